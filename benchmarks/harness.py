"""What the benchmark suite and ``scripts/profile_fused_vs_unfused.py`` share: inputs, variants, checks, timers.

One step reads, for ``bs`` requests, the slots of each request's window ``[start_offset, end_offset)`` (packed into
``out_cache_loc``) and the slot just before it (``last_loc``). The variants that compute it:

- ``fused``: :func:`specdec_ops.get_last_loc_and_assign_extend_cache_locs`, one launch;
- ``unfused``: :func:`specdec_ops.get_last_loc` then :func:`specdec_ops.assign_extend_cache_locs`, two launches;
- ``torch``: :func:`specdec_ops.reference.get_last_loc_and_assign_extend_cache_locs_torch` with ``num_tokens``
  given, so that it never syncs and can be captured in a graph;
- ``empty``: an empty Triton kernel on one program, the floor under any kernel launch.

Uniform windows pass ``window_len=N`` (the ops' fast path); ragged windows (lengths uniform in ``[0, 2N]``, mean
``N``) pass only ``num_tokens``. Every output goes into a preallocated buffer, so a graph can capture the calls.

Timers, each returning seconds per call, one sample per batch of ``K`` calls:

- :func:`eager_times`: samples of :func:`eager_sample`: wait for the device, read the host clock, make ``K``
  back-to-back eager calls, wait for the device again, read the clock; divide by ``K``. This is the steady-state
  cost of a call made back to back: the larger of the host's time per call (Python wrapper, argument checks, Triton
  launcher, driver) and the device's, plus ``1/K`` of one launch latency and one synchronize. On the CPU (Triton's
  interpreter) the calls are synchronous and this is plain wall-clock time.
- :func:`graph_times`: ``K`` calls captured in one CUDA (or NPU) graph; device events around each replay; divide
  by ``K``. This is the device time per call, launch gaps inside a graph included, with no host in the way.

The benchmark suite's graph groups time replays with pytest-benchmark's timer (the host clock once the device is
done, so each round also carries a share of one launch and one synchronize) and then, through
:func:`record_device_time`, with :func:`graph_times` as well: the run ends with a list of those device times.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
import triton

import specdec_ops
from specdec_ops import backend, reference

__all__ = [
    "ALLOCATOR_VARIANTS",
    "SENTINEL",
    "DEVICE_TIMES",
    "AllocatorStep",
    "VARIANTS",
    "WINDOWS",
    "Case",
    "OutputMismatch",
    "PoolMismatch",
    "StepInputs",
    "Summary",
    "capture_graph",
    "check_graph",
    "check_options",
    "check_outputs",
    "check_pool",
    "check_variant",
    "eager_sample",
    "eager_times",
    "empty_kernel",
    "environment",
    "format_environment",
    "gc_off",
    "graph_times",
    "group_suffix",
    "log_y_ticks",
    "make_input_sets",
    "make_table",
    "record_device_time",
    "resolve_device",
    "rotating_calls",
    "run_calls",
    "summarize",
    "supports_graphs",
    "variant_fn",
]

SENTINEL = -7777
# Prompts of the allocator steps are uniform in [1, PROMPT_MAX].
PROMPT_MAX = 64
VARIANTS = ("fused", "unfused", "torch", "empty")
ALLOCATOR_VARIANTS = ("fused", "unfused", "commit-and-draft")
WINDOWS = ("uniform", "ragged")

Outputs = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[["StepInputs"], Optional[Outputs]]


class OutputMismatch(AssertionError):
    """A variant's output differs from the reference's."""


class PoolMismatch(AssertionError):
    """An allocator's pool does not account for its pages: a page owned twice, lost, or outside the pool."""


