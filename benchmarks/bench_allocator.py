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

from specdec_ops import backend

from . import harness

pytest.importorskip("pytest_benchmark")

DEVICE = backend.default_device()
if DEVICE.type == "cpu":
    CASES, CALLS, ROUNDS, REPLAYS = [(7, 4, 1), (7, 4, 4)], 2, 2, 1
else:
    CASES, CALLS, ROUNDS, REPLAYS = [(256, 4, 1), (256, 4, 64), (1024, 8, 16)], 20, 10, 5
CHECK_STEPS = 3
GRAPH_MARK = pytest.mark.npu if DEVICE.type == "npu" else pytest.mark.gpu


def synchronized_clock_per_step() -> float:
    """pytest-benchmark's timer: the host clock once the device is done, over ``CALLS`` (seconds per step)."""
    backend.synchronize(DEVICE)
    return time.perf_counter() / CALLS


pytestmark = pytest.mark.benchmark(timer=synchronized_clock_per_step, disable_gc=True)


def _steps(bs: int, n: int, page_size: int) -> tuple[harness.AllocatorStep, harness.AllocatorStep]:
    # Checks, the eager run before a capture, (warm-up + timed rounds) x replays of CALLS steps, the last check,
    # with room to spare: past it a replayed step would run out of context.
    steps = 2 * (CHECK_STEPS + CALLS + CALLS * (1 + ROUNDS) * REPLAYS + 1)
    fused, unfused = (harness.AllocatorStep(v, bs, n, page_size, steps, DEVICE) for v in ("fused", "unfused"))
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
