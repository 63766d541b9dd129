"""Tree drafts in DraftCacheAllocator: branch slots, tree commit, and every guarantee of the slot layout kept.

A simulated KV buffer stands in for the engine's: the verify forward writes a tag per (request, node) at the node's
slot, the test applies ``kv[kv_dst] = kv[kv_src]``, and every committed position must read its node's tag.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ACCELERATORS, SENTINEL, examples, sentinel_like
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_allocator import (
    MANY_PROGRAMS,
    STATE_TENSORS,
    assert_same_runs,
    assert_unchanged,
    branch_pages_of,
    check_layout,
    next_look_back_bank,
    pages,
    patch_tiles,
    restore_tiles,
    snapshot,
)

import specdec_ops
import specdec_ops.allocator as allocator_module
from specdec_ops.allocator import DraftCacheAllocator, DraftStepWrapper, OutOfSlotsError


def random_paths(rng: random.Random, bs: int, tree: int, windows: list[int] | None = None):
    """Random accepted paths: strictly increasing nodes of [0, window), as [bs, T] and [bs]."""
    index = torch.full((bs, tree), -1, dtype=torch.int64)
    lens = []
    for i in range(bs):
        window = tree if windows is None else windows[i]
        k = rng.randint(0, window)
        nodes = sorted(rng.sample(range(window), k))
        if nodes and rng.random() < 0.5 and 0 not in nodes:  # most trees accept their root first
            nodes = [0, *nodes[1:]]
        index[i, : len(nodes)] = torch.tensor(nodes, dtype=torch.int64)
        lens.append(len(nodes))
    return index, lens


def branch_pops(alloc: DraftCacheAllocator, rows: list[int], topk: int, steps: int) -> int:
    """Pages the branches of ``rows`` take from the pool: a row that holds exactly as many keeps them."""
    p = alloc.page_size
    seq, held = alloc.seq_lens.tolist(), alloc.num_branch_pages.tolist()
    needs = [topk * pages(seq[r] % p + steps, p) for r in rows]
    return sum(need for r, need in zip(rows, needs) if held[r] != need)


class KVModel:
    """A KV buffer of tags, and the tag every committed position of every row must read."""

    def __init__(self, alloc: DraftCacheAllocator) -> None:
        self.alloc = alloc
        self.kv = torch.full((alloc.total_slots,), -1, dtype=torch.int64)
        self.committed: dict[int, list[int]] = {}  # row -> tag of each committed position
        self.next_tag = 1

    def prompt(self, rows: list[int]) -> None:
        for row in rows:
            n = int(self.alloc.seq_lens[row])
            slots = self.alloc.req_to_token[row, :n].long()
            tags = torch.arange(self.next_tag, self.next_tag + n)
            self.next_tag += n
            self.kv[slots] = tags
            self.committed[row] = tags.tolist()

    def verify(self, out_cache_loc: torch.Tensor) -> torch.Tensor:
        """The verify forward: each node writes a fresh tag at its slot; returns the tags, [bs * T]."""
        tags = torch.arange(self.next_tag, self.next_tag + out_cache_loc.numel())
        self.next_tag += out_cache_loc.numel()
        self.kv[out_cache_loc.cpu().long()] = tags
        return tags

    def apply(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.kv[dst.cpu().long()] = self.kv[src.cpu().long()].clone()

    def accept(self, rows: list[int], tags: torch.Tensor, tree: int, index: torch.Tensor, lens: list[int]) -> None:
        for i, row in enumerate(rows):
            self.committed[row] += [int(tags[i * tree + int(index[i, m])]) for m in range(lens[i])]

    def check(self) -> None:
        for row, expected in self.committed.items():
            slots = self.alloc.req_to_token[row, : len(expected)].cpu().long()
            assert int(self.alloc.seq_lens[row]) == len(expected), f"row {row}: committed length"
            assert self.kv[slots].tolist() == expected, f"row {row}: a committed position reads the wrong KV"


# ------------------------------------------------------------------------------------------- commit_tree


@pytest.mark.parametrize("page_size", [1, 4, 16, 128], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("tree", [1, 2, 5, 8, 33, 64, 65], ids=lambda t: f"T{t}")
def test_commit_tree_moves_the_accepted_kv_into_place(page_size, tree):
    rng = random.Random(page_size * 100 + tree)
    bs, steps = 5, 3
    context = 160 + tree * steps
    num_slots = pages(context, page_size) * bs * page_size
    alloc = DraftCacheAllocator(num_slots, bs + 1, context, page_size=page_size, device="cpu")
    rows = alloc.add_requests([rng.randrange(0, 150) for _ in range(bs)])
    model = KVModel(alloc)
    model.prompt(rows.tolist())
    src_buf, dst_buf = (
        sentinel_like(bs * tree + 2, torch.int64, "cpu"),
        sentinel_like(bs * tree + 2, torch.int64, "cpu"),
    )
    for _ in range(steps):
        out, _ = alloc.alloc_draft(rows, tree)
        tags = model.verify(out)
        index, lens = random_paths(rng, bs, tree)
        index = index.to(rng.choice([torch.int32, torch.int64]))
        window_before = alloc.req_to_token.clone()
        src, dst = alloc.commit_tree(
            rows, index, torch.tensor(lens, dtype=torch.int64), kv_src=src_buf, kv_dst=dst_buf, validate=True
        )
        assert src.data_ptr() == src_buf.data_ptr() and src_buf[bs * tree :].tolist() == [SENTINEL] * 2
        assert dst_buf[bs * tree :].tolist() == [SENTINEL] * 2
        if page_size == 1:
            assert torch.equal(src, dst), "page 1 re-points: no copies"
        else:
            assert torch.equal(alloc.req_to_token, window_before), "pages > 1 never re-point"
            assert len(set(dst[src != dst].tolist())) == int((src != dst).sum()), "a copy target appears twice"
        model.apply(src, dst)
        model.accept(rows.tolist(), tags, tree, index, lens)
        model.check()
        check_layout(alloc, ask_free_slots=False)
    alloc.free_requests(rows)
    assert alloc.num_free_slots() == alloc.num_slots


def test_commit_tree_copies_only_what_moved():
    alloc = DraftCacheAllocator(64, 2, 32, page_size=4, device="cpu")
    rows = alloc.add_requests([5, 2])
    out, _ = alloc.alloc_draft(rows, 4)
    slots = out.view(2, 4).tolist()
    index = torch.tensor([[0, 2, 3, 0], [1, 0, 0, 0]])
    src, dst = alloc.commit_tree(rows, index, torch.tensor([3, 1]))
    assert dst.view(2, 4).tolist() == slots
    assert src.view(2, 4).tolist() == [
        [slots[0][0], slots[0][2], slots[0][3], slots[0][3]],
        [slots[1][1], *slots[1][1:]],
    ]
    assert alloc.seq_lens[rows].tolist() == [8, 3] and alloc.window_lens[rows].tolist() == [0, 0]


@pytest.mark.parametrize("page_size", [1, 4])
def test_sglang_accept_index_converted_as_the_readme_says(page_size):
    """README, "Where SGLang differs": SGLang's verify gives ``accept_index`` of ``[bs, spec_steps + 1]`` batch-wide
    indices (``i * T + node``, -1 padded) and ``accept_length`` without the root. Converted as the README says, it
    commits what the request-local form does; unconverted, every request but the first commits nothing (its path
    stops at its first node) and the pool stays whole."""
    T, steps = 4, 2
    sglang_index = torch.tensor([[0, 2, -1], [4, -1, -1], [8, 9, 11]])  # nodes [0, 2], [0], [0, 1, 3]
    accept_length = torch.tensor([1, 0, 2])
    local = torch.tensor([[0, 2, 0, 0], [0, 0, 0, 0], [0, 1, 3, 0]])
    runs = []
    for form in ("local", "converted", "helper", "unconverted"):
        alloc = DraftCacheAllocator(128, 3, 32, page_size=page_size, device="cpu")
        rows = alloc.add_requests([5, 2, 7])
        alloc.alloc_draft(rows, T)
        if form == "local":
            got = alloc.commit_tree(rows, local, accept_length + 1)
        elif form == "converted":
            index = torch.zeros(3, T, dtype=torch.int64)
            index[:, : steps + 1] = sglang_index - torch.arange(3)[:, None] * T
            got = alloc.commit_tree(rows, index, accept_length + 1)
        elif form == "helper":
            index, lens = specdec_ops.sglang.tree_accept_from_sglang(sglang_index, accept_length, T)
            assert index.tolist() == [[0, 2, -1, -1], [0, -1, -1, -1], [0, 1, 3, -1]] and lens.tolist() == [2, 1, 3]
            got = alloc.commit_tree(rows, index, lens)
        else:
            got = alloc.commit_tree(rows, sglang_index, accept_length)
        runs.append(([got], snapshot(alloc)))
        check_layout(alloc)
        if form == "unconverted":
            assert alloc.seq_lens[rows].tolist() == [6, 2, 7]  # request 0 takes 1 position, the others none
    assert_same_runs(runs[0], runs[1])
    assert_same_runs(runs[0], runs[2])


@pytest.mark.parametrize(
    "args, error, message",
    [
        (([[0, 1]], [1], 4), TypeError, "accept_index must be a torch.Tensor, got list"),
        ((torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), 4), TypeError, "accept_index must be int32 or int64"),
        ((torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 4), ValueError, "must be 2-D"),
        ((torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 4), ValueError, "at most"),
        ((torch.zeros(2, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 4), ValueError, "3 elements"),
        ((torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 4.0), TypeError, "draft_token_num"),
    ],
    ids=["index-list", "index-float", "index-1d", "too-wide", "lengths", "tree-float"],
)
def test_tree_accept_from_sglang_refuses_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        specdec_ops.sglang.tree_accept_from_sglang(*args)


def test_commit_tree_page1_repoints_the_window():
    alloc = DraftCacheAllocator(64, 2, 32, device="cpu")
    rows = alloc.add_requests([3])
    out, _ = alloc.alloc_draft(rows, 6)
    old = out.tolist()
    src, dst = alloc.commit_tree(rows, torch.tensor([[0, 2, 5, 1, 1, 1]]), torch.tensor([3]))
    # accepted nodes 0, 2, 5 first, then the rejected 1, 3, 4 in node order, kept for the next window
    expected = [old[0], old[2], old[5], old[1], old[3], old[4]]
    assert alloc.req_to_token[0, 3:9].tolist() == expected
    assert src.tolist() == dst.tolist() == expected
    assert int(alloc.seq_lens[0]) == 6
    out2, _ = alloc.alloc_draft(rows, 3)
    assert out2.tolist() == expected[3:]
    check_layout(alloc, ask_free_slots=False)


@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_bad_paths_never_corrupt_the_pool(page_size):
    rng = random.Random(page_size)
    alloc = DraftCacheAllocator(64 * page_size, 4, 64, page_size=page_size, device="cpu")
    rows = alloc.add_requests([3, 7, 0, 9])
    tree = 6
    alloc.alloc_draft(rows[:3], tree)  # row 3 has no open window: it commits nothing
    index = torch.tensor(
        [
            [0, 3, 2, 4, 5, 1],  # not increasing at m = 2: a = 2
            [-1, 1, 2, 3, 4, 5],  # bad first node: a = 0
            [1, 2, 6, 2**40, 0, 0],  # node 6 is outside the window: a = 2
            [0, 1, 2, 3, 4, 5],
        ]
    )
    lens = torch.tensor([6, 3, 2**33, 4])
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=r"accept_index\[0, 2\] = 2 must be greater than"):
        alloc.commit_tree(rows, index, lens, validate=True)
    assert_unchanged(alloc, before)
    seq = alloc.seq_lens[rows].tolist()
    src, dst = alloc.commit_tree(rows, index, lens)
    assert [b - a for a, b in zip(seq, alloc.seq_lens[rows].tolist())] == [2, 0, 2, 0]
    assert src.shape == (4 * tree,)
    assert ((src >= 0) & (src < alloc.total_slots) & (dst >= 0) & (dst < alloc.total_slots)).all()
    assert dst[3 * tree :].tolist() == [0] * tree, "no window: pairs 0 -> 0"
    check_layout(alloc, ask_free_slots=False)
    index2, lens2 = random_paths(rng, 4, tree)
    alloc.commit_tree(rows, index2, lens2)  # no window open any more: commits nothing
    assert alloc.seq_lens[rows].tolist() == [s + d for s, d in zip(seq, [2, 0, 2, 0])]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda a, r: a.commit_tree(r, torch.zeros(3, 4, dtype=torch.int64), [0, 0]), ValueError, r"shape \[2, T\]"),
        (lambda a, r: a.commit_tree(r, torch.zeros(2, 4), [0, 0]), TypeError, "accept_index must be int32 or int64"),
        (lambda a, r: a.commit_tree(r, torch.zeros(2, 8, dtype=torch.int64)[:, ::2], [0, 0]), ValueError, "unit"),
        (lambda a, r: a.commit_tree(r, torch.zeros(2, 300, dtype=torch.int64), [0, 0]), ValueError, "at most 256"),
        (
            lambda a, r: a.commit_tree(r, torch.zeros(2, 4, dtype=torch.int64), torch.tensor([0, 5]), validate=True),
            ValueError,
            r"accept_lens\[1\] must be in \[0, 4\]",
        ),
        (
            lambda a, r: a.commit_tree(r, torch.tensor([[0, 9], [0, 1]]), torch.tensor([2, 1]), validate=True),
            ValueError,
            r"accept_index\[0, 1\] must be a node in \[0, 2\), got 9",
        ),
        (lambda a, r: a.alloc_branches(r, 0, 3), ValueError, "topk must be in"),
        (lambda a, r: a.alloc_branches(r, 2, 3, out=torch.empty(11, dtype=torch.int64)), ValueError, "at least 12"),
        (lambda a, r: a.alloc_branches([0, 3], 2, 3), ValueError, "is not a row in use"),
        (lambda a, r: a.release_branches([2]), ValueError, "is not a row in use"),
        (  # (a tensor of rows is not read back: more entries than rows would publish past the kernel's scratch)
            lambda a, r: a.alloc_branches(torch.tensor([0, 1, 0, 1, 0]), 2, 3),
            ValueError,
            r"req_pool_indices must have at most max_requests \(4\) entries, got 5",
        ),
        (  # (a commit that releases branch pages is the allocation kernel's, with the same scratch)
            lambda a, r: a.commit(torch.tensor([0, 1, 9, 9, 9]), torch.zeros(5, dtype=torch.int64)),
            ValueError,
            r"req_pool_indices must have at most max_requests \(4\) entries, got 5",
        ),
        (
            lambda a, r: a.release_branches(torch.tensor([0, 1, 9, 9, 9])),
            ValueError,
            r"req_pool_indices must have at most max_requests \(4\) entries, got 5",
        ),
        (  # a list is checked on the host: against the window (4 here) and against T
            lambda a, r: a.commit_tree(r, torch.zeros(2, 2, dtype=torch.int64), [2, 3]),
            ValueError,
            r"accept_lens\[1\] must be in \[0, 2\] \(T, the tree's nodes\), got 3",
        ),
        (
            lambda a, r: a.commit_tree(r, torch.zeros(2, 4, dtype=torch.int64), [0, 0], keep_branches="no"),
            TypeError,
            "keep_branches must be a bool, got str",
        ),
        (
            lambda a, r: a.alloc_branches(r, 2, 3, out=torch.empty(4, 6, dtype=torch.int64).t()),
            ValueError,
            r"out must be 1-D, or contiguous \(it is flattened\), got shape \(6, 4\) with strides \(1, 6\)",
        ),
    ],
    ids=[
        "shape",
        "float",
        "strided",
        "too-big",
        "lens",
        "node",
        "topk",
        "out",
        "rows",
        "release-rows",
        "batch-past-max",
        "commit-batch-past-max",
        "release-batch-past-max",
        "list-lens-past-T",
        "keep-not-bool",
        "out-2d-strided",
    ],
)
def test_bad_tree_arguments_change_nothing(call, error, message):
    alloc = DraftCacheAllocator(64, 4, 16, page_size=2, device="cpu")
    rows = alloc.add_requests([3, 4])
    alloc.alloc_draft(rows, 4)
    before = snapshot(alloc)
    with pytest.raises(error, match=message):
        call(alloc, rows)
    assert_unchanged(alloc, before)


# ------------------------------------------------------------------------------------------- branches


def check_branches(alloc, rows, topk, steps, slots, copy_src, copy_dst, model: KVModel):
    """Branch slots: disjoint from everything owned and from each other, paged, and after the copies a paged
    attention kernel reading a branch's page table sees the committed prefix."""
    p = alloc.page_size
    owned = check_layout(alloc, ask_free_slots=False)
    owned_slots = {slot for row_slots in owned.values() for slot in row_slots}
    flat = slots.reshape(-1).tolist()
    assert len(set(flat)) == len(flat), "a branch slot appears twice"
    assert not set(flat) & owned_slots, "a branch slot is owned by a request"
    branches = branch_pages_of(alloc)
    model.apply(copy_src, copy_dst)
    for i, row in enumerate(rows):
        seq = int(alloc.seq_lens[row])
        off = seq % p
        per_branch = pages(off + steps, p)
        assert len(branches[row]) == topk * per_branch
        for b in range(topk):
            own = branches[row][b * per_branch : (b + 1) * per_branch]
            for s in range(steps):
                slot = int(slots[i, b, s])
                assert slot % p == (seq + s) % p, "branch slot breaks the paged layout"
                assert slot // p == own[(off + s) // p], "branch slot is not on the branch's page"
            # the branch's page table: the row's full pages, then the branch's pages
            for pos in range(seq - off, seq):
                assert int(model.kv[own[0] * p + pos % p]) == model.committed[row][pos], "prefix not copied"