@dataclass(frozen=True)
class Case:
    """One size of the sweep: ``batch_size`` requests with windows of ``window_len`` (the mean when ragged)."""

    windows: str
    batch_size: int
    window_len: int

    def __post_init__(self) -> None:
        if self.windows not in WINDOWS:
            raise ValueError(f"windows must be one of {WINDOWS}, got {self.windows!r}")

    def __str__(self) -> str:
        return f"{self.windows}-bs{self.batch_size}-N{self.window_len}"

    @property
    def max_window(self) -> int:
        """The longest window of the case."""
        return self.window_len if self.windows == "uniform" else 2 * self.window_len


@dataclass
class StepInputs:
    """One input set of a step, its preallocated outputs and the reference's outputs."""

    req_to_token: torch.Tensor  # [max_requests, context_len] int32
    req_pool_indices: torch.Tensor  # [bs] index dtype
    start_offset: torch.Tensor  # [bs] index dtype
    end_offset: torch.Tensor  # [bs] index dtype
    num_tokens: int
    window_len: int | None  # N for uniform windows, None for ragged
    out_cache_loc: torch.Tensor  # [num_tokens] int64
    last_loc: torch.Tensor  # [bs] index dtype
    expected: Outputs


def make_table(max_requests: int, context_len: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``req_to_token``: ``[max_requests, context_len]`` int32 holding a random permutation of the slots."""
    generator = torch.Generator(device=device).manual_seed(seed)
    slots = torch.randperm(max_requests * context_len, generator=generator, device=device, dtype=torch.int32)
    return slots.view(max_requests, context_len)


def make_input_sets(
    table: torch.Tensor, case: Case, index_dtype: torch.dtype, num_sets: int, seed: int = 0
) -> list[StepInputs]:
    """``num_sets`` independent input sets of ``case`` over ``table``: distinct random rows, random starts.

    ``req_pool_indices``, ``start_offset`` and ``end_offset`` have ``index_dtype`` (SGLang: int64).
    """
    max_requests, context_len = table.shape
    bs = case.batch_size
    if not 1 <= bs <= max_requests:
        raise ValueError(f"batch size must be in [1, {max_requests}] (rows of req_to_token), got {bs}")
    if case.max_window >= context_len:
        raise ValueError(f"windows of up to {case.max_window} tokens need context_len > {case.max_window}")
    device = table.device
    generator = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(num_sets):
        rows = torch.randperm(max_requests, generator=generator, device=device)[:bs]
        if case.windows == "uniform":
            lengths = torch.full((bs,), case.window_len, dtype=torch.int64, device=device)
        else:
            lengths = torch.randint(0, 2 * case.window_len + 1, (bs,), generator=generator, device=device)
        starts = torch.randint(0, context_len - case.max_window + 1, (bs,), generator=generator, device=device)
        req_pool_indices = rows.to(index_dtype)
        start_offset = starts.to(index_dtype)
        end_offset = (starts + lengths).to(index_dtype)
        uniform = case.windows == "uniform"
        num_tokens = bs * case.window_len if uniform else int(lengths.sum())
        expected = reference.get_last_loc_and_assign_extend_cache_locs_torch(
            table, req_pool_indices, start_offset, end_offset
        )
        sets.append(
            StepInputs(
                req_to_token=table,
                req_pool_indices=req_pool_indices,
                start_offset=start_offset,
                end_offset=end_offset,
                num_tokens=num_tokens,
                window_len=case.window_len if uniform else None,
                out_cache_loc=torch.full((num_tokens,), SENTINEL, dtype=torch.int64, device=device),
                last_loc=torch.full((bs,), SENTINEL, dtype=index_dtype, device=device),
                expected=expected,
            )
        )
    return sets


# ------------------------------------------------------------------------------------------------------ variants


def _empty_kernel(x_ptr):
    pass


@functools.cache
def _jit_empty_kernel(interpreted: bool):
    kernel = triton.jit(_empty_kernel)
    # Built like backend's CPU kernel modules: interpreted without setting TRITON_INTERPRET process-wide.
    return backend.interpreted_function(kernel) if interpreted else kernel


def empty_kernel(device: torch.device):
    """A Triton kernel that does nothing, built for ``device``'s backend; launch it as ``kernel[(1,)](tensor)``."""
    return _jit_empty_kernel(backend.is_interpreted(device))


def _run_fused(x: StepInputs) -> Outputs:
    return specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        x.req_to_token,
        x.req_pool_indices,
        x.start_offset,
        x.end_offset,
        x.out_cache_loc,
        x.last_loc,
        num_tokens=x.num_tokens,
        window_len=x.window_len,
    )


