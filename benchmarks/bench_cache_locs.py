"""pytest-benchmark suite of the cache-location step: fused op, the two components back to back, the PyTorch
reference, the allocator's draft step and an empty kernel (the floor), per (windows, batch size, N).

One benchmark group per size and mode (``uniform bs=256 N=8 | graph``), so one table compares the variants.
Every output is checked against the reference before anything is timed (graph replays too).

How a round is timed (the numbers read in seconds per call):

- ``eager``: a round is ``CALLS`` eager calls back to back, rotating over ``INPUT_SETS`` input sets. The timer
  waits for the device before reading the host clock, at both ends, so a round lasts until the device has
  finished its work; it divides the clock by ``CALLS``. This is the steady-state time per call of an eager caller.
- ``graph`` (CUDA, or NPU where torch_npu has graphs): ``CALLS`` calls captured in one graph; a round is
  ``GRAPH_REPLAYS`` replays (``pedantic(iterations=GRAPH_REPLAYS)``) timed by the same clock: device time per call
  inside a graph, plus ``1 / (CALLS * GRAPH_REPLAYS)`` of one launch and one synchronize. Then
  ``harness.record_device_time`` times more replays with device events (no launch or synchronize in them): the run
  ends with a list of those, and ``--benchmark-json`` carries them as ``extra_info``.

On the CPU the sizes are tiny and the kernels run in Triton's interpreter; the groups' names then end with
``| interpreter (CPU), not device speed``: those timings say nothing about a device. Typical uses::

    pytest benchmarks --benchmark-disable                      # CI: every op and check runs once, nothing is timed
                                                               # (record_device_time times no replay then either)
    pytest benchmarks --benchmark-only --benchmark-json=b.json # on a GPU
    pytest benchmarks --benchmark-only --benchmark-save=base   # then, after a change: --benchmark-compare=0001
    pytest benchmarks --benchmark-only -m gpu --benchmark-columns=median,iqr,min,rounds
"""

from __future__ import annotations

import time

import pytest
import torch

from specdec_ops import DraftCacheAllocator, backend, reference

from . import harness

pytest.importorskip("pytest_benchmark")

DEVICE = backend.default_device()
if DEVICE.type == "cpu":
    BATCH_SIZES, WINDOW_LENS, CONTEXT_LEN, PROMPT_MAX = (1, 7), (4,), 64, 8
    CALLS, ROUNDS, INPUT_SETS = 1, 3, 1
else:
    BATCH_SIZES, WINDOW_LENS, CONTEXT_LEN, PROMPT_MAX = (1, 256, 4096, 65536), (4, 8, 64), 2048, 64
    CALLS, ROUNDS, INPUT_SETS = 100, 20, 4
GRAPH_REPLAYS = 5
MAX_TOKENS = 2**20
CASES = [
    harness.Case(windows, bs, n)
    for windows in harness.WINDOWS
    for n in WINDOW_LENS
    for bs in BATCH_SIZES
    if bs * n <= MAX_TOKENS
]
UNIFORM_CASES = [case for case in CASES if case.windows == "uniform"]
# Graph benchmarks need the device's graphs: CUDA (marker gpu) or NPU (marker npu); both skip themselves elsewhere.
GRAPH_MARK = pytest.mark.npu if DEVICE.type == "npu" else pytest.mark.gpu


def synchronized_clock_per_call() -> float:
    """``time.perf_counter() / CALLS``, read once the device has finished the work queued on it.

    As pytest-benchmark's timer it makes a round last until the device is done, and report seconds per call.
    """
    backend.synchronize(DEVICE)
    return time.perf_counter() / CALLS


pytestmark = pytest.mark.benchmark(timer=synchronized_clock_per_call, disable_gc=True)


@pytest.fixture(scope="module")
def input_sets():
    """``input_sets(case)``: the case's input sets over one shared table, made once per module."""
    table = harness.make_table(2 * max(BATCH_SIZES), CONTEXT_LEN, DEVICE, seed=0)
    made = {}

    def get(case: harness.Case) -> list[harness.StepInputs]:
        if case not in made:
            made[case] = harness.make_input_sets(table, case, torch.int64, INPUT_SETS, seed=CASES.index(case) + 1)
        return made[case]

    return get


def _label(benchmark, case: harness.Case, mode: str, variant: str) -> None:
    benchmark.group = f"{case.windows} bs={case.batch_size} N={case.window_len} | {mode}{harness.group_suffix(DEVICE)}"
    benchmark.extra_info.update(
        variant=variant,
        mode=mode,
        windows=case.windows,
        batch_size=case.batch_size,
        window_len=case.window_len,
        calls_per_round=CALLS * (GRAPH_REPLAYS if mode == "graph" else 1),
        device=harness.environment(DEVICE)["device_name"],
    )


def _skip_without_graphs() -> None:
    if not harness.supports_graphs(DEVICE):
        pytest.skip(f"this torch build cannot capture graphs on {DEVICE}")


