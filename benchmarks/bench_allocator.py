"""A whole draft/verify step of ``DraftCacheAllocator``, fused against the same step built from the components.

- ``fused``: ``alloc_draft(rows, N)`` (page allocation, table update and read-back in one launch), then
  ``commit(rows, accept_lens)``: two launches.
- ``unfused``: ``reserve_draft(rows, N)`` (the same allocation, no read-back), ``end = seq_lens + N``,
  ``get_last_loc``, ``assign_extend_cache_locs``, then ``commit``: five launches.

Requests accept a fixed mix of 0..N tokens per step, so windows keep crossing page boundaries and new pages are
taken from the pool inside the timed steps. Groups ``allocator step bs=256 N=4 page=64 | graph`` compare the two.
Both variants are checked against each other and against the reference, step by step, before timing.
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
PROMPT_MAX = 64
GRAPH_MARK = pytest.mark.npu if DEVICE.type == "npu" else pytest.mark.gpu


def synchronized_clock_per_step() -> float:
    """pytest-benchmark's timer: the host clock once the device is done, over ``CALLS`` (seconds per step)."""
    backend.synchronize(DEVICE)
    return time.perf_counter() / CALLS


pytestmark = pytest.mark.benchmark(timer=synchronized_clock_per_step, disable_gc=True)


class Step:
    """One step of ``bs`` requests drafting ``n`` tokens, as ``variant`` builds it, with kept output buffers."""

    def __init__(self, variant: str, bs: int, n: int, page_size: int, steps: int) -> None:
        context_len = PROMPT_MAX + n * (steps + 1)
        num_slots = -(-bs * context_len // page_size) * page_size
        self.alloc = DraftCacheAllocator(num_slots, bs, context_len, page_size=page_size, device=DEVICE)
        prompt_lens = torch.randint(1, PROMPT_MAX + 1, (bs,), generator=torch.Generator().manual_seed(bs))
        self.rows = self.alloc.add_requests(prompt_lens.tolist())
        assert torch.equal(self.rows.cpu(), torch.arange(bs)), "a new allocator hands out rows 0..bs-1"
        self.seq_lens = self.alloc.seq_lens[:bs]  # the rows' committed lengths, a view: no gather launch
        self.end = torch.empty_like(self.seq_lens)
        self.accept = (torch.arange(bs, device=DEVICE) % (n + 1)).to(torch.int64)
        self.out = torch.full((bs * n,), harness.SENTINEL, dtype=torch.int64, device=DEVICE)
        self.last = torch.full((bs,), harness.SENTINEL, dtype=torch.int64, device=DEVICE)
        self.variant, self.n = variant, n

    def __call__(self) -> None:
        if self.variant == "fused":
            self.alloc.alloc_draft(self.rows, self.n, out_cache_loc=self.out, last_loc=self.last)
        else:
            self.alloc.reserve_draft(self.rows, self.n)
            torch.add(self.seq_lens, self.n, out=self.end)
            specdec_ops.get_last_loc(self.alloc.req_to_token, self.rows, self.seq_lens, last_loc=self.last)
            specdec_ops.assign_extend_cache_locs(
                self.alloc.req_to_token, self.rows, self.seq_lens, self.end, self.out, num_tokens=self.out.numel()
            )
        self.alloc.commit(self.rows, self.accept)

    def checked_call(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from poisoned buffers, checked against the reference read of the table before the commit."""
        self.out.fill_(harness.SENTINEL)
        self.last.fill_(harness.SENTINEL)
        seq_lens = self.seq_lens.clone()
        self()
        expected = reference.get_last_loc_and_assign_extend_cache_locs_torch(
            self.alloc.req_to_token, self.rows, seq_lens, seq_lens + self.n
        )
        got = (self.out.clone(), self.last.clone())
        harness.check_outputs(f"allocator step ({self.variant})", got, expected)
        return got


def _steps(bs: int, n: int, page_size: int) -> tuple[Step, Step]:
    # Checks, the eager run before a capture, (warm-up + timed rounds) x replays of CALLS steps, the last check,
    # with room to spare: past it a replayed step would run out of context.
    steps = 2 * (CHECK_STEPS + CALLS + CALLS * (1 + ROUNDS) * REPLAYS + 1)
    fused, unfused = (Step(v, bs, n, page_size, steps) for v in ("fused", "unfused"))
    for _ in range(CHECK_STEPS):  # the same calls give the same slots, whichever way the step is built
        got_fused, got_unfused = fused.checked_call(), unfused.checked_call()
        harness.check_outputs("allocator step fused vs unfused", got_fused, got_unfused)
    return fused, unfused


def _label(benchmark, bs: int, n: int, page_size: int, mode: str, variant: str) -> None:
    benchmark.group = f"allocator step bs={bs} N={n} page={page_size} | {mode}"
    benchmark.name = variant
    benchmark.extra_info.update(bs=bs, window_len=n, page_size=page_size, mode=mode, variant=variant, calls=CALLS)


@pytest.mark.parametrize("variant", ["fused", "unfused"])
@pytest.mark.parametrize("bs,n,page_size", CASES, ids=[f"bs{b}-N{n}-page{p}" for b, n, p in CASES])
def test_allocator_step_eager(benchmark, bs, n, page_size, variant):
    step = dict(zip(("fused", "unfused"), _steps(bs, n, page_size)))[variant]
    step.alloc.refresh()
    syncs = step.alloc.num_syncs
    _label(benchmark, bs, n, page_size, "eager", variant)
    benchmark.pedantic(harness.run_calls, args=([step] * CALLS,), rounds=ROUNDS, warmup_rounds=1)
    assert step.alloc.num_syncs == syncs, "a timed step synced with the host"


@GRAPH_MARK
@pytest.mark.parametrize("variant", ["fused", "unfused"])
@pytest.mark.parametrize("bs,n,page_size", CASES, ids=[f"bs{b}-N{n}-page{p}" for b, n, p in CASES])
def test_allocator_step_graph(benchmark, bs, n, page_size, variant):
    if not harness.supports_graphs(DEVICE):
        pytest.skip(f"this torch build cannot capture graphs on {DEVICE}")
    step = dict(zip(("fused", "unfused"), _steps(bs, n, page_size)))[variant]
    step.alloc.refresh()
    graph, _ = harness.capture_graph([step] * CALLS, DEVICE)
    _label(benchmark, bs, n, page_size, "graph", variant)
    benchmark.pedantic(graph.replay, rounds=ROUNDS, warmup_rounds=1, iterations=REPLAYS)
    step.alloc.refresh()  # the replays grew every request: the table must still read back exactly
    step.checked_call()