def _run_unfused(x: StepInputs) -> Outputs:
    last_loc = specdec_ops.get_last_loc(x.req_to_token, x.req_pool_indices, x.start_offset, last_loc=x.last_loc)
    out_cache_loc = specdec_ops.assign_extend_cache_locs(
        x.req_to_token,
        x.req_pool_indices,
        x.start_offset,
        x.end_offset,
        x.out_cache_loc,
        num_tokens=x.num_tokens,
        window_len=x.window_len,
    )
    return out_cache_loc, last_loc


def _run_torch(x: StepInputs) -> Outputs:
    return reference.get_last_loc_and_assign_extend_cache_locs_torch(
        x.req_to_token, x.req_pool_indices, x.start_offset, x.end_offset, num_tokens=x.num_tokens
    )


def variant_fn(name: str, device: torch.device) -> StepFn:
    """The function that runs variant ``name`` on one input set; it returns ``(out_cache_loc, last_loc)``
    (``None`` for ``empty``)."""
    if name == "fused":
        return _run_fused
    if name == "unfused":
        return _run_unfused
    if name == "torch":
        return _run_torch
    if name == "empty":
        kernel = empty_kernel(device)

        def _run_empty(x: StepInputs) -> None:
            kernel[(1,)](x.req_pool_indices)

        return _run_empty
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")


# -------------------------------------------------------------------------------------------------------- checks


def check_outputs(label: str, got: Outputs, expected: Outputs) -> None:
    """Raise :class:`OutputMismatch` unless ``got`` equals ``expected`` exactly (values, shapes and dtypes)."""
    for name, g, e in zip(("out_cache_loc", "last_loc"), got, expected):
        if g.dtype != e.dtype or g.shape != e.shape:
            raise OutputMismatch(
                f"{label}: {name} is {g.dtype} {tuple(g.shape)}, the reference's {e.dtype} {tuple(e.shape)}"
            )
        if not torch.equal(g, e):
            i = int((g != e).nonzero()[0, 0])
            raise OutputMismatch(f"{label}: {name}[{i}] = {int(g[i])}, the reference has {int(e[i])}")


def _poison(outputs: Outputs | None) -> None:
    if outputs is not None:
        for tensor in outputs:
            tensor.fill_(SENTINEL)


def check_variant(name: str, fn: StepFn, input_sets: list[StepInputs]) -> None:
    """Run ``fn`` once on each input set, outputs poisoned first, and compare with the reference."""
    for k, x in enumerate(input_sets):
        _poison((x.out_cache_loc, x.last_loc))
        got = fn(x)
        if name == "empty":
            continue
        check_outputs(f"{name}, input set {k}", got, x.expected)


def check_graph(
    graph, outputs: list[Outputs | None], expected: list[Outputs], device: torch.device, name: str = "graph"
) -> None:
    """Poison what the last captured calls wrote, replay ``graph`` once, and compare with the reference.

    ``outputs[i]`` is what call ``i`` returned during capture, made on input set ``i % len(expected)``.
    """
    num_sets = len(expected)
    last = range(max(0, len(outputs) - num_sets), len(outputs))
    for i in last:
        _poison(outputs[i])
    graph.replay()
    backend.synchronize(device)
    for i in last:
        if outputs[i] is not None:
            check_outputs(f"{name} replay, input set {i % num_sets}", outputs[i], expected[i % num_sets])


