"""DraftCacheAllocator: the draft/verify loop keeps every guarantee of the slot layout, in any order of calls.

A host model mirrors the exact state (rows, committed and allocated lengths, the slot of every owned position)
and predicts which calls must fail; after every call the device state is checked against it.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from conftest import SENTINEL, examples, sentinel_like
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import specdec_ops
from specdec_ops import allocator as allocator_module
from specdec_ops import backend
from specdec_ops.allocator import (
    AllocationError,
    ContextLengthError,
    DraftCacheAllocator,
    DraftStepWrapper,
    OutOfRowsError,
    OutOfSlotsError,
)
from specdec_ops.reference import get_last_loc_and_assign_extend_cache_locs_torch

STATE_TENSORS = (
    "req_to_token",
    "seq_lens",
    "alloc_lens",
    "window_lens",
    "prefix_lens",
    "free_pages",
    "free_head",
    "num_free_pages",
    "branch_pages",
    "num_branch_pages",
)


def pages(length: int, page_size: int) -> int:
    return -(-length // page_size)


def snapshot(alloc: DraftCacheAllocator) -> dict:
    """Everything a caller can observe: the device state and the rows in use, in the order they are handed out."""
    state = {name: getattr(alloc, name).clone() for name in STATE_TENSORS}
    state["rows_in_use"] = alloc.rows_in_use()
    state["free_rows"] = list(alloc._free_rows)  # in order: the stack hands them out from its end
    state["cached_pages"] = alloc.cached_pages()
    return state


@contextlib.contextmanager
def allocator_constants(values: dict[str, int]):
    """The allocator module's launch constants set to ``values`` inside the block, restored after it."""
    saved = {name: getattr(allocator_module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(allocator_module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(allocator_module, name, value)


def assert_same_runs(a: tuple[list, dict], b: tuple[list, dict]) -> None:
    """Two runs, each (the tensors every call returned, the final snapshot), are identical call for call."""
    assert len(a[0]) == len(b[0])
    for got, expected in zip(a[0], b[0]):
        assert len(got) == len(expected) and all(torch.equal(x, y) for x, y in zip(got, expected))
    for name in STATE_TENSORS:
        assert torch.equal(a[1][name], b[1][name]), name


def assert_unchanged(alloc: DraftCacheAllocator, before: dict) -> None:
    after = snapshot(alloc)
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[name], value), f"{name} changed"
        else:
            assert after[name] == value, f"{name} changed"


def branch_pages_of(alloc: DraftCacheAllocator) -> dict[int, list[int]]:
    """The branch pages each row holds (tree drafts)."""
    counts = alloc.num_branch_pages.tolist()
    table = alloc.branch_pages.tolist()
    return {row: table[row][: counts[row]] for row in range(alloc.max_requests) if counts[row]}


def next_look_back_bank(alloc: DraftCacheAllocator) -> torch.Tensor:
    """The tiles' statuses that the next draft looking back takes, its pops and its pushes: all 0 (unpublished)
    between launches."""
    n = alloc.max_requests
    bank, push_bank = (int(alloc._counters[i].item()) & 1 for i in (3, 5))
    pops = alloc._scratch[(4 + bank) * n : (5 + bank) * n]
    return torch.cat([pops, alloc._scratch[(6 + push_bank) * n : (7 + push_bank) * n]])


def check_layout(alloc: DraftCacheAllocator, *, ask_free_slots: bool = True) -> dict[int, list[int]]:
    """Check every guarantee that the device state alone must keep; returns the owned slots of each row in use.

    Pages are conserved: the free ring, the pages live requests own (their cache-owned prefix excluded) and the
    pages of the prefix cache are disjoint and together make up the pool; the padding page is never handed out.
    ``ask_free_slots`` also checks ``num_free_slots()``, which syncs and so tightens the host bound.
    """
    p = alloc.page_size
    assert alloc._counters[2].item() == 0, "a launch left its ticket set"
    assert not next_look_back_bank(alloc).any(), "the next draft that looks back finds a tile published"
    table = alloc.req_to_token.cpu()
    seq_lens = alloc.seq_lens.cpu().tolist()
    alloc_lens = alloc.alloc_lens.cpu().tolist()
    window_lens = alloc.window_lens.cpu().tolist()
    prefix_lens = alloc.prefix_lens.cpu().tolist()
    cache = set(alloc.cached_pages())
    live = set(alloc.rows_in_use())
    owned = {}
    owned_pages = []
    for row in range(alloc.max_requests):
        slots = table[row].tolist()
        if row not in live:
            assert window_lens[row] == prefix_lens[row] == 0 and seq_lens[row] == alloc_lens[row] == -1
            assert not any(slots), f"free row {row} is not cleared"
            continue
        n = alloc_lens[row]
        assert 0 <= seq_lens[row] <= seq_lens[row] + window_lens[row] <= n <= alloc.max_context_len
        assert 0 <= prefix_lens[row] <= n and prefix_lens[row] % p == 0
        assert len(alloc._prefix_pages[row]) == prefix_lens[row] // p  # the host books of the prefix: what a sync reads
        assert not any(slots[n:]), f"row {row} has slots past alloc_len {n}"
        mine = slots[:n]
        for pos, slot in enumerate(mine):
            assert p <= slot < alloc.total_slots, f"row {row} pos {pos}: slot {slot} outside the pool"
            assert slot % p == pos % p, f"row {row} pos {pos}: slot {slot} breaks slot % page_size == pos % page_size"
            assert slot // p == mine[pos - pos % p] // p, f"row {row} pos {pos}: a page is split"
        owned[row] = mine
        row_pages = [mine[k * p] // p for k in range(pages(n, p))]
        shared = prefix_lens[row] // p
        assert set(row_pages[:shared]) <= cache, f"row {row}: a prefix page is not the cache's"
        assert not set(row_pages[shared:]) & cache, f"row {row}: owns a page of the cache"
        owned_pages += row_pages[shared:]
    # Branch pages (tree drafts) belong to their row, apart from its positions.
    branches = branch_pages_of(alloc)
    assert set(branches) <= live, "a free row holds branch pages"
    branch_list = [page for row_pages in branches.values() for page in row_pages]
    assert all(1 <= page <= alloc.num_pages for page in branch_list), "a branch page outside the pool"
    # The host bounds may only overestimate: pages of live requests and of the cache, and branch pages apart.
    assert alloc._pages_bound >= len(owned_pages) + len(cache)
    assert alloc._branch_bound() >= len(branch_list)
    drafted = alloc._drafted_since_sync
    for row in live:  # the longest committed length a commit can make, and the max of them
        assert seq_lens[row] + window_lens[row] <= alloc._seq_base[row] + drafted <= alloc._seq_base_max + drafted
    owned_pages += branch_list
    assert len(owned_pages) == len(set(owned_pages)), "a page is owned twice"
    free = alloc.free_page_list()
    assert len(free) == len(set(free)), "a page is free twice"
    assert sorted(free + owned_pages + sorted(cache)) == list(range(1, alloc.num_pages + 1)), (
        "the free ring, the live requests (branches included) and the cache do not account for the pool"
    )
    if ask_free_slots:
        assert alloc.num_free_slots() == alloc.num_slots - p * (len(owned_pages) + len(cache))
        assert alloc.num_cached_slots() == p * len(cache)
        for row in live:  # that read synced: each row's host bounds are exact now
            assert alloc._min_pages[row] == pages(alloc_lens[row], p) - prefix_lens[row] // p
            assert alloc._seq_base[row] == seq_lens[row] + window_lens[row]
    assert alloc.rows_in_use() == [row for row, used in enumerate(alloc._in_use) if used]  # (kept by _rows_version)
    return owned


def loop_outputs(owned: dict[int, list[int]], rows: list[int], starts: list[int], n: int):
    out, last = [], []
    for row, start in zip(rows, starts):
        out += owned[row][start : start + n]
        last.append(owned[row][start - 1] if start else -1)
    return out, last


def patch_tiles(tiles: dict[str, object]) -> dict[str, object]:
    """Set launch constants of ``specdec_ops.allocator`` (a state machine's ``TILES``); returns their old values for
    ``restore_tiles``."""
    saved = {name: getattr(allocator_module, name) for name in tiles}
    for name, value in tiles.items():
        setattr(allocator_module, name, value)
    return saved


def restore_tiles(saved: dict[str, object]) -> None:
    for name, value in saved.items():
        setattr(allocator_module, name, value)


class AllocatorMachine(RuleBasedStateMachine):
    """Add, draft, commit and free in any order; failures must be exactly those the model predicts."""

    PAGE_SIZE = 1
    NUM_PAGES = 40
    MAX_REQUESTS = 5
    MAX_CONTEXT_LEN = 40
    MAX_DRAFT = 6
    DEVICE = "cpu"

    # Launch constants of specdec_ops.allocator to shrink for this machine (many programs with few requests).
    TILES: dict[str, int] = {}

    @initialize(data=st.data())
    def start(self, data):
        self._saved_tiles = patch_tiles(self.TILES)
        self.alloc = DraftCacheAllocator(
            self.NUM_PAGES * self.PAGE_SIZE,
            self.MAX_REQUESTS,
            self.MAX_CONTEXT_LEN,
            page_size=self.PAGE_SIZE,
            device=self.DEVICE,
        )
        self.seq = {}  # row -> committed length
        self.owned = {}  # row -> slots of positions [0, alloc_len)
        self.window = {}  # row -> open draft window
        initial = st.lists(st.integers(0, self.MAX_CONTEXT_LEN // 4), min_size=1, max_size=self.MAX_REQUESTS)
        for row, n in enumerate(data.draw(initial, label="initial prompt_lens")):
            self.seq[row], self.window[row] = n, 0
        self.alloc.add_requests([self.seq[row] for row in sorted(self.seq)])
        self.learn_slots(sorted(self.seq))
        # Free rows as a stack, its top last: a new allocator hands out 0, 1, 2, ...; freed rows come back first.
        self.free_stack = list(range(self.MAX_REQUESTS - 1, len(self.seq) - 1, -1))

    # -- model ------------------------------------------------------------------------------------

    def used_pages(self) -> int:
        return sum(pages(len(slots), self.PAGE_SIZE) for slots in self.owned.values())

    def learn_slots(self, rows):
        """Read the new slots of ``rows``: positions that owned a slot before must keep it."""
        table = self.alloc.req_to_token
        for row in rows:
            n = int(self.alloc.alloc_lens[row])
            slots = table[row, :n].tolist()
            old = self.owned.get(row, [])
            assert slots[: len(old)] == old, f"row {row}: an owned position changed slot"
            self.owned[row] = slots

    def pick_rows(self, data):
        live = sorted(self.seq)
        if not live:
            return []
        return data.draw(st.lists(st.sampled_from(live), unique=True), label="rows")

    def as_rows(self, data, rows):
        kind = data.draw(st.sampled_from(["list", "int64", "int32"]), label="rows as")
        if kind == "list":
            return rows
        return torch.tensor(rows, dtype=torch.int64 if kind == "int64" else torch.int32, device=self.DEVICE)

    # -- rules ------------------------------------------------------------------------------------

    @rule(data=st.data())
    def add(self, data):
        short = st.integers(0, self.MAX_CONTEXT_LEN // 4)
        length = st.one_of(short, short, short, st.integers(0, self.MAX_CONTEXT_LEN + 2))
        prompt_lens = data.draw(st.lists(length, max_size=3), label="prompt_lens")
        free_rows = self.free_stack[::-1]  # in the order add_requests hands them out
        need = sum(pages(n, self.PAGE_SIZE) for n in prompt_lens)
        if len(prompt_lens) > len(free_rows):
            expected = OutOfRowsError
        elif any(n > self.MAX_CONTEXT_LEN for n in prompt_lens):
            expected = ContextLengthError
        elif need > self.NUM_PAGES - self.used_pages():
            expected = OutOfSlotsError
        else:
            expected = None
        event(f"add: {expected.__name__ if expected else 'ok'}")
        before = snapshot(self.alloc)
        as_list = data.draw(st.booleans(), label="as list")
        arg = prompt_lens if as_list else torch.tensor(prompt_lens, dtype=torch.int64, device=self.DEVICE)
        if expected is not None:
            with pytest.raises(expected):
                self.alloc.add_requests(arg)
            assert_unchanged(self.alloc, before)
            return
        rows = self.alloc.add_requests(arg)
        assert rows.dtype == torch.int64 and rows.device == self.alloc.device
        assert rows.tolist() == free_rows[: len(prompt_lens)], "new requests take the rows freed last, in order"
        del self.free_stack[len(self.free_stack) - len(prompt_lens) :]
        for row, n in zip(rows.tolist(), prompt_lens):
            self.seq[row] = n
            self.window[row] = 0
        self.learn_slots(rows.tolist())
        assert all(len(self.owned[row]) == n for row, n in zip(rows.tolist(), prompt_lens))

    @rule(data=st.data())
    def draft(self, data):
        self.try_draft(data, self.pick_rows(data), data.draw(st.integers(0, self.MAX_DRAFT), label="N"))

    @rule(data=st.data())
    def commit(self, data):
        rows = self.pick_rows(data)
        self.do_commit(data, rows, [data.draw(st.integers(0, self.window[row]), label="accept") for row in rows])

    @rule(data=st.data())
    def step(self, data):
        """A step of the loop: every live request drafts, then commits a random part of its window."""
        rows = sorted(self.seq)
        n = data.draw(st.integers(1, self.MAX_DRAFT), label="N")
        if self.try_draft(data, rows, n):
            self.do_commit(data, rows, [data.draw(st.integers(0, n), label="accept") for _ in rows])

    @rule(data=st.data())
    def commit_and_draft(self, data):
        """commit_and_draft: the commit, then the next window, in one call; nothing committed if the draft fails."""
        rows = self.pick_rows(data)
        accept = [data.draw(st.integers(0, self.window[row]), label="accept") for row in rows]
        self.try_draft(data, rows, data.draw(st.integers(0, self.MAX_DRAFT), label="N"), accept)

    def try_draft(self, data, rows, n, accept=None) -> bool:
        """Draft ``n`` tokens for ``rows`` (``accept``: commit_and_draft with these accept lengths first); check the
        outputs, or the predicted failure. Whether it succeeded."""
        starts = [self.seq[row] + (0 if accept is None else a) for row, a in zip(rows, accept or rows)]
        p = self.PAGE_SIZE
        need = sum(max(pages(s + n, p) - pages(len(self.owned[row]), p), 0) for row, s in zip(rows, starts))
        if any(s + n > self.MAX_CONTEXT_LEN for s in starts):
            expected = ContextLengthError
        elif need > self.NUM_PAGES - self.used_pages():
            expected = OutOfSlotsError
        else:
            expected = None
        event(f"draft: {expected.__name__ if expected else 'ok'}")
        modes = ["alloc", "alloc-into-buffers"] + (["reserve"] if accept is None else [])
        mode = data.draw(st.sampled_from(modes), label="mode")
        validate = data.draw(st.booleans(), label="validate")
        arg = self.as_rows(data, rows)
        before = snapshot(self.alloc)
        free_before = self.NUM_PAGES - self.used_pages()
        if accept is None:
            draft = self.alloc.alloc_draft
        else:
            dtype = data.draw(st.sampled_from([torch.int32, torch.int64, None]), label="accept dtype")
            accept_arg = accept if dtype is None else torch.tensor(accept, dtype=dtype, device=self.DEVICE)

            def draft(arg, n, **kwargs):
                return self.alloc.commit_and_draft(arg, accept_arg, n, **kwargs)

        if expected is not None:
            with pytest.raises(expected):
                if mode == "reserve":
                    self.alloc.reserve_draft(arg, n, validate=validate)
                else:
                    draft(arg, n, validate=validate)
            assert_unchanged(self.alloc, before)
            return False
        if accept is not None:
            for row, a in zip(rows, accept):
                self.seq[row] += a
        if mode == "reserve":
            self.alloc.reserve_draft(arg, n, validate=validate)
            rows_t = torch.tensor(rows, dtype=torch.int64, device=self.DEVICE)
            start_t = torch.tensor(starts, dtype=torch.int64, device=self.DEVICE)
            out, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
                self.alloc.req_to_token, rows_t, start_t, start_t + n, window_len=n
            )
        elif mode == "alloc":
            out, last = draft(arg, n, validate=validate)
            assert out.dtype == last.dtype == torch.int64
        else:
            tail = 3
            out_buf = sentinel_like(len(rows) * n + tail, torch.int32, self.DEVICE)
            last_buf = sentinel_like(len(rows), torch.int32, self.DEVICE)
            out, last = draft(arg, n, out_cache_loc=out_buf, last_loc=last_buf, validate=validate)
            assert last is last_buf and (not out.numel() or out.data_ptr() == out_buf.data_ptr())
            assert out_buf[len(rows) * n :].tolist() == [SENTINEL] * tail
        assert out.shape == (len(rows) * n,) and last.shape == (len(rows),)
        old = {row: list(self.owned[row]) for row in rows}
        self.learn_slots(rows)
        for row, s in zip(rows, starts):
            assert len(self.owned[row]) == max(len(old[row]), s + n)
            self.window[row] = n
        assert self.NUM_PAGES - self.used_pages() == free_before - need
        expected_out, expected_last = loop_outputs(self.owned, rows, starts, n)
        assert out.tolist() == expected_out
        assert last.tolist() == expected_last
        rows_t = torch.tensor(rows, dtype=torch.int64, device=self.DEVICE)
        start_t = torch.tensor(starts, dtype=torch.int64, device=self.DEVICE)
        ref_out, ref_last = get_last_loc_and_assign_extend_cache_locs_torch(
            self.alloc.req_to_token, rows_t, start_t, start_t + n
        )
        assert torch.equal(out.long(), ref_out) and torch.equal(last.long(), ref_last)
        return True

    def do_commit(self, data, rows, accept):
        validate = data.draw(st.booleans(), label="validate")
        dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="accept dtype")
        accept_arg = torch.tensor(accept, dtype=dtype, device=self.DEVICE)
        self.alloc.commit(self.as_rows(data, rows), accept_arg, validate=validate)
        for row, a in zip(rows, accept):
            self.seq[row] += a
            self.window[row] = 0

    @rule(data=st.data())
    def free(self, data):
        rows = self.pick_rows(data)
        as_list = data.draw(st.booleans(), label="as list")
        arg = rows if as_list else torch.tensor(rows, dtype=torch.int64, device=self.DEVICE)
        self.alloc.free_requests(arg)
        for row in rows:
            del self.seq[row], self.owned[row], self.window[row]
        self.free_stack.extend(reversed(rows))

    @invariant()
    def state_matches_model(self):
        if not hasattr(self, "alloc"):
            return
        owned = check_layout(self.alloc, ask_free_slots=False)
        assert owned == self.owned
        assert self.alloc.rows_in_use() == sorted(self.seq)
        seq_lens = self.alloc.seq_lens.tolist()
        assert {row: seq_lens[row] for row in self.seq} == self.seq

    def teardown(self):
        try:
            if hasattr(self, "alloc"):
                self.alloc.free_requests(self.alloc.rows_in_use())
                assert self.alloc.num_free_slots() == self.alloc.num_slots
                check_layout(self.alloc)
        finally:
            restore_tiles(getattr(self, "_saved_tiles", {}))


STATEFUL_SETTINGS = settings(
    max_examples=examples(40),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# Windows reach past a page (and past one 64-column block of the kernel for page 64).
class PageSize1(AllocatorMachine):
    PAGE_SIZE, NUM_PAGES, MAX_CONTEXT_LEN, MAX_DRAFT = 1, 60, 32, 6


class PageSize4(AllocatorMachine):
    PAGE_SIZE, NUM_PAGES, MAX_CONTEXT_LEN, MAX_DRAFT = 4, 20, 40, 9


class PageSize16(AllocatorMachine):
    PAGE_SIZE, NUM_PAGES, MAX_CONTEXT_LEN, MAX_DRAFT = 16, 8, 64, 20


class PageSize64(AllocatorMachine):
    PAGE_SIZE, NUM_PAGES, MAX_CONTEXT_LEN, MAX_DRAFT = 64, 6, 200, 70


# Tiles of 2 requests and scans of 4: every launch spans several programs, each summing the needs of the requests
# before its tile, and the last program writes the shared state; commit_and_draft of more than 4 requests takes two
# launches (the tile counts, then the allocation), with 2-request tiles.
MANY_PROGRAMS = {
    "_MAX_TILE": 2,
    "_SCAN_BLOCK": 4,
    "_FREE_TILE": 2,
    "_FREE_CLASSES": ((None, 2, 2),),
    "_COMMIT_TILE": 2,
    "_COMMIT_DRAFT_MAX_BATCH": 4,
    "_TWO_PASS_TILE": 2,
}


class ManyProgramsPageSize1(PageSize1):
    MAX_REQUESTS, TILES = 9, MANY_PROGRAMS


class ManyProgramsPageSize16(PageSize16):
    MAX_REQUESTS, NUM_PAGES, TILES = 9, 12, MANY_PROGRAMS


TestStatefulPageSize1 = PageSize1.TestCase
TestStatefulPageSize4 = PageSize4.TestCase
TestStatefulPageSize16 = PageSize16.TestCase
TestStatefulPageSize64 = PageSize64.TestCase
TestStatefulManyProgramsPageSize1 = ManyProgramsPageSize1.TestCase
TestStatefulManyProgramsPageSize16 = ManyProgramsPageSize16.TestCase
for _case in (
    TestStatefulPageSize1,
    TestStatefulPageSize4,
    TestStatefulPageSize16,
    TestStatefulPageSize64,
    TestStatefulManyProgramsPageSize1,
    TestStatefulManyProgramsPageSize16,
):
    _case.settings = STATEFUL_SETTINGS
del _case


class CudaPageSize16(PageSize16):
    DEVICE = "cuda"


TestStatefulCudaPageSize16 = pytest.mark.gpu(CudaPageSize16.TestCase)
TestStatefulCudaPageSize16.settings = settings(STATEFUL_SETTINGS, max_examples=examples(20))


# --------------------------------------------------------------------------------------------- loops


def run_loop(alloc: DraftCacheAllocator, steps: int, seed: int, n: int = 3) -> list:
    """A seeded draft/verify loop: arrivals, random finishes, a draft of every live request, random accepts.

    Requests finish before they run out of context, and while the pool could not hold the next draft.
    Returns ``(rows, out_cache_loc, last_loc)`` of every draft, as lists.
    """
    rng = random.Random(seed)
    p = alloc.page_size
    outputs = []
    for _ in range(steps):
        if alloc.num_requests < alloc.max_requests and rng.random() < 0.6:
            length = rng.randrange(0, alloc.max_context_len // 2)
            if pages(length, p) <= alloc.num_free_slots() // p // 2:
                alloc.add_requests([length])
        seq = alloc.seq_lens.tolist()
        done = [row for row in alloc.rows_in_use() if rng.random() < 0.1 or seq[row] + n > alloc.max_context_len]
        alloc.free_requests(done)
        live = alloc.rows_in_use()
        while live and alloc.num_free_slots() // p < len(live) * pages(n, p):
            alloc.free_requests(live[:1])
            live = live[1:]
        if not live:
            continue
        rows = torch.tensor(live, device=alloc.device)
        out, last = alloc.alloc_draft(rows, n)
        outputs.append((live, out.tolist(), last.tolist()))
        accept = torch.tensor([rng.randint(0, n) for _ in live], device=alloc.device)
        alloc.commit(rows, accept)
    return outputs


@pytest.mark.parametrize("page_size", [1, 4, 16, 64], ids=lambda p: f"page{p}")
def test_same_calls_give_the_same_table(page_size):
    runs = []
    for _ in range(2):
        alloc = DraftCacheAllocator(page_size * 24, 6, 96, page_size=page_size, device="cpu")
        outputs = run_loop(alloc, steps=12, seed=page_size)
        check_layout(alloc)
        runs.append((outputs, snapshot(alloc)))
    assert runs[0][0] == runs[1][0]
    for name in STATE_TENSORS:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


def test_no_sync_needed_while_the_pool_has_headroom():
    alloc = DraftCacheAllocator(4096, 8, 512, page_size=4, device="cpu")
    rows = alloc.add_requests([10, 0, 37, 5, 1, 64, 3, 9])
    for step in range(10):
        alloc.alloc_draft(rows, 5)
        alloc.commit(rows, torch.full((8,), step % 6))
    assert alloc.num_syncs == 0
    check_layout(alloc)


def test_repr_names_the_sizes_and_reads_only_the_host():
    alloc = DraftCacheAllocator(64, 4, 16, page_size=2, device="cpu")
    alloc.free_requests(alloc.add_requests([4, 3, 2])[1:].tolist(), keep_lens=[2, 0])
    assert repr(alloc) == (
        "DraftCacheAllocator(num_slots=64, max_requests=4, max_context_len=16, page_size=2, device='cpu'; "
        "num_requests=1, num_cached_slots=2)"
    )
    assert alloc.num_syncs == 0


def test_windows_shorter_than_pages_need_no_sync():
    # A page per request per step would pass 64 pages after 5 steps; a window of 4 crosses a page of 64 only
    # every 16 tokens, and the bound knows it.
    alloc = DraftCacheAllocator(64 * 64, 8, 1024, page_size=64, device="cpu")
    rows = alloc.add_requests([100, 1, 64, 0, 5, 200, 63, 17])  # 12 pages
    for _ in range(60):
        alloc.alloc_draft(rows, 4)
        alloc.commit(rows, torch.full((8,), 4))
    assert alloc.num_syncs == 0
    check_layout(alloc)


def test_near_capacity_the_bound_syncs_instead_of_failing():
    # 16 pages of 1 slot, 2 requests: the worst-case bound passes capacity long before the pool does.
    alloc = DraftCacheAllocator(16, 2, 64, device="cpu")
    rows = alloc.add_requests([2, 2])
    for _ in range(5):
        alloc.alloc_draft(rows, 4)
        alloc.commit(rows, torch.tensor([1, 0]))
    assert alloc.num_syncs > 0
    check_layout(alloc)
    assert alloc.alloc_lens.tolist() == [10, 6]
    assert alloc.num_free_slots() == 0  # the last step took the last slot


def test_rejected_positions_keep_their_slots_for_the_next_window():
    alloc = DraftCacheAllocator(64, 2, 32, page_size=4, device="cpu")
    rows = alloc.add_requests([5])
    out, last = alloc.alloc_draft(rows, 4)
    assert out.tolist() == [9, 10, 11, 12] and last.tolist() == [8]  # the rest of page 2, then page 3
    alloc.commit(rows, torch.tensor([1]))
    free = alloc.num_free_slots()
    out2, last2 = alloc.alloc_draft(rows, 3)
    assert out2.tolist() == out.tolist()[1:] and last2.tolist() == [9]
    assert alloc.num_free_slots() == free
    alloc.commit(rows, torch.tensor([3]))
    out3, _ = alloc.alloc_draft(rows, 4)
    assert out3.tolist() == [13, 14, 15, 16]  # the rest of page 3, then page 4
    alloc.free_requests(rows)
    assert alloc.num_free_slots() == 64


def test_rows_come_from_a_stack_freed_rows_first_in_their_order():
    alloc = DraftCacheAllocator(64, 6, 8, device="cpu")
    assert alloc.add_requests([1, 1, 1]).tolist() == [0, 1, 2]
    alloc.free_requests([2, 0])
    assert alloc.add_requests([1, 1, 1]).tolist() == [2, 0, 3]
    alloc.free_requests(torch.tensor([3, 1]))
    assert alloc.add_requests([1]).tolist() == [3]
    assert alloc.add_requests([1, 1, 1]).tolist() == [1, 4, 5]
    assert alloc.rows_in_use() == [0, 1, 2, 3, 4, 5]


def test_first_pages_and_the_padding_page():
    alloc = DraftCacheAllocator(64, 3, 32, page_size=16, device="cpu")
    assert alloc.total_slots == 80
    rows = alloc.add_requests([0, 17])
    assert rows.tolist() == [0, 1]
    out, last = alloc.alloc_draft(rows, 2)
    assert last.tolist() == [-1, 32]
    assert out.tolist() == [48, 49, 33, 34]  # row 1 holds pages 1, 2 and fills page 2; row 0 takes page 3
    alloc.free_requests(torch.tensor([1]))
    assert alloc.free_page_list() == [4, 1, 2]  # freed pages join the end of the ring, in position order
    rows2 = alloc.add_requests([3, 20])
    assert rows2.tolist() == [1, 2]
    assert alloc.req_to_token[1, :3].tolist() == [64, 65, 66]
    assert alloc.req_to_token[2, :20].tolist() == list(range(16, 32)) + [32, 33, 34, 35]


def test_fused_step_matches_the_components():
    alloc = DraftCacheAllocator(512, 6, 64, page_size=4, device="cpu")
    rows = alloc.add_requests([3, 0, 9, 16, 1])
    alloc.alloc_draft(rows, 4)
    alloc.commit(rows, torch.tensor([4, 0, 2, 1, 3]))
    out, last = alloc.alloc_draft(rows, 4)
    start = alloc.seq_lens[rows]
    end = start + 4
    table = alloc.req_to_token
    assert torch.equal(last, specdec_ops.get_last_loc(table, rows, start))
    assert torch.equal(out, specdec_ops.assign_extend_cache_locs(table, rows, start, end, window_len=4))
    fused = specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, start, end, window_len=4)
    assert torch.equal(out, fused[0]) and torch.equal(last, fused[1])


def test_large_batch_spans_several_tiles():
    # 300 requests with windows of 64: the allocation kernel walks several [TILE, BLOCK_N] tiles.
    alloc = DraftCacheAllocator(300 * 8 * 32, 300, 256, page_size=32, device="cpu")
    lens = [(7 * i) % 150 for i in range(300)]
    rows = alloc.add_requests(lens)
    out, last = alloc.alloc_draft(rows, 64)
    owned = check_layout(alloc)
    expected_out, expected_last = loop_outputs(owned, rows.tolist(), lens, 64)
    assert out.tolist() == expected_out and last.tolist() == expected_last
    alloc.free_requests(rows)
    assert alloc.num_free_slots() == alloc.num_slots


# ------------------------------------------------------------------------------------ out of resources


def test_out_of_rows():
    alloc = DraftCacheAllocator(64, 3, 16, device="cpu")
    alloc.add_requests([1, 2])
    before = snapshot(alloc)
    with pytest.raises(OutOfRowsError, match=r"asked for 2 rows but 1 of 3 are free"):
        alloc.add_requests([1, 1])
    assert_unchanged(alloc, before)
    assert issubclass(OutOfRowsError, AllocationError) and issubclass(AllocationError, RuntimeError)


def test_prompt_longer_than_the_context():
    alloc = DraftCacheAllocator(64, 3, 16, device="cpu")
    before = snapshot(alloc)
    with pytest.raises(ContextLengthError, match=r"prompt_lens\[1\] = 17 is longer than max_context_len = 16"):
        alloc.add_requests([3, 17])
    assert_unchanged(alloc, before)


@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_out_of_slots_on_add(page_size):
    alloc = DraftCacheAllocator(8 * page_size, 4, 64, page_size=page_size, device="cpu")
    alloc.add_requests([5 * page_size])
    before = snapshot(alloc)
    with pytest.raises(OutOfSlotsError, match=rf"need 4 new pages \({4 * page_size} slots\) but 3 pages"):
        alloc.add_requests([page_size, 3 * page_size])
    assert_unchanged(alloc, before)
    alloc.add_requests([page_size, 2 * page_size])  # exactly fills the pool
    assert alloc.num_free_slots() == 0


@pytest.mark.parametrize("page_size", [1, 4, 16], ids=lambda p: f"page{p}")
def test_out_of_slots_on_draft_is_all_or_nothing(page_size):
    alloc = DraftCacheAllocator(6 * page_size, 3, 128, page_size=page_size, device="cpu")
    rows = alloc.add_requests([page_size, 2 * page_size])
    # 3 pages free; a window of 2 pages for each request needs 4.
    before = snapshot(alloc)
    n = 2 * page_size
    with pytest.raises(OutOfSlotsError, match=rf"2 requests with {n} draft tokens needs 4 new pages .* 3 pages"):
        alloc.alloc_draft(rows, n)
    assert_unchanged(alloc, before)
    with pytest.raises(OutOfSlotsError):
        alloc.reserve_draft(rows, n)
    assert_unchanged(alloc, before)
    out, _ = alloc.alloc_draft(rows[:1], 3 * page_size)  # exactly the 3 free pages
    assert len(set(out.tolist())) == 3 * page_size
    assert alloc.num_free_slots() == 0
    alloc.alloc_draft(rows[:1], 2 * page_size)  # reuses the reserved slots: needs nothing
    alloc.free_requests(rows[1:])
    alloc.alloc_draft(rows[:1], 5 * page_size)  # the 2 pages just freed
    assert alloc.num_free_slots() == 0
    check_layout(alloc)


def test_draft_past_the_context_is_all_or_nothing():
    alloc = DraftCacheAllocator(256, 3, 20, page_size=4, device="cpu")
    rows = alloc.add_requests([3, 17, 5])
    before = snapshot(alloc)
    with pytest.raises(
        ContextLengthError, match=r"request 1 \(row 1\) has 17 committed tokens; a draft window of 4 needs 21"
    ):
        alloc.alloc_draft(rows, 4)
    assert_unchanged(alloc, before)
    alloc.alloc_draft(rows, 3)  # ends exactly at max_context_len
    check_layout(alloc)


def test_freeing_everything_restores_the_pool():
    alloc = DraftCacheAllocator(24 * 16, 6, 96, page_size=16, device="cpu")
    run_loop(alloc, steps=10, seed=3)
    alloc.free_requests(alloc.rows_in_use())
    assert alloc.num_free_slots() == alloc.num_slots
    assert not alloc.req_to_token.any()
    assert sorted(alloc.free_pages.tolist()) == list(range(1, 25))


# ------------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_slots": 10, "page_size": 4}, ValueError, "num_slots must be a multiple of page_size = 4, got 10"),
        ({"page_size": 0}, ValueError, r"page_size must be in \[1, 2\*\*31\), got 0"),
        ({"num_slots": 8.0}, TypeError, "num_slots must be an int, got float"),
        ({"max_requests": 0}, ValueError, "max_requests must be in"),
        ({"max_context_len": True}, TypeError, "max_context_len must be an int, got bool"),
        # devices that torch cannot name or that are not here: torch raised RuntimeError or AssertionError
        ({"device": "garbage"}, ValueError, "device must name a torch device .*, got 'garbage'"),
        ({"device": 1.5}, TypeError, "device must be a torch.device, a str, an int or None, got float"),
        # meta holds no values: every call raised, naming no argument (a new-user audit, 2026-11-25)
        ({"device": "meta"}, ValueError, r"device \(where the allocator's tensors live\) must be on cpu, cuda or npu"),
        pytest.param(
            {"device": "cuda"},
            ValueError,
            "device cuda is not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here"),
        ),
        # a table no device can hold (2**61 bytes, past any address space): torch's RuntimeError named no argument
        (
            {"max_requests": 2**30, "max_context_len": 2**29},
            ValueError,
            r"req_to_token of max_requests \* max_context_len = 1073741824 \* 536870912 = 576460752303423488 int32 "
            r"entries \(2147483648.0 GiB\).* cannot be allocated on cpu",
        ),
    ],
    ids=[
        "slots-not-pages",
        "page-0",
        "slots-float",
        "no-rows",
        "context-bool",
        "device-garbage",
        "device-float",
        "device-meta",
        "no-cuda",
        "table-too-large",
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    args = {"num_slots": 16, "max_requests": 2, "max_context_len": 8, "device": "cpu", **kwargs}
    with pytest.raises(error, match=message):
        DraftCacheAllocator(**args)


HUGE = 10**12


class Huge(Sequence):
    """A lazy sequence of HUGE ints that fails the test if anything reads its values (or would take hours)."""

    def __len__(self):
        return HUGE

    def __getitem__(self, i):
        raise AssertionError("a lazy sequence was read before its length was checked")


def _nested(component, layout=torch.strided):
    """A nested tensor of two copies of ``component``, without torch's prototype warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor([component, component.clone()], layout=layout)


class _Forwarding:
    """Every attribute of a tensor, forwarded: no tensor."""

    def __init__(self, tensor):
        self._tensor = tensor

    def __getattr__(self, name):
        return getattr(self._tensor, name)


def live_allocator():
    alloc = DraftCacheAllocator(64, 4, 16, page_size=2, device="cpu")
    rows = alloc.add_requests([3, 4])
    alloc.alloc_draft(rows, 2)
    return alloc, rows


BAD_CALLS = [
    ("add-negative", lambda a, r: a.add_requests([2, -1]), ValueError, r"prompt_lens\[1\] must be >= 0, got -1"),
    ("add-float", lambda a, r: a.add_requests([2.0]), TypeError, r"prompt_lens\[0\] must be an int, got float"),
    (
        "add-float-tensor",
        lambda a, r: a.add_requests(torch.tensor([2.0])),
        TypeError,
        "prompt_lens must be int32 or int64",
    ),
    ("add-2d", lambda a, r: a.add_requests(torch.ones(1, 2, dtype=torch.int64)), ValueError, "must be 1-D"),
    ("add-str", lambda a, r: a.add_requests("12"), TypeError, "sequence of ints, got str"),
    ("draft-negative-n", lambda a, r: a.alloc_draft(r, -1), ValueError, "num_draft_tokens must be in"),
    ("draft-float-n", lambda a, r: a.alloc_draft(r, 2.0), TypeError, "num_draft_tokens must be an int, got float"),
    (  # the allocator's own tensors are never an output buffer: the call would write into its state
        "draft-last-is-state",
        lambda a, r: a.alloc_draft(r, 2, last_loc=a.seq_lens[:2]),
        ValueError,
        "last_loc must not share memory with the allocator's own tensors",
    ),
    (
        "draft-out-in-table",
        lambda a, r: a.alloc_draft(r, 2, out_cache_loc=a.req_to_token[1]),
        ValueError,
        "out_cache_loc must not share memory with the allocator's own tensors",
    ),
    (  # the same memory through a storage object of its own (numpy, DLPack): compared as byte ranges
        "draft-last-is-state-through-numpy",
        lambda a, r: a.alloc_draft(r, 2, last_loc=torch.from_numpy(a.seq_lens.numpy()[2:4])),
        ValueError,
        "last_loc must not share memory with the allocator's own tensors",
    ),
    (
        "draft-last-is-state-through-dlpack",
        lambda a, r: a.alloc_draft(r, 2, last_loc=torch.from_dlpack(a.alloc_lens[2:4].__dlpack__())),
        ValueError,
        "last_loc must not share memory with the allocator's own tensors",
    ),
    (
        "tree-kv-in-table-through-numpy",
        lambda a, r: a.commit_tree(
            r,
            torch.tensor([[0, 1], [0, 1]]),
            [1, 1],
            kv_src=torch.from_numpy(a.req_to_token.numpy()[1, :8].view(np.int64)),
            validate=True,
        ),
        ValueError,
        "kv_src must not share memory with the allocator's own tensors",
    ),
    # flags are bools: a tensor raised torch's RuntimeError, a string turned validation on; return_copies was read
    # after the branches had been taken
    ("draft-validate-str", lambda a, r: a.alloc_draft(r, 2, validate="no"), TypeError, "validate must be a bool"),
    (
        "commit-validate-tensor",
        lambda a, r: a.commit(r, torch.tensor([1, 1]), validate=torch.tensor([True, False])),
        TypeError,
        "validate must be a bool, got torch.Tensor",
    ),
    (
        "branches-validate-array",
        lambda a, r: a.alloc_branches(r, 2, 2, validate=np.array([1, 2])),
        TypeError,
        "validate must be a bool, got numpy.ndarray",
    ),
    (
        "branches-return-copies-tensor",
        lambda a, r: a.alloc_branches(r, 2, 2, return_copies=torch.tensor([True, False])),
        TypeError,
        "return_copies must be a bool, got torch.Tensor",
    ),
    ("release-validate-int", lambda a, r: a.release_branches(r, validate=1), TypeError, "validate must be a bool"),
    (  # with validate, as the ops: no output shares memory with an input
        "draft-validate-last-is-rows",
        lambda a, r: a.alloc_draft(r, 2, last_loc=r, validate=True),
        ValueError,
        "last_loc must not share memory with req_pool_indices",
    ),
    (
        "tree-commit-validate-kv-in-accept-index",
        lambda a, r: a.commit_tree(
            r, (idx := torch.zeros(2, 2, dtype=torch.int64)), [0, 0], kv_src=idx.view(-1), validate=True
        ),
        ValueError,
        "kv_src must not share memory with accept_index",
    ),
    (  # found by an audit of the request lifecycle, 2026-11-24: torch's unnamed overflow, no check, torch's meta error
        "free-keep-past-int64",
        lambda a, r: a.free_requests(r, keep_lens=[0, 2**64]),
        ValueError,
        r"keep_lens\[1\] must be <= max_context_len = 16, got 18446744073709551616",
    ),
    ("free-no-rows-keep", lambda a, r: a.free_requests([], keep_lens=[2]), ValueError, "keep_lens has 1 elements"),
    (
        "add-meta-lens",
        lambda a, r: a.add_requests(torch.zeros(1, dtype=torch.int64, device="meta")),
        ValueError,
        r"prompt_lens must hold values to read \(any device but meta\), got a tensor on meta",
    ),
    (  # named as numpy's, not to be read as torch.float64 (numpy's integers are ints: see below)
        "draft-numpy-float-n",
        lambda a, r: a.alloc_draft(r, np.float64(2)),
        TypeError,
        "num_draft_tokens must be an int, got numpy.float64",
    ),
    (
        "draft-numpy-float-row",
        lambda a, r: a.alloc_draft([0, np.float64(1)], 2),
        TypeError,
        r"req_pool_indices\[1\] must be an int, got numpy.float64",
    ),
    ("draft-numpy-bool-n", lambda a, r: a.alloc_draft(r, np.bool_(True)), TypeError, "got numpy.bool"),
    (  # an int past int64 in a list: named, not torch's "Overflow when unpacking long long"
        "draft-row-past-int64",
        lambda a, r: a.alloc_draft([0, 2**63], 2),
        ValueError,
        r"req_pool_indices\[1\] must fit in int64, got 9223372036854775808",
    ),
    (
        "commit-accept-past-int64",
        lambda a, r: a.commit([0, 1], [0, -(2**64)]),
        ValueError,
        r"accept_lens\[1\] must fit in int64, got -18446744073709551616",
    ),
    ("draft-float-rows", lambda a, r: a.alloc_draft(r.float(), 2), TypeError, "req_pool_indices must be int32"),
    ("draft-2d-rows", lambda a, r: a.alloc_draft(r[None], 2), ValueError, "req_pool_indices must be 1-D"),
    ("draft-strided-rows", lambda a, r: a.alloc_draft(r.repeat(2)[::2], 2), ValueError, "unit stride"),
    ("draft-free-row", lambda a, r: a.alloc_draft([0, 2], 2), ValueError, r"req_pool_indices\[1\] = 2 is not a row"),
    ("draft-row-range", lambda a, r: a.alloc_draft([4], 2), ValueError, r"must be in \[0, 4\), got 4"),
    (
        "draft-free-row-validate",
        lambda a, r: a.alloc_draft(torch.tensor([3]), 2, validate=True),
        ValueError,
        "= 3 is not a row in use",
    ),
    (
        "draft-duplicate-validate",
        lambda a, r: a.alloc_draft(torch.tensor([1, 1]), 2, validate=True),
        ValueError,
        "appears twice",
    ),
    (
        "draft-small-out",
        lambda a, r: a.alloc_draft(r, 2, out_cache_loc=torch.empty(3, dtype=torch.int64)),
        ValueError,
        "out_cache_loc must have at least 4 elements, got 3",
    ),
    (
        "draft-last-size",
        lambda a, r: a.alloc_draft(r, 2, last_loc=torch.empty(3, dtype=torch.int64)),
        ValueError,
        "last_loc must have 2 elements, got 3",
    ),
    (
        "draft-float-out",
        lambda a, r: a.alloc_draft(r, 2, out_cache_loc=torch.empty(4)),
        TypeError,
        "out_cache_loc must be int32 or int64",
    ),
    (
        # A device batch longer than max_requests (duplicates): the kernel's per-entry scratch has max_requests rows.
        "draft-batch-past-rows",
        lambda a, r: a.alloc_draft(torch.tensor([0, 1, 0, 1, 0]), 2),
        ValueError,
        r"req_pool_indices must have at most max_requests \(4\) entries, got 5",
    ),
    (
        "reserve-batch-past-rows",
        lambda a, r: a.reserve_draft(torch.tensor([1] * 9), 1),
        ValueError,
        r"at most max_requests \(4\) entries, got 9",
    ),
    (
        "reserve-free-row",
        lambda a, r: a.reserve_draft([3], 1),
        ValueError,
        "= 3 is not a row in use",
    ),
    (
        "commit-too-many",
        lambda a, r: a.commit(r, torch.tensor([1, 3]), validate=True),
        ValueError,
        r"accept_lens\[1\] must be in \[0, 2\] \(the draft window of row 1\), got 3",
    ),
    (
        "commit-negative",
        lambda a, r: a.commit(r, torch.tensor([-1, 0]), validate=True),
        ValueError,
        r"accept_lens\[0\] must be in \[0, 2\]",
    ),
    (
        "commit-length",
        lambda a, r: a.commit(r, torch.tensor([1])),
        ValueError,
        "accept_lens has 1 elements but req_pool_indices has 2",
    ),
    ("commit-float", lambda a, r: a.commit(r, torch.tensor([1.0, 1.0])), TypeError, "accept_lens must be int32"),
    (
        "commit-free-row",
        lambda a, r: a.commit(torch.tensor([2]), torch.tensor([0]), validate=True),
        ValueError,
        "= 2 is not a row in use",
    ),
    (
        "commit-and-draft-too-many",
        lambda a, r: a.commit_and_draft(r, torch.tensor([1, 3]), 2, validate=True),
        ValueError,
        r"accept_lens\[1\] must be in \[0, 2\] \(the draft window of row 1\), got 3",
    ),
    (
        "commit-and-draft-list",
        lambda a, r: a.commit_and_draft([0, 1], [1, 3], 2),
        ValueError,
        r"accept_lens\[1\] must be in \[0, 2\] \(the draft window of row 1\), got 3",
    ),
    (
        "commit-and-draft-length",
        lambda a, r: a.commit_and_draft(r, torch.tensor([1]), 2),
        ValueError,
        "accept_lens has 1 elements but req_pool_indices has 2",
    ),
    (
        "commit-and-draft-negative-n",
        lambda a, r: a.commit_and_draft(r, torch.tensor([1, 1]), -1),
        ValueError,
        "num_draft_tokens must be in",
    ),
    (
        "commit-and-draft-past-the-context",
        lambda a, r: a.commit_and_draft(r, torch.tensor([2, 2]), 12),
        ContextLengthError,
        r"request 1 \(row 1\) has 6 committed tokens; a draft window of 12 needs 18 positions but max_context_len "
        r"is 16",
    ),
    ("free-unused", lambda a, r: a.free_requests([0, 3]), ValueError, r"req_pool_indices\[1\] = 3 is not a row in use"),
    ("free-twice", lambda a, r: a.free_requests(torch.tensor([1, 1])), ValueError, "appears twice"),
    ("free-negative", lambda a, r: a.free_requests([-1]), ValueError, r"must be in \[0, 4\), got -1"),
    # Host lists are checked by C-level builtins first; every kind of bad entry still gets its own error.
    ("add-bool", lambda a, r: a.add_requests([2, True]), TypeError, r"prompt_lens\[1\] must be an int, got bool"),
    ("add-too-long", lambda a, r: a.add_requests([2, 17]), ContextLengthError, r"prompt_lens\[1\] = 17 is longer"),
    ("free-twice-list", lambda a, r: a.free_requests([1, 0, 1]), ValueError, r"\[2\] = 1 appears twice"),
    ("free-bool", lambda a, r: a.free_requests([0, False]), TypeError, r"req_pool_indices\[1\] must be an int"),
    (
        "free-keep-length",
        lambda a, r: a.free_requests([0, 1], keep_lens=[0]),
        ValueError,
        "keep_lens has 1 elements but req_pool_indices has 2",
    ),
    # Sparse tensors read back on the host: torch's RuntimeError or NotImplementedError named nothing (an audit)
    (
        "add-sparse",
        lambda a, r: a.add_requests(torch.tensor([3]).to_sparse()),
        ValueError,
        "prompt_lens must be a dense",
    ),
    (
        "free-sparse",
        lambda a, r: a.free_requests(torch.tensor([0]).to_sparse()),
        ValueError,
        "req_pool_indices must be a dense",
    ),
    (
        "free-keep-sparse",
        lambda a, r: a.free_requests([0], keep_lens=torch.tensor([2]).to_sparse()),
        ValueError,
        "keep_lens must be a dense",
    ),
    (
        "release-sparse",
        lambda a, r: a.release_slots(torch.tensor([4]).to_sparse()),
        ValueError,
        "slots must be a dense",
    ),
    (
        "prefix-slots-sparse",
        lambda a, r: a.add_requests(
            [4], prefix_slots=torch.zeros(1, 4, dtype=torch.int64).to_sparse(), prefix_lens=[2]
        ),
        ValueError,
        "prefix_slots must be a dense",
    ),
    (  # (the count of a host vector is taken before its values: that must not trip on a nested tensor)
        "add-lens-nested",
        lambda a, r: a.add_requests(_nested(torch.tensor(3))),
        ValueError,
        "prompt_lens must be a dense",
    ),
    (
        "free-rows-nested",
        lambda a, r: a.free_requests(_nested(torch.tensor(0))),
        ValueError,
        "req_pool_indices must be a dense",
    ),
    (
        "free-keep-nested",
        lambda a, r: a.free_requests([0, 1], keep_lens=_nested(torch.tensor(0))),
        ValueError,
        "keep_lens must be a dense",
    ),
    (
        "prefix-lens-nested",
        lambda a, r: a.add_requests(
            [4, 4], prefix_slots=torch.zeros(2, 4, dtype=torch.int64), prefix_lens=_nested(torch.tensor(4))
        ),
        ValueError,
        "prefix_lens must be a dense",
    ),
    (  # an object that forwards a tensor's attributes is no buffer: the launch wrote through it, then a step raised
        "draft-out-forwarding",
        lambda a, r: a.alloc_draft(r, 2, out_cache_loc=_Forwarding(torch.empty(8, dtype=torch.int64))),
        TypeError,
        "out_cache_loc must be a torch.Tensor, got .*_Forwarding",
    ),
    (
        "branches-out-forwarding",
        lambda a, r: a.alloc_branches(r, 2, 2, out=_Forwarding(torch.empty(8, dtype=torch.int64))),
        TypeError,
        "out must be a torch.Tensor, got .*_Forwarding",
    ),
    (
        "prefix-lens-sparse",
        lambda a, r: a.add_requests(
            [4], prefix_slots=torch.zeros(1, 4, dtype=torch.int64), prefix_lens=torch.tensor([2]).to_sparse()
        ),
        ValueError,
        "prefix_lens must be a dense",
    ),
    # Nested and sparse tree tensors: torch's RuntimeError, an indeterminate relation or a stride message (an audit)
    (
        "tree-index-nested",
        lambda a, r: a.commit_tree(r, _nested(torch.zeros(2, dtype=torch.int64)), [0, 0]),
        ValueError,
        "accept_index must be a dense",
    ),
    (
        "tree-index-jagged",
        lambda a, r: a.commit_tree(r, _nested(torch.zeros(2, dtype=torch.int64), layout=torch.jagged), [0, 0]),
        ValueError,
        "accept_index must be a dense",
    ),
    (
        "tree-index-sparse",
        lambda a, r: a.commit_tree(r, torch.zeros(2, 2, dtype=torch.int64).to_sparse(), [0, 0]),
        ValueError,
        "accept_index must be a dense",
    ),
    (
        "tree-kv-src-nested",
        lambda a, r: a.commit_tree(
            r, torch.zeros(2, 2, dtype=torch.int64), [0, 0], kv_src=_nested(torch.zeros(2, dtype=torch.int64))
        ),
        ValueError,
        "kv_src must be a dense",
    ),
    (  # 1-D and contiguous: it passed the fast check (a review, 2026-11-25)
        "commit-rows-nested-1d",
        lambda a, r: a.commit(_nested(torch.tensor(0)), [0, 0]),
        ValueError,
        "req_pool_indices must be a dense",
    ),
    (
        "release-rows-nested-1d",
        lambda a, r: a.release_branches(_nested(torch.tensor(0))),
        ValueError,
        "req_pool_indices must be a dense",
    ),
    (
        "draft-out-nested-1d",
        lambda a, r: a.alloc_draft(r, 2, out_cache_loc=_nested(torch.tensor(0))),
        ValueError,
        "out_cache_loc must be a dense",
    ),
    (
        "branches-out-nested",
        lambda a, r: a.alloc_branches(r, 2, 2, out=_nested(torch.zeros(4, dtype=torch.int64))),
        ValueError,
        "out must be a dense",
    ),
    # Lazy sequences are measured before they are read: range(10**7) used to be expanded first (about 2 s)
    ("add-huge-lazy", lambda a, r: a.add_requests(Huge()), OutOfRowsError, f"asked for {HUGE} rows but 2 of 4"),
    ("add-range", lambda a, r: a.add_requests(range(10**30)), OutOfRowsError, f"asked for {2**63} rows"),
    (
        "free-huge-lazy",
        lambda a, r: a.free_requests(Huge()),
        ValueError,
        rf"at most max_requests \(4\) entries, got {HUGE}",
    ),
    ("free-huge-tensor", lambda a, r: a.free_requests(torch.zeros(5, dtype=torch.int64)), ValueError, "got 5"),
    (
        "free-keep-huge-lazy",
        lambda a, r: a.free_requests([0, 1], keep_lens=Huge()),
        ValueError,
        f"keep_lens has {HUGE} elements but req_pool_indices has 2",
    ),
    ("draft-huge-lazy", lambda a, r: a.alloc_draft(Huge(), 2), ValueError, r"at most max_requests \(4\) entries"),
    (
        "commit-huge-lazy",
        lambda a, r: a.commit([0, 1], Huge()),
        ValueError,
        f"accept_lens has {HUGE} elements but req_pool_indices has 2",
    ),
    (
        "prefix-huge-lazy",
        lambda a, r: a.add_requests([4], prefix_slots=torch.zeros(1, 4, dtype=torch.int64), prefix_lens=Huge()),
        ValueError,
        f"prefix_lens has {HUGE} elements but prompt_lens has 1",
    ),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_change_nothing(call, error, message):
    alloc, rows = live_allocator()
    before = snapshot(alloc)
    with pytest.raises(error, match=message):
        call(alloc, rows)
    assert_unchanged(alloc, before)


def test_a_buffer_that_passed_is_checked_again_once_it_changes():
    """An allocator keeps what it found of output buffers that passed its checks (an engine passes the same ones every
    step), by address, strides, shape, dtype and device: a buffer made too short for the call, moved onto the
    allocator's memory, re-typed, re-strided, or met by a new ``branch_pages`` is refused as a new buffer would be,
    and nothing changes."""
    alloc = DraftCacheAllocator(256, 4, 32, page_size=4, device="cpu")
    rows = alloc.add_requests([3, 6])
    out, last = torch.empty(16, dtype=torch.int64)[:8], torch.empty(2, dtype=torch.int64)

    def draft(n=2):
        return alloc.alloc_draft(rows, n, out_cache_loc=out, last_loc=last)

    for _ in range(2):  # passed, then kept
        draft()
        alloc.commit(rows, [0, 0])
    assert len(alloc._checked_buffers) == 2

    def refused(message, error=ValueError, n=2):
        before = snapshot(alloc)
        with pytest.raises(error, match=message):
            draft(n)
        assert_unchanged(alloc, before)

    refused("out_cache_loc must have at least 10 elements, got 8", n=5)

    class LooksLikeOut:  # the kept buffer's five facts, and nothing else (an audit found it taken as the buffer)
        def __getattr__(self, name):
            if name not in ("data_ptr", "stride", "shape", "dtype", "device"):
                raise AttributeError(name)
            return getattr(out, name)

    before = snapshot(alloc)
    with pytest.raises(TypeError, match="out_cache_loc must be a torch.Tensor, got .*LooksLikeOut"):
        alloc.alloc_draft(rows, 2, out_cache_loc=LooksLikeOut(), last_loc=last)
    assert_unchanged(alloc, before)
    saved = out.data
    out.data = out.view(torch.float64)  # same address, shape and strides
    refused("out_cache_loc must be int32 or int64, got torch.float64", TypeError)
    out.data = saved
    out.as_strided_((8,), (2,))  # same address, shape and dtype
    refused("out_cache_loc must have unit stride")
    out.as_strided_((8,), (1,))
    last.set_(alloc.seq_lens.untyped_storage(), 0, (2,), (1,))
    refused("last_loc must not share memory with the allocator's own tensors")
    last = torch.empty(2, dtype=torch.int64)
    draft()  # the buffers pass again
    alloc.commit(rows, [0, 0])
    # As if tree calls had widened branch_pages into memory a freed buffer held, at an address a kept buffer has
    alloc.branch_pages = out.view(torch.int32).view(4, 4)  # (the first 8 int64 of out's 16)
    refused("out_cache_loc must not share memory with the allocator's own tensors")


def test_numpy_integers_count_as_ints():
    """Counts and the entries of host lists may be any integer type (numbers.Integral, e.g. numpy.int64), as the
    ops' counts: the same calls with numpy's integers leave the allocator exactly as with Python's (they were
    refused, a new-user audit of 2026-11-25 found: engines' schedulers often hold numpy integers)."""
    results = []
    for ints in (int, np.int64):
        alloc = DraftCacheAllocator(ints(256), ints(4), ints(32), page_size=ints(4), device="cpu")
        got = [alloc.add_requests([ints(3), ints(6)]).tolist()]
        rows = [ints(r) for r in got[0]]
        got += [t.tolist() for t in alloc.alloc_draft(rows, ints(3))]
        alloc.commit(rows, [ints(2), np.int32(1)])
        got += [t.tolist() for t in alloc.alloc_branches(rows, ints(2), ints(2))]
        got += [t.tolist() for t in alloc.alloc_tree_draft(rows, ints(2), ints(2), ints(2))]
        step = DraftStepWrapper(alloc)
        step.plan(rows, ints(2), accept_lens=torch.tensor([1, 0]))
        got += [t.tolist() for t in step.commit_and_draft()]
        alloc.free_requests(rows[:1], keep_lens=[ints(0)])
        results.append((got, snapshot(alloc)))
    assert results[0][0] == results[1][0]
    for name, value in results[0][1].items():
        assert (
            torch.equal(value, results[1][1][name]) if isinstance(value, torch.Tensor) else value == results[1][1][name]
        ), name


def test_a_numpy_device_index_is_an_int_index():
    """``device=numpy.int64(0)`` names what ``device=0`` names (a CUDA index; refused as a type before)."""
    outcomes = []
    for index in (0, np.int64(0)):
        try:
            outcomes.append(DraftCacheAllocator(16, 1, 8, device=index).device)
        except ValueError as error:  # no CUDA device here: the same error for both
            outcomes.append(str(error))
    assert outcomes[0] == outcomes[1]


def test_commit_after_commit_is_caught_by_validate():
    alloc, rows = live_allocator()
    alloc.commit(rows, torch.tensor([2, 1]), validate=True)
    with pytest.raises(ValueError, match=r"must be in \[0, 0\]"):
        alloc.commit(rows, torch.tensor([1, 0]), validate=True)


def test_empty_batches():
    alloc, rows = live_allocator()
    before = snapshot(alloc)
    empty = torch.empty(0, dtype=torch.int64)
    out, last = alloc.alloc_draft(empty, 3)
    assert out.shape == (0,) and last.shape == (0,)
    alloc.reserve_draft([], 3)
    alloc.commit(empty, empty)
    alloc.free_requests([])
    assert alloc.add_requests([]).shape == (0,)
    assert_unchanged(alloc, before)
    out, last = alloc.alloc_draft(rows, 0)
    assert out.shape == (0,) and last.tolist() == [alloc.req_to_token[0, 2].item(), alloc.req_to_token[1, 3].item()]


# ------------------------------------------------------------------------------------------ many programs


def test_batch_size_picks_the_allocation_tile(monkeypatch):
    """Off Ascend: one program with the smallest power-of-two tile (at least _MIN_TILE) up to _MAX_TILE requests,
    _MIN_TILE-request tiles past it up to _LARGE_BATCH, _MAX_TILE-request ones past that; a window too wide for the
    tile's elements narrows it."""
    monkeypatch.setattr(allocator_module, "_LARGE_BATCH", 400)
    alloc = DraftCacheAllocator(64 * 1024, 600, 256, page_size=16, device="cpu")
    rows = alloc.add_requests([3] * 600)
    launches = []
    real = backend.launch

    def record(kernel, grid, *args):
        if kernel.__name__ == "_alloc_windows_kernel":
            launches.append((grid[0], dict(args[-2])["TILE"]))
        real(kernel, grid, *args)

    monkeypatch.setattr(backend, "launch", record)
    low, high = allocator_module._MIN_TILE, allocator_module._MAX_TILE
    for bs, n in ((1, 4), (low + 1, 4), (high, 4), (high + 1, 4), (600, 4), (100, 64)):
        alloc.alloc_draft(rows[:bs], n)
        alloc.commit(rows[:bs], torch.zeros(bs, dtype=torch.int64))
    block = allocator_module._ALLOC_ELEMENTS // 64
    assert launches == [
        (1, low),
        (1, 2 * low),
        (1, high),
        (-(-(high + 1) // low), low),
        (-(-600 // high), high),
        (-(-100 // block), block),
    ]
    check_layout(alloc)


def test_tree_draft_past_large_batch_takes_about_one_program_per_core(monkeypatch):
    """Past _LARGE_BATCH requests a draft with branches at page 1 takes the smallest power-of-two tile of at least
    _MIN_TILE requests that keeps the grid within one program per core, at most _BRANCH_LARGE_TILE; whichever the
    tile, the same slots, pairs and lengths."""
    monkeypatch.setattr(allocator_module, "_LARGE_BATCH", 300)
    bs, low, high = 500, allocator_module._MIN_TILE, allocator_module._BRANCH_LARGE_TILE
    launches = []
    real = backend.launch

    def record(kernel, grid, *args):
        if kernel.__name__ == "_alloc_windows_kernel" and dict(args[-2])["BRANCH"]:
            launches.append((grid[0], dict(args[-2])["TILE"]))
        real(kernel, grid, *args)

    monkeypatch.setattr(backend, "launch", record)
    results = []
    for cores, tile in ((2, high), (8, 64), (100, low)):  # 250 -> 256 (capped), 63 -> 64, 5 -> 8 (at least low)
        alloc = DraftCacheAllocator(8 * 1024, bs, 32, page_size=1, device="cpu")
        alloc._num_cores = cores
        rows = alloc.add_requests([i % 7 for i in range(bs)])
        launches.clear()
        outputs = alloc.alloc_tree_draft(rows, 3, 2, 2)
        assert launches == [(-(-bs // tile), tile)]
        check_layout(alloc)
        results.append(([outputs], snapshot(alloc)))
    for run in results[1:]:
        assert_same_runs(run, results[0])


@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_release_draft_tile_at_page_one(monkeypatch, page_size):
    """A draft that returns branch pages with page_size 1 runs on _MIN_TILE-request tiles past
    _RELEASE_ONE_PROGRAM requests (its pushes and pops grow with every token); other page sizes keep one program up
    to _MAX_TILE."""
    bs = allocator_module._RELEASE_ONE_PROGRAM + 1
    alloc = DraftCacheAllocator(64 * 1024, bs, 64, page_size=page_size, device="cpu")
    rows = alloc.add_requests([3] * bs)
    launches = []
    real = backend.launch

    def record(kernel, grid, *args):
        if kernel.__name__ == "_alloc_windows_kernel":
            constexprs = dict(args[-2])
            launches.append((grid[0], constexprs["TILE"], constexprs["RELEASE"]))
        real(kernel, grid, *args)

    monkeypatch.setattr(backend, "launch", record)
    alloc.alloc_draft(rows, 4)  # no branch pages yet: no release
    alloc.alloc_branches(rows, 2, 3)
    alloc.alloc_draft(rows, 4)  # returns the branch pages in its launch
    low = allocator_module._MIN_TILE
    one = 1 << (bs - 1).bit_length()
    released = (-(-bs // low), low, True) if page_size == 1 else (1, one, True)
    assert launches == [(1, one, False), released]
    check_layout(alloc)


@pytest.fixture
def many_programs(monkeypatch):
    """Tiles of 8 requests, scans of 16: a few hundred requests span dozens of programs."""
    tiles = {"_MAX_TILE": 8, "_SCAN_BLOCK": 16, "_FREE_TILE": 8, "_FREE_CLASSES": ((None, 8, 16),), "_COMMIT_TILE": 8}
    for name, value in tiles.items():
        monkeypatch.setattr(allocator_module, name, value)


@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_many_programs_match_one_program_call_for_call(page_size, many_programs):
    """The same loop with tiles of 8 (dozens of programs) and with one program per launch: identical."""
    runs = []
    one = {"_MAX_TILE": 1024, "_SCAN_BLOCK": 1024, "_FREE_TILE": 1024, "_FREE_CLASSES": ((None, 1024, 16),)}
    for tiles in ({}, {**one, "_COMMIT_TILE": 1024}):
        with allocator_constants(tiles):
            num_slots = (20000 // page_size + 600) * page_size
            alloc = DraftCacheAllocator(num_slots, 300, 96, page_size=page_size, device="cpu")
            rows = alloc.add_requests([(37 * i) % 60 for i in range(300)])
            outputs = []
            for step in range(3):
                outputs.append(alloc.alloc_draft(rows, 5))
                alloc.commit(rows, torch.tensor([(i + step) % 7 for i in range(300)]))
            check_layout(alloc)
            alloc.free_requests(rows[::3])
            check_layout(alloc)
            runs.append((outputs, snapshot(alloc)))
    assert_same_runs(*runs)


@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_looking_back_matches_summing_call_for_call(page_size, many_programs, monkeypatch):
    """A chain draft past one program looks back (each program publishes its tiles' pops and adds those of earlier
    tiles) off Ascend; on Ascend every program sums the earlier requests itself (_LOOK_BACK_BLOCK = 0 here). Both,
    call for call, on dozens of programs: the same slots and state, with rows not in use, clamped accept lengths and
    a draft that commits first in the batch; check_layout checks that every published tile went back to 0. (A grid
    capped below the tiles, each program looping over several, runs on a GPU only, test_gpu.py: the interpreter
    runs programs one after another, so a program would wait for a later one's tile.)"""
    looping = False
    launches = []
    launch = backend.launch

    def record(kernel, grid, device, tensors, scalars, constexprs, num_warps):
        if kernel.__name__ == "_alloc_windows_kernel":
            launches.append((grid[0], dict(constexprs)["LOOKBACK"]))
        return launch(kernel, grid, device, tensors, scalars, constexprs, num_warps)

    monkeypatch.setattr(backend, "launch", record)
    runs = []
    for block in (0, 4):  # summing; looking back at 4 tiles a load, past the dozens of tiles of a batch
        with allocator_constants({"_LOOK_BACK_BLOCK": block}):
            rng = random.Random(page_size)
            alloc = DraftCacheAllocator(page_size * 8000, 200, 64, page_size=page_size, device="cpu")
            if looping:
                alloc._look_back_programs = 2
            rows = alloc.add_requests([rng.randrange(0, 40) for _ in range(150)])
            alloc.free_requests(rows[100:110])  # rows not in use, still in the batch: they change nothing
            launches.clear()
            outputs = []
            for step in range(4):
                outputs.append(alloc.alloc_draft(rows, rng.randrange(0, 6)))
                check_layout(alloc)
                accept = torch.tensor([rng.choice([-1, 0, 1, 2, 3, 9]) for _ in range(150)])
                if step % 2:
                    outputs.append(alloc.commit_and_draft(rows[:64], accept[:64], 3))
                else:
                    alloc.commit(rows, accept)
                if step == 2:
                    alloc.reserve_draft(rows[::2].contiguous(), 2)
                check_layout(alloc)
            runs.append((outputs, snapshot(alloc)))
            drafts = [grid for grid, looked in launches if looked]
            if block:
                assert drafts and max(drafts) == (2 if looping else 150 // 8 + 1), launches
            else:
                assert not drafts
    assert_same_runs(*runs)


@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_a_draft_of_more_than_one_tile_looks_back_on_small_tiles(page_size, monkeypatch):
    """Up to _MAX_TILE requests, a chain draft that is more than one tile of _ALLOC_ELEMENTS slots (more than
    _ALLOC_ELEMENTS / block requests: windows wider than 8 tokens) looks back on the per-SM tiles of larger batches; a
    batch within one tile keeps one program. Slots and state are those of one program, call for call (alloc_draft and
    commit_and_draft, rows not in use in the batch)."""
    launches = []
    launch = backend.launch

    def record(kernel, grid, device, tensors, scalars, constexprs, num_warps):
        if kernel.__name__ == "_alloc_windows_kernel" and not dict(constexprs)["PREFILL"]:
            launches.append((grid[0], dict(constexprs)["TILE"], dict(constexprs)["LOOKBACK"]))
        return launch(kernel, grid, device, tensors, scalars, constexprs, num_warps)

    monkeypatch.setattr(backend, "launch", record)
    elements, tile = allocator_module._ALLOC_ELEMENTS, allocator_module._LOOK_BACK_MIN_TILE
    cases = [
        (elements // 16 + 1, 9),
        (elements // 16, 16),
        (elements // 32 + 1, 32),
        (elements // 64 + 1, 64),
        (elements // 64, 64),
        (allocator_module._MAX_TILE, 8),
    ]
    for bs, n in cases:
        looks = bs > elements // specdec_ops.tiles.block_n(n)
        runs = []
        for programs in (132, 0):  # a GPU's 132 SMs; none: the interpreter's one program (no looking back)
            alloc = DraftCacheAllocator(
                page_size * (bs * (40 + 3 * n) // page_size + 2 * bs), bs, 40 + 3 * n, page_size=page_size, device="cpu"
            )
            alloc._look_back_programs = programs
            rows = alloc.add_requests([(7 * i) % 40 for i in range(bs)])
            alloc.free_requests(rows[5:9])  # rows not in use, still in the batch
            launches.clear()
            outputs = [alloc.alloc_draft(rows, n)]
            outputs.append(alloc.commit_and_draft(rows, torch.tensor([i % (n + 2) for i in range(bs)]), n))
            check_layout(alloc)
            if programs:
                one = max(1 << (bs - 1).bit_length(), allocator_module._MIN_TILE)  # one program, one tile
                expected = (-(-bs // tile), tile, allocator_module._LOOK_BACK_BLOCK) if looks else (1, one, 0)
                assert launches == [expected, expected], (bs, n, launches)
            runs.append((outputs, snapshot(alloc)))
        assert_same_runs(*runs)


@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_wide_prefill_matches_the_narrow_one(page_size):
    """Long prompts (and a cached prefix) read in wide column blocks give the same rows, slots and lengths as the
    narrow blocks of short prompts."""
    runs = []
    for wide in (True, False):
        with allocator_constants({"_WIDE_PREFILL_TOKENS": 256 if wide else 10**9}):
            alloc = DraftCacheAllocator(24 * 2048, 24, 2048, page_size=page_size, device="cpu")
            rows = alloc.add_requests([300 + 97 * i for i in range(10)])  # 10 requests: 3 tiles of 4 when wide
            keep = [page_size * (100 // page_size)] * 2
            kept = alloc.free_requests(rows[:2], keep_lens=keep)
            prefix = kept.view(2, -1)
            alloc.add_requests([700, 1500], prefix_slots=prefix, prefix_lens=keep)
            assert alloc._alloc_configs and all(key[-3] == wide for key in alloc._alloc_configs)
            check_layout(alloc)
            runs.append(([], snapshot(alloc)))
    assert_same_runs(*runs)


def test_many_programs_large_batch_against_the_loop(many_programs):
    alloc = DraftCacheAllocator(300 * 8 * 32, 300, 256, page_size=32, device="cpu")
    lens = [(7 * i) % 150 for i in range(300)]
    rows = alloc.add_requests(lens)
    out, last = alloc.alloc_draft(rows, 40)
    owned = check_layout(alloc)
    expected_out, expected_last = loop_outputs(owned, rows.tolist(), lens, 40)
    assert out.tolist() == expected_out and last.tolist() == expected_last
    alloc.free_requests(rows)
    assert alloc.num_free_slots() == alloc.num_slots
    assert alloc._counters[2].item() == 0, "the last program resets the ticket"


@pytest.mark.parametrize("page_size", [1, 4, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("programs", ["one", "many", "two-launches", "two-launches-looping"])
def test_commit_and_draft_is_commit_then_alloc_draft(page_size, programs, monkeypatch):
    """commit_and_draft against commit + alloc_draft, call for call: the same slots, the same state, on one program,
    on many, and past _COMMIT_DRAFT_MAX_BATCH (two launches: the tile counts, then the allocation; "looping": two
    programs take the four tiles in turn, as on Ascend's grid of one program per core); accept lengths past the
    window or negative are clamped alike; branch pages held by the rows are released in the same launch."""
    if programs == "many":
        for name, value in {"_MAX_TILE": 2, "_MIN_TILE": 2, "_SCAN_BLOCK": 4, "_COMMIT_TILE": 2}.items():
            monkeypatch.setattr(allocator_module, name, value)
    elif programs.startswith("two-launches"):
        for name, value in {"_COMMIT_DRAFT_MAX_BATCH": 6, "_TWO_PASS_TILE": 2, "_SCAN_BLOCK": 2}.items():
            monkeypatch.setattr(allocator_module, name, value)
    runs = []
    for fused in (False, True):
        rng = random.Random(page_size)
        alloc = DraftCacheAllocator(max(page_size * 120, 800), 8, 96, page_size=page_size, device="cpu")
        if programs == "two-launches-looping":
            alloc._max_programs = 2
        rows = alloc.add_requests([3, 17, 0, 33, 5, 9, 1])
        outputs = [alloc.alloc_draft(rows, 4)]
        for step in range(6):
            accept = torch.tensor([rng.choice([-2, 0, 1, 3, 5, 2**33]) for _ in range(7)])
            n = rng.randrange(0, 6)
            if step == 3:
                alloc.alloc_branches(rows, 2, 3)  # the next call releases them
            if fused:
                out, last = alloc.commit_and_draft(rows, accept, n)
            else:
                alloc.commit(rows, accept)
                out, last = alloc.alloc_draft(rows, n)
            outputs.append((out.clone(), last.clone()))
            check_layout(alloc)
        runs.append((outputs, snapshot(alloc)))
    assert_same_runs(*runs)


@pytest.mark.parametrize("branches", [False, True], ids=["chain", "branches"])
def test_commit_and_draft_is_one_launch_up_to_its_batch_limit(branches, monkeypatch):
    """One launch of the allocation kernel up to _COMMIT_DRAFT_MAX_BATCH requests; past it the tile counts, then the
    allocation; one launch again when branch pages are released with the commit."""
    launches = []
    launch = backend.launch
    monkeypatch.setattr(backend, "launch", lambda kernel, *a: launches.append(kernel.__name__) or launch(kernel, *a))
    alloc = DraftCacheAllocator(4 * 64, 8, 64, page_size=4, device="cpu")
    rows = alloc.add_requests([3, 6, 9])
    alloc.alloc_draft(rows, 2)
    for limit, expected in ((3, ["_alloc_windows_kernel"]), (2, ["_count_pops_kernel", "_alloc_windows_kernel"])):
        monkeypatch.setattr(allocator_module, "_COMMIT_DRAFT_MAX_BATCH", limit)
        if branches:
            alloc.alloc_branches(rows, 2, 2)
            expected = ["_alloc_windows_kernel"]
        launches.clear()
        alloc.commit_and_draft(rows, torch.tensor([1, 2, 0]), 2)
        assert launches == expected
    check_layout(alloc)


def test_commit_and_draft_is_all_or_nothing():
    """A draft that does not fit: OutOfSlotsError, and the commit did not happen either."""
    alloc = DraftCacheAllocator(4 * 6, 3, 64, page_size=4, device="cpu")
    rows = alloc.add_requests([4, 4])
    alloc.alloc_draft(rows, 4)
    before = snapshot(alloc)
    with pytest.raises(OutOfSlotsError):
        alloc.commit_and_draft(rows, torch.tensor([4, 4]), 12)
    assert_unchanged(alloc, before)
    out, last = alloc.commit_and_draft(rows, torch.tensor([4, 1]), 4)
    assert alloc.seq_lens[rows].tolist() == [8, 5] and alloc.window_lens[rows].tolist() == [4, 4]
    owned = check_layout(alloc)
    assert out.tolist() == owned[0][8:12] + owned[1][5:9] and last.tolist() == [owned[0][7], owned[1][4]]


# --------------------------------------------------------------------------------------------- misuse


def test_commit_clamps_to_the_open_window():
    alloc = DraftCacheAllocator(64, 3, 32, page_size=4, device="cpu")
    rows = alloc.add_requests([3, 6, 1])
    alloc.alloc_draft(rows, 4)
    alloc.commit(rows, torch.tensor([2**33, -5, 4]))  # past the window (and int32), negative, exactly the window
    assert alloc.seq_lens[rows].tolist() == [7, 6, 5]
    assert alloc.window_lens.tolist() == [0, 0, 0]
    alloc.commit(rows, torch.tensor([3, 3, 3]))  # no window open: commits nothing
    assert alloc.seq_lens[rows].tolist() == [7, 6, 5]
    out, last = alloc.alloc_draft(rows, 2)
    assert last.tolist() == alloc.req_to_token[rows, alloc.seq_lens[rows] - 1].tolist()  # never the padding slot
    check_layout(alloc)


@pytest.mark.parametrize("page_size", [1, 4, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("seed", range(3))
def test_misuse_never_corrupts_the_pool(page_size, seed):
    """Random accept lengths (negative, past the window), commits without drafts and double commits, with
    validate=False: after every call no slot is owned twice, the padding page is never handed out, and freeing
    everything gives the whole pool back."""
    rng = random.Random(seed)
    alloc = DraftCacheAllocator(page_size * 64, 6, 64, page_size=page_size, device="cpu")
    alloc.add_requests([rng.randrange(0, 20) for _ in range(4)])
    for _ in range(25):
        live = alloc.rows_in_use()
        rows = torch.tensor(live)
        action = rng.choice(["draft", "draft", "commit", "commit", "add", "free"])
        if action == "draft":
            n = rng.randrange(0, 6)
            seq = alloc.seq_lens[rows].tolist()
            if live and max(seq) + n <= alloc.max_context_len and alloc.num_free_slots() >= len(live) * (n + page_size):
                alloc.alloc_draft(rows, n)
        elif action == "commit" and live:
            accept = torch.tensor([rng.choice([-(2**40), -3, 0, 1, 5, 100, 2**31 - 1, 2**33]) for _ in live])
            alloc.commit(rows, accept)
        elif action == "add" and alloc.num_requests < alloc.max_requests and alloc.num_free_slots() > 40:
            alloc.add_requests([rng.randrange(0, 20)])
        elif action == "free" and live:
            alloc.free_requests([rng.choice(live)])
        check_layout(alloc)
    alloc.free_requests(alloc.rows_in_use())
    assert alloc.num_free_slots() == alloc.num_slots
    assert sorted(alloc.free_page_list()) == list(range(1, alloc.num_pages + 1))


def _stale_row_step(alloc: DraftCacheAllocator, rows: torch.Tensor, live: list[int]) -> list[torch.Tensor]:
    """One pass over every call that takes a tensor of rows on the hot path (validate=False), on ``rows``; returns
    the entries of the outputs that belong to ``live`` batch positions (all of them for the twin without stale
    rows) and checks that the others are what a row out of range gives."""
    bs, keep = rows.numel(), torch.tensor(live)
    stale = torch.tensor([i for i in range(bs) if i not in live], dtype=torch.long)
    got = []

    def take(values: torch.Tensor, per_request: int, filler: int) -> None:
        values = values.reshape(bs, per_request)
        got.append(values[keep].clone())
        assert (values[stale] == filler).all(), f"a stale row's outputs are {values[stale].tolist()}"

    def accept(step: int) -> torch.Tensor:  # by row, so that the twin's rows accept the same
        return (rows + step) % 4

    for step in range(2):
        out, last = alloc.alloc_draft(rows, 3)
        take(out, 3, -1), take(last, 1, -1)
        alloc.commit(rows, accept(step))
        out, last = alloc.commit_and_draft(rows, accept(step + 1), 2)
        take(out, 2, -1), take(last, 1, -1)
        alloc.commit(rows, accept(step))
        alloc.reserve_draft(rows, 4)
        slots, src, dst = alloc.alloc_branches(rows, 2, 3, return_copies=True)
        take(slots, 6, 0), take(src, src.numel() // bs, 0), take(dst, dst.numel() // bs, 0)
        out, last, slots, src, dst = alloc.alloc_tree_draft(rows, 4, 2, 2)
        take(out, 4, -1), take(last, 1, -1), take(slots, 4, 0)
        index = torch.tensor([[0, 2, 3, 1]] * bs)
        kv_src, kv_dst, out, last, slots, src, dst = alloc.commit_tree_and_draft(rows, index, accept(step), 4, 2, 3)
        take(out, 4, -1), take(last, 1, -1), take(slots, 6, 0)
        take(kv_src, 4, 0), take(kv_dst, 4, 0)  # stale rows accept nothing: pairs 0 -> 0
        kv_src, kv_dst = alloc.commit_tree(rows, index, accept(step + 2))
        take(kv_src, 4, 0), take(kv_dst, 4, 0)
        alloc.release_branches(rows)
    return got


@pytest.mark.parametrize("programs", ["one", "many"])
@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_stale_rows_change_nothing(page_size, programs):
    """A row not in use (freed, or never taken) in a tensor of rows with validate=False, which the host cannot see
    without a sync: every call leaves it as it is (seq_len and alloc_len -1, no slots, no pages), gives its outputs
    as for a row out of range, and does exactly what it does to the other rows without it. Before, a draft gave such
    a row pages that nothing ever freed (the next add_requests of the row overwrote them)."""
    runs = []
    with allocator_constants(MANY_PROGRAMS if programs == "many" else {}):
        for with_stale in (True, False):
            alloc = DraftCacheAllocator(page_size * 400, 8, 96, page_size=page_size, device="cpu")
            alloc.add_requests([5, 9, 3, 12, 7])
            alloc.free_requests([1, 3])
            batch = [0, 1, 2, 6, 4, 3] if with_stale else [0, 2, 4]
            live = [0, 2, 4] if with_stale else [0, 1, 2]
            outputs = _stale_row_step(alloc, torch.tensor(batch), live)
            for row in (1, 3, 5, 6, 7):
                assert alloc.alloc_lens[row] == alloc.seq_lens[row] == -1 and alloc.window_lens[row] == 0
                assert alloc.num_branch_pages[row] == 0 and not alloc.req_to_token[row].any()
            check_layout(alloc)
            runs.append((outputs, snapshot(alloc)))
            alloc.free_requests(alloc.rows_in_use())
            assert sorted(alloc.free_page_list()) == list(range(1, alloc.num_pages + 1))
    assert_same_runs(*runs)


def test_a_stale_row_raises_where_the_call_syncs_for_capacity():
    """Near capacity a draft syncs for an exact count and reads the rows back with it: a stale row is then caught
    (ValueError, nothing changed), where with headroom the kernels skip it; the same call without it goes through."""
    alloc = DraftCacheAllocator(4 * 6, 3, 64, page_size=4, device="cpu")
    alloc.add_requests([4, 4, 4])  # rows 0, 1, 2: 3 of the 6 pages
    alloc.free_requests([2])
    batch = torch.tensor([0, 1, 2])
    alloc.alloc_draft(batch, 1)  # headroom: no sync, row 2 skipped
    assert alloc.num_syncs == 0
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=r"req_pool_indices\[2\] = 2 is not a row in use"):
        alloc.alloc_draft(batch, 8)  # 4 pages more than the bound allows without a sync
    assert alloc.num_syncs == 1
    assert_unchanged(alloc, before)
    alloc.alloc_draft(batch[:2], 8)
    assert alloc.num_free_slots() == 0
    check_layout(alloc)


def test_accept_lengths_given_as_a_list_are_checked_on_the_host():
    alloc = DraftCacheAllocator(64, 3, 32, page_size=4, device="cpu")
    rows = alloc.add_requests([3, 6])
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=r"accept_lens\[0\] must be in \[0, 0\] \(the draft window of row 0\), got 1"):
        alloc.commit([0, 1], [1, 0])  # no window open
    assert_unchanged(alloc, before)
    alloc.alloc_draft([0, 1], 3)
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=r"accept_lens\[1\] must be in \[0, 3\] \(the draft window\), got 4"):
        alloc.commit(rows, [2, 4])  # rows on the device: the widest window the host knows of
    with pytest.raises(ValueError, match=r"accept_lens\[0\] must be in \[0, 3\]"):
        alloc.commit([0, 1], [-1, 0])
    assert_unchanged(alloc, before)
    alloc.commit([0, 1], [3, 1])
    assert alloc.seq_lens[rows].tolist() == [6, 7]


def test_rows_on_the_device_leave_the_host_an_upper_bound_of_every_window():
    """A commit or a draft whose rows the host does not see may close or open any window: the host keeps a bound
    of them all, so a list of accept lengths within a row's open window passes the host check."""
    alloc = DraftCacheAllocator(64, 3, 32, page_size=4, device="cpu")
    alloc.add_requests([3, 6])
    alloc.alloc_draft([0, 1], 3)
    alloc.commit(torch.tensor([0]), torch.tensor([1]))  # rows on the device: the host cannot tell which
    alloc.commit([1], [3])
    assert alloc.seq_lens[:2].tolist() == [4, 9]
    alloc.alloc_draft([0], 2)  # row 0's window: 2, as the host knows
    alloc.alloc_draft(torch.tensor([0]), 5)  # now 5, which the host cannot see
    alloc.commit([0], [5])
    assert alloc.seq_lens[:2].tolist() == [9, 9]


class LaunchFailed(RuntimeError):
    pass


def _failing_launch(*args, **kwargs):
    raise LaunchFailed("launch failed")


def _two_launches(call, *args):
    """``call(*args)`` with commit_and_draft past its one-launch limit: the tile counts, then the allocation."""
    with allocator_constants({"_COMMIT_DRAFT_MAX_BATCH": 1}):
        return call(*args)


def _tree_two_launches(alloc, *args):
    """commit_tree_and_draft past one program: the tree commit's launch, then the draft's."""
    choice = DraftCacheAllocator._tree_step_launch_choice
    DraftCacheAllocator._tree_step_launch_choice = lambda self, *a: (False, False)
    try:
        return alloc.commit_tree_and_draft(*args)
    finally:
        DraftCacheAllocator._tree_step_launch_choice = choice


LAUNCHING_CALLS = [
    ("add", lambda a, r: a.add_requests([5, 0, 9])),
    (
        "add-prefix",
        lambda a, r: a.add_requests([8], prefix_slots=4 * a.cached_pages()[1] + torch.arange(4)[None], prefix_lens=[4]),
    ),
    ("alloc_draft", lambda a, r: a.alloc_draft(r, 3)),
    ("alloc_draft-list", lambda a, r: a.alloc_draft(r.tolist(), 3)),
    ("reserve_draft", lambda a, r: a.reserve_draft(r, 3)),
    ("commit", lambda a, r: a.commit(r, torch.tensor([1, 1]))),
    ("commit_and_draft", lambda a, r: a.commit_and_draft(r, torch.tensor([1, 1]), 3)),
    ("commit_and_draft-lists", lambda a, r: a.commit_and_draft(r.tolist(), [1, 2], 3)),
    ("commit_and_draft-two-launches", lambda a, r: _two_launches(a.commit_and_draft, r, torch.tensor([1, 1]), 3)),
    ("alloc_branches", lambda a, r: a.alloc_branches(r, 2, 3)),  # the first: it widens branch_pages
    ("alloc_tree_draft", lambda a, r: a.alloc_tree_draft(r, 2, 2, 3)),  # widens branch_pages too
    ("commit_tree", lambda a, r: a.commit_tree(r, torch.tensor([[0, 1], [1, 0]]), torch.tensor([2, 1]))),
    (
        "commit_tree_and_draft",
        lambda a, r: a.commit_tree_and_draft(r, torch.tensor([[0, 1], [1, 0]]), torch.tensor([2, 1]), 2, 2, 3),
    ),
    (
        "commit_tree_and_draft-two-launches",
        lambda a, r: _tree_two_launches(a, r, torch.tensor([[0, 1], [1, 0]]), torch.tensor([2, 1]), 2, 2, 3),
    ),
    ("free", lambda a, r: a.free_requests(r)),
    ("free-keep", lambda a, r: a.free_requests(r, keep_lens=[4, 0])),
    ("release_slots", lambda a, r: a.release_slots([4 * a.cached_pages()[0] + 3])),
]


@pytest.mark.parametrize("call", [c[1] for c in LAUNCHING_CALLS], ids=[c[0] for c in LAUNCHING_CALLS])
def test_a_launch_that_raises_changes_nothing(call, monkeypatch):
    alloc = DraftCacheAllocator(64, 6, 32, page_size=4, device="cpu")
    for length in (6, 7):
        first = alloc.add_requests([length])
        alloc.free_requests(first, keep_lens=[4])  # its first page goes to the cache
    assert len(alloc.cached_pages()) == 2
    rows = alloc.add_requests([5, 6])
    alloc.alloc_draft(rows, 2)
    before = snapshot(alloc)
    host = (alloc._pages_bound, list(alloc._seq_base), dict(alloc._known_windows), list(alloc._min_pages))
    monkeypatch.setattr(backend, "launch", _failing_launch)
    with pytest.raises(LaunchFailed):
        call(alloc, rows)
    monkeypatch.undo()
    assert_unchanged(alloc, before)
    assert (alloc._pages_bound, list(alloc._seq_base), dict(alloc._known_windows), list(alloc._min_pages)) == host
    call(alloc, rows)  # and the same call goes through afterwards
    check_layout(alloc)


@pytest.mark.parametrize("call", ["commit", "commit-wrapper", "free"])
def test_with_branch_pages_held_a_launch_that_raises_changes_nothing(call, monkeypatch):
    """Rows that hold branch pages give them back in the call that commits or frees them, in its one launch: a chain
    commit's (the allocation kernel's commit and release, a window of no tokens), the free's (its kernel's
    BRANCHES). The launch raising changes nothing."""
    alloc = DraftCacheAllocator(64, 6, 32, page_size=4, device="cpu")
    rows = alloc.add_requests([5, 6])
    alloc.alloc_draft(rows, 2)
    alloc.alloc_branches(rows, 2, 3)
    step = DraftStepWrapper(alloc)
    step.plan(rows, 2, accept_lens=torch.tensor([1, 2]))
    before = snapshot(alloc)
    host = alloc._pages_bound, dict(alloc._known_windows), dict(alloc._branch_rows), alloc._branch_batch_pages
    run = {
        "commit": lambda: alloc.commit(rows, torch.tensor([1, 2])),
        "commit-wrapper": step.commit,
        "free": lambda: alloc.free_requests(rows),
    }[call]
    launches = []
    monkeypatch.setattr(backend, "launch", lambda kernel, *args: launches.append(kernel) or _failing_launch())
    monkeypatch.setattr(backend.Launch, "__call__", lambda self: launches.append(self) or _failing_launch())
    with pytest.raises(LaunchFailed):
        run()
    monkeypatch.undo()
    assert len(launches) == 1
    assert_unchanged(alloc, before)
    assert (alloc._pages_bound, dict(alloc._known_windows), dict(alloc._branch_rows), alloc._branch_batch_pages) == host
    launches = []
    monkeypatch.setattr(backend, "launch", lambda *args, launch=backend.launch: launches.append(args) or launch(*args))
    run()  # and the same call goes through afterwards
    monkeypatch.undo()
    assert len(launches) == 1
    if call == "free":
        assert ("BRANCHES", True) in launches[0][5]  # (kernel, grid, device, tensors, scalars, constexprs, warps)
    assert not alloc.num_branch_pages.any()
    # A free reads its rows back (every row in use: all forgotten); the host cannot tell what a tensor held.
    assert alloc._branches_may_exist() == (call != "free")
    if call != "free":
        assert alloc.seq_lens[rows].tolist() == [6, 8] and not alloc.window_lens[rows].any()
    check_layout(alloc)


# ------------------------------------------------------------------------------------------ page arithmetic


def test_commit_and_draft_takes_two_launches_past_one_program(monkeypatch):
    """Two launches past _COMMIT_DRAFT_MAX_BATCH requests; where the second overlaps the first (PDL), also past
    _COMMIT_DRAFT_WIDE_MAX_BATCH with windows of at least _COMMIT_DRAFT_WIDE_MIN_N tokens; never with branch pages to
    release. On a device (not the interpreter), eager calls take one launch up to _COMMIT_DRAFT_EAGER_MAX_BATCH;
    calls captured into a graph take two."""
    alloc = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    limit, wide, wide_n, eager = (
        allocator_module._COMMIT_DRAFT_MAX_BATCH,
        allocator_module._COMMIT_DRAFT_WIDE_MAX_BATCH,
        allocator_module._COMMIT_DRAFT_WIDE_MIN_N,
        allocator_module._COMMIT_DRAFT_EAGER_MAX_BATCH,
    )
    for pdl in (False, True):
        monkeypatch.setattr(backend, "supports_pdl", lambda device, pdl=pdl: pdl)
        assert alloc._in_two_launches(limit + 1, 1, False) and not alloc._in_two_launches(limit + 1, 1, True)
        assert not alloc._in_two_launches(limit, wide_n - 1, False)
        assert alloc._in_two_launches(wide + 1, wide_n, False) == pdl
        assert not alloc._in_two_launches(wide, wide_n, False)
    monkeypatch.setattr(backend, "is_interpreted", lambda device: False)  # as on a GPU
    for capturing in (False, True):
        monkeypatch.setattr(backend, "is_capturing", lambda device, capturing=capturing: capturing)
        assert alloc._in_two_launches(limit + 1, 1, False) == capturing
        assert alloc._in_two_launches(eager, 1, False) == capturing
        assert alloc._in_two_launches(eager + 1, 1, False)
        assert alloc._in_two_launches(wide + 1, wide_n + 1, False) == capturing


def test_two_launch_tiles_follow_page_window_and_batch():
    """The second launch's tiles (the first takes the same): pages of one token take 8-request tiles for windows of
    3 tokens or more up to 512 requests, else 16 up to 1024; larger pages 16 for windows of 2 to 4 tokens; 32 for
    the rest up to 4096 requests, 256 past them."""
    one = DraftCacheAllocator(64, 4, 32, page_size=1, device="cpu")
    paged = DraftCacheAllocator(64, 4, 32, page_size=16, device="cpu")
    assert [one._two_pass_tile(512, n) for n in (1, 2, 3, 4, 8)] == [16, 16, 8, 8, 8]
    assert [one._two_pass_tile(bs, 4) for bs in (257, 513, 1024, 1025, 4096, 4097)] == [8, 16, 16, 32, 32, 256]
    assert [paged._two_pass_tile(512, n) for n in (1, 2, 4, 5, 8)] == [32, 16, 16, 32, 32]
    assert paged._two_pass_tile(4097, 4) == 256


@pytest.mark.parametrize("wrapper", [False, True], ids=["method", "wrapper"])
def test_commit_and_draft_in_two_launches_changes_nothing_if_the_second_raises(wrapper, monkeypatch):
    """Past the one-launch limit the first launch writes only scratch: if the allocation launch raises after it, the
    allocator is as before, device and host; then the same call goes through, as commit + alloc_draft would."""
    monkeypatch.setattr(allocator_module, "_COMMIT_DRAFT_MAX_BATCH", 1)
    alloc, expected = (DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu") for _ in range(2))
    rows = alloc.add_requests([5, 6])
    expected.add_requests([5, 6])
    for a in (alloc, expected):
        a.alloc_draft(rows, 3)
    accept = torch.tensor([2, 3])
    step = DraftStepWrapper(alloc)
    step.plan(rows, 2, accept_lens=accept)
    call = step.commit_and_draft if wrapper else lambda: alloc.commit_and_draft(rows, accept, 2)
    before = snapshot(alloc)
    host = (alloc._pages_bound, dict(alloc._known_windows), alloc._unknown_window_bound)
    made = []
    launch = backend.launch

    def second_raises(kernel, *args):
        made.append(kernel.__name__)
        if len(made) == 2:
            raise LaunchFailed("launch failed")
        return launch(kernel, *args)

    monkeypatch.setattr(backend, "launch", second_raises)
    with pytest.raises(LaunchFailed):
        call()
    monkeypatch.setattr(backend, "launch", launch)
    assert made == ["_count_pops_kernel", "_alloc_windows_kernel"]
    assert_unchanged(alloc, before)
    assert (alloc._pages_bound, dict(alloc._known_windows), alloc._unknown_window_bound) == host
    out, last = call()
    expected.commit(rows, accept)
    assert_same_runs(([(out, last)], snapshot(alloc)), ([expected.alloc_draft(rows, 2)], snapshot(expected)))


def test_power_of_two_pages_shift_and_others_divide():
    assert [allocator_module._page_shift(p) for p in (1, 2, 16, 64, 128, 3, 12, 96)] == [0, 1, 4, 6, 7, -1, -1, -1]


def test_npu_takes_only_the_page_sizes_its_compile_check_compiles(monkeypatch):
    """PAGE_SIZE is a constexpr: on an NPU another size would run kernels no check compiled (and a size that is not a
    power of two would divide in float32, exact only below 2**24)."""
    monkeypatch.setattr(backend, "is_npu", lambda device: True)
    for page_size in (2, 3, 32, 256):
        with pytest.raises(ValueError, match=rf"on an NPU, page_size must be one of 1, 16, 64, 128 .*got {page_size}$"):
            DraftCacheAllocator(page_size * 64, 2, 16, page_size=page_size, device="cpu")
    for page_size in allocator_module.NPU_PAGE_SIZES:
        DraftCacheAllocator(page_size * 64, 1, 2**24, page_size=page_size, device="cpu")  # shifts: any size
    monkeypatch.setattr(backend, "is_npu", lambda device: False)
    DraftCacheAllocator(3 * 64, 2, 16, page_size=3, device="cpu")  # elsewhere any size


def test_pool_limits():
    with pytest.raises(ValueError, match=r"num_slots \+ page_size must be below 2\*\*31"):
        DraftCacheAllocator(2**31 - 64, 1, 8, page_size=64, device="cpu")
    with pytest.raises(ValueError, match=r"num_slots // page_size must be below 2\*\*30 pages"):
        DraftCacheAllocator(2**30, 1, 8, device="cpu")
    with pytest.raises(ValueError, match=r"max_context_len must be in \[1, 2\*\*30\)"):
        DraftCacheAllocator(64, 1, 2**30, device="cpu")


@pytest.mark.parametrize("page_size", [128, 3], ids=lambda p: f"page{p}")
def test_slots_near_2_31_and_a_wrapping_ring_are_exact(page_size):
    """The highest pages of the largest pool, handed out across the end of the ring: exact slots and layout."""
    num_pages = (2**31 - 1) // page_size - 1
    alloc = DraftCacheAllocator(num_pages * page_size, 3, 4 * page_size, page_size=page_size, device="cpu")
    alloc._counters[0] = num_pages - 2  # the head sits 2 pages before the end of the ring
    rows = alloc.add_requests([page_size + 1, 2 * page_size])
    table = alloc.req_to_token[rows, : 2 * page_size].tolist()
    top = [num_pages - 1, num_pages]  # the ring holds pages 1..num_pages: its last two entries
    assert table[0][: page_size + 1] == [top[0] * page_size + j for j in range(page_size)] + [top[1] * page_size]
    assert table[1] == [1 * page_size + j for j in range(page_size)] + [2 * page_size + j for j in range(page_size)]
    assert max(max(r) for r in table) >= 2**31 - 3 * page_size
    out, last = alloc.alloc_draft(rows, page_size)
    assert out.tolist()[: page_size - 1] == [top[1] * page_size + j for j in range(1, page_size)]
    assert last.tolist() == [top[1] * page_size, 3 * page_size - 1]
    alloc.free_requests(rows)
    assert alloc.num_free_slots() == alloc.num_slots


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_a_table_the_device_cannot_hold_raises_value_error():
    """torch.OutOfMemoryError named no argument: the sizes are named, and the device works on after it."""
    with pytest.raises(ValueError, match=r"max_requests \* max_context_len = .* cannot be allocated on cuda:0"):
        DraftCacheAllocator(16, 2**30, 2**29, device="cuda")
    alloc = DraftCacheAllocator(16, 4, 16, page_size=2, device="cuda")
    alloc.add_requests([3])
    check_layout(alloc)


@pytest.mark.gpu
def test_gpu_a_capture_that_needs_a_sync_raises_and_changes_nothing():
    """A call whose capacity check needs an exact count from the device (a sync) cannot make it inside CUDA graph
    capture: it says so, and changes nothing (it used to fail in torch's copy, with no word of why)."""
    alloc = DraftCacheAllocator(16 * 4, 4, 64, page_size=16, device="cuda")
    rows = alloc.add_requests([16, 16, 16])  # 3 pages used, 1 free: a window of 16 for each needs 3 more
    out, last = torch.empty(48, dtype=torch.int64, device="cuda"), torch.empty(3, dtype=torch.int64, device="cuda")
    before = snapshot(alloc)
    host = alloc._pages_bound, alloc._drafted_since_sync, dict(alloc._known_windows)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with pytest.raises(RuntimeError, match="which CUDA graph capture cannot make"):
        with torch.cuda.stream(stream), torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
            alloc.alloc_draft(rows, 16, out_cache_loc=out, last_loc=last)
    torch.cuda.synchronize()
    assert_unchanged(alloc, before)
    assert (alloc._pages_bound, alloc._drafted_since_sync, dict(alloc._known_windows)) == host
    with pytest.raises(OutOfSlotsError):  # eagerly, the sync tells
        alloc.alloc_draft(rows, 16)
    alloc.alloc_draft(rows[:1], 16)
    check_layout(alloc)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_gpu_step_never_syncs_with_headroom(page_size):
    alloc = DraftCacheAllocator(1 << 16, 64, 1024, page_size=page_size, device="cuda")
    rows = alloc.add_requests(list(range(1, 65)))
    accept = torch.ones(64, dtype=torch.int64, device="cuda")
    out = torch.empty(64 * 4, dtype=torch.int64, device="cuda")
    last = torch.empty(64, dtype=torch.int64, device="cuda")
    alloc.alloc_draft(rows, 4, out_cache_loc=out, last_loc=last)  # compile outside the check
    alloc.commit(rows, accept)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            alloc.alloc_draft(rows, 4, out_cache_loc=out, last_loc=last)
            alloc.commit(rows, accept)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert alloc.num_syncs == 0
    check_layout(alloc)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_gpu_host_lists_never_sync_with_headroom(page_size):
    """Rows and lengths given as host lists reach the device by non-blocking copies from pinned memory: with room
    in the pool, adding requests, a chain step, tree steps (of three launches and of two) and freeing make no stream
    synchronization (a copy from pageable memory would make one per list)."""
    alloc = DraftCacheAllocator(1 << 16, 64, 1024, page_size=page_size, device="cuda")
    keep = alloc.add_requests([5] * 4).tolist()  # in use throughout: freeing never empties the allocator
    rows = list(range(4, 36))  # the rows add_requests hands out each time, freed last (checked after the loop)
    added = []

    def cycle():
        added.append(alloc.add_requests(list(range(1, 33))))
        alloc.alloc_draft(rows, 4)
        alloc.commit(rows, [1] * len(rows))
        alloc.alloc_branches(rows, 2, 3)
        alloc.alloc_draft(rows, 4)
        alloc.commit_tree(rows, torch.zeros(len(rows), 4, dtype=torch.int64, device="cuda"), [1] * len(rows))
        alloc.alloc_tree_draft(rows, 4, 2, 3)
        alloc.commit_tree(rows, torch.zeros(len(rows), 4, dtype=torch.int64, device="cuda"), [1] * len(rows))
        alloc.free_requests(rows)

    cycle()  # compile outside the check
    torch.cuda.synchronize()
    syncs = alloc.num_syncs
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cycle()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert alloc.num_syncs == syncs
    assert all(a.tolist() == rows for a in added)
    assert alloc.rows_in_use() == keep
    check_layout(alloc)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 4, 64], ids=lambda p: f"page{p}")
def test_gpu_matches_cpu_call_for_call(page_size):
    runs = []
    for device in ("cpu", "cuda"):
        alloc = DraftCacheAllocator(page_size * 24, 6, 96, page_size=page_size, device=device)
        outputs = run_loop(alloc, steps=15, seed=page_size)
        check_layout(alloc)
        runs.append((outputs, {name: t.cpu() for name, t in snapshot(alloc).items() if name in STATE_TENSORS}))
    assert runs[0][0] == runs[1][0]
    for name in STATE_TENSORS:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16, 128], ids=lambda p: f"page{p}")
def test_gpu_many_programs_match_one_program(page_size):
    """bs 2048: the default grid (several programs and the last-program ticket) against one program per launch,
    call for call, on the GPU; chain steps, then tree steps whose drafts keep or trade the branch pages."""
    bs = 2048
    runs = []
    one = {"_ALLOC_ELEMENTS": bs * 4, "_MAX_TILE": bs, "_FREE_TILE": bs, "_FREE_CLASSES": ((None, bs, 64),)}
    for tiles in ({}, {**one, "_COMMIT_TILE": bs}):
        with allocator_constants({**tiles, "_COMMIT_DRAFT_MAX_BATCH": bs}):  # commit_and_draft: one launch
            # Room for the contexts, and for the old and the new branch pages of a tree draft that trades them.
            branch_pages = 2 * 3 * -(-(page_size - 1 + 3) // page_size)
            pool = bs * (600 // page_size + 2 + branch_pages) * page_size
            alloc = DraftCacheAllocator(pool, bs, 1024, page_size=page_size)
            rows = alloc.add_requests([(37 * i) % 500 for i in range(bs)])
            outputs = []
            for step in range(4):
                out, last = alloc.alloc_draft(rows, 4)
                outputs.append((out.cpu(), last.cpu()))
                alloc.commit(rows, torch.tensor([(i + step) % 5 for i in range(bs)], device="cuda"))
            for step in range(3):
                accept = torch.tensor([(i + step) % 5 for i in range(bs)], device="cuda")
                out, last = alloc.commit_and_draft(rows, accept, 4)
                outputs.append((out.cpu(), last.cpu()))
            alloc.commit(rows, torch.zeros(bs, dtype=torch.int64, device="cuda"))
            index = torch.arange(4, device="cuda").repeat(bs, 1)
            for step in range(3):
                out, last, slots, src, dst = alloc.alloc_tree_draft(rows, 4, (2, 2, 3)[step], 3)
                outputs.append((torch.cat([out, slots.view(-1), src, dst]).cpu(), last.cpu()))
                accept = torch.tensor([(i + step) % 5 for i in range(bs)], device="cuda")
                alloc.commit_tree(rows, index, accept, keep_branches=True)
            alloc.free_requests(rows[::3])
            runs.append((outputs, snapshot(alloc)))
    assert_same_runs(*runs)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_gpu_looking_back_matches_summing(page_size):
    """A chain draft past one program looks back on the GPU (programs running at once, each waiting for the pops of
    the tiles before its own): the same, call for call, as every program summing the earlier requests (Ascend's
    way), on a grid of one program per tile and on grids capped at 2 and 5 programs that loop over the tiles; with
    a CUDA graph replayed, which needs every launch to leave the published pops at 0."""
    bs = 3000
    runs = []
    for block, programs in ((0, 0), (256, 0), (256, 2), (256, 5)):
        with allocator_constants({"_LOOK_BACK_BLOCK": block, "_COMMIT_DRAFT_MAX_BATCH": bs}):
            alloc = DraftCacheAllocator(bs * 300, bs, 256, page_size=page_size)
            if programs:
                alloc._look_back_programs = programs
            rows = alloc.add_requests([(37 * i) % 150 for i in range(bs)])
            alloc.free_requests(rows[1000:1100])  # rows not in use, left in the batch
            outputs = []
            for step in range(4):
                out, last = alloc.alloc_draft(rows, (4, 8, 1, 3)[step])
                outputs.append((out.cpu(), last.cpu()))
                accept = torch.tensor([(i * 7 + step) % 6 for i in range(bs)], device="cuda")
                if step % 2:
                    out, last = alloc.commit_and_draft(rows, accept, 2)  # one launch: commits, then looks back
                    outputs.append((out.cpu(), last.cpu()))
                alloc.commit(rows, accept)
            check_layout(alloc)
            graph = torch.cuda.CUDAGraph()
            accept = torch.ones(bs, dtype=torch.int64, device="cuda")
            out, last = alloc.alloc_draft(rows, 2)  # compiled, and a window open for the graph's first commit
            with torch.cuda.graph(graph):
                alloc.commit(rows, accept)
                alloc.alloc_draft(rows, 2, out_cache_loc=out, last_loc=last)
            for _ in range(3):
                graph.replay()
                outputs.append((out.cpu(), last.cpu()))
            # (The host's bound on committed lengths does not see replays: check_layout would fail on it.)
            assert alloc._counters[2].item() == 0 and not next_look_back_bank(alloc).any()
            launched = {dict(constexprs)["LOOKBACK"] for _, constexprs, *_ in alloc._alloc_configs.values()}
            assert launched == ({0} if block == 0 else {0, 256}), launched  # (add_requests never looks back)
            runs.append((outputs, snapshot(alloc)))
    for run in runs[1:]:
        assert_same_runs(runs[0], run)


@pytest.mark.gpu
@pytest.mark.parametrize("bs, n, page_size", [(256, 16, 1), (128, 32, 16), (64, 64, 128)])
def test_gpu_wide_windows_look_back_on_small_tiles_as_on_large_ones(bs, n, page_size, monkeypatch):
    """A batch of more than one tile looks back on per-SM tiles (_exceeds_one_tile): the same, call for call, as on
    tiles of 2048 slots, eagerly and in a replayed graph (alloc_draft, commit_and_draft in one launch, commit)."""
    runs = []
    for looks in (True, False):
        if not looks:
            monkeypatch.setattr(DraftCacheAllocator, "_exceeds_one_tile", lambda self, bs, window_len: False)
        alloc = DraftCacheAllocator(2 * bs * 1024, bs + 1, 1000, page_size=page_size)
        rows = alloc.add_requests([(37 * i) % 150 for i in range(bs)])
        alloc.free_requests(rows[3:7])  # rows not in use, still in the batch
        outputs = []
        for step in range(3):
            outputs.append(tuple(t.cpu() for t in alloc.alloc_draft(rows, n - step)))
            accept = torch.tensor([(i * 7 + step) % (n + 2) for i in range(bs)], device="cuda")
            outputs.append(tuple(t.cpu() for t in alloc.commit_and_draft(rows, accept, n)))
            alloc.commit(rows, accept)
        check_layout(alloc)
        out, last = alloc.alloc_draft(rows, n)
        accept = torch.ones(bs, dtype=torch.int64, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            alloc.commit(rows, accept)
            alloc.alloc_draft(rows, n, out_cache_loc=out, last_loc=last)
        for _ in range(3):
            graph.replay()
            outputs.append((out.cpu(), last.cpu()))
        drafts = {dict(c)["TILE"] for (_, c, *_) in alloc._alloc_configs.values() if not dict(c)["PREFILL"]}
        assert drafts == ({allocator_module._LOOK_BACK_MIN_TILE} if looks else {2048 // n}), drafts
        runs.append((outputs, snapshot(alloc)))
    assert_same_runs(*runs)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size, bs", [(16, 1100), (1, 400)], ids=["page16-bs1100", "page1-bs400"])
def test_gpu_commit_and_draft_past_its_one_launch_limit(page_size, bs, monkeypatch):
    """commit_and_draft counts each tile's pops in a launch of its own, then allocates (programs that write their
    own rows; the last tile's moves the counters: 35 at page 16 and bs 1100; at page 1 and bs 400, 50 of 8 requests
    for windows of 4 and 8 tokens, 25 of 16 for one token), on compute capability 9.0 and up as a programmatic
    dependent launch and without; the same, call for call, as commit + alloc_draft."""
    assert bs > allocator_module._COMMIT_DRAFT_MAX_BATCH
    pdl = torch.cuda.get_device_capability()[0] >= 9
    assert backend.supports_pdl(torch.device("cuda", torch.cuda.current_device())) == pdl
    monkeypatch.setattr(allocator_module, "_COMMIT_DRAFT_EAGER_MAX_BATCH", 256)  # eager calls: two launches too
    runs = []
    for fused in (True, "no-pdl", False):
        if fused == "no-pdl":
            monkeypatch.setattr(backend, "supports_pdl", lambda device: False)
        alloc = DraftCacheAllocator(bs * 40 * 16, bs, 512, page_size=page_size)
        rows = alloc.add_requests([(37 * i) % 400 + 1 for i in range(bs)])
        outputs = [alloc.alloc_draft(rows, 4)]
        for step in range(4):
            accept = torch.tensor([(i + step) % 6 for i in range(bs)], device="cuda")
            if fused:
                outputs.append(alloc.commit_and_draft(rows, accept, (4, 8, 1, 4)[step]))
            else:
                alloc.commit(rows, accept)
                outputs.append(alloc.alloc_draft(rows, (4, 8, 1, 4)[step]))
        check_layout(alloc)
        used_pdl = any(dict(constexprs).get("PDL") for _, constexprs, *_ in alloc._alloc_configs.values())
        assert used_pdl == (pdl and fused is True)
        if fused and page_size == 1:
            assert allocator_module._TWO_PASS_TINY_TILE in {tile for tile, *_ in alloc._alloc_configs.values()}
        runs.append((outputs, snapshot(alloc)))
    for run in runs[1:]:
        assert_same_runs(runs[0], run)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [100, 4608], ids=lambda bs: f"bs{bs}")
def test_gpu_chain_draft_warps_do_not_change_results(bs):
    """A chain draft on tiles of 64-128 requests runs on 4 warps (one program of 64-128 requests; past 4224 requests
    on a 132-SM GPU, looking back): the same, call for call, as on the 8 warps of every other launch."""
    assert bs > allocator_module._LARGE_BATCH or 64 < bs <= 128
    runs = []
    for warps in ({}, {"_SMALL_TILE_NUM_WARPS": 8}):
        with allocator_constants(warps):
            alloc = DraftCacheAllocator(bs * 48 * 16, bs, 512, page_size=16)
            rows = alloc.add_requests([(37 * i) % 400 + 1 for i in range(bs)])
            outputs = []
            for step in range(4):
                out, last = alloc.alloc_draft(rows, (4, 8, 1, 4)[step])
                outputs.append((out.cpu(), last.cpu()))
                alloc.commit(rows, torch.tensor([(i + step) % 5 for i in range(bs)], device="cuda"))
            alloc.free_requests(rows[::3])
            check_layout(alloc)
            runs.append((outputs, snapshot(alloc)))
    assert_same_runs(*runs)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "one_launch,bs",
    [(False, 48), (True, 48), (True, 600)],
    ids=["two-launches", "commit_and_draft", "commit_and_draft-bs600"],
)
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_gpu_graph_captures_a_whole_step(page_size, one_launch, bs):
    """alloc_draft + commit (or commit_and_draft: one launch at bs 48, two at bs 600, the second a programmatic
    dependent launch on compute capability 9.0 and up) captured once, replayed with new accept lengths: the same as
    running alloc_draft + commit eagerly."""
    n, replays = 4, 60
    prompt_lens = [(13 * i) % 200 for i in range(bs)]
    graphed, eager = (DraftCacheAllocator(bs * 512, bs + 2, 512, page_size=page_size, device="cuda") for _ in range(2))
    rows = graphed.add_requests(prompt_lens)
    assert torch.equal(eager.add_requests(prompt_lens), rows)
    out = sentinel_like(bs * n, torch.int64, "cuda")
    last = sentinel_like(bs, torch.int64, "cuda")
    accept = torch.zeros(bs, dtype=torch.int32, device="cuda")

    def step():
        if one_launch:
            graphed.commit_and_draft(rows, accept, n, out_cache_loc=out, last_loc=last)
            return
        graphed.alloc_draft(rows, n, out_cache_loc=out, last_loc=last)
        graphed.commit(rows, accept)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    eager.alloc_draft(rows, n)
    if not one_launch:  # commit_and_draft commits at the start of the next step
        eager.commit(rows, accept)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    rng = random.Random(page_size)
    for _ in range(replays):
        accepted = torch.tensor([rng.randint(0, n) for _ in range(bs)], dtype=torch.int32, device="cuda")
        accept.copy_(accepted)
        out.fill_(SENTINEL)
        last.fill_(SENTINEL)
        graph.replay()
        if one_launch:
            eager.commit(rows, accepted)
        eager_out, eager_last = eager.alloc_draft(rows, n)
        if not one_launch:
            eager.commit(rows, accepted)
        assert torch.equal(out, eager_out) and torch.equal(last, eager_last)
    torch.cuda.synchronize()
    graphed.refresh()  # the replays ran no host code: re-read the usage before the next eager call
    check_layout(graphed)
    for name in STATE_TENSORS:
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name
    assert int(graphed.seq_lens[rows].sum()) - sum(prompt_lens) > replays * bs  # about 2 accepted per replay
    graphed.free_requests(rows)
    assert graphed.num_free_slots() == graphed.num_slots


def test_launch_choices_kept_by_batch_size_start_over_past_their_limit(monkeypatch):
    """The caches of launch configs keyed by batch size (the drafts', the frees') start over once they hold
    _MAX_LAUNCH_CONFIGS entries: an engine's batch sizes without end must not grow them without end (a scale audit
    saw the frees' reach 234 MiB over every batch size up to 65536). The calls give what they give without a limit."""

    def run(alloc: DraftCacheAllocator) -> list[tuple[int, int]]:
        sizes = []
        for bs in range(1, 7):
            rows = alloc.add_requests([2] * bs)
            alloc.alloc_draft(rows, 2)
            alloc.commit(rows, [1] * bs)
            alloc.free_requests(rows.tolist())
            sizes.append((len(alloc._free_launches), len(alloc._launch_configs)))
        return sizes

    unlimited = DraftCacheAllocator(256, 16, 16, page_size=1, device="cpu")
    assert max(run(unlimited)) == (6, 12)  # a free, and a draft and a commit, each batch size
    monkeypatch.setattr(allocator_module, "_MAX_LAUNCH_CONFIGS", 3)
    limited = DraftCacheAllocator(256, 16, 16, page_size=1, device="cpu")
    assert max(max(pair) for pair in run(limited)) <= 3
    for bs in range(1, 7):  # the tree step's launch choices (asked of the host alone: nothing launches)
        limited._tree_step_in_one_launch(bs, 2, False, (2, 2), 3)
        limited._tree_step_counts(bs, 2, False, (2, 2), 3)
        assert len(limited._tree_step_launches) <= 3 and len(limited._tree_step_counted) <= 3
    for name in ("req_to_token", "seq_lens", "alloc_lens", "window_lens"):
        assert torch.equal(getattr(limited, name), getattr(unlimited, name))
    assert limited.free_page_list() == unlimited.free_page_list()


def test_capacity_errors_are_exported_at_the_top_level():
    """What an engine catches to preempt or wait, without reaching into specdec_ops.allocator (README)."""
    alloc = DraftCacheAllocator(8, 2, 8, page_size=1, device="cpu")
    with pytest.raises(specdec_ops.OutOfRowsError):
        alloc.add_requests([1, 1, 1])
    with pytest.raises(specdec_ops.ContextLengthError):
        alloc.add_requests([9])
    with pytest.raises(specdec_ops.OutOfSlotsError):
        alloc.add_requests([8, 8])
    for error in (specdec_ops.OutOfRowsError, specdec_ops.ContextLengthError, specdec_ops.OutOfSlotsError):
        assert issubclass(error, specdec_ops.AllocationError) and issubclass(error, RuntimeError)
    assert alloc.num_requests == 0 and alloc.num_free_slots() == 8
