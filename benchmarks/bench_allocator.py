"""A whole draft/verify step of ``DraftCacheAllocator``, fused against the same step built from the components.

- ``fused``: ``alloc_draft(rows, N)`` (page allocation, table update and read-back in one launch), then
  ``commit(rows, accept_lens)``: two launches.
- ``unfused``: ``reserve_draft(rows, N)`` (the same allocation, no read-back), ``end = seq_lens + N``,
  ``get_last_loc``, ``assign_extend_cache_locs``, then ``commit``: five launches.
- ``commit-and-draft``: ``commit_and_draft(rows, accept_lens, N)``, the commit of the previous window and the next
  window: one launch up to 256 requests, two past them (past 128 with windows of 3 tokens or more on a GPU with
  programmatic dependent launches).

Requests accept a fixed mix of 0..N tokens per step, so windows keep crossing page boundaries and new pages are taken
from the pool inside the timed steps. Groups ``allocator step bs=256 N=4 page=64 | graph`` compare the three (on the
CPU, where Triton's interpreter runs the kernels, the names end with ``| interpreter (CPU), not device speed``: those
timings say nothing about a device). The variants are checked against each other and against the reference, step by
step, before timing. Graph groups are timed by pytest-benchmark's timer (the host clock once the device is done, over
``REPLAYS`` replays of ``CALLS`` steps) and then by device events around more replays (``harness.record_device_time``,
not with ``--benchmark-disable``), listed at the end of the run. After the timing, ``CALLS`` more steps (one more replay
in graph groups) run from poisoned buffers and are checked: the committed lengths, the last window against the table,
and the pool's accounting (``harness.check_pool``).
"""

from __future__ import annotations

import time

import pytest
import torch

import specdec_ops
from specdec_ops import DraftCacheAllocator, backend, reference

from . import harness

pytest.importorskip("pytest_benchmark")

DEVICE = backend.default_device()
if DEVICE.type == "cpu":
    CASES, CALLS, ROUNDS, REPLAYS = [(7, 4, 1), (7, 4, 4)], 2, 2, 1
else:
    CASES, CALLS, ROUNDS, REPLAYS = [(256, 4, 1), (256, 4, 64), (1024, 8, 16)], 20, 10, 5
CHECK_STEPS = 3
DEVICE_REPLAYS = harness.DEVICE_TIME_WARMUP + harness.DEVICE_TIME_REPEATS  # replays of record_device_time
GRAPH_MARK = pytest.mark.npu if DEVICE.type == "npu" else pytest.mark.gpu


def synchronized_clock_per_step() -> float:
    """pytest-benchmark's timer: the host clock once the device is done, over ``CALLS`` (seconds per step)."""
    backend.synchronize(DEVICE)
    return time.perf_counter() / CALLS


pytestmark = pytest.mark.benchmark(timer=synchronized_clock_per_step, disable_gc=True)


VARIANTS = ("fused", "unfused", "commit-and-draft")


def _step(bs: int, n: int, page_size: int, variant: str) -> harness.AllocatorStep:
    """``variant``'s step, checked for ``CHECK_STEPS`` calls against the fused one."""
    # Checks, the eager run before a capture, (warm-up + timed rounds) x replays of CALLS steps, the replays timed
    # with device events, the last check, with room to spare: past it a replayed step would run out of context.
    steps = 2 * (CHECK_STEPS + CALLS + CALLS * ((1 + ROUNDS) * REPLAYS + DEVICE_REPLAYS) + 1)
    step = harness.AllocatorStep(variant, bs, n, page_size, steps, DEVICE)
    other = harness.AllocatorStep("unfused" if variant == "fused" else "fused", bs, n, page_size, steps, DEVICE)
    for _ in range(CHECK_STEPS):  # the same calls give the same slots, whichever way the step is built
        harness.check_outputs(f"allocator step {variant} vs {other.variant}", step.checked_call(), other.checked_call())
    return step