def _require(ok: torch.Tensor | bool, what: str) -> None:
    if not bool(ok):
        raise PoolMismatch(what)


def check_pool(alloc: specdec_ops.DraftCacheAllocator) -> None:
    """Check that every page of ``alloc``'s pool is accounted for exactly once and that ``num_free_slots()`` agrees.

    A page is free (in the free ring), owned by a row in use (the pages of its positions ``[0, alloc_len)``, its
    cached prefix apart), a branch page of a row (tree drafts) or the prefix cache's. Each owned position's slot is
    inside the pool with ``slot % page_size == position % page_size``, no page is split between pages of positions,
    positions past ``alloc_len`` (every position of a row not in use) hold no slot, and a row's prefix pages are the
    cache's. Raises
    :class:`PoolMismatch`. Reads the device state directly (rows in chunks) and syncs: call it outside timed regions.
    """
    p, num_pages, device = alloc.page_size, alloc.num_pages, alloc.device
    counts = torch.zeros(num_pages + 1, dtype=torch.int64, device=device)

    def count(pages: torch.Tensor, what: str) -> None:
        pages = pages.long().flatten()
        _require(((pages >= 1) & (pages <= num_pages)).all(), f"{what}: a page outside the pool [1, {num_pages}]")
        counts.add_(torch.bincount(pages, minlength=num_pages + 1))

    cache_pages = torch.tensor(alloc.cached_pages(), dtype=torch.int64, device=device)
    rows = list(range(alloc.max_requests))  # (a row not in use has alloc_len -1: it owns nothing, and must be clear)
    context_len = alloc.max_context_len
    _require((alloc.alloc_lens <= context_len).all(), "an alloc_len past max_context_len")
    chunk = max(1, 2**24 // context_len)
    pos = torch.arange(context_len, device=device)[None, :]
    for first_row in range(0, len(rows), chunk):
        index = torch.tensor(rows[first_row : first_row + chunk], dtype=torch.int64, device=device)
        table = alloc.req_to_token[index].long()  # [rows, max_context_len]
        owned = pos < alloc.alloc_lens[index].long()[:, None]
        slots = table[owned]
        _require(((slots >= p) & (slots < alloc.total_slots)).all(), "an owned position's slot is outside the pool")
        _require((slots % p == pos.expand_as(table)[owned] % p).all(), "slot % page_size != position % page_size")
        page_first = table.gather(1, (pos - pos % p).expand_as(table))
        _require((page_first[owned] // p == slots // p).all(), "a page split between positions of different pages")
        _require((table[~owned] == 0).all(), "a position past alloc_len holds a slot")
        page_starts = owned & (pos % p == 0)
        prefix = pos < alloc.prefix_lens[index].long()[:, None]
        _require(torch.isin(table[page_starts & prefix] // p, cache_pages).all(), "a prefix page is not the cache's")
        count(table[page_starts & ~prefix] // p, "pages of rows in use")
    head, free = int(alloc.free_head[0]), int(alloc.num_free_pages[0])
    count(alloc.free_pages[(head + torch.arange(free, device=device)) % num_pages], "the free ring")
    held = torch.arange(alloc.branch_pages.size(1), device=device)[None, :] < alloc.num_branch_pages[:, None]
    count(alloc.branch_pages[held], "branch pages")
    count(cache_pages, "the prefix cache")
    wrong = (counts[1:] != 1).nonzero()
    if wrong.numel():
        page = int(wrong[0, 0]) + 1
        raise PoolMismatch(
            f"page {page} is counted {int(counts[page])} times (free, rows' pages, branch pages and the cache must "
            "account for every page once)"
        )
    free_slots = alloc.num_free_slots()
    _require(free_slots == p * free, f"num_free_slots() is {free_slots}, the free ring holds {free} pages of {p}")


# -------------------------------------------------------------------------------------------------------- timers


def rotating_calls(fn: StepFn, input_sets: list, count: int) -> list[Callable[[], Outputs | None]]:
    """``count`` zero-argument calls of ``fn``; call ``i`` takes input set ``i % len(input_sets)``."""
    return [functools.partial(fn, input_sets[i % len(input_sets)]) for i in range(count)]


def run_calls(calls: list[Callable[[], object]]) -> None:
    """Make the calls back to back."""
    for call in calls:
        call()


@contextlib.contextmanager
def gc_off():
    """Python's garbage collector off (after one collection) for host timings, then as it was."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def eager_sample(calls: list[Callable[[], object]], device: torch.device | None) -> float:
    """One sample, in seconds per call: synchronize, host clock, the calls back to back, synchronize, host clock;
    over the count. ``device`` None: nothing to wait for (host work alone)."""
    if device is not None:
        backend.synchronize(device)
    start = time.perf_counter()
    for call in calls:
        call()
    if device is not None:
        backend.synchronize(device)
    return (time.perf_counter() - start) / len(calls)


def eager_times(calls: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """:func:`eager_sample` once per repeat; the ``warmup`` first repeats are dropped. Python's garbage collector is
    off meanwhile."""
    samples = []
    with gc_off():
        for r in range(warmup + repeats):
            seconds = eager_sample(calls, device)
            if r >= warmup:
                samples.append(seconds)
    return samples


def check_options(parser, args, least: dict[str, int]) -> None:
    """A script's option checks: ``parser.error`` for the first option of ``least`` (its ``dest`` -> the least value
    it takes; ``None``, an option not given, passes) below its least value, then ``args.device`` resolved
    (:func:`resolve_device`; an unknown device through ``parser.error`` too)."""
    for name, minimum in least.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))


def resolve_device(name: str | None) -> torch.device:
    """The device ``--device name`` names (the default device when None), with its index, made the current one of
    its kind (so that the launches of ``--device cuda:1`` go to GPU 1). Raises ValueError naming ``--device``."""
    try:
        device = backend.default_device() if name is None else torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or npu (with an index: cuda:1), got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA GPU")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type == "npu":
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            raise ValueError(f"--device {name}: torch_npu is missing or sees no NPU")
        device = torch.device("npu", npu.current_device() if device.index is None else device.index)
        npu.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device must be cpu, cuda or npu, got {name!r}")
    return device


def _accelerator(device: torch.device) -> ModuleType:
    """``torch.cuda`` or ``torch.npu``: the module with the device's streams, events and graphs."""
    if device.type == "cuda":
        return torch.cuda
    if device.type == "npu":
        return torch.npu
    raise ValueError(f"graphs and device events need a cuda or npu device, got {device}")


def _graph_class(device: torch.device):
    accelerator = _accelerator(device)
    graph_class = getattr(accelerator, "CUDAGraph" if device.type == "cuda" else "NPUGraph", None)
    if graph_class is None or not hasattr(accelerator, "graph"):
        raise RuntimeError(f"this torch build has no graph capture for {device.type}")
    return graph_class


def supports_graphs(device: torch.device) -> bool:
    """Whether ``device`` can capture and replay graphs (CUDA graphs; NPU graphs where torch_npu has them)."""
    if device.type not in ("cuda", "npu"):
        return False
    try:
        _graph_class(device)
    except RuntimeError:
        return False
    return True


def capture_graph(calls: list[Callable[[], object]], device: torch.device):
    """Capture ``calls`` in one graph; returns ``(graph, outputs)``, ``outputs[i]`` what call ``i`` returned.

    The calls run once eagerly on a side stream first (torch's recipe), so that compilation and lazy
    initialisation stay out of the capture. Keep ``outputs`` alive as long as the graph: replays write there.
    """
    accelerator = _accelerator(device)
    graph = _graph_class(device)()
    side = accelerator.Stream(device)
    side.wait_stream(accelerator.current_stream(device))
    with accelerator.stream(side):
        run_calls(calls)
    accelerator.current_stream(device).wait_stream(side)
    accelerator.synchronize(device)
    gc.collect()  # a collection inside the capture could free memory of other streams and invalidate it
    with accelerator.graph(graph):
        outputs = [call() for call in calls]
    accelerator.synchronize(device)
    return graph, outputs


def graph_times(graph, calls_per_replay: int, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call: device events around each replay of ``graph``, over ``calls_per_replay``.

    ``warmup`` replays first; then ``repeats`` replays, queued back to back (the device never waits for the host:
    each replay holds ``calls_per_replay`` kernels), one sample each.
    """
    accelerator = _accelerator(device)
    for _ in range(warmup):
        graph.replay()
    events = [(accelerator.Event(enable_timing=True), accelerator.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    accelerator.synchronize(device)
    return [start.elapsed_time(end) * 1e-3 / calls_per_replay for start, end in events]


@dataclass(frozen=True)
class Summary:
    """Median and 20th/80th percentiles of per-call samples, in microseconds."""

    median_us: float
    p20_us: float
    p80_us: float
    samples: int


def summarize(seconds: list[float]) -> Summary:
    if not seconds:
        raise ValueError("no samples to summarize")
    q = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    p20, median, p80 = (torch.tensor(seconds, dtype=torch.float64).quantile(q) * 1e6).tolist()
    return Summary(median_us=median, p20_us=p20, p80_us=p80, samples=len(seconds))


def group_suffix(device: torch.device) -> str:
    """What a benchmark group's name ends with on ``device``: nothing where Triton compiles the kernels,
    `` | interpreter (CPU), not device speed`` where its interpreter runs them (so that no table of such timings,
    nor the ratios pytest-benchmark prints beside them, reads as a device's)."""
    if not backend.is_interpreted(device):
        return ""
    where = "CPU" if device.type == "cpu" else f"{device.type}, TRITON_INTERPRET=1"
    return f" | interpreter ({where}), not device speed"


# (group, name, Summary) of every benchmark that recorded its device time, for the run's closing list.
DEVICE_TIMES: list[tuple[str, str, Summary]] = []
# Replays a benchmark's device time is taken over, after warm-up replays.
DEVICE_TIME_REPEATS, DEVICE_TIME_WARMUP = 20, 3


def record_device_time(benchmark, graph, calls_per_replay: int, device: torch.device) -> Summary | None:
    """Time ``DEVICE_TIME_REPEATS`` more replays of ``graph`` with device events (:func:`graph_times`), keep the
    median and p20/p80 per call in ``benchmark.extra_info`` (``--benchmark-json`` carries them) and in
    ``DEVICE_TIMES`` (under the benchmark's group and its ``variant`` extra_info, else its name), which
    ``benchmarks/conftest.py`` lists at the end of the run. Call it after the benchmark's timing, with the group set:
    the replays advance whatever state the graph changes. With ``--benchmark-disable`` it times nothing and returns
    None, so that such a run times nothing at all."""
    if getattr(benchmark, "disabled", False):
        return None
    summary = summarize(graph_times(graph, calls_per_replay, device, DEVICE_TIME_REPEATS, DEVICE_TIME_WARMUP))
    benchmark.extra_info.update(
        device_median_us=summary.median_us, device_p20_us=summary.p20_us, device_p80_us=summary.p80_us
    )
    DEVICE_TIMES.append((benchmark.group, benchmark.extra_info.get("variant", benchmark.name), summary))
    return summary


class AllocatorStep:
    """One draft/verify step of a :class:`specdec_ops.DraftCacheAllocator` with ``bs`` requests drafting ``n``
    tokens, built as ``variant`` says, with kept output buffers (so a graph can capture it):

    - ``fused``: ``alloc_draft`` (allocation, table update and read-back in one launch), then ``commit``;
    - ``unfused``: ``reserve_draft``, ``end = seq_lens + n``, ``get_last_loc``, ``assign_extend_cache_locs``, then
      ``commit``;
    - ``commit-and-draft``: ``commit_and_draft``, the commit of the previous step's window and the next window
      (one launch up to 256 requests, two past them, past 128 with windows of 3 tokens or more on a GPU with
      programmatic dependent launches; its first call commits nothing), so its windows are those of
      ``fused``, call for call.

    Requests accept ``i % (n + 1)`` tokens, so windows keep crossing pages. The pool and the context hold
    ``steps`` steps. With ``prefix_pages``, every request starts from that many pages of a prefix cache (shared
    by all requests, as a system prompt would be). ``context_len``: rows of ``req_to_token`` at least that long
    (an engine's rows hold its whole context, and longer rows cost the step more); the pool stays sized for
    ``steps`` steps.
    """

    def __init__(
        self,
        variant: str,
        bs: int,
        n: int,
        page_size: int,
        steps: int,
        device: torch.device,
        prefix_pages: int = 0,
        context_len: int | None = None,
    ) -> None:
        if variant not in ALLOCATOR_VARIANTS:
            raise ValueError(f"variant must be one of {ALLOCATOR_VARIANTS}, got {variant!r}")
        prefix = prefix_pages * page_size
        needed = prefix + PROMPT_MAX + n * (steps + 1)
        num_slots = (bs * -(-needed // page_size) + 2 * prefix_pages) * page_size  # a partial page per request
        context_len = max(needed, context_len or 0)
        self.alloc = specdec_ops.DraftCacheAllocator(num_slots, bs + 1, context_len, page_size=page_size, device=device)
        prompt_lens = torch.randint(1, PROMPT_MAX + 1, (bs,), generator=torch.Generator().manual_seed(bs))
        if prefix_pages:
            # A finished request leaves its first prefix_pages pages to the cache; every new request reads them.
            first = self.alloc.add_requests([prefix])
            cached = self.alloc.free_requests(first, keep_lens=[prefix])
            self.rows = self.alloc.add_requests(
                (prompt_lens + prefix).tolist(), prefix_slots=cached.expand(bs, prefix), prefix_lens=[prefix] * bs
            )
        else:
            self.rows = self.alloc.add_requests(prompt_lens.tolist())
        assert torch.equal(self.rows.cpu(), torch.arange(bs)), "a new allocator hands out rows 0..bs-1"
        self.seq_lens = self.alloc.seq_lens[:bs]  # the rows' committed lengths, a view: no gather launch
        self.end = torch.empty_like(self.seq_lens)
        self.accept = (torch.arange(bs, device=device) % (n + 1)).to(torch.int64)
        self.out = torch.full((bs * n,), SENTINEL, dtype=torch.int64, device=device)
        self.last = torch.full((bs,), SENTINEL, dtype=torch.int64, device=device)
        self.variant, self.n = variant, n

    def __call__(self) -> None:
        if self.variant == "commit-and-draft":
            self.alloc.commit_and_draft(self.rows, self.accept, self.n, out_cache_loc=self.out, last_loc=self.last)
            return
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
        self.out.fill_(SENTINEL)
        self.last.fill_(SENTINEL)
        seq_lens = self.seq_lens.clone()
        self()
        if self.variant == "commit-and-draft":  # it commits first: the window starts where the commit left each row
            seq_lens = self.seq_lens.clone()
        expected = reference.get_last_loc_and_assign_extend_cache_locs_torch(
            self.alloc.req_to_token, self.rows, seq_lens, seq_lens + self.n
        )
        got = (self.out.clone(), self.last.clone())
        check_outputs(f"allocator step ({self.variant})", got, expected)
        return got

    def check_steps(self, run: Callable[[], object], calls: int) -> None:
        """Check what ``run`` wrote, ``calls`` steps of this step (a replay of a graph that captured them, or eager
        calls), run once more here from poisoned buffers: the committed lengths that the accept lengths predict,
        the last step's ``out_cache_loc`` and ``last_loc`` against the reference read of the table at the window
        start the host predicts, each row's ``alloc_len``, and the pool's accounting (:func:`check_pool`). Call it
        after the timed replays, outside any timed region: it advances the state by ``calls`` steps.

        Every row must hold an open window of at least ``n`` tokens for ``commit-and-draft`` (its first commit
        commits that window), as after any step.
        """
        label = f"allocator step ({self.variant}), {calls} steps checked after the timed ones"
        seq_lens = self.seq_lens.clone()
        alloc_lens = self.alloc.alloc_lens[: seq_lens.numel()].clone()
        self.out.fill_(SENTINEL)
        self.last.fill_(SENTINEL)
        run()
        backend.synchronize(self.alloc.device)
        committed = seq_lens + calls * self.accept
        if not torch.equal(self.seq_lens, committed):
            i = int((self.seq_lens != committed).nonzero()[0, 0])
            raise OutputMismatch(f"{label}: row {i} committed {int(self.seq_lens[i])} tokens, {int(committed[i])} due")
        # The last window starts where the last commit left each row (commit-and-draft), else one commit before.
        start = committed if self.variant == "commit-and-draft" else committed - self.accept
        expected = reference.get_last_loc_and_assign_extend_cache_locs_torch(
            self.alloc.req_to_token, self.rows, start, start + self.n
        )
        check_outputs(label, (self.out, self.last), expected)
        due = torch.maximum(alloc_lens, start + self.n)
        if not torch.equal(self.alloc.alloc_lens[: due.numel()].long(), due.long()):
            raise OutputMismatch(f"{label}: alloc_lens are {self.alloc.alloc_lens.tolist()}, {due.tolist()} due")
        check_pool(self.alloc)


# --------------------------------------------------------------------------------------------------- environment


def _command_output(args: list[str]) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def _nvidia_driver() -> str:
    version = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if version:
        return version
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # pynvml missing or failing: the driver stays unknown, which is no reason to stop
        return "unknown"


@functools.cache
def environment(device: torch.device) -> dict[str, str]:
    """Date, device, driver and versions: what a reader needs to reproduce a number."""
    repo = Path(__file__).resolve().parents[1]
    commit = _command_output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]) or "unknown"
    if commit != "unknown" and _command_output(["git", "-C", str(repo), "status", "--porcelain", "--untracked=no"]):
        commit += "-dirty"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        driver = _nvidia_driver()
        runtime = f"CUDA {torch.version.cuda}"
    elif device.type == "npu":
        import torch_npu

        name = torch.npu.get_device_name(device)
        driver = "unknown (npu-smi info shows it)"
        runtime = f"torch_npu {torch_npu.__version__}"
    else:
        name = platform.processor() or platform.machine()
        driver = "none"
        runtime = "Triton interpreter (CPU)"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": str(device),
        "device_name": name,
        "driver": driver,
        "runtime": runtime,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "specdec_ops": f"{specdec_ops.__version__} (git {commit})",
        "python": platform.python_version(),
    }


def format_environment(env: dict[str, str]) -> list[str]:
    """The environment as the lines printed on top of every report."""
    return [
        f"date: {env['date']}",
        f"device: {env['device_name']} ({env['device']}), driver {env['driver']}, {env['runtime']}",
        f"torch {env['torch']}, triton {env['triton']}, specdec_ops {env['specdec_ops']}, python {env['python']}",
    ]


def log_y_ticks(ax, values: list[float]) -> None:
    """Labelled ticks on a log y axis (matplotlib ``Axes``) for ``values``: 1, 2, 5 a decade where they span one or
    more, every integer multiple (1-9) where they stay within one, so that the labels never vanish (a log axis labels
    only powers of ten, and a range inside one decade may hold none) nor overlap; no minor y ticks (the x axis is
    left as it is)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    values = [v for v in values if v > 0]
    narrow = bool(values) and max(values) < 10 * min(values)
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=tuple(range(1, 10)) if narrow else (1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
