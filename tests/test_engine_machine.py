"""An engine's whole bookkeeping on one DraftCacheAllocator: arrivals that hit a prefix cache and arrivals that do not,
finishes that keep pages for the cache and finishes that do not, evictions, chain and tree steps through the methods
and through a DraftStepWrapper planned on the current rows (rows added and freed between its runs), and the misuse
the docs say is clamped on the device, in any order.

The other state machines test one feature each (``test_allocator.py``: chain drafts; ``test_prefix_cache.py``: the
prefix cache; ``test_tree.py``: tree drafts). This one mixes them as an engine does, with a host model of every
request (its committed tokens, which are the KV tags the simulated verify forward wrote, its allocated length, open
window, cache pages read and branch pages held) that predicts every result and every failure:

- the device lengths, windows, prefix lengths and branch page counts equal the model's after every call, and the
  free pages are exactly the pool less the pages of live requests, of the cache and of the branches;
- no slot is owned twice (rows, branches, cache and free ring disjoint; ``check_layout``), the padding page is never
  handed out, cache pages are never written or returned to the pool while cached, committed positions never move
  and read the KV of their tokens;
- pages are taken from the head of the free ring (in batch order, then position order, for a chain draft or a
  prefill) and released pages join its end;
- failures (OutOfSlotsError, ContextLengthError, OutOfRowsError, ValueError) change nothing.

The machine runs on the cpu (Triton's interpreter, one program after another) and also on a CUDA GPU and an Ascend NPU
(``pytest -m gpu`` / ``pytest -m npu``), where the kernels run concurrently: look-back, PDL, programs in parallel.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch
from conftest import SENTINEL, examples, sentinel_like
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_allocator import (
    assert_unchanged,
    branch_pages_of,
    check_layout,
    pages,
    patch_tiles,
    restore_tiles,
    snapshot,
)
from test_prefix_cache import ToyRadixCache
from test_tree import TREE_MANY_PROGRAMS, KVModel, check_branches, random_paths

import specdec_ops
from specdec_ops import backend
from specdec_ops.allocator import (
    ContextLengthError,
    DraftCacheAllocator,
    DraftStepWrapper,
    OutOfRowsError,
    OutOfSlotsError,
)

ERRORS = (ValueError, OutOfSlotsError, ContextLengthError, OutOfRowsError)
SYSTEM_TOKEN = 10**9  # system prompt tokens: apart from the fresh tags the KV model hands out
TAIL = 2  # sentinel elements past every output buffer the test gives


@dataclass
class Request:
    """The model of a live request."""

    tokens: list[int]  # committed tokens, which are also the KV tags of the committed positions
    alloc_len: int
    prefix_pages: list[int]  # pages of the cache it reads
    window: int = 0  # open draft window
    pending: list[int] = field(default_factory=list)  # KV tags the verify wrote at the open window's nodes
    held: int = 0  # branch pages
    slots: list[int] = field(default_factory=list)  # slots of the committed positions: never move
    owned: set[int] = field(default_factory=set)  # slots of [0, alloc_len): only grow


@dataclass
class Call:
    """One hot-path call (a method's or a DraftStepWrapper's), as the model sees it."""

    name: str
    batch: list[int]  # rows, in batch order; with rows as a tensor some may no longer be in use (stale)
    rows_kind: str  # "list", "int64", "int32" or "inference" (an int64 tensor made under torch.inference_mode)
    n: int | None = None  # the draft window (None: no draft)
    reserve: bool = False  # reserve_draft: no slots returned
    accept: list[int] | None = None  # accept lengths of a commit made first (None: no commit)
    accept_kind: str = "int64"  # "list", "int32" or "int64"
    index: torch.Tensor | None = None  # accept_index: the commit is a tree commit
    keep: bool = False  # keep_branches of the tree commit
    branches: tuple[int, int] | None = None  # (topk, num_steps) of the branches the call gives
    release: bool = False  # release_branches
    validate: bool = False


@dataclass
class Plan:
    """A DraftStepWrapper planned on the rows of its time."""

    step: DraftStepWrapper
    batch: list[int]
    rows_kind: str
    n: int
    accept: torch.Tensor
    index: torch.Tensor | None
    keep: bool
    branches: tuple[int, int] | None
    buffers: dict[str, torch.Tensor]
    validate: bool
    emit: bool


def path_nodes(path: list[int], accept: int, window: int, tree: int) -> list[int]:
    """The nodes a tree commit accepts (``commit_tree``'s docstring): ``accept`` clamped to ``[0, min(window, T)]``,
    cut at the first entry that is not a node of the window or not greater than the one before."""
    limit = min(max(accept, 0), window, tree)
    nodes: list[int] = []
    for node in path[:limit]:
        if not (0 <= node < min(window, tree)) or (nodes and node <= nodes[-1]):
            break
        nodes.append(node)
    return nodes


class EngineMachine(RuleBasedStateMachine):
    """Arrivals (with and without cache hits), finishes (keeping pages or not), evictions, chain and tree steps through
    the methods and through a plan, and clamped misuse, on one allocator."""

    PAGE_SIZE = 4
    NUM_PAGES = 36
    MAX_REQUESTS = 5
    MAX_CONTEXT_LEN = 64
    MAX_DRAFT = 6  # N of a chain window, T of a tree
    MAX_TOPK = 3
    MAX_STEPS = 6
    MAX_SUFFIX = 9
    MAX_ADD = 2
    SYSTEM_LENS = (9, 20, 33)

    # Launch constants of specdec_ops.allocator to shrink (many programs with few requests).
    TILES: dict[str, object] = {}

    # The allocator's device. Every tensor the machine gives the allocator (rows, accept lengths, paths, prompt and
    # prefix lengths, prefix and released slots, output buffers) is made there; the host model (the KV model, the
    # lists) stays on the cpu and reads the device through .tolist()/.cpu().
    DEVICE = "cpu"
    # The index dtypes the machine draws for the allocator's tensors and uses for output buffers: an NPU takes int64
    # only (checks.check_npu_dtypes).
    INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)

    @property
    def buffer_dtype(self) -> torch.dtype:
        return self.INDEX_DTYPES[0]

    def kinds(self, kinds: list[str]) -> list[str]:
        """``kinds`` of rows or accept lengths, without the int32 tensors of a device that takes none."""
        return [kind for kind in kinds if kind != "int32" or torch.int32 in self.INDEX_DTYPES]

    # -- setup ------------------------------------------------------------------------------------

    # Whether the CPU allocator answers as an NPU (backend.is_npu): its launch configurations, its dtype and page rules.
    AS_NPU = False

    @initialize(data=st.data())
    def start(self, data):
        self._saved_tiles = patch_tiles(self.TILES)
        if self.AS_NPU:
            self._is_npu = backend.is_npu
            backend.is_npu = lambda device: True
        p = self.PAGE_SIZE
        self.alloc = DraftCacheAllocator(
            self.NUM_PAGES * p, self.MAX_REQUESTS, self.MAX_CONTEXT_LEN, page_size=p, device=self.DEVICE
        )
        self.kv = KVModel(self.alloc)  # kv: the simulated KV buffer; committed[row] is reqs[row].tokens
        self.cache = ToyRadixCache(p)
        self.reqs: dict[int, Request] = {}
        self.free_stack = list(range(self.MAX_REQUESTS - 1, -1, -1))  # the allocator's free rows, top last
        self.plan: Plan | None = None
        # System prompts share their first tokens, so that one's pages are a prefix of another's.
        self.system_prompts = [[SYSTEM_TOKEN + i for i in range(n)] for n in self.SYSTEM_LENS]
        if data.draw(st.booleans(), label="warm cache"):
            self.warm_cache(data)
        self.arrive(data)

    def warm_cache(self, data):
        """Earlier requests served: one per system prompt arrives, commits its prompt and leaves its whole pages to
        the cache (the pages of one system prompt that repeat another's go back with release_slots)."""
        p = self.PAGE_SIZE
        prompts = [list(sp) + self.fresh(data.draw(st.integers(0, p), label="suffix")) for sp in self.system_prompts]
        prompts = prompts[: self.MAX_REQUESTS]
        rows = self.alloc.add_requests([len(t) for t in prompts]).tolist()
        self.admit(rows, prompts, [[] for _ in prompts], None)
        self.do_finish(data, rows, [len(t) // p * p for t in prompts], "list")

    # -- model ------------------------------------------------------------------------------------

    def fresh(self, n: int) -> list[int]:
        tags = list(range(self.kv.next_tag, self.kv.next_tag + n))
        self.kv.next_tag += n
        return tags

    def free_model(self) -> int:
        """The free pages the model predicts: the pool less live requests' own pages, branch pages and the cache."""
        p = self.PAGE_SIZE
        used = sum(pages(r.alloc_len, p) - len(r.prefix_pages) + r.held for r in self.reqs.values())
        return self.NUM_PAGES - used - len(self.cache.pages)

    def learn(self) -> None:
        """Committed positions never move; the slots a request owns only grow (page 1 tree commits permute the
        window's slots among its positions)."""
        table = self.alloc.req_to_token
        for row, req in self.reqs.items():
            slots = table[row, : req.alloc_len].tolist()
            assert slots[: len(req.slots)] == req.slots, f"row {row}: a committed position moved"
            assert req.owned <= set(slots), f"row {row}: lost slots {sorted(req.owned - set(slots))}"
            req.slots = slots[: len(req.tokens)]
            req.owned = set(slots)

    def write_kv(self, slots: list[int]) -> list[int]:
        """A forward pass writes a fresh tag at each slot; returns the tags."""
        tags = self.fresh(len(slots))
        if slots:
            self.kv.kv[torch.tensor(slots, dtype=torch.int64)] = torch.tensor(tags, dtype=torch.int64)
        return tags

    # -- drawing ----------------------------------------------------------------------------------

    def pick_rows(self, data, *, nonempty: bool = False, stale: bool = False) -> list[int]:
        """Rows in use in some order; ``stale``: sometimes with a row not in use among them (one freed, or never
        taken), as an engine's tensor of rows may hold: rows given as a list must raise, a tensor's are left as
        they are."""
        live = sorted(self.reqs)
        rows: list[int] = []
        if live:
            if data.draw(st.booleans(), label="every request"):
                rows = list(live)
                if data.draw(st.booleans(), label="shuffled"):
                    random.Random(data.draw(st.integers(0, 99), label="order")).shuffle(rows)
            else:
                rows = data.draw(st.lists(st.sampled_from(live), unique=True, min_size=int(nonempty)), label="rows")
        unused = [row for row in range(self.MAX_REQUESTS) if row not in self.reqs]
        if stale and unused and data.draw(st.integers(0, 3), label="stale row") == 0:
            row = data.draw(st.sampled_from(unused), label="stale")
            at = data.draw(st.integers(0, len(rows)), label="stale at")
            rows = rows[:at] + [row] + rows[at:]
        return rows

    def rows_arg(self, batch: list[int], kind: str):
        """Rows as a list, an int64 or int32 tensor, or an int64 tensor made under torch.inference_mode (which keeps
        no version counter, as engines' tensors)."""
        if kind == "list":
            return list(batch)
        if kind == "inference":
            with torch.inference_mode():
                return torch.tensor(batch, dtype=torch.int64, device=self.DEVICE)
        return torch.tensor(batch, dtype=getattr(torch, kind), device=self.DEVICE)

    def draw_kind(self, data, label: str) -> str:
        return data.draw(st.sampled_from(self.kinds(["list", "int64", "int32", "inference"])), label=label)

    def draw_validate(self, data) -> bool:
        return data.draw(st.sampled_from([False, False, False, True]), label="validate")

    def window_of(self, row: int) -> int:
        return self.reqs[row].window if row in self.reqs else 0

    def draw_accept(self, data, batch: list[int]) -> list[int]:
        """Accept lengths, mostly in the open windows; sometimes past them or negative (clamped on the device)."""
        values = []
        for row in batch:
            w = self.window_of(row)
            if data.draw(st.integers(0, 4), label="misuse") == 0:
                values.append(data.draw(st.sampled_from([-1, -(2**31), w + 1, w + 7, 2**31 - 1]), label="accept"))
            else:
                values.append(data.draw(st.integers(0, w), label="accept"))
        return values

    def draw_paths(self, data, batch: list[int], tree: int) -> tuple[torch.Tensor, list[int]]:
        """Accepted paths of the rows' open windows (``[bs, tree]``, lengths); sometimes bad ones, which the
        device cuts at the first bad entry."""
        rng = random.Random(data.draw(st.integers(0, 2**16), label="paths"))
        windows = [min(self.window_of(row), tree) for row in batch]
        index, lens = random_paths(rng, len(batch), tree, windows)
        if batch and data.draw(st.integers(0, 3), label="bad paths") == 0:
            i = rng.randrange(len(batch))
            how = data.draw(st.sampled_from(["long", "out of range", "unordered", "accept"]), label="bad path")
            if how == "long":
                lens[i] += rng.randint(1, 3)
            elif how == "out of range":
                index[i, rng.randrange(tree)] = rng.choice([-3, windows[i], tree, tree + 5, 2**30])
                lens[i] = max(lens[i], 1)
            elif how == "unordered" and lens[i] >= 2:
                m = rng.randrange(1, lens[i])
                index[i, m] = index[i, m - 1]
            else:
                lens[i] = rng.choice([-1, 2**31 - 1, windows[i] + 1])
        dtype = data.draw(st.sampled_from(self.INDEX_DTYPES), label="index dtype")
        return index.to(device=self.DEVICE, dtype=dtype), lens

    def draw_branches(self, data) -> tuple[int, int]:
        topk = data.draw(st.integers(1, self.MAX_TOPK), label="topk")
        return topk, data.draw(st.integers(1, self.MAX_STEPS), label="num_steps")

    # -- the model of a hot-path call -------------------------------------------------------------

    def predict(self, c: Call) -> tuple[set, dict[int, list[int]], dict[int, int], int]:
        """The outcomes allowed (``"ok"`` or exception types), the nodes each live row's commit accepts, the
        committed length each live row's draft starts from, and the pages the call takes from the pool."""
        p = self.PAGE_SIZE
        live = [row in self.reqs for row in c.batch]
        stale = not all(live)
        value_error = stale and (c.rows_kind == "list" or c.validate)  # rows checked on the host
        maybe_value_error = False
        nodes: dict[int, list[int]] = {}
        if c.accept is not None:
            tree = None if c.index is None else c.index.size(1)
            paths = None if c.index is None else c.index.tolist()
            for i, row in enumerate(c.batch):
                a = c.accept[i]
                if c.accept_kind == "list":
                    # Checked on the host against the window it knows, an upper bound of the row's (rows given as a
                    # tensor leave it one), and against a tree's T: a negative length or one past T always raises,
                    # one past the window may.
                    if a < 0 or (tree is not None and a > tree):
                        value_error = True
                    elif a > self.window_of(row):
                        maybe_value_error = True
                if not live[i]:
                    continue
                w = self.reqs[row].window
                if tree is None:
                    nodes[row] = list(range(min(max(a, 0), w)))
                    valid = 0 <= a <= w
                else:
                    nodes[row] = path_nodes(paths[i], a, w, tree)
                    valid = 0 <= a <= min(w, tree) and len(path_nodes(paths[i], a, w, tree)) == a
                if c.validate and not valid:
                    value_error = True
        starts = {row: len(self.reqs[row].tokens) + len(nodes.get(row, ())) for row in c.batch if row in self.reqs}
        error = None
        need = 0
        may_sync = c.n is not None or c.branches is not None
        if may_sync:
            if c.n is not None:
                if any(s + c.n > self.MAX_CONTEXT_LEN for s in starts.values()):
                    error = ContextLengthError
                need = sum(max(pages(s + c.n, p) - pages(self.reqs[row].alloc_len, p), 0) for row, s in starts.items())
            if c.branches is not None:
                topk, steps = c.branches
                for row, s in starts.items():
                    branch_need = topk * pages(s % p + steps, p)
                    need += 0 if self.reqs[row].held == branch_need else branch_need  # held as many: kept
            if error is None and need > self.free_model():  # the pops never see the pages the call releases
                error = OutOfSlotsError
        if value_error:
            allowed = {ValueError}
        else:
            allowed = {error or "ok"}
            # A sync (only near capacity, which the model cannot tell) reads the rows back: stale ones raise.
            if maybe_value_error or (stale and may_sync):
                allowed.add(ValueError)
        return allowed, nodes, starts, need

    def execute(self, c: Call, thunk) -> dict | None:
        """Run ``thunk`` (the call), check its outcome against the model, and apply it to the model."""
        allowed, nodes, starts, need = self.predict(c)
        before = snapshot(self.alloc)
        free_before = self.alloc.free_page_list()
        try:
            result = thunk()
        except ERRORS as e:
            assert type(e) in allowed, f"{c.name} raised {type(e).__name__}: {e}; expected {allowed}"
            assert_unchanged(self.alloc, before)
            event(f"{c.name}: {type(e).__name__}")
            return None
        assert "ok" in allowed, f"{c.name} went through; expected {allowed}"
        event(f"{c.name}: ok")
        owned_before = {row: {slot // self.PAGE_SIZE for slot in req.owned} for row, req in self.reqs.items()}
        self.apply(c, nodes, starts, result)
        # The pages taken are the first of the free ring (FIFO): for a chain draft in batch order, then position
        # order; a tree draft takes each request's window pages, then its branch pages.
        p = self.PAGE_SIZE
        table = self.alloc.req_to_token
        branches_after = branch_pages_of(self.alloc)
        taken: list[int] = []
        for row in dict.fromkeys(c.batch):
            if row not in self.reqs:
                continue
            slots = table[row, : self.reqs[row].alloc_len].tolist()
            taken += [page for page in dict.fromkeys(slot // p for slot in slots) if page not in owned_before[row]]
            held_before = before["branch_pages"][row, : int(before["num_branch_pages"][row])].tolist()
            if branches_after.get(row, []) != held_before:
                taken += branches_after.get(row, [])
        assert len(taken) == need, f"{c.name}: took {len(taken)} pages, expected {need}"
        if c.branches is None:
            assert taken == free_before[:need], f"{c.name}: pages not taken from the head of the ring in order"
        else:
            assert sorted(taken) == sorted(free_before[:need]), f"{c.name}: pages not taken from the head of the ring"
        self.learn()
        return result

    def apply(self, c: Call, nodes: dict[int, list[int]], starts: dict[int, int], result: dict) -> None:
        p = self.PAGE_SIZE
        bs = len(c.batch)
        live = [i for i, row in enumerate(c.batch) if row in self.reqs]
        stale = [i for i in range(bs) if i not in live]
        # The commit: accepted nodes become committed positions.
        if c.accept is not None:
            if c.index is not None:
                kv_src, kv_dst = result["kv"]
                tree = c.index.size(1)
                assert kv_src.shape == kv_dst.shape == (bs * tree,)
                if stale:
                    assert not kv_src.view(bs, tree)[stale].any() and not kv_dst.view(bs, tree)[stale].any()
                if p == 1:
                    assert torch.equal(kv_src, kv_dst), "page 1: the window is re-pointed, nothing copied"
                self.kv.apply(kv_src, kv_dst)
            for i in live:
                req = self.reqs[c.batch[i]]
                req.tokens += [req.pending[j] for j in nodes[c.batch[i]]]
                req.window, req.pending = 0, []
                if c.index is None or not c.keep:
                    req.held = 0  # a chain commit, or a tree commit without keep_branches, releases them
        # The draft: positions [start, start + N) own slots, returned in batch order; the verify writes their KV.
        if c.n is not None:
            n = c.n
            table = self.alloc.req_to_token
            if c.reserve:  # the engine reads the slots itself (a stale row is out of range: -1, as the draft gives)
                rows_t = torch.tensor(
                    [row if row in self.reqs else self.MAX_REQUESTS for row in c.batch],
                    dtype=torch.int64,
                    device=self.DEVICE,
                )
                start_t = torch.tensor([starts.get(row, 0) for row in c.batch], dtype=torch.int64, device=self.DEVICE)
                out, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
                    table, rows_t, start_t, start_t + n, window_len=n
                )
            else:
                out, last = result["draft"]
            assert out.shape == (bs * n,) and last.shape == (bs,)
            out, last = out.tolist(), last.tolist()
            for i in stale:
                assert out[i * n : (i + 1) * n] == [-1] * n and last[i] == -1, "a stale row's outputs"
            for i in live:
                row = c.batch[i]
                req, s = self.reqs[row], starts[row]
                assert len(req.tokens) == s
                req.alloc_len = max(req.alloc_len, s + n)
                req.window = n
                slots = table[row, : req.alloc_len].tolist()
                assert out[i * n : (i + 1) * n] == slots[s : s + n], f"row {row}: out_cache_loc"
                assert last[i] == (slots[s - 1] if s else -1), f"row {row}: last_loc"
                req.pending = self.write_kv(slots[s : s + n])
                if c.branches is None:
                    req.held = 0  # a chain draft releases the branch pages
        # The branches: slots on pages of their own, the partial page copied; then the draft model writes them.
        if c.branches is not None:
            topk, steps = c.branches
            slots, copy_src, copy_dst = result["branches"]
            assert slots.shape == (bs, topk, steps)
            assert copy_src.shape == copy_dst.shape == (bs * topk * (p - 1),)
            for i in live:
                req = self.reqs[c.batch[i]]
                req.held = topk * pages(len(req.tokens) % p + steps, p)
            if stale:
                assert not slots[stale].any(), "a stale row's branch slots"
                assert not copy_src.view(bs, -1)[stale].any() and not copy_dst.view(bs, -1)[stale].any()
            live_rows = [c.batch[i] for i in live]
            check_branches(self.alloc, live_rows, topk, steps, slots[live], copy_src, copy_dst, self.kv)
            self.write_kv(slots[live].reshape(-1).tolist())
        if c.release:
            for i in live:
                self.reqs[c.batch[i]].held = 0

    # -- calls through the methods ----------------------------------------------------------------

    def method(self, c: Call, buffers: bool):
        """The thunk of ``c`` through the allocator's method (``buffers``: output buffers of ``buffer_dtype`` with a
        sentinel tail, which must stay untouched)."""
        alloc, p = self.alloc, self.PAGE_SIZE
        bs = len(c.batch)
        rows = self.rows_arg(c.batch, c.rows_kind)
        accept = None
        if c.accept is not None:
            if c.accept_kind == "list":
                accept = c.accept
            else:
                accept = torch.tensor(c.accept, dtype=getattr(torch, c.accept_kind), device=self.DEVICE)
        bufs: dict[str, torch.Tensor] = {}
        if buffers:
            if c.n is not None and not c.reserve:
                bufs["out_cache_loc"] = sentinel_like(bs * c.n + TAIL, self.buffer_dtype, self.DEVICE)
                bufs["last_loc"] = sentinel_like(bs, self.buffer_dtype, self.DEVICE)
            if c.branches is not None:
                topk, steps = c.branches
                name = "out" if c.name == "alloc_branches" else "branch_slots"
                bufs[name] = sentinel_like(bs * topk * steps + TAIL, self.buffer_dtype, self.DEVICE)
                if p > 1:
                    bufs["copy_src"] = sentinel_like(bs * topk * (p - 1) + TAIL, self.buffer_dtype, self.DEVICE)
                    bufs["copy_dst"] = sentinel_like(bs * topk * (p - 1) + TAIL, self.buffer_dtype, self.DEVICE)
            if c.index is not None:
                bufs["kv_src"] = sentinel_like(bs * c.index.size(1) + TAIL, self.buffer_dtype, self.DEVICE)
                bufs["kv_dst"] = sentinel_like(bs * c.index.size(1) + TAIL, self.buffer_dtype, self.DEVICE)
        v = c.validate

        def call():
            if c.name == "alloc_draft":
                res = {"draft": alloc.alloc_draft(rows, c.n, validate=v, **bufs)}
            elif c.name == "reserve_draft":
                alloc.reserve_draft(rows, c.n, validate=v)
                res = {}
            elif c.name == "commit":
                assert alloc.commit(rows, accept, validate=v) is None
                res = {}
            elif c.name == "commit_and_draft":
                res = {"draft": alloc.commit_and_draft(rows, accept, c.n, validate=v, **bufs)}
            elif c.name == "alloc_branches":
                res = {"branches": alloc.alloc_branches(rows, *c.branches, return_copies=True, validate=v, **bufs)}
            elif c.name == "alloc_tree_draft":
                got = alloc.alloc_tree_draft(rows, c.n, *c.branches, validate=v, **bufs)
                res = {"draft": got[:2], "branches": got[2:]}
            elif c.name == "commit_tree":
                res = {"kv": alloc.commit_tree(rows, c.index, accept, keep_branches=c.keep, validate=v, **bufs)}
            elif c.name == "commit_tree_and_draft":
                got = alloc.commit_tree_and_draft(rows, c.index, accept, c.n, *c.branches, validate=v, **bufs)
                res = {"kv": got[:2], "draft": got[2:4], "branches": got[4:]}
            elif c.name == "release_branches":
                alloc.release_branches(rows, validate=v)
                res = {}
            else:  # pragma: no cover
                raise AssertionError(c.name)
            for name, buf in bufs.items():
                assert buf[buf.numel() - TAIL :].tolist() == [SENTINEL] * TAIL or name == "last_loc", (
                    f"{c.name} wrote past its output in {name}"
                )
            return res

        return call

    def call(self, data, name: str, batch: list[int], **kwargs) -> dict | None:
        c = Call(name, batch, kwargs.pop("rows_kind", None) or self.draw_kind(data, "rows as"), **kwargs)
        if c.accept is not None and c.index is None and "accept_kind" not in kwargs:
            c.accept_kind = data.draw(st.sampled_from(self.kinds(["list", "int64", "int32"])), label="accept as")
        if c.accept is not None and c.index is not None and "accept_kind" not in kwargs:
            c.accept_kind = data.draw(st.sampled_from(self.kinds(["int64", "int32", "list"])), label="accept as")
        buffers = data.draw(st.booleans(), label="buffers")
        return self.execute(c, self.method(c, buffers))

    # -- rules: requests ----------------------------------------------------------------------------

    @rule(data=st.data())
    def arrive(self, data):
        """New requests, matching the cache (whole pages of their prompt) or not; out of slots, the cache evicts
        what no live request reads (sparing the pages the arrivals matched) and the arrivals try again."""
        p = self.PAGE_SIZE
        k = data.draw(st.integers(1, self.MAX_ADD), label="arrivals")
        prompts, hits = [], []
        for _ in range(k):
            system = data.draw(st.sampled_from([None, *range(len(self.system_prompts))]), label="system prompt")
            tokens = ([] if system is None else list(self.system_prompts[system])) + self.fresh(
                data.draw(st.integers(0, self.MAX_SUFFIX), label="suffix")
            )
            if data.draw(st.integers(0, 19), label="too long") == 0:
                tokens += self.fresh(self.MAX_CONTEXT_LEN)
            use = data.draw(st.sampled_from([True, True, True, False]), label="use the cache")
            hit = self.cache.match(tokens, len(tokens)) if use else []
            hit = hit[: data.draw(st.integers(0, len(hit)), label="pages used")] if hit else hit
            prompts.append(tokens)
            hits.append(hit)
        lens = [len(t) for t in prompts]
        with_prefix = any(hits) or data.draw(st.booleans(), label="prefix arguments")
        width = max([len(h) * p for h in hits] + [1])
        prefix_slots = torch.full((k, width), 12345, dtype=torch.int64, device=self.DEVICE)  # past each prefix: ignored
        for i, hit in enumerate(hits):
            for m, page in enumerate(hit):
                prefix_slots[i, m * p : (m + 1) * p] = torch.arange(page * p, (page + 1) * p, device=self.DEVICE)
        prefix_slots = prefix_slots.to(data.draw(st.sampled_from(self.INDEX_DTYPES), label="slots dtype"))
        prefix_lens = [len(h) * p for h in hits]
        as_list = data.draw(st.booleans(), label="lens as list")

        def call():
            arg = lens if as_list else torch.tensor(lens, device=self.DEVICE)
            if not with_prefix:
                return self.alloc.add_requests(arg)
            plens = prefix_lens if as_list else torch.tensor(prefix_lens, dtype=torch.int32, device=self.DEVICE)
            return self.alloc.add_requests(arg, prefix_slots=prefix_slots, prefix_lens=plens)

        def expected():
            if k > len(self.free_stack):
                return OutOfRowsError
            if max(lens) > self.MAX_CONTEXT_LEN:
                return ContextLengthError
            if sum(pages(n, p) - len(h) for n, h in zip(lens, hits)) > self.free_model():
                return OutOfSlotsError
            return None

        error = expected()
        if error is OutOfSlotsError and data.draw(st.booleans(), label="evict first"):
            before = snapshot(self.alloc)
            with pytest.raises(OutOfSlotsError):
                call()
            assert_unchanged(self.alloc, before)
            need = sum(pages(n, p) - len(h) for n, h in zip(lens, hits))
            self.evict_until(need, locked=[page for h in hits for page in h])
            error = expected()
            event(f"arrive: evicted, then {error.__name__ if error else 'ok'}")
        if error is not None:
            before = snapshot(self.alloc)
            with pytest.raises(error):
                call()
            assert_unchanged(self.alloc, before)
            event(f"arrive: {error.__name__}")
            return
        free_before = self.alloc.free_page_list()
        rows = call().tolist()
        self.admit(rows, prompts, hits, prefix_slots)
        taken = [slot // p for row, hit in zip(rows, hits) for slot in self.reqs[row].slots[len(hit) * p :: p]]
        assert taken == free_before[: len(taken)], "a prefill takes the head of the ring, in batch order"
        event(f"arrive: ok, {sum(map(len, hits))} cached pages")

    def admit(self, rows, prompts, hits, prefix_slots) -> None:
        """The model of requests add_requests took: the rows handed out, the prefix on the cache's pages (which
        hold its KV), the prefill's KV."""
        p = self.PAGE_SIZE
        k = len(rows)
        assert rows == self.free_stack[::-1][:k], "new requests take the rows freed last, in order"
        del self.free_stack[len(self.free_stack) - k :]
        table = self.alloc.req_to_token
        for i, (row, tokens, hit) in enumerate(zip(rows, prompts, hits)):
            n, plen = len(tokens), len(hit) * p
            slots = table[row, :n].tolist()
            if plen:
                assert slots[:plen] == prefix_slots[i, :plen].tolist(), "the prefix is the cache's pages"
            # The cache's pages hold the prefix's KV; the prefill writes the rest.
            assert self.kv.kv[torch.tensor(slots[:plen], dtype=torch.int64)].tolist() == tokens[:plen]
            if n > plen:
                self.kv.kv[torch.tensor(slots[plen:], dtype=torch.int64)] = torch.tensor(tokens[plen:])
            self.reqs[row] = Request(tokens=tokens, alloc_len=n, prefix_pages=list(hit))
            self.kv.committed[row] = self.reqs[row].tokens
            self.cache.readers.update(hit)
        self.learn()

    @precondition(lambda self: getattr(self, "reqs", None))
    @rule(data=st.data())
    def finish(self, data):
        """Finished requests: their committed whole pages go to the cache (the duplicates of pages it has go back
        with release_slots) or all their pages to the pool."""
        p = self.PAGE_SIZE
        rows = self.pick_rows(data, nonempty=True)
        keep = None
        if data.draw(st.booleans(), label="keep pages"):
            keep = [data.draw(st.integers(0, len(self.reqs[r].tokens) // p), label="kept pages") * p for r in rows]
            if data.draw(st.integers(0, 5), label="bad keep") == 0:  # past the committed length, or not whole pages
                i = data.draw(st.integers(0, len(rows) - 1), label="bad keep row")
                bad = [len(self.reqs[rows[i]].tokens) // p * p + p] + ([keep[i] + 1] if p > 1 else [])
                keep[i] = data.draw(st.sampled_from(bad), label="bad keep length")
                before = snapshot(self.alloc)
                with pytest.raises(ValueError):
                    self.alloc.free_requests(rows, keep_lens=keep)
                assert_unchanged(self.alloc, before)
                event("finish: bad keep_lens")
                return
        self.do_finish(data, rows, keep, self.draw_kind(data, "rows as"))

    def do_finish(self, data, rows: list[int], keep: list[int] | None, kind: str) -> None:
        p = self.PAGE_SIZE
        kept = self.alloc.free_requests(self.rows_arg(rows, kind), keep_lens=keep).tolist()
        assert len(kept) == sum(keep or [])
        duplicates = []
        offset = 0
        for i, row in enumerate(rows):
            req = self.reqs.pop(row)
            del self.kv.committed[row]
            self.cache.readers.subtract(req.prefix_pages)
            if keep is None:
                continue
            mine = kept[offset : offset + keep[i]]
            offset += keep[i]
            assert mine == req.slots[: keep[i]], f"row {row}: kept slots"
            duplicates += self.cache.insert(req.tokens, mine)
        self.free_stack.extend(reversed(rows))
        event(f"finish: {'kept' if keep else 'no keep'}, {len(duplicates)} duplicates")
        if duplicates:
            self.release_pages(data, [slot // p for slot in duplicates], by_full_list=False)
        self.learn()

    def release_pages(self, data, pages_: list[int], by_full_list: bool) -> None:
        """release_slots of ``pages_`` (pages the allocator's cache owns and the toy cache no longer holds): by one
        slot each or by every slot, as a list or a tensor; they join the free pages."""
        p = self.PAGE_SIZE
        if by_full_list:
            slots = [page * p + q for page in pages_ for q in range(p)]
        else:
            slots = [page * p + data.draw(st.integers(0, p - 1), label="slot of page") for page in pages_]
        free = self.alloc.free_page_list()
        as_list = data.draw(st.booleans(), label="slots as list")
        self.alloc.release_slots(slots if as_list else torch.tensor(slots, device=self.DEVICE))
        assert self.alloc.free_page_list() == free + list(dict.fromkeys(pages_)), "released pages join the end"
        assert not set(pages_) & set(self.alloc.cached_pages())

    def evict_until(self, need: int, locked: list[int] = ()) -> None:
        """Evict leaves of the cache that no live request reads until ``need`` pages are free (or none is left),
        sparing ``locked``."""
        self.cache.readers.update(locked)
        try:
            while self.free_model() < need:
                keys = self.cache.evictable()
                if not keys:
                    break
                page = self.cache.pages.pop(keys[0])
                self.alloc.release_slots([page * self.PAGE_SIZE])
        finally:
            self.cache.readers.subtract(locked)

    @precondition(lambda self: hasattr(self, "cache") and self.cache.pages)
    @rule(data=st.data())
    def evict(self, data):
        """The cache evicts leaves no live request reads: always when the pool is low, else sometimes."""
        low = self.free_model() < self.NUM_PAGES // 4
        keys = self.cache.evictable()
        if not keys or not (low or data.draw(st.booleans(), label="evict anyway")):
            return
        chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, min_size=1), label="keys")
        # A key whose extension is also chosen is a leaf once the extension goes: evict children first.
        chosen.sort(key=len, reverse=True)
        page_list = []
        for key in chosen:
            if key in self.cache.pages and key in self.cache.evictable():
                page_list.append(self.cache.pages.pop(key))
        if page_list:
            event(f"evict: {'low' if low else 'anyway'}")
            self.release_pages(data, page_list, by_full_list=data.draw(st.booleans(), label="by full list"))

    @rule()
    def poll(self):
        """The engine reads the free slots (a sync, which tightens the host bound)."""
        assert self.alloc.num_free_slots() == self.free_model() * self.PAGE_SIZE
        assert self.alloc.num_cached_slots() == len(self.cache.pages) * self.PAGE_SIZE

    # -- rules: chain steps ---------------------------------------------------------------------------

    @rule(data=st.data())
    def chain_draft(self, data):
        rows = self.pick_rows(data, stale=True)
        n = data.draw(st.integers(0, self.MAX_DRAFT), label="N")
        name = data.draw(st.sampled_from(["alloc_draft", "alloc_draft", "reserve_draft"]), label="draft")
        self.call(data, name, rows, n=n, reserve=name == "reserve_draft", validate=self.draw_validate(data))

    @rule(data=st.data())
    def chain_commit(self, data):
        """A commit: within the windows, past them, negative, with no window open (clamped on the device)."""
        rows = self.pick_rows(data, stale=True)
        self.call(data, "commit", rows, accept=self.draw_accept(data, rows), validate=self.draw_validate(data))

    @rule(data=st.data())
    def chain_step(self, data):
        """alloc_draft, verify, commit; or commit_and_draft after it; out of slots, the cache evicts and the step
        tries again; sometimes a second commit of the same lengths, which commits nothing."""
        rows = self.pick_rows(data, stale=True)
        n = data.draw(st.integers(1, self.MAX_DRAFT), label="N")
        got = self.call(data, "alloc_draft", rows, n=n)
        if got is None and self.cache.pages and data.draw(st.booleans(), label="evict and retry"):
            self.evict_until(self.NUM_PAGES)
            got = self.call(data, "alloc_draft", rows, n=n)
        if got is None:
            return
        accept = self.draw_accept(data, rows)
        if data.draw(st.booleans(), label="commit_and_draft"):
            n2 = data.draw(st.integers(0, self.MAX_DRAFT), label="next N")
            self.call(data, "commit_and_draft", rows, n=n2, accept=accept)
        else:
            first = self.call(data, "commit", rows, accept=accept)
            if first is not None and data.draw(st.booleans(), label="commit twice"):
                before = {r: len(req.tokens) for r, req in self.reqs.items()}
                self.call(data, "commit", rows, accept=accept, accept_kind="int64")
                assert {r: len(req.tokens) for r, req in self.reqs.items()} == before
                event("chain_step: double commit")

    @rule(data=st.data())
    def commit_and_draft(self, data):
        rows = self.pick_rows(data, stale=True)
        accept = self.draw_accept(data, rows)
        n = data.draw(st.integers(0, self.MAX_DRAFT), label="N")
        self.call(data, "commit_and_draft", rows, n=n, accept=accept, validate=self.draw_validate(data))

    # -- rules: tree steps ----------------------------------------------------------------------------

    @rule(data=st.data())
    def tree_draft(self, data):
        rows = self.pick_rows(data, stale=True)
        tree = data.draw(st.integers(1, self.MAX_DRAFT), label="T")
        self.call(
            data, "alloc_tree_draft", rows, n=tree, branches=self.draw_branches(data), validate=self.draw_validate(data)
        )

    @rule(data=st.data())
    def branches(self, data):
        rows = self.pick_rows(data, stale=True)
        self.call(data, "alloc_branches", rows, branches=self.draw_branches(data), validate=self.draw_validate(data))

    @rule(data=st.data())
    def tree_commit(self, data):
        rows = self.pick_rows(data, stale=True)
        tree = data.draw(st.integers(1, self.MAX_DRAFT), label="T")
        index, lens = self.draw_paths(data, rows, tree)
        keep = data.draw(st.booleans(), label="keep_branches")
        self.call(data, "commit_tree", rows, index=index, accept=lens, keep=keep, validate=self.draw_validate(data))

    @rule(data=st.data())
    def commit_tree_and_draft(self, data):
        rows = self.pick_rows(data, stale=True)
        tree = data.draw(st.integers(1, self.MAX_DRAFT), label="T")
        index, lens = self.draw_paths(data, rows, tree)
        next_tree = data.draw(st.integers(1, self.MAX_DRAFT), label="next T")
        self.call(
            data,
            "commit_tree_and_draft",
            rows,
            n=next_tree,
            index=index,
            accept=lens,
            keep=True,
            branches=self.draw_branches(data),
            validate=self.draw_validate(data),
        )

    @rule(data=st.data())
    def tree_step(self, data):
        """A whole tree step: alloc_tree_draft + commit_tree; alloc_branches + alloc_draft + commit_tree; or
        alloc_tree_draft, then commit_tree_and_draft and commit_tree of the new tree."""
        rows = self.pick_rows(data, stale=True)
        tree = data.draw(st.integers(1, self.MAX_DRAFT), label="T")
        branches = self.draw_branches(data)
        how = data.draw(st.sampled_from(["tree draft", "branches", "one call"]), label="tree step")
        if how == "branches":
            self.call(data, "alloc_branches", rows, branches=branches)
            got = self.call(data, "alloc_draft", rows, n=tree)
        else:
            got = self.call(data, "alloc_tree_draft", rows, n=tree, branches=branches)
        if got is None:
            return
        index, lens = self.draw_paths(data, rows, tree)
        if how == "one call":
            next_tree = data.draw(st.integers(1, self.MAX_DRAFT), label="next T")
            args = dict(index=index, accept=lens, keep=True, branches=branches)
            if self.call(data, "commit_tree_and_draft", rows, n=next_tree, **args) is not None:
                tree = next_tree
                index, lens = self.draw_paths(data, rows, tree)
        keep = data.draw(st.booleans(), label="keep_branches")
        self.call(data, "commit_tree", rows, index=index, accept=lens, keep=keep)

    @rule(data=st.data())
    def release(self, data):
        self.call(
            data, "release_branches", self.pick_rows(data, stale=True), release=True, validate=self.draw_validate(data)
        )

    # -- rules: plan/run ------------------------------------------------------------------------------

    @precondition(lambda self: getattr(self, "reqs", None))
    @rule(data=st.data())
    def plan_step(self, data):
        """A DraftStepWrapper planned on some of the current rows, for chain steps or tree steps."""
        p = self.PAGE_SIZE
        rows = self.pick_rows(data, nonempty=True)
        bs = len(rows)
        kind = self.draw_kind(data, "plan rows as")
        n = data.draw(st.integers(1, self.MAX_DRAFT), label="plan N")
        tree = data.draw(st.booleans(), label="tree plan")
        branches = self.draw_branches(data) if tree or data.draw(st.booleans(), label="branches") else None
        keep = tree and data.draw(st.booleans(), label="plan keep_branches")
        emit = tree or data.draw(st.sampled_from([True, True, False]), label="emit")  # emit=False: reserve_draft()
        accept_dtype = data.draw(st.sampled_from(self.INDEX_DTYPES), label="accept dtype")
        accept = torch.zeros(bs, dtype=accept_dtype, device=self.DEVICE)
        index = torch.zeros(bs, n, dtype=torch.int64, device=self.DEVICE) if tree else None
        buffers: dict[str, torch.Tensor] = {}
        if data.draw(st.booleans(), label="plan buffers"):
            if emit:
                buffers["out_cache_loc"] = sentinel_like(bs * n + TAIL, self.buffer_dtype, self.DEVICE)
                buffers["last_loc"] = sentinel_like(bs, self.buffer_dtype, self.DEVICE)
            if tree:
                buffers["kv_src"] = sentinel_like(bs * n + TAIL, self.buffer_dtype, self.DEVICE)
                buffers["kv_dst"] = sentinel_like(bs * n + TAIL, self.buffer_dtype, self.DEVICE)
            if branches is not None:
                buffers["branch_slots"] = sentinel_like(
                    bs * branches[0] * branches[1] + TAIL, self.buffer_dtype, self.DEVICE
                )
                if p > 1:
                    buffers["copy_src"] = sentinel_like(
                        bs * branches[0] * (p - 1) + TAIL, self.buffer_dtype, self.DEVICE
                    )
                    buffers["copy_dst"] = sentinel_like(
                        bs * branches[0] * (p - 1) + TAIL, self.buffer_dtype, self.DEVICE
                    )
        validate = data.draw(st.sampled_from([False] * 5 + [True]), label="plan validate")
        step = DraftStepWrapper(self.alloc)
        before = snapshot(self.alloc)
        step.plan(
            self.rows_arg(rows, kind),
            n,
            accept_lens=accept,
            emit=emit,
            accept_index=index,
            keep_branches=keep,
            topk=None if branches is None else branches[0],
            num_steps=None if branches is None else branches[1],
            validate=validate,
            **buffers,
        )
        assert_unchanged(self.alloc, before)  # a plan changes nothing
        self.plan = Plan(step, rows, kind, n, accept, index, keep, branches, buffers, validate, emit)
        event(f"plan: {'tree' if tree else 'chain'}{' + branches' if branches else ''}, rows as {kind}, emit {emit}")

    def run(self, data, name: str, c: Call, call) -> dict | None:
        """One run of the plan: the bound buffers refilled with the sentinel first (in place), then the call."""
        pl = self.plan
        for buf in pl.buffers.values():
            buf.fill_(SENTINEL)

        def thunk():
            got = call()
            for key, buf in pl.buffers.items():
                if key != "last_loc":
                    assert buf[buf.numel() - TAIL :].tolist() == [SENTINEL] * TAIL, f"{name} wrote past {key}"
            return got

        return self.execute(c, thunk)

    @precondition(lambda self: getattr(self, "plan", None) is not None)
    @rule(data=st.data())
    def run_plan(self, data):
        """A few steps of the plan on the rows of its time: rows since freed raise (rows as a list) or are stale
        (rows as a tensor, left as they are); rows taken again by new requests are those requests'."""
        pl = self.plan
        step = pl.step
        modes = ["draft+commit"]
        if pl.index is None and pl.emit:
            modes.append("commit_and_draft")
        if pl.branches is not None:
            modes.append("branches+draft+commit")
            if pl.index is not None:
                modes += ["tree draft+commit", "commit_tree_and_draft"]
        if any(row not in self.reqs for row in pl.batch):
            event(f"run_plan: rows freed since the plan, rows as {pl.rows_kind}")
        base = dict(rows_kind=pl.rows_kind, validate=pl.validate)
        batch = pl.batch
        for _ in range(data.draw(st.integers(1, 3), label="runs")):
            mode = data.draw(st.sampled_from(modes), label="run")

            def write_commit() -> dict:
                """The accept lengths (and paths) of the current windows, written in place."""
                if pl.index is None:
                    values = self.draw_accept(data, batch)
                    pl.accept.copy_(torch.tensor(values, device=self.DEVICE))
                    return dict(accept=values, accept_kind=str(pl.accept.dtype).removeprefix("torch."))
                index, lens = self.draw_paths(data, batch, pl.n)
                lens = [max(min(a, 2**31 - 1), -(2**31)) for a in lens]
                pl.index.copy_(index)
                pl.accept.copy_(torch.tensor(lens, device=self.DEVICE))
                kind = str(pl.accept.dtype).removeprefix("torch.")
                return dict(accept=lens, accept_kind=kind, index=pl.index.clone(), keep=pl.keep)

            def commit():
                res = step.commit()
                return {} if pl.index is None else {"kv": res}

            if mode == "commit_and_draft":
                args = write_commit()
                c = Call("plan.commit_and_draft", batch, n=pl.n, **args, **base)
                self.run(data, mode, c, lambda: {"draft": step.commit_and_draft()})
                continue
            if mode == "commit_tree_and_draft":
                args = write_commit()
                args["keep"] = True
                c = Call("plan.commit_tree_and_draft", batch, n=pl.n, branches=pl.branches, **args, **base)

                def both():
                    got = step.commit_tree_and_draft()
                    return {"kv": got[:2], "draft": got[2:4], "branches": got[4:]}

                self.run(data, mode, c, both)
                continue
            if mode == "branches+draft+commit":
                c = Call("plan.alloc_branches", batch, branches=pl.branches, **base)
                self.run(data, mode, c, lambda: {"branches": step.alloc_branches()})
            if mode == "tree draft+commit":
                c = Call("plan.alloc_tree_draft", batch, n=pl.n, branches=pl.branches, **base)

                def tree_draft():
                    got = step.alloc_tree_draft()
                    return {"draft": got[:2], "branches": got[2:]}

                self.run(data, mode, c, tree_draft)
            elif pl.emit:
                c = Call("plan.alloc_draft", batch, n=pl.n, **base)
                self.run(data, mode, c, lambda: {"draft": step.alloc_draft()})
            else:
                c = Call("plan.reserve_draft", batch, n=pl.n, reserve=True, **base)
                self.run(data, mode, c, lambda: step.reserve_draft() or {})
            args = write_commit()
            self.run(data, mode, Call("plan.commit", batch, **args, **base), commit)

    # -- rules: misuse that raises ----------------------------------------------------------------------

    @rule(data=st.data())
    def misuse(self, data):
        """Calls the allocator refuses on the host: each raises ValueError and changes nothing."""
        p = self.PAGE_SIZE
        how = data.draw(
            st.sampled_from(
                [
                    "release a page a live request reads",
                    "release a live request's page",
                    "release a free page",
                    "release the padding page",
                    "release a branch page",
                    "prefix on a page the cache does not own",
                    "keep past the committed length",
                    "negative accept length as a list",
                ]
            ),
            label="misuse",
        )
        alloc = self.alloc
        call = None
        if how == "release a page a live request reads":
            read = sorted(page for page, n in self.cache.readers.items() if n > 0)
            if read:
                page = data.draw(st.sampled_from(read), label="page")
                call = lambda: alloc.release_slots([page * p])  # noqa: E731
        elif how == "release a live request's page":
            own = sorted(
                {slot // p for row, req in self.reqs.items() for slot in req.owned} - set(self.cache.pages.values())
            )
            if own:
                page = data.draw(st.sampled_from(own), label="page")
                call = lambda: alloc.release_slots([page * p + p - 1])  # noqa: E731
        elif how == "release a free page":
            free = alloc.free_page_list()
            if free:
                page = data.draw(st.sampled_from(free), label="page")
                call = lambda: alloc.release_slots(torch.tensor([page * p], device=self.DEVICE))  # noqa: E731
        elif how == "release the padding page":
            call = lambda: alloc.release_slots([data.draw(st.integers(0, p - 1), label="slot")])  # noqa: E731
        elif how == "release a branch page":
            held = sorted(page for row_pages in branch_pages_of(alloc).values() for page in row_pages)
            if held:
                page = data.draw(st.sampled_from(held), label="page")
                call = lambda: alloc.release_slots([page * p])  # noqa: E731
        elif how == "prefix on a page the cache does not own" and self.free_stack:
            # (with every row in use add_requests raises OutOfRowsError first, before it reads any value)
            free = alloc.free_page_list()
            if free:
                page = data.draw(st.sampled_from(free), label="page")
                slots = torch.arange(page * p, (page + 1) * p, device=self.DEVICE)[None, :]
                call = lambda: alloc.add_requests([p + 1], prefix_slots=slots, prefix_lens=[p])  # noqa: E731
        elif how == "keep past the committed length" and self.reqs:
            row = data.draw(st.sampled_from(sorted(self.reqs)), label="row")
            keep = len(self.reqs[row].tokens) // p * p + p
            call = lambda: alloc.free_requests([row], keep_lens=[keep])  # noqa: E731
        elif how == "negative accept length as a list" and self.reqs:
            row = data.draw(st.sampled_from(sorted(self.reqs)), label="row")
            call = lambda: alloc.commit([row], [-1])  # noqa: E731
        if call is None:
            return
        before = snapshot(alloc)
        with pytest.raises(ValueError):
            call()
        assert_unchanged(alloc, before)
        event(f"misuse: {how}")

    # -- invariants and teardown ------------------------------------------------------------------

    @invariant()
    def consistent(self):
        if not hasattr(self, "alloc"):
            return
        alloc, p = self.alloc, self.PAGE_SIZE
        owned = check_layout(alloc, ask_free_slots=False)
        assert sorted(owned) == sorted(self.reqs) == alloc.rows_in_use()
        assert int(alloc.num_free_pages) == self.free_model(), "free pages: the pool less everything owned"
        assert alloc.cached_pages() == sorted(self.cache.pages.values())
        lengths = (alloc.seq_lens, alloc.alloc_lens, alloc.window_lens, alloc.prefix_lens, alloc.num_branch_pages)
        seq, lens, windows, prefix, held = (t.tolist() for t in lengths)
        for row, req in self.reqs.items():
            assert (seq[row], lens[row], windows[row]) == (len(req.tokens), req.alloc_len, req.window), f"row {row}"
            assert prefix[row] == len(req.prefix_pages) * p and held[row] == req.held, f"row {row}"
            assert owned[row][: len(req.slots)] == req.slots, f"row {row}: a committed position moved"
            assert owned[row][: prefix[row]] == [page * p + q for page in req.prefix_pages for q in range(p)]
        # The host's bound of the branch pages held covers what the rows hold, and its cached sum is current
        assert alloc._branch_rows_sum == sum(alloc._branch_rows.values())  # kept up to date by each call
        assert alloc._branch_bound() >= sum(held), "the host's bound of branch pages is below what rows hold"
        self.kv.check()  # every committed position reads the KV of its token
        for key, page in self.cache.pages.items():  # and every cached page the KV of its tokens
            assert self.kv.kv[page * p : (page + 1) * p].tolist() == list(key[-p:]), f"cache page {page} was written"

    def teardown(self):
        try:
            if hasattr(self, "alloc"):
                alloc = self.alloc
                alloc.free_requests(alloc.rows_in_use())
                cached = alloc.cached_pages()
                assert cached == sorted(self.cache.pages.values())
                alloc.release_slots([page * self.PAGE_SIZE for page in cached])
                assert alloc.num_free_slots() == alloc.num_slots, "all slots free but the padding page"
                assert alloc.num_cached_slots() == 0
                assert not alloc.num_branch_pages.any(), "branch pages held after everything was freed"
                assert sorted(alloc.free_page_list()) == list(range(1, alloc.num_pages + 1))
                check_layout(alloc)
        finally:
            restore_tiles(getattr(self, "_saved_tiles", {}))
            if hasattr(self, "_is_npu"):
                backend.is_npu = self._is_npu


class EnginePage1(EngineMachine):
    PAGE_SIZE, NUM_PAGES, MAX_CONTEXT_LEN, SYSTEM_LENS, MAX_SUFFIX = 1, 72, 40, (5, 11, 17), 6


class EnginePage4(EngineMachine):
    pass


class EnginePage16(EngineMachine):
    PAGE_SIZE, NUM_PAGES, MAX_CONTEXT_LEN, MAX_DRAFT, MAX_TOPK, MAX_STEPS = 16, 24, 96, 20, 2, 18


# Tiles of 2 requests, scans of 4: every launch of more than 2 requests spans several programs (test_tree.py's).
class EngineManyPrograms(EngineMachine):
    MAX_REQUESTS, MAX_ADD, NUM_PAGES, TILES = 9, 5, 80, TREE_MANY_PROGRAMS


# The same machine on a device, where the kernels really run concurrently: drafts look back on the tiles before them
# while those are still running, launches overlap through programmatic dependent launch (PDL) on CUDA, and a launch's
# programs run in parallel. The cpu runs them through Triton's interpreter, one program after another, so a bug in the
# ordering or publication between programs shows only on a device.
class EngineOnGpu(EnginePage4):
    DEVICE = "cuda"


class EngineOnGpuPage16(EnginePage16):
    DEVICE = "cuda"


# Many programs with few requests (EngineManyPrograms' tiles) on a real GPU: every launch of more than 2 requests
# spans several programs running at once.
class EngineOnGpuManyPrograms(EngineManyPrograms):
    DEVICE = "cuda"


# An NPU takes page sizes 1, 16, 64 and 128 and int64 index tensors only (allocator.NPU_PAGE_SIZES,
# checks.check_npu_dtypes).
class EngineOnNpu(EnginePage1):
    DEVICE, INDEX_DTYPES = "npu", (torch.int64,)


class EngineOnNpuPage16(EnginePage16):
    DEVICE, INDEX_DTYPES = "npu", (torch.int64,)


# The CPU allocator answering as an NPU: what EngineOnNpu and EngineOnNpuPage16 run, through the interpreter, in CI.
class EngineAsNpuPage1(EnginePage1):
    AS_NPU, INDEX_DTYPES = True, (torch.int64,)


class EngineAsNpuPage16(EnginePage16):
    AS_NPU, INDEX_DTYPES = True, (torch.int64,)


ENGINE_SETTINGS = settings(
    max_examples=examples(10),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
TestEnginePage1 = EnginePage1.TestCase
TestEnginePage4 = EnginePage4.TestCase
TestEnginePage16 = EnginePage16.TestCase
TestEngineManyPrograms = EngineManyPrograms.TestCase
TestEngineAsNpuPage1 = EngineAsNpuPage1.TestCase
TestEngineAsNpuPage16 = EngineAsNpuPage16.TestCase
TestEngineOnGpu = pytest.mark.gpu(EngineOnGpu.TestCase)
TestEngineOnGpuPage16 = pytest.mark.gpu(EngineOnGpuPage16.TestCase)
TestEngineOnGpuManyPrograms = pytest.mark.gpu(EngineOnGpuManyPrograms.TestCase)
TestEngineOnNpu = pytest.mark.npu(EngineOnNpu.TestCase)
TestEngineOnNpuPage16 = pytest.mark.npu(EngineOnNpuPage16.TestCase)
for _case in (TestEnginePage1, TestEnginePage4, TestEnginePage16, TestEngineManyPrograms):
    _case.settings = ENGINE_SETTINGS
for _case in (TestEngineAsNpuPage1, TestEngineAsNpuPage16):
    _case.settings = settings(ENGINE_SETTINGS, max_examples=examples(4))
# Fewer examples on a device (each of its launches costs a host round trip there: about 9 s an example on an H200).
for _case in (
    TestEngineOnGpu,
    TestEngineOnGpuPage16,
    TestEngineOnGpuManyPrograms,
    TestEngineOnNpu,
    TestEngineOnNpuPage16,
):
    _case.settings = settings(ENGINE_SETTINGS, max_examples=examples(4))
del _case


# ------------------------------------------------------------------------------------------ regressions


def test_a_stale_row_leaves_other_rows_branch_pages_on_the_books():
    """A stale row in a tensor of rows changes nothing for the other rows (README: "the call does to the other rows
    exactly what it would do without it"): row 2's branch pages, held outside the batch, still go back when row 2 is
    freed."""
    alloc = DraftCacheAllocator(4 * 40, 4, 64, page_size=4, device="cpu")
    alloc.add_requests([5, 6, 7])  # rows 0, 1, 2
    alloc.alloc_branches([2], 2, 3)  # row 2 holds branch pages
    batch = torch.tensor([0, 1])  # the engine's tensor of rows
    alloc.free_requests([1])  # row 1 finishes: a stale row in the batch, which is as long as the rows in use (0, 2)
    alloc.alloc_draft(batch, 2)
    alloc.free_requests([2])
    assert not alloc.num_branch_pages.any(), "a freed row still holds branch pages"
    alloc.free_requests([0])
    assert alloc.num_free_slots() == alloc.num_slots