def _label(benchmark, bs: int, n: int, page_size: int, mode: str, variant: str) -> None:
    benchmark.group = f"allocator step bs={bs} N={n} page={page_size} | {mode}{harness.group_suffix(DEVICE)}"
    benchmark.name = variant
    benchmark.extra_info.update(bs=bs, window_len=n, page_size=page_size, mode=mode, variant=variant, calls=CALLS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bs,n,page_size", CASES, ids=[f"bs{b}-N{n}-page{p}" for b, n, p in CASES])
def test_allocator_step_eager(benchmark, bs, n, page_size, variant):
    step = _step(bs, n, page_size, variant)
    step.alloc.refresh()
    syncs = step.alloc.num_syncs
    _label(benchmark, bs, n, page_size, "eager", variant)
    benchmark.pedantic(harness.run_calls, args=([step] * CALLS,), rounds=ROUNDS, warmup_rounds=1)
    assert step.alloc.num_syncs == syncs, "a timed step synced with the host"
    step.check_steps(lambda: harness.run_calls([step] * CALLS), CALLS)


@GRAPH_MARK
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bs,n,page_size", CASES, ids=[f"bs{b}-N{n}-page{p}" for b, n, p in CASES])
def test_allocator_step_graph(benchmark, bs, n, page_size, variant):
    if not harness.supports_graphs(DEVICE):
        pytest.skip(f"this torch build cannot capture graphs on {DEVICE}")
    step = _step(bs, n, page_size, variant)
    step.alloc.refresh()
    graph, _ = harness.capture_graph([step] * CALLS, DEVICE)
    _label(benchmark, bs, n, page_size, "graph", variant)
    benchmark.pedantic(graph.replay, rounds=ROUNDS, warmup_rounds=1, iterations=REPLAYS)
    harness.record_device_time(benchmark, graph, CALLS, DEVICE)
    step.check_steps(graph.replay, CALLS)  # one more replay, from poisoned buffers, checked
    step.alloc.refresh()  # the replays grew every request: the table must still read back exactly
    step.checked_call()


# ------------------------------------------------------------------------------------------------ tree steps
# A tree step (EAGLE with topk > 1): branch slots for the draft model, the verify window of T nodes, the commit of
# the accepted paths. Groups ``tree step bs=.. topk=4 steps=5 T=8 page=.. | graph`` compare:
# - ``fused``: alloc_branches (release + pops + slots + partial-page copies), alloc_draft (which releases the
#   branches in its own launch), commit_tree: three launches, two for verify plus commit;
# - ``tree_draft``: alloc_tree_draft (the branches and the verify window in one launch, releasing the previous
#   step's branches), commit_tree with ``keep_branches=True``: two launches. Its page numbers differ from the
#   others' (each request's window pages come before its branch pages in the ring), so only its lengths are
#   compared with theirs;
# - ``one_call``: commit_tree_and_draft, the commit of the previous tree and the next tree's window and branches
#   (keeping the branch pages): one launch while the tree draft is one program and the tree commit one tile (up
#   to 32 requests at page 1 and 8 at page 64 here), else two. Checked against ``tree_draft``, whose steps it runs
#   shifted by half a step;
# - ``components``: the same step from this library's components, as an engine would chain them today:
#   release_branches, alloc_branches, reserve_draft, get_last_loc, assign_extend_cache_locs, the copy pairs in
#   PyTorch (a gather of the accepted nodes' slots), then commit.

if DEVICE.type == "cpu":
    TREE_CASES = [(7, 1), (7, 4)]
else:
    TREE_CASES = [(bs, page) for page in (1, 64) for bs in (1, 4, 8, 16, 32, 64, 256, 1024)]
TREE_TOPK, TREE_STEPS, TREE_T = 4, 5, 8


class TreeStep:
    """One tree step of ``bs`` requests as ``variant`` builds it, with kept buffers; paths accept ``i % (T + 1)``
    nodes (the root, then every other node)."""

    def __init__(self, variant: str, bs: int, page_size: int, steps: int) -> None:
        topk, num_steps, tree = TREE_TOPK, TREE_STEPS, TREE_T
        context_len = harness.PROMPT_MAX + tree * (steps + 1)
        per_row = -(-context_len // page_size) + topk * -(-(page_size - 1 + num_steps) // page_size)
        self.alloc = DraftCacheAllocator(per_row * bs * page_size, bs, context_len, page_size=page_size, device=DEVICE)
        prompt_lens = torch.randint(1, harness.PROMPT_MAX + 1, (bs,), generator=torch.Generator().manual_seed(bs))
        self.rows = self.alloc.add_requests(prompt_lens.tolist())
        self.seq_lens = self.alloc.seq_lens[:bs]
        self.end = torch.empty_like(self.seq_lens)
        self.lens = (torch.arange(bs, device=DEVICE) % (tree + 1)).to(torch.int64)
        m = torch.arange(tree, device=DEVICE)
        self.index = torch.where(m[None, :] == 0, 0, 2 * m[None, :] - 1).clamp(max=tree - 1).repeat(bs, 1)
        self.lens = torch.minimum(self.lens, torch.tensor((tree + 1) // 2, device=DEVICE))  # increasing part only
        self.slots = torch.empty(bs * topk * num_steps, dtype=torch.int64, device=DEVICE)
        self.copies = [torch.empty(bs * topk * (page_size - 1), dtype=torch.int64, device=DEVICE) for _ in "sd"]
        self.out = torch.empty(bs * tree, dtype=torch.int64, device=DEVICE)
        self.last = torch.empty(bs, dtype=torch.int64, device=DEVICE)
        self.kv = [torch.empty(bs * tree, dtype=torch.int64, device=DEVICE) for _ in "sd"]
        self.m = m
        self.variant = variant

    def __call__(self) -> None:
        alloc, rows, tree = self.alloc, self.rows, TREE_T
        if self.variant == "one_call":
            alloc.commit_tree_and_draft(
                rows,
                self.index,
                self.lens,
                tree,
                TREE_TOPK,
                TREE_STEPS,
                kv_src=self.kv[0],
                kv_dst=self.kv[1],
                out_cache_loc=self.out,
                last_loc=self.last,
                branch_slots=self.slots,
                copy_src=self.copies[0],
                copy_dst=self.copies[1],
            )
            return
        if self.variant == "tree_draft":
            alloc.alloc_tree_draft(
                rows,
                tree,
                TREE_TOPK,
                TREE_STEPS,
                out_cache_loc=self.out,
                last_loc=self.last,
                branch_slots=self.slots,
                copy_src=self.copies[0],
                copy_dst=self.copies[1],
            )
            alloc.commit_tree(rows, self.index, self.lens, kv_src=self.kv[0], kv_dst=self.kv[1], keep_branches=True)
            return
        if self.variant == "fused":
            alloc.alloc_branches(
                rows, TREE_TOPK, TREE_STEPS, out=self.slots, copy_src=self.copies[0], copy_dst=self.copies[1]
            )
            alloc.alloc_draft(rows, tree, out_cache_loc=self.out, last_loc=self.last)
            alloc.commit_tree(rows, self.index, self.lens, kv_src=self.kv[0], kv_dst=self.kv[1])
            return
        alloc.release_branches(rows)
        alloc.alloc_branches(
            rows, TREE_TOPK, TREE_STEPS, out=self.slots, copy_src=self.copies[0], copy_dst=self.copies[1]
        )
        alloc.reserve_draft(rows, tree)
        torch.add(self.seq_lens, tree, out=self.end)
        specdec_ops.get_last_loc(alloc.req_to_token, rows, self.seq_lens, last_loc=self.last)
        specdec_ops.assign_extend_cache_locs(
            alloc.req_to_token, rows, self.seq_lens, self.end, self.out, num_tokens=self.out.numel()
        )
        window = self.out.view(-1, tree)
        taken = self.m[None, :] < self.lens[:, None]
        torch.where(taken, window.gather(1, self.index), window, out=self.kv[0].view(-1, tree))
        self.kv[1].copy_(self.out)
        alloc.commit(rows, self.lens)

    def check_window(self, label: str, start: torch.Tensor) -> None:
        """Check ``out`` and ``last`` of the last step, whose window started at ``start``, against the table.

        Where the step's tree commit re-points the window it drafted (page 1, ``fused`` and ``tree_draft``), the
        table no longer holds that window in order: there ``last_loc`` must be the slot before it, the table's window
        must hold the window's slots in some order, and each committed position ``start + m`` (``m < accept_lens``)
        the slot the window gave node ``accept_index[m]``. Elsewhere
        (pages > 1, ``components``, and ``one_call``, whose window comes after its commit) both outputs must equal the
        reference read of the table.
        """
        expected = reference.get_last_loc_and_assign_extend_cache_locs_torch(
            self.alloc.req_to_token, self.rows, start, start + TREE_T
        )
        if self.alloc.page_size > 1 or self.variant in ("one_call", "components"):
            harness.check_outputs(label, (self.out, self.last), expected)
            return
        if not torch.equal(self.last, expected[1]):
            raise harness.OutputMismatch(f"{label}: last_loc is not the slot before the window")
        window = self.out.view(-1, TREE_T)  # [bs, T]
        table = self.alloc.req_to_token[self.rows[:, None], start[:, None] + self.m[None, :]].long()  # [bs, T]
        if not torch.equal(table.sort(dim=1).values, window.sort(dim=1).values):
            raise harness.OutputMismatch(f"{label}: the table's window does not hold the window's slots")
        taken = self.m[None, :] < self.lens[:, None]
        if not torch.equal(table[taken], window.gather(1, self.index)[taken]):
            raise harness.OutputMismatch(f"{label}: a committed position does not hold its accepted node's slot")

    def checked_call(self) -> list[torch.Tensor]:
        """One step from poisoned window buffers, its window checked (:meth:`check_window`), and, but for
        ``one_call`` (whose first call commits nothing), the committed lengths it must leave."""
        self.out.fill_(harness.SENTINEL)
        self.last.fill_(harness.SENTINEL)
        seq_lens = self.seq_lens.clone()
        self()
        label = f"tree step ({self.variant})"
        if self.variant == "one_call":  # its window starts at the lengths it committed
            self.check_window(label, self.seq_lens.clone())
        else:
            if not torch.equal(self.seq_lens, seq_lens + self.lens):
                raise harness.OutputMismatch(f"{label}: the committed lengths are not the accepted paths' lengths")
            self.check_window(label, seq_lens)
        return [t.clone() for t in (self.slots, *self.copies, *self.kv)]

    def check_steps(self, run, calls: int) -> None:
        """Check what ``run`` wrote, ``calls`` steps (a replay of a graph that captured them), run once more here
        from poisoned window buffers: the committed lengths the accepted paths predict, the last step's window
        (:meth:`check_window`) at the start the host predicts, and the pool's accounting (``harness.check_pool``).
        Every row must hold an open window (as after any step), which ``one_call`` commits first. Outside any timed
        region: it advances the state by ``calls`` steps."""
        label = f"tree step ({self.variant}), {calls} steps checked after the timed ones"
        seq_lens = self.seq_lens.clone()
        self.out.fill_(harness.SENTINEL)
        self.last.fill_(harness.SENTINEL)
        run()
        backend.synchronize(DEVICE)
        committed = seq_lens + calls * self.lens
        if not torch.equal(self.seq_lens, committed):
            raise harness.OutputMismatch(
                f"{label}: committed lengths {self.seq_lens.tolist()}, {committed.tolist()} due"
            )
        self.check_window(label, committed if self.variant == "one_call" else committed - self.lens)
        harness.check_pool(self.alloc)


TREE_VARIANTS = ("fused", "tree_draft", "one_call", "components")


def _tree_steps(bs: int, page_size: int) -> tuple[TreeStep, ...]:
    steps = 2 * (CHECK_STEPS + CALLS + CALLS * ((1 + ROUNDS) * REPLAYS + DEVICE_REPLAYS) + 1)
    fused, tree_draft, one_call, components = (TreeStep(v, bs, page_size, steps) for v in TREE_VARIANTS)
    one_call.checked_call()  # its first window: it commits nothing
    for _ in range(CHECK_STEPS):  # the same step: the same slots, pairs and lengths (tree_draft: lengths)
        got_fused, got_components = fused.checked_call(), components.checked_call()
        got_tree_draft = tree_draft.checked_call()
        got_one_call = one_call.checked_call()  # tree_draft's commit, then its next draft
        assert torch.equal(fused.seq_lens, tree_draft.seq_lens)
        assert torch.equal(one_call.seq_lens, tree_draft.seq_lens)
        assert torch.equal(got_one_call[3], got_tree_draft[3]) and torch.equal(got_one_call[4], got_tree_draft[4]), (
            "tree step: kv pairs differ between tree_draft and one_call"
        )
        for a, b in zip(got_fused[:3], got_components[:3]):
            assert torch.equal(a, b), "tree step: branch slots or copy pairs differ between the variants"
        if page_size > 1:
            for a, b in zip(got_fused[3:], got_components[3:]):
                assert torch.equal(a, b), "tree step: kv pairs differ between the variants"
        assert torch.equal(fused.seq_lens, components.seq_lens)
    return fused, tree_draft, one_call, components


def _tree_label(benchmark, bs: int, page_size: int, mode: str, variant: str) -> None:
    benchmark.group = (
        f"tree step bs={bs} topk={TREE_TOPK} steps={TREE_STEPS} T={TREE_T} page={page_size} | {mode}"
        + harness.group_suffix(DEVICE)
    )
    benchmark.name = variant
    benchmark.extra_info.update(
        bs=bs, topk=TREE_TOPK, num_steps=TREE_STEPS, tree=TREE_T, page_size=page_size, mode=mode, variant=variant
    )


@pytest.mark.parametrize("variant", TREE_VARIANTS)
@pytest.mark.parametrize("bs,page_size", TREE_CASES, ids=[f"bs{b}-page{p}" for b, p in TREE_CASES])
def test_tree_step_eager(benchmark, bs, page_size, variant):
    step = dict(zip(TREE_VARIANTS, _tree_steps(bs, page_size)))[variant]
    step.alloc.refresh()
    syncs = step.alloc.num_syncs
    _tree_label(benchmark, bs, page_size, "eager", variant)
    benchmark.pedantic(harness.run_calls, args=([step] * CALLS,), rounds=ROUNDS, warmup_rounds=1)
    assert step.alloc.num_syncs == syncs, "a timed step synced with the host"
    step.check_steps(lambda: harness.run_calls([step] * CALLS), CALLS)


@GRAPH_MARK
@pytest.mark.parametrize("variant", TREE_VARIANTS)
@pytest.mark.parametrize("bs,page_size", TREE_CASES, ids=[f"bs{b}-page{p}" for b, p in TREE_CASES])
def test_tree_step_graph(benchmark, bs, page_size, variant):
    if not harness.supports_graphs(DEVICE):
        pytest.skip(f"this torch build cannot capture graphs on {DEVICE}")
    step = dict(zip(TREE_VARIANTS, _tree_steps(bs, page_size)))[variant]
    step.alloc.refresh()
    graph, _ = harness.capture_graph([step] * CALLS, DEVICE)
    _tree_label(benchmark, bs, page_size, "graph", variant)
    benchmark.pedantic(graph.replay, rounds=ROUNDS, warmup_rounds=1, iterations=REPLAYS)
    harness.record_device_time(benchmark, graph, CALLS, DEVICE)
    step.check_steps(graph.replay, CALLS)  # one more replay, from poisoned buffers, checked
    step.alloc.refresh()
    step.checked_call()