@pytest.mark.parametrize("variant", harness.VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cache_locs_eager(benchmark, input_sets, case, variant):
    sets = input_sets(case)
    fn = harness.variant_fn(variant, DEVICE)
    harness.check_variant(variant, fn, sets)
    _label(benchmark, case, "eager", variant)
    calls = harness.rotating_calls(fn, sets, CALLS)
    benchmark.pedantic(harness.run_calls, args=(calls,), rounds=ROUNDS, warmup_rounds=1)


@GRAPH_MARK
@pytest.mark.parametrize("variant", harness.VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cache_locs_graph(benchmark, input_sets, case, variant):
    _skip_without_graphs()
    sets = input_sets(case)
    fn = harness.variant_fn(variant, DEVICE)
    harness.check_variant(variant, fn, sets)
    graph, outputs = harness.capture_graph(harness.rotating_calls(fn, sets, CALLS), DEVICE)
    harness.check_graph(graph, outputs, [x.expected for x in sets], DEVICE, name=variant)
    _label(benchmark, case, "graph", variant)
    benchmark.pedantic(graph.replay, rounds=ROUNDS, warmup_rounds=1, iterations=GRAPH_REPLAYS)
    harness.record_device_time(benchmark, graph, CALLS, DEVICE)


class DraftStep:
    """One draft step of a ``DraftCacheAllocator``: ``alloc_draft(rows, N)`` into kept buffers, then
    ``commit(rows, accept_lens=0)``.

    Accepting nothing keeps every committed length, so the step repeats forever on the same slots without growing
    the pool: what is timed is the hot path of a step (two launches, no host sync), not the pool filling up. Every
    call raises the allocator's host-side bounds by N, so the pool and the context have room for ``2 * CALLS + 2``
    steps between two :meth:`refresh` calls (a refresh syncs once and makes the bounds exact again).
    """

    def __init__(self, case: harness.Case) -> None:
        bs, n = case.batch_size, case.window_len
        context_len = PROMPT_MAX + n * (2 * CALLS + 2)
        self.allocator = DraftCacheAllocator(bs * context_len, bs, context_len, device=DEVICE)
        prompt_lens = torch.randint(1, PROMPT_MAX + 1, (bs,), generator=torch.Generator().manual_seed(bs))
        self.rows = self.allocator.add_requests(prompt_lens.tolist())
        self.accept_lens = torch.zeros(bs, dtype=torch.int64, device=DEVICE)
        self.out_cache_loc = torch.full((bs * n,), harness.SENTINEL, dtype=torch.int64, device=DEVICE)
        self.last_loc = torch.full((bs,), harness.SENTINEL, dtype=torch.int64, device=DEVICE)
        self.window_len = n

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.allocator.alloc_draft(
            self.rows, self.window_len, out_cache_loc=self.out_cache_loc, last_loc=self.last_loc
        )
        self.allocator.commit(self.rows, self.accept_lens)
        return out

    def refresh(self) -> None:
        self.allocator.refresh()

    def expected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots of the draft window and the slot before it, read from the allocator's table by the reference."""
        seq_lens = self.allocator.seq_lens[self.rows]
        return reference.get_last_loc_and_assign_extend_cache_locs_torch(
            self.allocator.req_to_token, self.rows, seq_lens, seq_lens + self.window_len
        )

    def check(self) -> None:
        """Two steps from poisoned buffers: each returns the table's slots, none of them the padding page."""
        for _ in range(2):
            self.out_cache_loc.fill_(harness.SENTINEL)
            self.last_loc.fill_(harness.SENTINEL)
            got = self()
            harness.check_outputs("allocator draft step", got, self.expected())
            if got[0].numel() and int(got[0].min()) < self.allocator.page_size:
                raise harness.OutputMismatch("allocator draft step handed out a slot of the padding page")


def _draft_step(case: harness.Case) -> DraftStep:
    step = DraftStep(case)
    step.check()
    return step


@pytest.mark.parametrize("case", UNIFORM_CASES, ids=str)
def test_allocator_draft_step_eager(benchmark, case):
    step = _draft_step(case)
    syncs = step.allocator.num_syncs
    _label(benchmark, case, "eager", "allocator")
    benchmark.pedantic(harness.run_calls, args=([step] * CALLS,), setup=step.refresh, rounds=ROUNDS, warmup_rounds=1)
    assert step.allocator.num_syncs == syncs, "a timed draft step synced with the host"


@GRAPH_MARK
@pytest.mark.parametrize("case", UNIFORM_CASES, ids=str)
def test_allocator_draft_step_graph(benchmark, case):
    _skip_without_graphs()
    step = _draft_step(case)
    expected = step.expected()
    step.refresh()
    graph, outputs = harness.capture_graph([step] * CALLS, DEVICE)
    harness.check_graph(graph, outputs, [expected], DEVICE, name="allocator")
    _label(benchmark, case, "graph", "allocator")
    benchmark.pedantic(graph.replay, rounds=ROUNDS, warmup_rounds=1, iterations=GRAPH_REPLAYS)
    harness.record_device_time(benchmark, graph, CALLS, DEVICE)