@pytest.mark.parametrize("page_size", [1, 4, 16, 128], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("topk, steps", [(1, 1), (4, 5), (3, 17)], ids=["k1s1", "k4s5", "k3s17"])
def test_alloc_branches(page_size, topk, steps):
    rng = random.Random(page_size + topk)
    bs = 4
    num_pages = bs * (pages(200, page_size) + 2 * topk * pages(page_size - 1 + steps, page_size))
    alloc = DraftCacheAllocator(page_size * num_pages, bs + 1, 300, page_size=page_size, device="cpu")
    rows = alloc.add_requests([rng.randrange(0, 200) for _ in range(bs)])
    model = KVModel(alloc)
    model.prompt(rows.tolist())
    free = alloc.num_free_slots()
    for _ in range(2):  # the second call keeps the first call's pages (the same seq_lens: as many pages)
        out = sentinel_like(bs * topk * steps + 1, torch.int32, "cpu")
        slots, copy_src, copy_dst = alloc.alloc_branches(rows, topk, steps, out=out, return_copies=True)
        assert slots.shape == (bs, topk, steps) and out[-1].item() == SENTINEL
        assert copy_src.shape == copy_dst.shape == (bs * topk * (page_size - 1),)
        check_branches(alloc, rows.tolist(), topk, steps, slots, copy_src, copy_dst, model)
    alloc.release_branches(rows)
    assert alloc.num_free_slots() == free and not alloc.num_branch_pages.any()
    check_layout(alloc, ask_free_slots=False)


@pytest.mark.parametrize("keep", [False, True], ids=["release", "keep"])
@pytest.mark.parametrize("page_size", [1, 4, 16, 128], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("topk, steps", [(1, 1), (4, 5), (3, 17)], ids=["k1s1", "k4s5", "k3s17"])
def test_alloc_tree_draft_is_the_draft_and_the_branches_in_one_launch(page_size, topk, steps, keep, monkeypatch):
    """alloc_tree_draft: the window's slots as alloc_draft gives them, branches as alloc_branches gives them, in
    one launch; commit_tree then releases the branch pages in its own single launch, or (``keep_branches``) leaves
    them to the next tree draft, which keeps or trades them in its own single launch."""
    rng = random.Random(page_size * 7 + topk)
    bs, tree = 4, 8
    num_pages = bs * (pages(260, page_size) + 2 * topk * pages(page_size - 1 + steps, page_size))
    alloc = DraftCacheAllocator(page_size * num_pages, bs + 1, 300, page_size=page_size, device="cpu")
    rows = alloc.add_requests([rng.randrange(0, 200) for _ in range(bs)])
    model = KVModel(alloc)
    model.prompt(rows.tolist())
    launches = []
    launch = allocator_module.backend.launch
    monkeypatch.setattr(allocator_module.backend, "launch", lambda fn, *a: launches.append(fn) or launch(fn, *a))
    for _ in range(3):
        buffers = [sentinel_like(n + 1, torch.int64, "cpu") for n in (bs * tree, bs * topk * steps)]
        copies = [sentinel_like(bs * topk * (page_size - 1) + 1, torch.int32, "cpu") for _ in range(2)]
        seq = alloc.seq_lens[:bs].clone()
        launches.clear()
        out, last, slots, src, dst = alloc.alloc_tree_draft(
            rows,
            tree,
            topk,
            steps,
            out_cache_loc=buffers[0],
            branch_slots=buffers[1],
            copy_src=copies[0],
            copy_dst=copies[1],
        )
        assert len(launches) == 1, "one launch"
        assert slots.shape == (bs, topk, steps) and src.shape == dst.shape == (bs * topk * (page_size - 1),)
        assert [int(t[-1]) for t in (*buffers, *copies)] == [SENTINEL] * 4, "only the outputs' elements written"
        for i, row in enumerate(rows.tolist()):
            window = alloc.req_to_token[row, int(seq[i]) : int(seq[i]) + tree].long()
            assert out[i * tree : (i + 1) * tree].tolist() == window.tolist()
            assert int(last[i]) == (int(alloc.req_to_token[row, int(seq[i]) - 1]) if seq[i] > 0 else -1)
        check_branches(alloc, rows.tolist(), topk, steps, slots, src, dst, model)
        held = branch_pages_of(alloc)
        tags = model.verify(out)
        index, lens = random_paths(rng, bs, tree)
        launches.clear()
        kv_src, kv_dst = alloc.commit_tree(rows, index, torch.tensor(lens, dtype=torch.int64), keep_branches=keep)
        assert len(launches) == 1, "the tree commit releases the branch pages (or not) in its own launch"
        if keep:
            assert branch_pages_of(alloc) == held and alloc._branches_may_exist()
        else:
            assert not alloc.num_branch_pages.any()  # (on the host's books still: rows given as a tensor)
        model.apply(kv_src, kv_dst)
        model.accept(rows.tolist(), tags, tree, index, lens)
        model.check()
        check_layout(alloc)
    alloc.free_requests(rows)
    assert alloc.num_free_slots() == alloc.num_slots


def tree_steps(alloc, rows, rng, steps, tree, topk, num_steps, one_call, rows_as="tensor"):
    """A first alloc_tree_draft, then ``steps`` times: verify, commit the paths and draft the next tree, by
    commit_tree_and_draft (``one_call``) or by commit_tree(keep_branches=True) + alloc_tree_draft. Checks the
    simulated KV and the branches after every step; returns every tensor the calls returned."""
    model = KVModel(alloc)
    model.prompt(rows)
    arg = rows if rows_as == "list" else torch.tensor(rows)
    bs, p = len(rows), alloc.page_size
    out, _, slots, src, dst = alloc.alloc_tree_draft(arg, tree, topk, num_steps)
    model.apply(src, dst)
    returned = []
    for _ in range(steps):
        tags = model.verify(out)
        index, lens = random_paths(rng, bs, tree)
        accept = lens if rows_as == "list" else torch.tensor(lens, dtype=torch.int64)
        if one_call:
            kv = [sentinel_like(bs * tree + 1, torch.int64, "cpu") for _ in range(2)]
            window = [sentinel_like(n + 1, torch.int64, "cpu") for n in (bs * tree, bs, bs * topk * num_steps)]
            copies = [sentinel_like(bs * topk * (p - 1) + 1, torch.int32, "cpu") for _ in range(2)]
            result = alloc.commit_tree_and_draft(
                arg,
                index,
                accept,
                tree,
                topk,
                num_steps,
                kv_src=kv[0],
                kv_dst=kv[1],
                out_cache_loc=window[0],
                last_loc=window[1][:bs],
                branch_slots=window[2],
                copy_src=copies[0],
                copy_dst=copies[1],
            )
            assert [int(t[-1]) for t in (*kv, *window, *copies)] == [SENTINEL] * 7, "only the outputs' elements"
        else:
            result = alloc.commit_tree(arg, index, accept, keep_branches=True)
            result += alloc.alloc_tree_draft(arg, tree, topk, num_steps)
        kv_src, kv_dst, out, last, slots, src, dst = result
        assert slots.shape == (bs, topk, num_steps) and src.shape == dst.shape == (bs * topk * (p - 1),)
        model.apply(kv_src, kv_dst)  # the accepted KV into place, then the committed prefix into the branches
        model.accept(rows, tags, tree, index, lens)
        model.check()
        check_branches(alloc, rows, topk, num_steps, slots, src, dst, model)
        for i, row in enumerate(rows):
            seq = int(alloc.seq_lens[row])
            assert out[i * tree : (i + 1) * tree].tolist() == alloc.req_to_token[row, seq : seq + tree].tolist()
            assert int(last[i]) == (int(alloc.req_to_token[row, seq - 1]) if seq else -1)
        returned.append([t.tolist() for t in result])
    return returned


@pytest.mark.parametrize("rows_as", ["tensor", "list"])
@pytest.mark.parametrize(
    "page_size, bs, launches",
    [
        (1, 5, "one"),
        (1, 32, "one"),
        (1, 33, "count"),
        (1, 65, "count"),
        (4, 3, "one"),
        (4, 16, "one"),
        (4, 17, "count"),
        (16, 8, "one"),
        (16, 9, "count"),
        (128, 4, "one"),
        (128, 5, "count"),
    ],
    ids=lambda v: str(v),
)
def test_commit_tree_and_draft_is_the_two_calls_in_one_launch(page_size, bs, launches, rows_as, monkeypatch):
    """commit_tree_and_draft gives exactly what commit_tree(keep_branches=True) + alloc_tree_draft give, call for
    call (slots, pairs, the whole state), in one launch while the tree draft is one program and the tree commit one
    tile (here topk 4, 5 steps, T 6: up to 32 requests at page 1; with pages > 1 up to 16 requests and 512 copy
    pairs, or the 4 of a draft tile), in two past it: the tree commit and the draft while the draft is one program
    (up to 64 requests at page 1), past that the tree commit with the draft's counts and the draft from them."""
    topk, num_steps, tree = 4, 5, 6

    def run(one_call):
        rng = random.Random(page_size * 1000 + bs)
        num_pages = bs * (pages(120, page_size) + 2 * topk * pages(page_size - 1 + num_steps, page_size))
        alloc = DraftCacheAllocator(page_size * num_pages, bs + 1, 120, page_size=page_size, device="cpu")
        rows = alloc.add_requests([rng.randrange(0, 60) for _ in range(bs)]).tolist()
        return tree_steps(alloc, rows, rng, 3, tree, topk, num_steps, one_call, rows_as), snapshot(alloc), alloc

    two_calls, two_state, _ = run(False)
    made = []
    launch = allocator_module.backend.launch
    monkeypatch.setattr(allocator_module.backend, "launch", lambda fn, *a: made.append(fn.__name__) or launch(fn, *a))
    one_call, one_state, alloc = run(True)
    assert one_call == two_calls
    for name in STATE_TENSORS:
        assert torch.equal(one_state[name], two_state[name]), name
    assert made[:2] == ["_alloc_windows_kernel"] * 2  # add_requests, the first alloc_tree_draft
    steps = made[2:]
    expected = {
        "one": ["_commit_tree_draft_kernel"],
        "commit": ["_commit_tree_kernel", "_alloc_windows_kernel"],
        "count": ["_commit_tree_count_kernel", "_alloc_windows_kernel"],
    }[launches]
    assert steps == expected * 3
    alloc.free_requests(alloc.rows_in_use())
    assert alloc.num_free_slots() == alloc.num_slots and not alloc.num_branch_pages.any()


def test_commit_tree_and_draft_commits_nothing_where_no_window_is_open():
    """Rows with no open window (new ones) commit nothing and get their tree; others commit their path."""
    alloc, expected = (DraftCacheAllocator(4 * 200, 4, 64, page_size=4, device="cpu") for _ in range(2))
    for a in (alloc, expected):
        old = a.add_requests([9, 13])
        a.alloc_tree_draft(old, 4, 2, 3)
        new = a.add_requests([6])
    rows = torch.tensor([*old.tolist(), *new.tolist()])
    index = torch.tensor([[0, 2, -1, -1], [1, 3, -1, -1], [0, 1, 2, 3]])
    got = alloc.commit_tree_and_draft(rows, index, torch.tensor([2, 2, 4]), 4, 2, 3)
    expected_result = expected.commit_tree(rows, index, torch.tensor([2, 2, 4]), keep_branches=True)
    expected_result += expected.alloc_tree_draft(rows, 4, 2, 3)
    assert alloc.seq_lens[rows].tolist() == [11, 15, 6]
    assert all(torch.equal(x, y) for x, y in zip(got, expected_result))
    for name in STATE_TENSORS:
        assert torch.equal(getattr(alloc, name), getattr(expected, name)), name


@pytest.mark.parametrize("rows_as", ["tensor", "list"])
def test_out_of_slots_for_commit_tree_and_draft_commits_nothing(rows_as):
    """All or nothing: a tree draft that cannot fit after the commit raises before anything is committed, with the
    pages counted from the lengths the commit would leave (the host bound, then the exact numbers after a sync)."""
    alloc = DraftCacheAllocator(16 * 24, 4, 256, page_size=16, device="cpu")
    rows_t = alloc.add_requests([14, 30, 46])  # 6 pages, offsets 14
    rows = rows_t.tolist() if rows_as == "list" else rows_t
    alloc.alloc_tree_draft(rows, 2, 2, 1)  # windows inside the rows' pages; branches 2 pages a row
    index = torch.tensor([[0, 1], [0, 1], [0, -1]])
    accept = [2, 2, 1] if rows_as == "list" else torch.tensor([2, 2, 1])
    # 12 free. Committed 16, 32, 47: windows of 16 need a page each; 4 branches of 1 step 4 pages a row.
    before = snapshot(alloc)
    with pytest.raises(OutOfSlotsError, match="a tree draft of 3 requests with 16 draft tokens"):
        alloc.commit_tree_and_draft(rows, index, accept, 16, 4, 1)  # 3 + 12 > 12 (the 6 released do not count)
    assert_unchanged(alloc, before)
    assert alloc.window_lens[rows_t].tolist() == [2, 2, 2], "nothing committed"
    alloc.commit_tree_and_draft(rows, index, accept, 16, 2, 1)  # 3 pages, the 2 branch pages a row kept
    assert alloc.seq_lens[rows_t].tolist() == [16, 32, 47]
    assert alloc.num_free_slots() == 16 * 9
    check_layout(alloc)


@pytest.mark.parametrize("page_size", [1, 4])
def test_the_host_counts_what_a_tree_commit_accepts_as_the_kernel_does(page_size):
    """The capacity check after a sync counts the positions a tree commit accepts on the device (_tree_accepted),
    garbage paths and lengths included: exactly what commit_tree then commits."""
    rng = random.Random(page_size)
    alloc = DraftCacheAllocator(page_size * 400, 8, 40, page_size=page_size, device="cpu")
    rows = alloc.add_requests([rng.randrange(0, 30) for _ in range(8)])
    for _ in range(20):
        alloc.alloc_draft(rows[: rng.randint(0, 8)], rng.randint(0, 9))  # some windows open, of several lengths
        tree = rng.randint(1, 8)
        index = torch.tensor([[rng.randint(-2, tree + 1) for _ in range(tree)] for _ in range(8)])
        accept = torch.tensor([rng.randint(-2, tree + 2) for _ in range(8)])
        seqs = alloc.seq_lens[rows].clone()
        counted = alloc._tree_accepted(rows, seqs, accept, index)
        alloc.commit_tree(rows, index, accept)
        assert (alloc.seq_lens[rows] - seqs).tolist() == counted.tolist()


@pytest.mark.parametrize("page_size", [1, 16])
def test_commit_tree_and_draft_on_ascend_always_takes_two_launches(page_size, monkeypatch):
    """On an NPU the one launch's on-chip buffer is not within budget for every tree (170-178 KiB for trees of 4 nodes
    at topk 1, page 1; 146.5 KiB for 8 nodes with an int32 kv_src): the tree step always takes two launches there,
    whose kernels the compile check covers, while off Ascend a small tree step is one launch."""
    branches = (2, 3, None, None, None)
    alloc = DraftCacheAllocator(page_size * 64, 4, 64, page_size=page_size, device="cpu")
    assert alloc._tree_step_in_one_launch(3, 4, False, branches, 4), "off Ascend: one launch"
    monkeypatch.setattr(allocator_module.backend, "is_npu", lambda device: True)
    monkeypatch.setattr(allocator_module.backend, "num_cores", lambda device: 40)  # an Ascend 910B's vector cores
    alloc = DraftCacheAllocator(page_size * 64, 4, 64, page_size=page_size, device="cpu")  # (it caches the answers)
    for bs, n, tree, topk in [(1, 1, 1, 1), (3, 4, 4, 1), (3, 8, 8, 4), (1, 2, 2, 2)]:
        assert not alloc._tree_step_in_one_launch(bs, n, False, (topk, 1, None, None, None), tree)
        assert not alloc._tree_step_in_one_launch(bs, n, True, (topk, 1, None, None, None), tree)
    rows = alloc.add_requests([3, 5, 0])
    alloc.alloc_tree_draft(rows, 4, 1, 1)
    launched = []
    real = allocator_module.backend.launch
    monkeypatch.setattr(
        allocator_module.backend, "launch", lambda kernel, *a: launched.append(kernel.fn.__name__) or real(kernel, *a)
    )
    index = torch.arange(4).expand(3, 4).contiguous()
    alloc.commit_tree_and_draft(rows, index, torch.tensor([2, 1, 4]), 4, 1, 1)
    assert "_commit_tree_draft_kernel" not in launched and len(launched) == 2, launched
    check_layout(alloc, ask_free_slots=False)


def test_commit_tree_and_draft_takes_one_launch_eagerly_wherever_its_draft_is_one_program(monkeypatch):
    """With pages > 1, in a graph (and in the interpreter) the one launch is taken up to 512 copy pairs, where the
    counted draft of two launches would be one program; eager calls on a device take it wherever the tree draft alone
    is one program (16 requests, 2048 pairs): a second launch costs the host more than it saves the device."""
    monkeypatch.setattr(allocator_module.backend, "num_cores", lambda device: 132)  # where it answers as a GPU
    alloc = DraftCacheAllocator(16 * 64, 32, 64, page_size=16, device="cpu")
    branches = (4, 5, None, None, None)  # 60 copy pairs a request
    assert [alloc._tree_step_in_one_launch(bs, 4, False, branches, 4) for bs in (4, 8, 9, 16)] == [1, 1, 0, 0]
    monkeypatch.setattr(allocator_module.backend, "is_interpreted", lambda device: False)
    assert [alloc._tree_step_in_one_launch(bs, 4, False, branches, 4) for bs in (8, 9, 16, 17)] == [1, 1, 1, 0]
    monkeypatch.setattr(allocator_module.backend, "is_capturing", lambda device: True)
    assert [alloc._tree_step_in_one_launch(bs, 4, False, branches, 4) for bs in (8, 9, 16)] == [1, 0, 0]

    def asked(device):
        raise AssertionError("asked whether the stream is capturing")

    # Where both answers agree the call does not ask: on CUDA that is a query of the stream, on the hot path.
    monkeypatch.setattr(allocator_module.backend, "is_capturing", asked)
    assert [alloc._tree_step_in_one_launch(bs, 4, False, branches, 4) for bs in (8, 17)] == [1, 0]


@pytest.mark.parametrize("counts", [False, True], ids=["commit", "count"])
@pytest.mark.parametrize("wrapper", [False, True], ids=["method", "wrapper"])
def test_commit_tree_and_draft_in_two_launches_compiles_the_draft_first(wrapper, counts, monkeypatch):
    """Past one program the commit changes state in its own launch: the draft's launch is compiled before it, so a
    compilation that fails leaves everything as it was; then the same call goes through. ``counts``: a draft on
    two programs, whose counts the commit's launch writes."""
    from specdec_ops import DraftStepWrapper

    monkeypatch.setattr(DraftCacheAllocator, "_tree_step_launch_choice", lambda self, *a: (False, False))
    monkeypatch.setattr(allocator_module, "_COPY_ONE_PROGRAM_BS", 0)  # 4-request tiles
    alloc = DraftCacheAllocator(4 * 100, 6, 64, page_size=4, device="cpu")
    rows = alloc.add_requests([5, 9] + [3, 4, 6] * counts)
    alloc.alloc_tree_draft(rows, 3, 2, 2)
    index = torch.tensor([[0, 2, -1], [1, -1, -1]] + [[0, 1, 2]] * 3 * counts)
    accept = torch.tensor([2, 1] + [3] * 3 * counts)
    step = DraftStepWrapper(alloc)
    step.plan(rows, 3, accept_lens=accept, accept_index=index, keep_branches=True, topk=2, num_steps=2)
    call = step.commit_tree_and_draft if wrapper else lambda: alloc.commit_tree_and_draft(rows, index, accept, 3, 2, 2)
    events = []
    launch, compile_ = allocator_module.backend.launch, allocator_module.backend.ensure_compiled
    monkeypatch.setattr(allocator_module.backend, "launch", lambda fn, *a: events.append(fn.__name__) or launch(fn, *a))

    def failing_compile(*args):
        events.append("compile")
        raise RuntimeError("compilation failed")

    monkeypatch.setattr(allocator_module.backend, "ensure_compiled", failing_compile)  # Launch.compile calls it too
    before = snapshot(alloc)
    host = (alloc._pages_bound, dict(alloc._known_windows), alloc._unknown_window_bound, dict(alloc._branch_rows))
    with pytest.raises(RuntimeError, match="compilation failed"):
        call()
    assert events == ["compile"]
    assert_unchanged(alloc, before)
    assert (alloc._pages_bound, dict(alloc._known_windows), alloc._unknown_window_bound, dict(alloc._branch_rows)) == (
        host
    )
    monkeypatch.setattr(allocator_module.backend, "ensure_compiled", compile_)
    events.clear()
    call()
    assert events == ["_commit_tree_count_kernel" if counts else "_commit_tree_kernel", "_alloc_windows_kernel"]
    assert alloc.seq_lens[rows].tolist() == [7, 10] + [6, 7, 9] * counts
    check_layout(alloc)


@pytest.mark.parametrize("release", ["alloc_draft", "commit", "commit_tree", "free", "reserve_draft"])
@pytest.mark.parametrize("as_list", [False, True], ids=["tensor", "list"])
def test_branches_are_released_by_the_next_step(release, as_list):
    alloc = DraftCacheAllocator(16 * 60, 3, 256, page_size=16, device="cpu")
    rows = alloc.add_requests([5, 20, 33])
    arg = rows.tolist() if as_list else rows
    alloc.alloc_draft(arg, 8)
    free = alloc.num_free_slots()
    alloc.alloc_branches(arg, 4, 12)
    assert alloc.num_branch_pages.sum() == 4 * (2 + 1 + 1)  # offsets 5, 4, 1: 12 steps cross a page only for 5
    assert alloc._branches_may_exist()
    if release == "alloc_draft":
        alloc.alloc_draft(arg, 8)
    elif release == "reserve_draft":
        alloc.reserve_draft(arg, 8)
    elif release == "commit":
        alloc.commit(arg, torch.tensor([1, 2, 3]))
    elif release == "commit_tree":
        alloc.commit_tree(arg, torch.tensor([[0, 1], [0, 1], [0, 1]]), torch.tensor([2, 0, 1]))
    else:
        alloc.free_requests(arg)
        free = alloc.num_slots
    assert not alloc.num_branch_pages.any()
    assert alloc.num_free_slots() == free
    assert not alloc._branches_may_exist(), "the host knows the same rows released them"
    check_layout(alloc, ask_free_slots=False)


@pytest.mark.parametrize("call", ["alloc_branches", "alloc_tree_draft", "commit_tree_and_draft", "wrapper"])
def test_tree_calls_under_inference_mode(call):
    """Engines run under torch.inference_mode, whose tensors keep no version counter: a tree call with a tensor of
    rows made there still releases and records branch pages (conservatively: a release through a tensor whose rows
    may have changed forgets nothing), and freeing every row returns every page."""
    with torch.inference_mode():
        alloc = DraftCacheAllocator(16 * 40, 4, 128, page_size=16, device="cpu")
        in_use = alloc.add_requests([5, 20, 33, 9])
        rows = in_use[:3]  # not every row in use: a release of these cannot forget everything
        step = DraftStepWrapper(alloc)
        step.plan(rows, 4, accept_lens=torch.tensor([1, 2, 0]), topk=2, num_steps=3)
        for _ in range(3):
            if call == "alloc_branches":
                alloc.alloc_branches(rows, 2, 3)
            elif call == "alloc_tree_draft":
                alloc.alloc_tree_draft(rows, 4, 2, 3)
            elif call == "commit_tree_and_draft":
                alloc.alloc_tree_draft(rows, 4, 2, 3)
                paths = torch.tensor([[0, 1, -1, -1], [0, -1, -1, -1], [-1] * 4])
                alloc.commit_tree_and_draft(rows, paths, torch.tensor([2, 1, 0]), 4, 2, 3)
            else:
                step.alloc_branches()
            assert alloc.num_branch_pages.any() and alloc._branches_may_exist()
            check_layout(alloc, ask_free_slots=False)
        alloc.release_branches(rows)
        assert not alloc.num_branch_pages.any()
        assert alloc._branches_may_exist(), "an inference tensor's rows may have changed: nothing is forgotten"
        alloc.free_requests(in_use)
        assert alloc.num_free_slots() == alloc.num_slots
        assert not alloc._branches_may_exist(), "a release of every row in use forgets everything"
        check_layout(alloc)


def test_branch_pages_of_tensors_of_rows_stay_on_the_books_until_every_row_is_released_or_a_sync():
    """Branch pages taken through tensors of rows count in all, at most every row's worst case; a release through a
    tensor never drops them (it might hold a stale row, or other rows than when it was seen), a release of every row
    in use given as a list does, and a sync puts each row's exact count on the books."""
    alloc = DraftCacheAllocator(4 * 64, 4, 64, page_size=4, device="cpu")
    alloc.add_requests([5, 6, 7])
    for row in (0, 1, 2, 0, 1):
        alloc.alloc_branches(torch.tensor([row]), 2, 2)
    worst = 3 * alloc.branch_pages.shape[1]
    assert alloc._branch_batch_pages == worst == alloc._branch_bound()  # capped at every row's worst case
    alloc.refresh()
    held = alloc.num_branch_pages.tolist()
    assert alloc._branch_rows == {row: n for row, n in enumerate(held) if n} and alloc._branch_batch_pages == 0
    alloc.release_branches(torch.tensor([0]))
    assert alloc._branch_rows == {row: n for row, n in enumerate(held) if n}, "nothing known of a tensor"
    alloc.release_branches([1])
    assert alloc._branch_rows == {row: n for row, n in enumerate(held) if n and row != 1}
    alloc.alloc_branches(torch.tensor([1]), 2, 2)
    alloc.release_branches(torch.tensor([1]))
    assert alloc._branches_may_exist()
    alloc.release_branches(torch.tensor([0, 1, 2]))
    assert alloc._branches_may_exist() and not alloc.num_branch_pages.any()
    alloc.release_branches([0, 1, 2])
    assert not alloc._branches_may_exist() and not alloc.num_branch_pages.any()
    check_layout(alloc)


@pytest.mark.parametrize("rewrite", ["data-swap", "data-copy", "numpy"])
@pytest.mark.parametrize("form", ["wrapper", "methods"])
def test_a_tensor_of_rows_rewritten_any_way_never_makes_the_host_forget_branch_pages(rewrite, form):
    """A tensor of rows pointed back with ``.data =`` at a buffer refilled meanwhile (its own version counter
    unchanged), written through ``.data`` or through numpy holds other rows than the tree call saw, with nothing in
    the tensor to tell. The host used to take the release through it for the release of the rows it recorded, forget
    branch pages that rows 0 and 1 still held and, after a sync, hand out the padding page: now a release through a
    tensor forgets nothing, the next draft releases them in its launch, and a draft past the free pages raises
    (found by an audit of the plan/run wrappers, 2026-11-24)."""
    alloc = DraftCacheAllocator(24, 4, 64, page_size=1, device="cpu")
    alloc.add_requests([2, 2, 2, 2])  # 8 pages used, 16 free
    first, second = torch.tensor([0, 1]), torch.tensor([2, 3])
    rows = torch.empty(0, dtype=torch.int64)
    rows.data = first
    step = DraftStepWrapper(alloc)
    step.plan(rows, 1, accept_lens=torch.zeros(2, dtype=torch.int64), topk=2, num_steps=2)
    if form == "wrapper":
        step.alloc_branches()
    else:
        alloc.alloc_branches(rows, 2, 2)
    held = alloc.num_branch_pages.tolist()
    assert held == [4, 4, 0, 0]  # rows 0, 1: 8 branch pages, 8 free

    def draft():
        if form == "wrapper":
            step.alloc_draft()
        else:
            alloc.alloc_draft(rows, 1)

    if rewrite == "data-swap":  # double-buffered batches: the other buffer, then this one refilled
        rows.data = second
        draft()
        first.copy_(second)
        rows.data = first
    elif rewrite == "data-copy":
        rows.data.copy_(second)
    else:
        rows.numpy()[:] = [2, 3]
    draft()  # rows 2, 3: no branch page released
    assert alloc.num_branch_pages.tolist() == held and alloc._branches_may_exist()
    alloc.refresh()
    assert alloc._branch_rows == {0: 4, 1: 4}
    with pytest.raises(OutOfSlotsError):  # 12 pages, 6 free: the pops never see the 8 that the launch would release
        alloc.alloc_draft([0, 1, 2, 3], 3)
    alloc.alloc_draft([0, 1], 3)  # releases rows 0 and 1's branch pages in its launch
    assert not alloc.num_branch_pages.any() and not alloc._branches_may_exist()
    check_layout(alloc)
    alloc.free_requests(alloc.rows_in_use())
    assert alloc.num_free_slots() == alloc.num_slots
    check_layout(alloc)


@pytest.mark.parametrize("call", ["alloc_draft", "commit", "commit_tree", "release_branches", "alloc_tree_draft"])
def test_a_stale_row_in_a_tensor_as_long_as_the_rows_in_use_forgets_no_branch_pages(call):
    """A tensor with as many rows as are in use, one of them stale (freed), releases the branch pages of the rows it
    names, and the host still knows the row it leaves out holds some: freeing that row returns them (they leaked when
    the host took such a tensor for every row in use)."""
    alloc = DraftCacheAllocator(4 * 40, 4, 64, page_size=4, device="cpu")
    alloc.add_requests([5, 6, 7])  # rows 0, 1, 2
    alloc.alloc_branches([0, 2], 2, 3)
    held = alloc.num_branch_pages.tolist()
    assert held[2] > 0
    batch = torch.tensor([0, 1])
    alloc.free_requests([1])  # row 1 finishes: batch now names a stale row, and as many rows as are in use
    if call == "alloc_draft":
        alloc.alloc_draft(batch, 2)
    elif call == "commit":
        alloc.commit(batch, torch.tensor([0, 0]))
    elif call == "commit_tree":
        alloc.alloc_draft(batch, 2)
        alloc.commit_tree(batch, torch.tensor([[0, 1], [0, 1]]), torch.tensor([1, 1]))
    elif call == "release_branches":
        alloc.release_branches(batch)
    else:
        alloc.alloc_tree_draft(batch, 2, 2, 3)
    assert alloc.num_branch_pages[2] == held[2]  # untouched on the device ...
    assert alloc._branches_may_exist()  # ... and still on the host's books
    check_layout(alloc, ask_free_slots=False)
    alloc.free_requests([2])
    assert alloc.num_branch_pages[2] == 0
    alloc.free_requests(alloc.rows_in_use())
    assert alloc.num_free_slots() == alloc.num_slots
    assert not alloc.num_branch_pages.any()
    check_layout(alloc)


def test_chain_users_never_launch_a_release(monkeypatch):
    alloc = DraftCacheAllocator(256, 3, 64, page_size=4, device="cpu")
    rows = alloc.add_requests([5, 2])
    calls = []
    monkeypatch.setattr(alloc, "_launch_release", lambda *args: calls.append(args))
    alloc.alloc_draft(rows, 4)
    alloc.commit(rows, torch.tensor([1, 2]))
    alloc.alloc_draft(rows, 4)
    alloc.commit_tree(rows, torch.tensor([[0, 1], [0, 2]]), torch.tensor([2, 2]))
    alloc.free_requests(rows)
    assert not calls and alloc.branch_pages.shape == (3, 0)


@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_out_of_slots_for_branches_is_all_or_nothing(page_size):
    alloc = DraftCacheAllocator(10 * page_size, 3, 64, page_size=page_size, device="cpu")
    rows = alloc.add_requests([page_size, page_size])  # 8 pages free
    steps = page_size  # offset 0: one page per branch for page > 1, `steps` pages for page 1
    per_branch = pages(steps, page_size)
    topk = 8 // (2 * per_branch) + 1
    before = snapshot(alloc)
    with pytest.raises(OutOfSlotsError, match=r"alloc_branches: 2 requests with \d+ branches"):
        alloc.alloc_branches(rows, topk, steps)
    assert_unchanged(alloc, before)
    alloc.alloc_branches(rows, topk - 1, steps)
    with pytest.raises(OutOfSlotsError):  # the pages a call releases are not popped by the same call
        alloc.alloc_branches(rows, topk, steps)
    alloc.release_branches(rows)
    alloc.alloc_branches(rows[:1], 8 // per_branch, steps)  # exactly the 8 free pages
    assert alloc.num_free_slots() == 0
    check_layout(alloc, ask_free_slots=False)
    alloc.free_requests(rows)
    assert alloc.num_free_slots() == alloc.num_slots


@pytest.mark.parametrize("rows_as", ["tensor", "list"])
def test_out_of_slots_for_a_tree_draft_is_all_or_nothing(rows_as):
    alloc = DraftCacheAllocator(16 * 32, 4, 256, page_size=16, device="cpu")
    rows_t = alloc.add_requests([2, 18, 34, 50])  # 10 pages, offsets 2: a branch of 5 steps takes 1 page

    def rows(k=4):
        return rows_t[:k].tolist() if rows_as == "list" else rows_t[:k]

    before = snapshot(alloc)
    # 22 free: windows of 40 take 2 pages each (8), branches 4 each (16).
    with pytest.raises(OutOfSlotsError, match=r"a tree draft of 4 requests with 40 draft tokens and 4 branches of 5 "):
        alloc.alloc_tree_draft(rows(), 40, 4, 5)
    assert_unchanged(alloc, before)
    alloc.alloc_tree_draft(rows(3), 40, 4, 5)  # 6 + 12 pages
    assert alloc.num_free_slots() == 16 * 4
    before = snapshot(alloc)
    with pytest.raises(OutOfSlotsError):  # 4 free: the 12 branch pages it would release do not count
        alloc.alloc_tree_draft(rows(3), 1, 2, 5)
    assert_unchanged(alloc, before)
    alloc.commit_tree(rows(3), torch.zeros(3, 40, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    assert alloc.num_free_slots() == 16 * 16, "the tree commit released the branch pages"
    alloc.alloc_tree_draft(rows(), 1, 4, 5)  # exactly the 16 free pages
    assert alloc.num_free_slots() == 0
    check_layout(alloc)
    alloc.free_requests(rows())
    assert alloc.num_free_slots() == alloc.num_slots


def run_tree_step(
    alloc: DraftCacheAllocator, live: list[int], rows_as: str, rng: random.Random, topk=4, steps=5, tree=8
):
    """One tree step of the rows ``live``, given as a list, as one tensor, or as a new tensor to every call."""
    same = torch.tensor(live)

    def rows():
        if rows_as == "list":
            return live
        return torch.tensor(live) if rows_as == "new-tensors" else same

    alloc.alloc_branches(rows(), topk, steps)
    alloc.alloc_draft(rows(), tree)
    index, lens = random_paths(rng, len(live), tree)
    alloc.commit_tree(rows(), index, lens if rows_as == "list" else torch.tensor(lens, dtype=torch.int64))


@pytest.mark.parametrize("rows_as", ["tensor", "list", "new-tensors"])
def test_no_sync_in_a_tree_loop_with_headroom(rows_as):
    # The pool holds every request at max_context_len and every branch at its worst, so no call needs a sync,
    # however long the loop: requests arrive and finish after 3 to 6 steps, long prompts among them. Given rows as
    # a tensor, the host keeps the branches a draft released on its books (below: it cannot know which rows a tensor
    # held) until the next alloc_branches takes new ones, which it counts beside them: room for every branch twice.
    p, bs, topk, steps = 16, 8, 4, 5
    branches = topk * pages(p - 1 + steps, p) * (1 if rows_as == "list" else 2)
    num_pages = bs * (pages(512, p) + branches)
    alloc = DraftCacheAllocator(p * num_pages, bs, 512, page_size=p, device="cpu")
    rng = random.Random(len(rows_as))
    finish_at: dict[int, int] = {}
    for step in range(20):
        done = [row for row, end in finish_at.items() if end == step]
        alloc.free_requests(done)
        for row in done:
            del finish_at[row]
        # At most 440 + 6 windows of 8: no request comes near max_context_len, however much it accepts.
        new = alloc.add_requests([rng.randint(300, 440) for _ in range(bs - alloc.num_requests)]).tolist()
        finish_at.update((row, step + rng.randint(3, 6)) for row in new)
        run_tree_step(alloc, alloc.rows_in_use(), rows_as, rng, topk, steps)
        # Rows as a tensor: the host cannot tell which rows the tensor held (a stale row may stand in for one, or it
        # may have been rewritten in any way), so it keeps their branch pages on its books, bounded by every row's
        # worst case, which this pool holds: still no sync.
        may_exist = alloc._branches_may_exist()
        assert not may_exist if rows_as == "list" else may_exist, "the draft released every branch"
    assert alloc.num_syncs == 0
    check_layout(alloc)


@pytest.mark.parametrize("rows_as", ["tensor", "list"])
def test_near_capacity_a_tree_step_syncs_once(rows_as):
    # Branches at their worst (2 pages each) do not fit beside the requests, their exact need (1 page each) does:
    # alloc_branches syncs, and the draft that follows trusts the exact count.
    alloc = DraftCacheAllocator(16 * 32, 4, 256, page_size=16, device="cpu")
    alloc.add_requests([2, 18, 34, 50])  # 10 pages, offsets 2
    rng = random.Random(0)
    for step in range(5):  # windows of 1: offsets stay <= 7, so branches take one page and windows none
        syncs = alloc.num_syncs
        run_tree_step(alloc, alloc.rows_in_use(), rows_as, rng, tree=1)
        assert alloc.num_syncs == syncs + 1, f"step {step}"
    check_layout(alloc)


@pytest.mark.parametrize("rows_as", ["tensor", "list"])
def test_out_of_slots_after_branches_is_all_or_nothing(rows_as):
    alloc = DraftCacheAllocator(16 * 32, 4, 256, page_size=16, device="cpu")
    rows_t = alloc.add_requests([2, 18, 34, 50])  # 10 pages

    def rows(k=4):
        return rows_t[:k].tolist() if rows_as == "list" else rows_t[:k]

    alloc.alloc_branches(rows(), 4, 5)  # syncs: 16 pages of 22, the exact count recorded
    before = snapshot(alloc)
    with pytest.raises(OutOfSlotsError, match=r"a draft of 4 requests with 40 draft tokens needs 8 new pages"):
        alloc.alloc_draft(rows(), 40)  # 2 pages each, 6 free: the branch pages it releases are not free yet
    assert_unchanged(alloc, before)
    alloc.alloc_draft(rows(3), 40)  # the last 6 pages; releases 12 branch pages
    assert alloc.num_free_slots() == 16 * 12
    check_layout(alloc)
    before = snapshot(alloc)
    with pytest.raises(OutOfSlotsError, match=r"alloc_branches: 4 requests with 5 branches of 5 steps need 20"):
        alloc.alloc_branches(rows(), 5, 5)  # 12 free: the 4 pages it would release do not count
    assert_unchanged(alloc, before)
    kept = branch_pages_of(alloc)[int(rows_t[3])]
    alloc.alloc_branches(rows(), 4, 5)  # the 12 free pages, exactly: the 4th request keeps its 4 pages
    assert alloc.num_free_slots() == 0
    assert branch_pages_of(alloc)[int(rows_t[3])] == kept
    check_layout(alloc)
    alloc.release_branches(rows())
    assert alloc.num_free_slots() == 16 * 16


@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("fused", [False, True], ids=["alloc_branches", "alloc_tree_draft"])
def test_rows_keep_the_branch_pages_their_next_branches_take(page_size, fused):
    """Branch pages held (commit_tree(keep_branches=True), or alloc_branches) by a row whose next branches take as
    many pages are kept, with no trip through the pool: the same pages, the same free count. Rows whose branches
    take another number of pages trade theirs, in the same launch."""
    alloc = DraftCacheAllocator(page_size * 400, 4, 256, page_size=page_size, device="cpu")
    # Offsets in the last page 0, 5, 15 and 12 (page 16): 3 steps take one page a branch, except from 15.
    rows = alloc.add_requests([32, 21, 15, 44])
    model = KVModel(alloc)
    model.prompt(rows.tolist())

    def branches(topk, steps):
        if fused:
            out, _, slots, src, dst = alloc.alloc_tree_draft(rows, 2, topk, steps)
            # Commit nothing: the windows stay open for the next draft, which takes no new window pages.
            alloc.commit_tree(
                rows, torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), keep_branches=True
            )
        else:
            slots, src, dst = alloc.alloc_branches(rows, topk, steps, return_copies=True)
        check_branches(alloc, rows.tolist(), topk, steps, slots, src, dst, model)
        check_layout(alloc)
        return slots

    first = branches(4, 3)
    held, free = branch_pages_of(alloc), alloc.num_free_slots()
    assert torch.equal(branches(4, 3), first), "the same pages give the same slots"
    assert branch_pages_of(alloc) == held and alloc.num_free_slots() == free
    branches(3, 3)  # another topk: every row trades its pages
    assert alloc.num_free_slots() == free + page_size * (
        len(sum(held.values(), [])) - int(alloc.num_branch_pages.sum())
    )
    held = branch_pages_of(alloc)
    branches(3, 12)  # page 16: 12 steps take two pages a branch from offsets 5, 15 and 12, one from 0
    kept = [row for row, pages_held in branch_pages_of(alloc).items() if pages_held == held[row]]
    assert kept == ([] if page_size == 1 else [int(rows[0]), int(rows[2])])
    alloc.release_branches(rows)
    alloc.free_requests(rows)
    assert alloc.num_free_slots() == alloc.num_slots


@pytest.mark.parametrize(
    "call, page_size, bs, programs",
    [
        ("alloc_tree_draft", 16, 8, 1),
        ("alloc_tree_draft", 16, 16, 1),
        ("alloc_tree_draft", 16, 32, 8),
        ("alloc_tree_draft", 64, 8, 1),
        ("alloc_tree_draft", 64, 16, 4),
        ("alloc_tree_draft", 1, 16, 1),
        ("alloc_branches", 16, 32, 1),
        ("alloc_branches", 64, 16, 1),
        ("alloc_branches", 64, 32, 8),
        ("alloc_branches", 1, 16, 1),
    ],
)
def test_one_program_while_the_copy_pairs_are_few(call, page_size, bs, programs, monkeypatch):
    """Off Ascend, with pages > 1, alloc_tree_draft runs as one program while the batch has at most 16 requests and
    2048 copy pairs, alloc_branches at most 32 and 4096 (topk 4 here: 60 pairs a request at page 16, 252 at page 64),
    else on 4-request tiles."""
    alloc = DraftCacheAllocator(page_size * 64 * bs, bs, 64, page_size=page_size, device="cpu")
    rows = alloc.add_requests([(5 * i) % 40 for i in range(bs)])
    grids = []
    launch = allocator_module.backend.launch
    monkeypatch.setattr(
        allocator_module.backend, "launch", lambda fn, grid, *a: grids.append(grid) or launch(fn, grid, *a)
    )
    if call == "alloc_tree_draft":
        slots, src, dst = alloc.alloc_tree_draft(rows, 4, 4, 5)[2:]
    else:
        slots, src, dst = alloc.alloc_branches(rows, 4, 5, return_copies=True)
    assert grids == [(programs,)]
    model = KVModel(alloc)
    model.prompt(rows.tolist())
    check_branches(alloc, rows.tolist(), 4, 5, slots, src, dst, model)


# ---------------------------------------------------------------------------------------- many programs


def tree_loop(
    alloc: DraftCacheAllocator,
    steps: int,
    seed: int,
    topk: int = 3,
    num_steps: int = 4,
    tree: int = 6,
    fused: bool = False,
    keep: bool = False,
):
    """A seeded loop of tree steps (branches, draft, verify, tree commit; ``fused``: the branches and the draft by
    alloc_tree_draft; ``keep``: the tree commit keeps the branch pages) with arrivals and finishes; returns
    everything the calls returned, and checks the simulated KV after each step."""
    rng = random.Random(seed)
    model = KVModel(alloc)
    model.prompt(alloc.rows_in_use())
    outputs = []
    for _ in range(steps):
        if alloc.num_requests < alloc.max_requests and rng.random() < 0.5:
            rows = alloc.add_requests([rng.randrange(0, alloc.max_context_len // 3)]).tolist()
            model.prompt(rows)
        seq = alloc.seq_lens.tolist()
        done = [row for row in alloc.rows_in_use() if rng.random() < 0.1 or seq[row] + tree > alloc.max_context_len]
        alloc.free_requests(done)
        for row in done:
            del model.committed[row]
        live = alloc.rows_in_use()
        if not live:
            continue
        rows = torch.tensor(live)
        if fused:
            out, last, slots, copy_src, copy_dst = alloc.alloc_tree_draft(rows, tree, topk, num_steps)
            check_branches(alloc, live, topk, num_steps, slots, copy_src, copy_dst, model)
        else:
            slots, copy_src, copy_dst = alloc.alloc_branches(rows, topk, num_steps, return_copies=True)
            check_branches(alloc, live, topk, num_steps, slots, copy_src, copy_dst, model)
            out, last = alloc.alloc_draft(rows, tree)  # releases the branch pages
        tags = model.verify(out)
        index, lens = random_paths(rng, len(live), tree)
        src, dst = alloc.commit_tree(rows, index, torch.tensor(lens, dtype=torch.int64), keep_branches=keep)
        model.apply(src, dst)
        model.accept(live, tags, tree, index, lens)
        model.check()
        outputs.append([t.tolist() for t in (slots, copy_src, copy_dst, out, last, src, dst)])
    check_layout(alloc, ask_free_slots=False)
    return outputs


@pytest.mark.parametrize(
    "fused, keep", [(False, False), (True, False), (True, True)], ids=["branches+draft", "tree-draft", "keep"]
)
@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_many_programs_give_what_one_gives(page_size, fused, keep, monkeypatch):
    """Split over many programs (and scan blocks), every call gives what one program gives; ``keep``: tree drafts
    where some requests keep their branch pages and others (a page more or less per branch) trade them."""

    def run():
        num_pages = 12 * (pages(96, page_size) + 6 * pages(page_size + 3, page_size))
        alloc = DraftCacheAllocator(page_size * num_pages, 12, 96, page_size=page_size, device="cpu")
        alloc.add_requests([(5 * i) % 40 for i in range(9)])
        return tree_loop(alloc, steps=6, seed=page_size, fused=fused, keep=keep), snapshot(alloc)

    monkeypatch.setattr(allocator_module, "_COPY_BRANCH_TILE", 32)  # one program for the 9 requests
    one_out, one_state = run()
    for name, value in [
        ("_BRANCH_TILE", 2),
        ("_BRANCH_BLOCK", 4),
        ("_COPY_BRANCH_TILE", 2),
        ("_COPY_BRANCH_ONE_PROGRAM_BS", 0),
        ("_COPY_BRANCH_BLOCK", 4),
        ("_SCAN_BLOCK", 4),
        ("_FREE_TILE", 2),
        ("_FREE_BLOCK_P", 2),
        ("_FREE_CLASSES", ((None, 2, 2),)),
        ("_MAX_TILE", 2),
        ("_TREE_ELEMENTS", 16),
    ]:
        monkeypatch.setattr(allocator_module, name, value)
    many_out, many_state = run()
    assert one_out == many_out
    for name in STATE_TENSORS:
        assert torch.equal(one_state[name], many_state[name]), name


@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_commit_tree_and_draft_in_two_launches_on_many_programs(page_size, monkeypatch):
    """Past one launch, the tree commit counts each of its tiles' pops and pushes and the draft reads those counts
    (``_commit_tree_count_kernel``, then ``SUMS``): on many programs, with several commit tiles a draft tile and
    several scan blocks of counts, it gives exactly what commit_tree(keep_branches=True) + alloc_tree_draft give on
    one program. At page 4 the branches' page count changes with the committed length's offset in its page, so
    requests trade their branch pages (pops and pushes) as well as keep them."""
    topk, num_steps, tree, bs = 3, 4, 6, 11

    def run(one_call):
        rng = random.Random(page_size)
        num_pages = bs * (pages(140, page_size) + 2 * topk * pages(page_size - 1 + num_steps, page_size))
        alloc = DraftCacheAllocator(page_size * num_pages, bs + 1, 140, page_size=page_size, device="cpu")
        rows = alloc.add_requests([rng.randrange(0, 60) for _ in range(bs)]).tolist()
        return tree_steps(alloc, rows, rng, 4, tree, topk, num_steps, one_call), snapshot(alloc)

    two_calls, two_state = run(False)
    monkeypatch.setattr(DraftCacheAllocator, "_tree_step_launch_choice", lambda self, *a: (False, False))
    for name, value in [
        ("_MIN_TILE", 4),
        ("_RELEASE_ONE_PROGRAM", 0),
        ("_COPY_ONE_PROGRAM_BS", 0),
        ("_TREE_ELEMENTS", 16),
        ("_SCAN_BLOCK", 4),
    ]:
        monkeypatch.setattr(allocator_module, name, value)
    made = []
    launch = allocator_module.backend.launch

    def record(fn, grid, *args):
        made.append((fn.__name__, grid, dict(args[-2]).get("TILE"), dict(args[-2]).get("SUMS")))
        return launch(fn, grid, *args)

    monkeypatch.setattr(allocator_module.backend, "launch", record)
    one_call, one_state = run(True)
    assert one_call == two_calls
    for name in STATE_TENSORS:
        assert torch.equal(one_state[name], two_state[name]), name
    # 11 requests: the commit in 2-request tiles (6 programs), the draft in 4-request tiles (3 programs), 2 counts each
    assert made[-2:] == [("_commit_tree_count_kernel", (6,), 2, None), ("_alloc_windows_kernel", (3,), 4, 2)]


@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_tree_drafts_looking_back_match_summing_call_for_call(page_size, monkeypatch):
    """A tree draft in one launch past one program looks back off Ascend, as a chain draft does: each program
    publishes its tiles' pops, and where branch pages go back to the ring its pushes too, and adds those of earlier
    tiles. Against every program summing the earlier requests (Ascend's way, _LOOK_BACK_BLOCK = 0), call for call on
    many programs: alloc_tree_draft with branches only, then trading branch pages (pops and pushes) step after step,
    then (page 1) a chain draft that releases them and one that has none to release, which clears the pushes the
    one before published; with rows not in use in the batch. check_layout checks that both banks of published
    tiles went back to 0."""
    topk, num_steps, tree = 2, 3, 5
    bs = 80 if page_size == 1 else 24  # page 1: 32-request tiles (3 programs); page 4: 4-request tiles (5-6)
    launches = []
    launch = allocator_module.backend.launch

    def record(fn, grid, *args):
        constexprs = dict(args[-2])
        if fn.__name__ == "_alloc_windows_kernel" and not constexprs["PREFILL"]:
            launches.append((grid[0], constexprs["LOOKBACK"] > 0, constexprs["RELEASE"], constexprs["BRANCH"]))
        return launch(fn, grid, *args)

    monkeypatch.setattr(allocator_module.backend, "launch", record)
    monkeypatch.setattr(allocator_module, "_ALLOC_ELEMENTS", 128)  # chain drafts of 2 tokens: 32-request tiles
    runs = []
    for block in (0, 4):  # summing; looking back at 4 tiles a load
        monkeypatch.setattr(allocator_module, "_LOOK_BACK_BLOCK", block)
        rng = random.Random(page_size)
        num_pages = bs * (pages(200, page_size) + 2 * topk * pages(page_size - 1 + num_steps, page_size))
        alloc = DraftCacheAllocator(page_size * num_pages, bs + 6, 200, page_size=page_size, device="cpu")
        rows = alloc.add_requests([rng.randrange(0, 60) for _ in range(bs + 6)]).tolist()
        alloc.free_requests(rows[-6:])
        rows = rows[: bs - 6] + rows[-6:]  # rows not in use, still in the batch: they change nothing
        launches.clear()
        outputs = tree_steps(alloc, rows[: bs - 6], rng, 3, tree, topk, num_steps, False)
        check_layout(alloc)
        rows_t = torch.tensor(rows)  # (a tensor of rows is not checked on the host)
        out, last = alloc.alloc_draft(rows_t, 3)  # a chain draft that gives the branch pages back
        alloc.commit(rows_t, torch.tensor([rng.randrange(0, 4) for _ in rows]))
        check_layout(alloc)
        outputs.append([out.tolist(), last.tolist()])
        out, last = alloc.alloc_draft(rows_t, 2)  # no branch pages left: a chain draft that clears the pushes
        check_layout(alloc)
        outputs.append([out.tolist(), last.tolist()])
        runs.append((outputs, snapshot(alloc)))
        # (past page 1 a draft without branches stays one program up to _MAX_TILE requests)
        assert all(grid > 1 for grid, _, _, branch in launches if branch or page_size == 1), launches
        kinds = {(release, branch) for _, looked, release, branch in launches if looked}
        expected = {(False, True), (True, True)} | ({(True, False), (False, False)} if page_size == 1 else set())
        assert kinds == (set() if block == 0 else expected), launches
    assert runs[0][0] == runs[1][0]
    for name in STATE_TENSORS:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_alloc_branches_looking_back_matches_summing_call_for_call(page_size, monkeypatch):
    """alloc_branches past one program looks back off Ascend, as a tree draft does: each program publishes its tiles'
    pushes (the branch pages it returns) and pops and adds those of earlier tiles. Against every program summing the
    earlier requests (Ascend's way, _LOOK_BACK_BLOCK = 0), call for call on many programs: branches for rows that
    hold none, for rows that trade them or keep them (the branch shape changes, then stays), after a tree commit and
    a chain draft that released them, with rows not in use in the batch. check_layout also checks that both banks of
    published tiles went back to 0."""
    bs = 80 if page_size == 1 else 40  # page 1: 32-request tiles (3 programs); page 4: 4-request tiles (10)
    launches = []
    launch = allocator_module.backend.launch

    def record(fn, grid, *args):
        if fn.__name__ == "_alloc_branches_kernel":
            launches.append((grid[0], dict(args[-2])["LOOKBACK"]))
        return launch(fn, grid, *args)

    monkeypatch.setattr(allocator_module.backend, "launch", record)
    runs = []
    for block in (0, 4):  # summing; looking back at 4 tiles a load
        monkeypatch.setattr(allocator_module, "_LOOK_BACK_BLOCK", block)
        rng = random.Random(page_size)
        num_pages = bs * (pages(200, page_size) + 2 * 3 * pages(page_size - 1 + 4, page_size))
        alloc = DraftCacheAllocator(page_size * num_pages, bs + 6, 200, page_size=page_size, device="cpu")
        rows = alloc.add_requests([rng.randrange(0, 60) for _ in range(bs + 6)]).tolist()
        alloc.free_requests(rows[-6:])
        batch = torch.tensor(rows[: bs - 6] + rows[-6:])  # rows not in use, still in the batch: they change nothing
        launches.clear()
        outputs = []
        for topk, num_steps in ((2, 3), (3, 4), (3, 4), (2, 2)):  # none held, then traded, kept, traded
            outputs.append([t.tolist() for t in alloc.alloc_branches(batch, topk, num_steps, return_copies=True)])
            check_layout(alloc)
        out, last = alloc.alloc_draft(batch, 3)  # gives the branch pages back
        alloc.commit(batch, torch.tensor([rng.randrange(0, 4) for _ in range(bs)]))
        outputs.append([out.tolist(), last.tolist()])
        outputs.append([t.tolist() for t in alloc.alloc_branches(batch, 2, 3, return_copies=True)])
        check_layout(alloc)
        runs.append((outputs, snapshot(alloc)))
        assert len(launches) == 5 and all(grid > 1 and looked == block for grid, looked in launches), launches
    assert runs[0][0] == runs[1][0]
    for name in STATE_TENSORS:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


def test_tree_draft_with_copies_looking_back_takes_about_one_program_per_core(monkeypatch):
    """Past one program a tree draft with page_size > 1 (copy pairs) that looks back takes the smallest power-of-two
    tile of at least _COPY_TREE_DRAFT_TILE requests that keeps the grid within one program per core, at most
    _BRANCH_LARGE_TILE; where it does not look back (_look_back_programs 0: the interpreter, Ascend), that minimum.
    Whichever the tile, the same slots, pairs and lengths."""
    bs, low = 40, allocator_module._COPY_TREE_DRAFT_TILE
    launches = []
    launch = allocator_module.backend.launch

    def record(fn, grid, *args):
        constexprs = dict(args[-2])
        if fn.__name__ == "_alloc_windows_kernel" and constexprs["BRANCH"]:
            launches.append((grid[0], constexprs["TILE"]))
        return launch(fn, grid, *args)

    monkeypatch.setattr(allocator_module.backend, "launch", record)
    results = []
    # (the interpreter runs programs in order, so each grid here holds one program per tile: a program that looped
    # over tiles would wait for a later one's)
    assert allocator_module._BRANCH_LARGE_TILE >= 32
    for cores, tile in ((0, low), (100, low), (5, 8), (2, 32)):  # 40 / 5 -> 8; 40 / 2 -> 32
        alloc = DraftCacheAllocator(4 * 2048, bs, 32, page_size=4, device="cpu")
        alloc._look_back_programs = cores
        rows = alloc.add_requests([i % 7 for i in range(bs)])
        # The config first: a grid capped below its tiles would hang here (a program waiting for a later one).
        config = alloc._alloc_launch_config(bs, 3, False, False, True, False, (2, 2), None, False)
        assert (config[0], config[3]) == (tile, cores), (cores, config)
        launches.clear()
        outputs = alloc.alloc_tree_draft(rows, 3, 2, 2)
        assert launches == [(-(-bs // tile), tile)], (cores, launches)
        check_layout(alloc)
        results.append(([outputs], snapshot(alloc)))
    for run in results[1:]:
        assert_same_runs(run, results[0])


@pytest.mark.parametrize("fused", [False, True], ids=["branches+draft", "tree-draft"])
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_same_calls_give_the_same_table(page_size, fused):
    runs = []
    for _ in range(2):
        num_pages = 6 * (pages(96, page_size) + 3 * pages(page_size + 3, page_size))
        alloc = DraftCacheAllocator(page_size * num_pages, 6, 96, page_size=page_size, device="cpu")
        runs.append((tree_loop(alloc, steps=8, seed=page_size + 7, fused=fused), snapshot(alloc)))
        alloc.free_requests(alloc.rows_in_use())
        assert alloc.num_free_slots() == alloc.num_slots
    assert runs[0][0] == runs[1][0]
    for name in STATE_TENSORS:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


# ---------------------------------------------------------------------------------------------- stateful


class TreeMachine(RuleBasedStateMachine):
    """Chain steps, tree steps, branches, releases, adds and frees in any order: the simulated KV of every committed
    position stays right, committed positions never move, slots are never owned twice, failures are exactly the
    predicted ones and change nothing."""

    PAGE_SIZE = 1
    NUM_PAGES = 60
    MAX_REQUESTS = 4
    MAX_CONTEXT_LEN = 48
    MAX_TREE = 6
    MAX_ADD = 2  # requests an add makes at most

    # Launch constants of specdec_ops.allocator to shrink for this machine (many programs with few requests).
    TILES: dict[str, object] = {}

    @initialize(data=st.data())
    def start(self, data):
        self._saved_tiles = patch_tiles(self.TILES)
        self.alloc = DraftCacheAllocator(
            self.NUM_PAGES * self.PAGE_SIZE, self.MAX_REQUESTS, self.MAX_CONTEXT_LEN, page_size=self.PAGE_SIZE,
            device="cpu",
        )  # fmt: skip
        self.model = KVModel(self.alloc)
        self.slots = {}  # row -> slots of its committed positions
        self.window = {}  # row -> open window
        self.add(data)

    def free_pages(self) -> int:
        return len(self.alloc.free_page_list())

    def learn(self):
        """Committed positions never move."""
        for row in self.alloc.rows_in_use():
            n = int(self.alloc.seq_lens[row])
            slots = self.alloc.req_to_token[row, :n].tolist()
            old = self.slots.get(row, [])
            assert slots[: len(old)] == old, f"row {row}: a committed position moved"
            self.slots[row] = slots

    def pick_rows(self, data, everyone=False):
        live = self.alloc.rows_in_use()
        if everyone or not live:
            return live
        return data.draw(st.lists(st.sampled_from(live), unique=True), label="rows")

    def as_rows(self, data, rows):
        kind = data.draw(st.sampled_from(["list", "int64", "int32"]), label="rows as")
        return rows if kind == "list" else torch.tensor(rows, dtype=getattr(torch, kind))

    @rule(data=st.data())
    def add(self, data):
        lens = data.draw(
            st.lists(st.integers(0, self.MAX_CONTEXT_LEN // 3), max_size=self.MAX_ADD), label="prompt_lens"
        )
        if len(lens) > self.MAX_REQUESTS - self.alloc.num_requests:
            return
        if sum(pages(n, self.PAGE_SIZE) for n in lens) > self.free_pages():
            with pytest.raises(OutOfSlotsError):
                self.alloc.add_requests(lens)
            return
        rows = self.alloc.add_requests(lens).tolist()
        self.model.prompt(rows)
        self.window.update(dict.fromkeys(rows, 0))
        self.learn()

    @rule(data=st.data())
    def free(self, data):
        rows = self.pick_rows(data)
        self.alloc.free_requests(self.as_rows(data, rows))
        for row in rows:
            del self.model.committed[row], self.slots[row], self.window[row]

    def try_draft(self, data, rows, n):
        p = self.PAGE_SIZE
        seq, allocs = self.alloc.seq_lens.tolist(), self.alloc.alloc_lens.tolist()
        need = sum(max(pages(seq[r] + n, p) - pages(allocs[r], p), 0) for r in rows)
        fails = any(seq[r] + n > self.MAX_CONTEXT_LEN for r in rows) or need > self.free_pages()
        before = snapshot(self.alloc)
        if fails:
            with pytest.raises((OutOfSlotsError, allocator_module.ContextLengthError)):
                self.alloc.alloc_draft(self.as_rows(data, rows), n)
            assert_unchanged(self.alloc, before)
            event("draft: fails")
            return None
        out, _ = self.alloc.alloc_draft(self.as_rows(data, rows), n)
        self.window.update(dict.fromkeys(rows, n))
        return out

    @rule(data=st.data())
    def branches(self, data):
        rows = self.pick_rows(data)
        topk = data.draw(st.integers(1, 3), label="topk")
        steps = data.draw(st.integers(1, 2 * self.PAGE_SIZE + 1), label="num_steps")
        need = branch_pops(self.alloc, rows, topk, steps)
        before = snapshot(self.alloc)
        if need > self.free_pages():
            event("branches: fail")
            with pytest.raises(OutOfSlotsError):
                self.alloc.alloc_branches(self.as_rows(data, rows), topk, steps)
            assert_unchanged(self.alloc, before)
            return
        slots, src, dst = self.alloc.alloc_branches(self.as_rows(data, rows), topk, steps, return_copies=True)
        check_branches(self.alloc, rows, topk, steps, slots, src, dst, self.model)

    @rule(data=st.data())
    def release(self, data):
        self.alloc.release_branches(self.as_rows(data, self.pick_rows(data)))

    @rule(data=st.data())
    def chain_step(self, data):
        rows = self.pick_rows(data, everyone=data.draw(st.booleans(), label="everyone"))
        n = data.draw(st.integers(0, self.MAX_TREE), label="N")
        out = self.try_draft(data, rows, n)
        if out is None:
            return
        tags = self.model.verify(out)
        accept = [data.draw(st.integers(0, n), label="accept") for _ in rows]
        self.alloc.commit(self.as_rows(data, rows), torch.tensor(accept, dtype=torch.int64))
        index = torch.arange(n).repeat(len(rows), 1) if n else torch.zeros(len(rows), 0, dtype=torch.int64)
        self.model.accept(rows, tags, n, index, accept)
        self.window.update(dict.fromkeys(rows, 0))
        self.learn()

    def try_tree_draft(self, data, rows, tree):
        """alloc_tree_draft, or the failure it must raise (changing nothing); returns out_cache_loc or None."""
        topk = data.draw(st.integers(1, 3), label="topk")
        steps = data.draw(st.integers(1, 2 * self.PAGE_SIZE + 1), label="num_steps")
        p = self.PAGE_SIZE
        seq, allocs = self.alloc.seq_lens.tolist(), self.alloc.alloc_lens.tolist()
        need = sum(max(pages(seq[r] + tree, p) - pages(allocs[r], p), 0) for r in rows)
        need += branch_pops(self.alloc, rows, topk, steps)
        before = snapshot(self.alloc)
        if any(seq[r] + tree > self.MAX_CONTEXT_LEN for r in rows) or need > self.free_pages():
            with pytest.raises((OutOfSlotsError, allocator_module.ContextLengthError)):
                self.alloc.alloc_tree_draft(self.as_rows(data, rows), tree, topk, steps)
            assert_unchanged(self.alloc, before)
            event("tree draft: fails")
            return None
        out, _, slots, src, dst = self.alloc.alloc_tree_draft(self.as_rows(data, rows), tree, topk, steps)
        check_branches(self.alloc, rows, topk, steps, slots, src, dst, self.model)
        self.window.update(dict.fromkeys(rows, tree))
        return out

    @rule(data=st.data())
    def tree_step(self, data):
        rows = self.pick_rows(data, everyone=data.draw(st.booleans(), label="everyone"))
        tree = data.draw(st.integers(1, self.MAX_TREE), label="T")
        if data.draw(st.booleans(), label="alloc_tree_draft"):
            out = self.try_tree_draft(data, rows, tree)
        else:
            if data.draw(st.booleans(), label="with branches"):
                self.branches(data)
            out = self.try_draft(data, rows, tree)
        if out is None:
            return
        tags = self.model.verify(out)
        seed = data.draw(st.integers(0, 2**16), label="paths")
        index, lens = random_paths(random.Random(seed), len(rows), tree)
        index = index.to(data.draw(st.sampled_from([torch.int32, torch.int64]), label="index dtype"))
        validate = data.draw(st.booleans(), label="validate")
        keep = data.draw(st.booleans(), label="keep_branches")
        src, dst = self.alloc.commit_tree(
            self.as_rows(data, rows),
            index,
            torch.tensor(lens, dtype=torch.int64),
            keep_branches=keep,
            validate=validate,
        )
        self.model.apply(src, dst)
        self.model.accept(rows, tags, tree, index, lens)
        self.window.update(dict.fromkeys(rows, 0))
        self.learn()

    @rule(data=st.data())
    def tree_steps_in_one_call(self, data):
        """A tree draft, verification, then commit_tree_and_draft (the commit and the next tree) or the failure it must
        raise, committing nothing (the window is then committed by commit_tree); verification and commit_tree of the
        new tree."""
        rows = self.pick_rows(data, everyone=data.draw(st.booleans(), label="everyone"))
        tree = data.draw(st.integers(1, self.MAX_TREE), label="T")
        out = self.try_tree_draft(data, rows, tree)
        if out is None:
            return
        tags = self.model.verify(out)
        index, lens = random_paths(random.Random(data.draw(st.integers(0, 2**16), label="paths")), len(rows), tree)
        accept = torch.tensor(lens, dtype=torch.int64)
        new_tree = data.draw(st.integers(1, self.MAX_TREE), label="next T")
        topk = data.draw(st.integers(1, 3), label="topk")
        steps = data.draw(st.integers(1, 2 * self.PAGE_SIZE + 1), label="num_steps")
        p = self.PAGE_SIZE
        seq, allocs, held = (
            t.tolist() for t in (self.alloc.seq_lens, self.alloc.alloc_lens, self.alloc.num_branch_pages)
        )
        committed = [seq[r] + lens[i] for i, r in enumerate(rows)]
        need = sum(max(pages(s + new_tree, p) - pages(allocs[r], p), 0) for s, r in zip(committed, rows))
        branch_needs = [topk * pages(s % p + steps, p) for s in committed]
        need += sum(b for b, r in zip(branch_needs, rows) if held[r] != b)
        if any(s + new_tree > self.MAX_CONTEXT_LEN for s in committed) or need > self.free_pages():
            before = snapshot(self.alloc)
            with pytest.raises((OutOfSlotsError, allocator_module.ContextLengthError)):
                self.alloc.commit_tree_and_draft(self.as_rows(data, rows), index, accept, new_tree, topk, steps)
            assert_unchanged(self.alloc, before)
            event("commit_tree_and_draft: fails")
            src, dst = self.alloc.commit_tree(self.as_rows(data, rows), index, accept)
            self.model.apply(src, dst)
            self.model.accept(rows, tags, tree, index, lens)
            self.window.update(dict.fromkeys(rows, 0))
            self.learn()
            return
        src, dst, out, _, slots, copy_src, copy_dst = self.alloc.commit_tree_and_draft(
            self.as_rows(data, rows), index, accept, new_tree, topk, steps
        )
        self.model.apply(src, dst)
        self.model.accept(rows, tags, tree, index, lens)
        self.window.update(dict.fromkeys(rows, new_tree))
        check_branches(self.alloc, rows, topk, steps, slots, copy_src, copy_dst, self.model)
        tags = self.model.verify(out)
        index, lens = random_paths(random.Random(data.draw(st.integers(0, 2**16), label="paths")), len(rows), new_tree)
        src, dst = self.alloc.commit_tree(self.as_rows(data, rows), index, torch.tensor(lens, dtype=torch.int64))
        self.model.apply(src, dst)
        self.model.accept(rows, tags, new_tree, index, lens)
        self.window.update(dict.fromkeys(rows, 0))
        self.learn()

    @invariant()
    def state_matches_model(self):
        if not hasattr(self, "alloc"):
            return
        check_layout(self.alloc, ask_free_slots=False)
        self.model.check()
        assert {row: int(self.alloc.window_lens[row]) for row in self.window} == self.window
        # The host's bound of the branch pages held covers what the rows hold, and its cached sum is current
        alloc = self.alloc
        assert alloc._branch_rows_sum == sum(alloc._branch_rows.values())  # kept up to date by each call
        assert alloc._branch_bound() >= int(alloc.num_branch_pages.sum())

    def teardown(self):
        try:
            if hasattr(self, "alloc"):
                self.alloc.free_requests(self.alloc.rows_in_use())
                assert self.alloc.num_free_slots() == self.alloc.num_slots
                assert not self.alloc.num_branch_pages.any()
                check_layout(self.alloc, ask_free_slots=False)
        finally:
            restore_tiles(getattr(self, "_saved_tiles", {}))


TREE_SETTINGS = settings(
    max_examples=examples(20), stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class TreePage1(TreeMachine):
    PAGE_SIZE, NUM_PAGES = 1, 70


class TreePage4(TreeMachine):
    PAGE_SIZE, NUM_PAGES = 4, 24


class TreePage16(TreeMachine):
    PAGE_SIZE, NUM_PAGES, MAX_CONTEXT_LEN = 16, 14, 64


# Tiles of 2 requests, scans of 4 and blocks of 4: every tree draft, branch and tree commit of more than 2 requests
# spans several programs (each summing the requests before its tile, the last one writing the shared state), and
# commit_tree_and_draft of more than 2 requests takes two launches, the tree commit counting each draft tile's pops
# and pushes for the draft (SUMS).
TREE_MANY_PROGRAMS = {
    **MANY_PROGRAMS,  # the chain machine's
    "_MIN_TILE": 2,
    "_FREE_BLOCK_P": 2,
    "_BRANCH_TILE": 2,
    "_BRANCH_BLOCK": 4,
    "_COPY_BRANCH_TILE": 2,
    "_COPY_BRANCH_ONE_PROGRAM_BS": 0,
    "_COPY_BRANCH_BLOCK": 4,
    "_RELEASE_ONE_PROGRAM": 0,
    "_COPY_ONE_PROGRAM": 0,
    "_COPY_ONE_PROGRAM_BS": 0,
    "_COPY_COUNTED_ONE_PROGRAM": 0,
    "_COPY_TREE_DRAFT_TILE": 2,
    "_TREE_ELEMENTS": 16,
}


class TreeManyProgramsPage1(TreePage1):
    MAX_REQUESTS, MAX_ADD, NUM_PAGES, TILES = 9, 6, 300, TREE_MANY_PROGRAMS


class TreeManyProgramsPage4(TreePage4):
    MAX_REQUESTS, MAX_ADD, NUM_PAGES, TILES = 9, 6, 120, TREE_MANY_PROGRAMS


TestTreePage1 = TreePage1.TestCase
TestTreePage4 = TreePage4.TestCase
TestTreePage16 = TreePage16.TestCase
TestTreeManyProgramsPage1 = TreeManyProgramsPage1.TestCase
TestTreeManyProgramsPage4 = TreeManyProgramsPage4.TestCase
for _case in (TestTreePage1, TestTreePage4, TestTreePage16, TestTreeManyProgramsPage1, TestTreeManyProgramsPage4):
    _case.settings = TREE_SETTINGS
del _case


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_tree_accept_from_sglang_neither_syncs_nor_escapes_a_graph():
    """specdec_ops.sglang.tree_accept_from_sglang on CUDA: no synchronization (torch's sync debug mode), and captured
    in a CUDA graph it converts the values the capture's inputs hold at each replay."""
    sglang_index = torch.tensor([[0, 2, -1], [4, -1, -1], [8, 9, 11]], device="cuda")
    accept_length = torch.tensor([1, 0, 2], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        index, lens = specdec_ops.sglang.tree_accept_from_sglang(sglang_index, accept_length, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert index.tolist() == [[0, 2, -1, -1], [0, -1, -1, -1], [0, 1, 3, -1]] and lens.tolist() == [2, 1, 3]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        specdec_ops.sglang.tree_accept_from_sglang(sglang_index, accept_length, 4)  # (warm-up off the capture)
        with torch.cuda.graph(graph, stream=stream):
            index, lens = specdec_ops.sglang.tree_accept_from_sglang(sglang_index, accept_length, 4)
    torch.cuda.current_stream().wait_stream(stream)
    sglang_index.copy_(torch.tensor([[0, 1, 3], [4, 6, -1], [8, -1, -1]]))
    accept_length.copy_(torch.tensor([2, 1, 0]))
    graph.replay()
    torch.cuda.synchronize()
    assert index.tolist() == [[0, 1, 3, -1], [0, 2, -1, -1], [0, -1, -1, -1]] and lens.tolist() == [3, 2, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["branches+draft", "tree-draft"])
@pytest.mark.parametrize("page_size", [1, 64], ids=lambda p: f"page{p}")
def test_gpu_graph_captures_a_whole_tree_step(page_size, fused):
    """alloc_branches + alloc_draft + commit_tree (``fused``: alloc_tree_draft + commit_tree) captured once and
    replayed with new paths: the same outputs and state as the same calls run eagerly (whose KV bookkeeping the CPU
    tests check)."""
    bs, topk, steps, tree, replays = 48, 4, 5, 8, 40
    prompt_lens = [(13 * i) % 200 for i in range(bs)]
    context = 256 + tree * (replays + 2)
    # Room for every branch at its worst twice (2 pages a branch at page 64): the host keeps the branch pages taken
    # through a tensor of rows on its books beside the ones a call takes, and a capture cannot sync.
    num_slots = bs * (pages(context, page_size) + 4 * topk) * page_size
    graphed, eager = (DraftCacheAllocator(num_slots, bs, context, page_size=page_size, device="cuda") for _ in "ge")
    rows = graphed.add_requests(prompt_lens)
    assert torch.equal(eager.add_requests(prompt_lens), rows)
    index = torch.zeros(bs, tree, dtype=torch.int64, device="cuda")
    lens = torch.zeros(bs, dtype=torch.int64, device="cuda")
    slots = torch.empty(bs * topk * steps, dtype=torch.int64, device="cuda")
    copies = [torch.empty(bs * topk * (page_size - 1), dtype=torch.int64, device="cuda") for _ in range(2)]
    out, last = (torch.empty(n, dtype=torch.int64, device="cuda") for n in (bs * tree, bs))
    kv_pairs = [torch.empty(bs * tree, dtype=torch.int64, device="cuda") for _ in range(2)]

    def step(alloc, outputs):
        if fused:
            alloc.alloc_tree_draft(
                rows,
                tree,
                topk,
                steps,
                out_cache_loc=outputs[3],
                last_loc=outputs[4],
                branch_slots=outputs[0],
                copy_src=outputs[1],
                copy_dst=outputs[2],
            )
        else:
            alloc.alloc_branches(rows, topk, steps, out=outputs[0], copy_src=outputs[1], copy_dst=outputs[2])
            alloc.alloc_draft(rows, tree, out_cache_loc=outputs[3], last_loc=outputs[4])
        alloc.commit_tree(rows, index, lens, kv_src=outputs[5], kv_dst=outputs[6])

    outputs = [slots, *copies, out, last, *kv_pairs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(graphed, outputs)  # compile, size the branch table and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    step(eager, [torch.empty_like(t) for t in outputs])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, outputs)
    rng = random.Random(page_size)
    for _ in range(replays):
        host_index, host_lens = random_paths(rng, bs, tree)
        index.copy_(host_index)
        lens.copy_(torch.tensor(host_lens, dtype=torch.int64))
        graph.replay()
        eager_outputs = [torch.empty_like(t) for t in outputs]
        step(eager, eager_outputs)
        for got, expected in zip(outputs, eager_outputs):
            assert torch.equal(got, expected)
    torch.cuda.synchronize()
    graphed.refresh()
    for name in STATE_TENSORS:
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name
    check_layout(graphed)
    graphed.free_requests(rows)
    assert graphed.num_free_slots() == graphed.num_slots


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_gpu_tree_drafts_looking_back_match_summing(page_size, monkeypatch):
    """Tree drafts past one program look back on the GPU (programs running at once, each waiting for the pops and
    pushes of the tiles before its own): the same, call for call, as every program summing the earlier requests
    (Ascend's way), on a grid of one program per tile and on grids capped at 2 and 5 programs that loop over the
    tiles: alloc_tree_draft with branches only, then trading branch pages, alloc_branches trading and keeping them,
    a chain draft that releases them, and a replayed CUDA graph of a tree step, which needs every launch to leave
    both banks of published tiles at 0."""
    bs, topk, num_steps, tree = 3000, 2, 3, 4
    runs = []
    for block, programs in ((0, 0), (256, 0), (256, 2), (256, 5)):
        monkeypatch.setattr(allocator_module, "_LOOK_BACK_BLOCK", block)
        rng = random.Random(page_size)
        num_pages = bs * (pages(300, page_size) + 2 * 3 * pages(page_size - 1 + 4, page_size))
        alloc = DraftCacheAllocator(page_size * num_pages, bs, 300, page_size=page_size, device="cuda")
        if programs:
            alloc._look_back_programs = programs
        rows = alloc.add_requests([(37 * i) % 150 for i in range(bs)])
        alloc.free_requests(rows[1000:1100])  # rows not in use, left in the batch
        outputs = []
        for _ in range(3):
            outputs.append(alloc.alloc_tree_draft(rows, tree, topk, num_steps))
            index, lens = random_paths(rng, bs, tree)
            alloc.commit_tree(rows, index.cuda(), torch.tensor(lens, device="cuda"), keep_branches=True)
        for shape in ((3, 4), (3, 4), (topk, num_steps)):  # alloc_branches: traded, kept, traded back
            outputs.append(alloc.alloc_branches(rows, *shape, return_copies=True))
        outputs.append(alloc.alloc_draft(rows, 3))  # gives the branch pages back
        alloc.commit(rows, torch.tensor([i % 4 for i in range(bs)], device="cuda"))
        check_layout(alloc)
        index = torch.zeros(bs, tree, dtype=torch.int64, device="cuda")
        lens = torch.ones(bs, dtype=torch.int64, device="cuda")
        graph_outputs = alloc.alloc_tree_draft(rows, tree, topk, num_steps)  # compiled, a window open
        out, last, slots, src, dst = graph_outputs
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            alloc.commit_tree(rows, index, lens, keep_branches=True)
            alloc.alloc_tree_draft(
                rows, tree, topk, num_steps, out_cache_loc=out, last_loc=last, branch_slots=slots.view(-1),
                copy_src=src, copy_dst=dst,
            )  # fmt: skip
        for _ in range(3):
            graph.replay()
            outputs.append(tuple(t.clone() for t in graph_outputs))
        # (The host's bound on committed lengths does not see replays: check_layout would fail on it.)
        assert alloc._counters[2].item() == 0 and not next_look_back_bank(alloc).any()
        launched = {dict(constexprs)["LOOKBACK"] for _, constexprs, *_ in alloc._alloc_configs.values()}
        assert launched == ({0} if block == 0 else {0, 256}), launched  # (add_requests never looks back)
        runs.append(([[t.cpu() for t in result] for result in outputs], snapshot(alloc)))
    for run in runs[1:]:
        assert_same_runs(run, runs[0])


TREE_STEP_OUTPUTS = ("kv_src", "kv_dst", "out_cache_loc", "last_loc", "branch_slots", "copy_src", "copy_dst")


def _twin_tree_allocators(page_size: int, bs: int, topk: int, steps: int, tree: int, replays: int):
    """Two like allocators on the GPU (one to capture, one to run eagerly) with the same requests; the tree step's
    accept_index and accept_lens buffers; and the lengths of its outputs (TREE_STEP_OUTPUTS) by name."""
    prompt_lens = [(13 * i) % 200 for i in range(bs)]
    context = 256 + tree * (replays + 3)
    num_slots = bs * (pages(context, page_size) + 2 * topk) * page_size
    graphed, eager = (DraftCacheAllocator(num_slots, bs, context, page_size=page_size, device="cuda") for _ in "ge")
    rows = graphed.add_requests(prompt_lens)
    assert torch.equal(eager.add_requests(prompt_lens), rows)
    index = torch.zeros(bs, tree, dtype=torch.int64, device="cuda")
    lens = torch.zeros(bs, dtype=torch.int64, device="cuda")
    copies = bs * topk * (page_size - 1)
    sizes = (bs * tree, bs * tree, bs * tree, bs, bs * topk * steps, copies, copies)
    return graphed, eager, rows, index, lens, dict(zip(TREE_STEP_OUTPUTS, sizes))


def _replay_against_eager(graph, outputs, graphed, eager, rows, index, lens, topk, steps, replays, seed):
    """Replay ``graph`` (a captured commit_tree_and_draft writing ``outputs``) with new paths: each replay's outputs,
    and the state after all of them, those of commit_tree(keep_branches=True) + alloc_tree_draft run eagerly."""
    bs, tree = index.shape
    rng = random.Random(seed)
    for _ in range(replays):
        host_index, host_lens = random_paths(rng, bs, tree)
        index.copy_(host_index)
        lens.copy_(torch.tensor(host_lens, dtype=torch.int64))
        graph.replay()
        expected = list(eager.commit_tree(rows, index, lens, keep_branches=True))
        expected += eager.alloc_tree_draft(rows, tree, topk, steps)
        for got, want in zip(outputs, expected):
            assert torch.equal(got.reshape(-1), want.reshape(-1))
    torch.cuda.synchronize()
    graphed.refresh()
    for name in STATE_TENSORS:
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name
    check_layout(graphed)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size, bs", [(1, 8), (1, 48), (16, 8), (16, 16), (16, 48)], ids=lambda v: str(v))
def test_gpu_graph_captures_commit_tree_and_draft(page_size, bs):
    """commit_tree_and_draft (one launch at bs 8, two at bs 48; at page 16 bs 16 one launch in the eager warm-up and
    two in the graph, whose kernels first compile during the capture) captured once and replayed with new paths: the
    same outputs and state as commit_tree(keep_branches=True) + alloc_tree_draft run eagerly."""
    topk, steps, tree, replays = 4, 5, 8, 40
    graphed, eager, rows, index, lens, sizes = _twin_tree_allocators(page_size, bs, topk, steps, tree, replays)
    for alloc in (graphed, eager):
        alloc.alloc_tree_draft(rows, tree, topk, steps)
    outputs = [torch.empty(n, dtype=torch.int64, device="cuda") for n in sizes.values()]

    def step(outputs):
        graphed.commit_tree_and_draft(rows, index, lens, tree, topk, steps, **dict(zip(sizes, outputs)))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(outputs)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    eager.commit_tree(rows, index, lens, keep_branches=True)
    eager.alloc_tree_draft(rows, tree, topk, steps)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(outputs)
    _replay_against_eager(graph, outputs, graphed, eager, rows, index, lens, topk, steps, replays, page_size + bs)
    graphed.free_requests(rows)
    assert graphed.num_free_slots() == graphed.num_slots


@pytest.mark.gpu
@pytest.mark.parametrize("own", [False, True], ids=["buffers-given", "own-buffers"])
def test_gpu_graph_captures_the_wrappers_tree_step(own):
    """DraftStepWrapper.commit_tree_and_draft() captured once and replayed with new paths, its outputs given or made by
    plan() (views of one allocation, re-checked by address): the same outputs, read through the views the call
    returned, and the same state as commit_tree(keep_branches=True) + alloc_tree_draft run eagerly."""
    page_size, bs, topk, steps, tree, replays = 16, 8, 4, 5, 8, 20
    graphed, eager, rows, index, lens, sizes = _twin_tree_allocators(page_size, bs, topk, steps, tree, replays)
    given = {} if own else {k: torch.empty(n, dtype=torch.int64, device="cuda") for k, n in sizes.items()}
    step = DraftStepWrapper(graphed)
    step.plan(rows, tree, accept_lens=lens, accept_index=index, topk=topk, num_steps=steps, **given)
    assert len(step._tree_step_bound.owned) == (1 if own else 0)
    step.alloc_tree_draft()
    eager.alloc_tree_draft(rows, tree, topk, steps)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        outputs = step.commit_tree_and_draft()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    eager.commit_tree(rows, index, lens, keep_branches=True)
    eager.alloc_tree_draft(rows, tree, topk, steps)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step.commit_tree_and_draft()
    assert all(a is b for a, b in zip(captured, outputs)), "the same views: no plan again in the capture"
    _replay_against_eager(graph, outputs, graphed, eager, rows, index, lens, topk, steps, replays, 7 + own)


@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_ascend_launch_configs_give_the_same_tree_steps(monkeypatch, page_size):
    """The launch configurations an NPU gets (its tiles, block sizes and scan blocks) run here through the
    interpreter and give, call for call, what the default ones give: chain steps, tree steps, frees and adds (the
    compile check proves they compile for Ascend; this proves they compute the same)."""

    def loop(npu: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(allocator_module.backend, "is_npu", lambda device: npu)
        alloc = DraftCacheAllocator(page_size * 2048, 12, 160, page_size=page_size, device="cpu")
        rng = random.Random(7)
        results = []
        alloc.add_requests([rng.randint(1, 40) for _ in range(12)])
        for step in range(4):
            live = alloc.rows_in_use()
            # A chain step, then requests leave and arrive.
            out, last = alloc.alloc_draft(live, 3)
            alloc.commit(live, [rng.randint(0, 3) for _ in live])
            results += [out.clone(), last.clone()]
            alloc.free_requests(live[step::4])
            alloc.add_requests([rng.randint(1, 40) for _ in live[step::4]])
            live = alloc.rows_in_use()
            slots, src, dst = alloc.alloc_branches(live, 3, 4, return_copies=True)
            out, last = alloc.alloc_draft(live, 6)
            index, lens = random_paths(rng, len(live), 6)
            kv_src, kv_dst = alloc.commit_tree(live, index, lens)
            results += [t.clone() for t in (slots, src, dst, out, last, kv_src, kv_dst)]
            # A tree step in two launches: the draft with the branches, then the commit that releases them.
            out, last, slots, src, dst = alloc.alloc_tree_draft(live, 5, 2, 3)
            index, lens = random_paths(rng, len(live), 5)
            kv_src, kv_dst = alloc.commit_tree(live, index, lens)
            results += [t.clone() for t in (slots, src, dst, out, last, kv_src, kv_dst)]
            # commit_tree_and_draft: off Ascend one launch for 3 requests and two for all of them; on an NPU two.
            for batch in (live[:3], live):
                alloc.alloc_tree_draft(batch, 4, 2, 3)
                index, lens = random_paths(rng, len(batch), 4)
                results += [t.clone() for t in alloc.commit_tree_and_draft(batch, index, lens, 4, 2, 3)]
                index, lens = random_paths(rng, len(batch), 4)
                results += [t.clone() for t in alloc.commit_tree(batch, index, lens)]
        results += [alloc.req_to_token.clone(), alloc.seq_lens.clone(), alloc.free_page_list()]
        check_layout(alloc)
        return results

    npu, default = loop(True), loop(False)
    for a, b in zip(npu, default):
        assert (a == b) if isinstance(a, list) else torch.equal(a, b)


@pytest.mark.parametrize("wrapped", [False, True], ids=["method", "wrapper"])
def test_rows_rebound_with_data_keep_their_branch_pages_on_the_books(wrapped):
    """``rows.data = other`` replaces a tensor's rows without bumping its version counter: the host must not take
    the new rows' release for the old rows', or it forgets branch pages they hold and never returns them. (Found by
    a review that fuzzed the wrappers.)"""
    alloc = DraftCacheAllocator(64, 4, 32, device="cpu")
    alloc.add_requests([3, 4, 5, 6])
    rows = torch.tensor([0, 1])
    step = DraftStepWrapper(alloc)
    step.plan(rows, 2, topk=2, num_steps=2)
    step.alloc_branches() if wrapped else alloc.alloc_branches(rows, 2, 2)
    assert alloc.num_branch_pages[:2].tolist() == [4, 4]
    rows.data = torch.tensor([2, 3])  # the engine's next batch, as a new tensor: the version counter stays
    step.alloc_draft() if wrapped else alloc.alloc_draft(rows, 2)
    alloc.free_requests([0, 1])  # the rows that hold the branch pages finish: their pages come back
    assert alloc.num_branch_pages.tolist() == [0, 0, 0, 0]
    alloc.free_requests([2, 3])
    assert alloc.num_free_slots() == alloc.num_slots


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_gpu_capped_grids_that_sum_match_one_program_per_tile(page_size, monkeypatch):
    """Ascend's kind of grid on the GPU: every launch on at most 2 or 7 programs that loop over the tiles and sum the
    requests before each (no look-back), call for call the same as a grid of one program per tile. Each program's
    sums start where those for its previous tile stopped; Triton 3.6 on an H200 miscompiled that start while it was
    carried from one tile to the next, and every tile after a program's first took wrong pages (docs/design.md)."""
    bs, topk, num_steps, tree = 1500, 2, 3, 4
    monkeypatch.setattr(allocator_module, "_LOOK_BACK_BLOCK", 0)
    runs = []
    for programs in (0, 2, 7):
        rng = random.Random(page_size)
        num_pages = bs * (pages(400, page_size) + 2 * topk * pages(page_size - 1 + num_steps, page_size))
        alloc = DraftCacheAllocator(page_size * num_pages, bs, 400, page_size=page_size, device="cuda")
        alloc._max_programs = programs
        rows = alloc.add_requests([(37 * i) % 150 for i in range(bs)])
        alloc.free_requests(rows[500:560])  # rows not in use, left in the batch
        outputs = []
        for step in range(2):
            outputs.append(alloc.alloc_draft(rows, 4))
            alloc.commit(rows, torch.tensor([(i + step) % 6 for i in range(bs)], device="cuda"))
        for step in range(2):  # two launches: counts, then pops
            outputs.append(alloc.commit_and_draft(rows, torch.tensor([(i * step) % 5 for i in range(bs)]).cuda(), 4))
        alloc.commit(rows, torch.zeros(bs, dtype=torch.int64, device="cuda"))
        for _ in range(2):
            outputs.append(alloc.alloc_tree_draft(rows, tree, topk, num_steps))
            index, lens = random_paths(rng, bs, tree)
            alloc.commit_tree(rows, index.cuda(), torch.tensor(lens, device="cuda"), keep_branches=True)
        outputs.append(alloc.alloc_draft(rows, 3))  # gives the branch pages back
        alloc.commit(rows, torch.tensor([i % 4 for i in range(bs)], device="cuda"))
        outputs.append(alloc.alloc_branches(rows, topk, num_steps, return_copies=True))
        alloc.free_requests(rows[bs - bs // 3 :])
        outputs.append((alloc.add_requests([(11 * i) % 90 for i in range(bs // 3)]),))
        check_layout(alloc)
        most = max(alloc._grid(bs, tile)[0] for tile, *_ in alloc._alloc_configs.values())
        assert most == programs if programs else most > 7, most  # (the grid of one program per tile: many)
        runs.append(([[t.cpu() for t in result] for result in outputs], snapshot(alloc)))
    for run in runs[1:]:
        assert_same_runs(run, runs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("cores", [3, 40], ids=lambda c: f"cores{c}")
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_gpu_ascend_launch_configs_give_the_same_steps(monkeypatch, page_size, cores):
    """What an NPU launches (its tiles, block sizes and scan blocks, a grid of one program per core, each looping
    over many tiles) compiled by a real compiler, Triton's for the GPU, and run on 1000 requests: call for call what
    the GPU's own launches give. Chain steps, tree steps in one and two launches, frees and adds. The interpreter
    runs the same launches in tests/test_tree.py; a compiler that mistranslates a program's loop over its tiles
    shows here (Triton 3.6 did, docs/design.md, "A loop's lower bound carried from the tile before")."""
    bs = 1000

    def loop(npu: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(allocator_module.backend, "is_npu", lambda device: npu)
        monkeypatch.setattr(allocator_module.backend, "num_cores", lambda device: cores if npu else 132)
        alloc = DraftCacheAllocator(page_size * 120 * bs, bs + 8, 320, page_size=page_size, device="cuda")
        assert alloc._grid(bs, 4) == ((cores,) if npu else (250,))
        rng = random.Random(7)
        results = []
        alloc.add_requests([rng.randint(1, 40) for _ in range(bs)])
        for step in range(2):
            live = alloc.rows_in_use()
            out, last = alloc.alloc_draft(live, 3)
            alloc.commit(live, [rng.randint(0, 3) for _ in live])
            results += [out.clone(), last.clone()]
            alloc.free_requests(live[step::4])
            alloc.add_requests([rng.randint(1, 40) for _ in live[step::4]])
            live = alloc.rows_in_use()
            rows = torch.tensor(live, device="cuda")
            slots, src, dst = alloc.alloc_branches(rows, 3, 4, return_copies=True)
            out, last = alloc.alloc_draft(rows, 6)
            index, lens = random_paths(rng, len(live), 6)
            kv_src, kv_dst = alloc.commit_tree(rows, index.cuda(), torch.tensor(lens, device="cuda"))
            results += [t.clone() for t in (slots, src, dst, out, last, kv_src, kv_dst)]
            out, last, slots, src, dst = alloc.alloc_tree_draft(rows, 5, 2, 3)
            index, lens = random_paths(rng, len(live), 5)
            kv_src, kv_dst = alloc.commit_tree(rows, index.cuda(), torch.tensor(lens, device="cuda"))
            results += [t.clone() for t in (slots, src, dst, out, last, kv_src, kv_dst)]
            for batch in (rows[:3], rows):  # commit_tree_and_draft: one launch for 3 requests, two for all
                alloc.alloc_tree_draft(batch, 4, 2, 3)
                index, lens = random_paths(rng, len(batch), 4)
                index, lens = index.cuda(), torch.tensor(lens, device="cuda")
                results += [t.clone() for t in alloc.commit_tree_and_draft(batch, index, lens, 4, 2, 3)]
                index, lens = random_paths(rng, len(batch), 4)
                results += [t.clone() for t in alloc.commit_tree(batch, index.cuda(), torch.tensor(lens).cuda())]
            accept = torch.tensor([rng.randint(0, 4) for _ in live], device="cuda")
            results += [t.clone() for t in alloc.commit_and_draft(rows, accept, 4)]
            alloc.commit(rows, torch.zeros_like(accept))
        results += [alloc.req_to_token.clone(), alloc.seq_lens.clone(), alloc.free_page_list()]
        check_layout(alloc)
        launched = {dict(constexprs)["TILE"] for _, constexprs, *_ in alloc._alloc_configs.values()}
        assert max(launched) <= (32 if npu else 256), launched
        return results

    npu, default = loop(True), loop(False)
    assert len(npu) == len(default)
    for a, b in zip(npu, default):
        assert (a == b) if isinstance(a, list) else torch.equal(a, b)


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
def test_device_steps_match_the_cpu_call_for_call(device, page_size):
    """The allocator on an accelerator, with the launches that device picks (on an NPU: a grid of one program per
    core, each looping over its tiles, programs that sum earlier requests and a last program's pass; on a GPU: drafts
    that look back, programmatic dependent launches), against the same calls on the CPU interpreter, 1000 requests
    on an NPU (so that its programs loop over tiles) and 300 on a GPU (where the interpreter's side costs most of the
    time; test_gpu_ascend_launch_configs_give_the_same_steps runs 1000): adds, chain steps, frees, tree steps in one
    and two launches, branches, commit_and_draft, a prefix kept and reused; every output and the final state, call
    for call. On an NPU this is the first check that the kernels triton-ascend compiles compute what the interpreter
    computes (tests/test_ops.py covers the ops there)."""
    bs = 1000 if device == "npu" else 300

    def run(on: str) -> list:
        alloc = DraftCacheAllocator(page_size * 120 * bs, bs + 8, 320, page_size=page_size, device=on)
        rng = random.Random(11)
        results = []

        def keep(*tensors):
            results.extend(t.cpu() for t in tensors)

        keep(alloc.add_requests([rng.randint(1, 40) for _ in range(bs)]))
        live = alloc.rows_in_use()
        keep(*alloc.alloc_draft(live, 3))
        alloc.commit(live, [rng.randint(0, 3) for _ in live])
        kept = alloc.free_requests(live[::5], keep_lens=[0] * len(live[::5]))
        keep(kept, alloc.add_requests([rng.randint(1, 40) for _ in live[::5]]))
        live = alloc.rows_in_use()
        rows = torch.tensor(live, device=on)
        keep(*alloc.alloc_branches(rows, 3, 4, return_copies=True))
        keep(*alloc.alloc_draft(rows, 6))
        index, lens = random_paths(rng, len(live), 6)
        keep(*alloc.commit_tree(rows, index.to(on), torch.tensor(lens, device=on)))
        keep(*alloc.alloc_tree_draft(rows, 5, 2, 3))
        index, lens = random_paths(rng, len(live), 5)
        keep(*alloc.commit_tree(rows, index.to(on), torch.tensor(lens, device=on)))
        for batch in (rows[:3], rows):  # commit_tree_and_draft: one launch for 3 requests, two for all
            alloc.alloc_tree_draft(batch, 4, 2, 3)
            index, lens = random_paths(rng, len(batch), 4)
            keep(*alloc.commit_tree_and_draft(batch, index.to(on), torch.tensor(lens, device=on), 4, 2, 3))
            index, lens = random_paths(rng, len(batch), 4)
            keep(*alloc.commit_tree(batch, index.to(on), torch.tensor(lens, device=on)))
        accept = torch.tensor([rng.randint(0, 4) for _ in live], device=on)
        keep(*alloc.commit_and_draft(rows, accept, 4))
        alloc.commit(rows, torch.zeros_like(accept))
        # A prefix kept by finished requests and read by new ones.
        live = alloc.rows_in_use()
        longest = sorted(live, key=lambda row: int(alloc.seq_lens[row]))[-4:]
        k = min(int(alloc.seq_lens[row]) for row in longest) // page_size * page_size
        kept = alloc.free_requests(longest, keep_lens=[k] * 4)
        prefix = dict(prefix_slots=kept.view(4, k), prefix_lens=[k] * 4) if k else {}
        keep(kept, alloc.add_requests([k + 5] * 4, **prefix))
        keep(alloc.req_to_token, alloc.seq_lens, alloc.alloc_lens, alloc.window_lens, alloc.num_branch_pages)
        results.append(alloc.free_page_list())
        check_layout(alloc)
        return results

    on_device, on_cpu = run(device), run("cpu")
    assert len(on_device) == len(on_cpu)
    for i, (a, b) in enumerate(zip(on_device, on_cpu)):
        assert (a == b) if isinstance(a, list) else torch.equal(a, b), i


def test_a_commit_that_releases_branch_pages_refuses_more_entries_than_max_requests():
    """The chain commit of rows that may hold branch pages is the allocation kernel's commit and release, whose
    last program keeps per-entry values in max_requests-long scratch: a longer tensor of rows (out-of-range rows,
    which the device skips) wrote past it (found by an audit, 2026-11-24). It raises, and nothing changes."""
    alloc = DraftCacheAllocator(64 * 16, 8, 256, page_size=16, device="cpu")
    live = alloc.add_requests([3, 5, 6, 7, 9, 2, 1, 4])
    alloc.alloc_branches(live, 2, 3)
    alloc.alloc_draft(live, 4)
    before = snapshot(alloc)
    rows = torch.cat([live, torch.full((600,), 1000)])
    with pytest.raises(ValueError, match=r"req_pool_indices must have at most max_requests \(8\) entries, got 608"):
        alloc.commit(rows, torch.ones(608, dtype=torch.int64))
    assert_unchanged(alloc, before)
    alloc.commit(live, torch.ones(8, dtype=torch.int64))  # the batch itself commits and releases
    alloc.free_requests(live)
    assert alloc.num_free_slots() == alloc.num_slots
