#!/usr/bin/env python
"""Eager host time per call of the ops and of the allocator's calls, next to an empty Triton launch in the same run.

Engines run the KV-cache bookkeeping eagerly on the scheduler, so the host's time per call is what they pay. Each
measurement is a sample of --iters back-to-back calls: synchronize, read the clock, the calls, synchronize, read
the clock, over --iters. Samples are taken in rounds, one of every call a round (--warmup rounds dropped, then
--repeats kept), so a slow phase of the host, which can last seconds, falls on every call alike instead of on the
calls timed then. The report gives each call's median and p20/p80 over its samples, and its ratio to the empty
launch (target: <= 1.2): the median over rounds of the call's sample over the empty launch's sample of the same
round.

Calls (bs --batch-size, N --window-len, buffers given, num_tokens given: the hot path of an engine):

  empty launch     an empty @triton.jit kernel launched as kernel[(1,)](tensor): Triton's own launch path
  fused uniform    get_last_loc_and_assign_extend_cache_locs(..., num_tokens=, window_len=N)
  fused ragged     the same without window_len
  get_last_loc, assign_extend_cache_locs (uniform)
  alloc_draft      DraftCacheAllocator.alloc_draft(rows, N, out_cache_loc=, last_loc=) with room in the pool
  commit           DraftCacheAllocator.commit(rows, accept_lens); each sample ends with refresh()-free headroom
  commit_and_draft DraftCacheAllocator.commit_and_draft(rows, accept_lens, N, out_cache_loc=, last_loc=): a chain
                   step in one launch
  alloc_branches   DraftCacheAllocator.alloc_branches(rows, --topk, --num-steps, out=, copy_src=, copy_dst=): tree
                   drafts' branch slots, each call releasing the previous call's branch pages in its launch
  commit_tree      DraftCacheAllocator.commit_tree(rows, accept_index, accept_lens, kv_src=, kv_dst=) of a tree of N
                   nodes, releasing branch pages in its launch (the host cannot know that a tensor of rows released
                   them, so it launches the release, as in an engine's tree step)
  commit_tree_and_draft
                   DraftCacheAllocator.commit_tree_and_draft(rows, accept_index, accept_lens, N, --topk,
                   --num-steps, with every buffer): the tree commit and the next tree, keeping the branch
                   pages: one launch or two, by the method's own rule (its docstring); two at the defaults
  ... (plan/run)   the same calls through CacheLocsWrapper.run() and DraftStepWrapper.alloc_draft()/commit()/
                   commit_and_draft()/alloc_branches()/commit_tree_and_draft(), planned once with the same
                   arguments (the plan/run form an engine's eager loop uses; the tree calls' wrapper is planned
                   with topk=, num_steps= and accept_index=)
  ... (plan/run, own buffers)
                   fused uniform, alloc_draft and commit_tree_and_draft planned without output buffers: plan()
                   makes them and each call re-checks them by address only (it returns views of them)
  add_requests + free_requests
                   DraftCacheAllocator.add_requests(prompt_lens) of bs prompts of 7 tokens, then free_requests(rows)
                   of the rows it took, given as a host list, on an allocator of its own with 2 * bs rows of which
                   bs stay in use: each pair leaves the state it found, so no pair syncs for capacity. Its ratio is
                   to two empty launches (the pair launches two Triton kernels). Each call sends its host lists
                   to the device through the allocator's ring of pinned slots, without waiting for the stream:
                   add_requests copies the rows and prompt_lens together; free_requests' kernel reads the rows
                   from their slot in place where the device reads pinned memory at its host address (every
                   64-bit CUDA platform; else a copy), and clears the rows of req_to_token itself. It reads
                   nothing back from host rows (a device tensor of rows, keep_lens= or freeing the last rows in
                   use would). After the tables: syncs per pair, the allocator's num_syncs (capacity syncs) and,
                   on cuda, the stream synchronizations that torch's sync debug mode reports. The two calls are
                   not timed apart: back-to-back add_requests need room for --iters batches, so they would time a
                   pool sized for it

Every call is given the same tensors each time, as an engine's persistent buffers: from their second call the
function and method forms take the launch kept for them (docs/design.md, "Calls given the tensors of an earlier
call"). The chain calls (alloc_draft, commit, commit_and_draft) run on an allocator of their own that never takes branch
pages, as a chain engine's (topk 1); the tree calls on another.

A second table times the same calls with the launch replaced by a no-op (backend.launch, the prepared launches of
plan/run, backend.Launch, and the kept launches of calls given the tensors of an earlier call, backend.KeptLaunch,
stubbed): the Python of the wrappers alone (argument checks, launch configuration, host bookkeeping), i.e. where
host time goes besides Triton's launcher.

On cpu the kernels run in Triton's interpreter: the first table would time the interpreter, which says nothing
about a device, so only the second (host Python) table is printed there, with torch on one thread: the calls' own
tensor ops (the copies of host lists) then run in the timing thread, not in a thread pool whose wake-ups cost
milliseconds on a busy machine.

Examples:
  python scripts/eager_host_time.py                 # on the default device (cuda on a GPU machine)
  python scripts/eager_host_time.py --device cpu    # the wrappers' Python only
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import warnings
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import specdec_ops  # noqa: E402
from benchmarks import harness  # noqa: E402
from specdec_ops import backend  # noqa: E402

TARGET_RATIO = 1.2
REQUEST_PAIR = "add_requests + free_requests"
# What torch's sync debug mode "warn" says at each synchronizing CUDA call (c10/cuda/CUDAFunctions.cpp).
_SYNC_WARNING = "called a synchronizing CUDA operation"
# Calls that launch more than one kernel: their ratio is to as many empty launches.
LAUNCHES = {REQUEST_PAIR: 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="eager_host_time.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", help="cuda, npu or cpu (default: npu if present, else cuda, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="requests per call (default: 64)")
    parser.add_argument("--window-len", type=int, default=4, help="draft tokens per request N (default: 4)")
    parser.add_argument("--topk", type=int, default=4, help="branches per request of alloc_branches (default: 4)")
    parser.add_argument("--num-steps", type=int, default=3, help="steps per branch of alloc_branches (default: 3)")
    parser.add_argument("--iters", type=int, default=200, help="back-to-back calls per sample (default: 200)")
    parser.add_argument("--repeats", type=int, default=30, help="samples kept per call (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="samples run and dropped first (default: 5)")
    args = parser.parse_args(argv)
    least = dict.fromkeys(("batch_size", "window_len", "topk", "num_steps", "iters", "repeats"), 1)
    harness.check_options(parser, args, {**least, "warmup": 0})
    return args


class RequestPair:
    """One ``add_requests`` of ``bs`` prompts, then ``free_requests`` of the rows it took (a host list), on an
    allocator of its own that keeps ``bs`` other requests in use: the same rows each time, the pool's bounds back
    where they were after each pair, and never the last rows freed (that would re-read the bounds)."""

    def __init__(self, device: torch.device, bs: int, num_slots: int, max_context_len: int, page_size: int) -> None:
        self.pool = specdec_ops.DraftCacheAllocator(
            num_slots, 2 * bs, max_context_len, page_size=page_size, device=device
        )
        self.prompt_lens = [7] * bs
        self.pool.add_requests(self.prompt_lens)  # in use throughout
        self.rows = self.pool.add_requests(self.prompt_lens).tolist()
        self.pool.free_requests(self.rows)

    def __call__(self) -> None:
        self.pool.add_requests(self.prompt_lens)
        self.pool.free_requests(self.rows)

    def syncs(self, count: int) -> tuple[float, float | None]:
        """Per pair over ``count`` pairs: the allocator's ``num_syncs`` (capacity syncs), and on cuda the stream
        synchronizations that torch's sync debug mode reports (None elsewhere)."""
        before = self.pool.num_syncs
        with warnings.catch_warnings(record=True) as caught, _sync_warnings(self.pool.device):
            warnings.simplefilter("always")
            for _ in range(count):
                self()
        syncs = (self.pool.num_syncs - before) / count
        if self.pool.device.type != "cuda":
            return syncs, None
        # Only torch's warning at a synchronizing call: turning the mode on warns once that it is a prototype
        # ("... does not yet detect all synchronizing operations"), which earlier versions of this count took
        # for a sync (0.1 a pair over 10 pairs).
        return syncs, sum(_SYNC_WARNING in str(w.message) for w in caught) / count


@contextlib.contextmanager
def _sync_warnings(device: torch.device):
    """On cuda, torch warns at each synchronizing operation meanwhile (its sync debug mode); elsewhere nothing."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def make_calls(device: torch.device, bs: int, n: int, topk: int, num_steps: int) -> dict[str, object]:
    """name -> a function of no arguments making one call; every call is made once here (compiles, checks)."""
    max_requests, context = 2 * bs, 64 * n + 64
    table = torch.arange(max_requests * context, dtype=torch.int32, device=device).reshape(max_requests, context)
    rows = torch.randperm(max_requests, device=device)[:bs]
    start = torch.randint(1, context // 2, (bs,), device=device)
    end = start + n
    ragged_end = start + torch.randint(0, 2 * n + 1, (bs,), device=device)
    ragged_tokens = int((ragged_end - start).sum())
    out = torch.empty(bs * 2 * n, dtype=torch.int64, device=device)
    last = torch.empty(bs, dtype=torch.int64, device=device)
    empty = harness.empty_kernel(device)
    ops = specdec_ops

    # Room for every timed call: back-to-back drafts that commit nothing grow the host bounds (tokens drafted since
    # the last exact count) by N a call, and a draft syncs once they reach max_context_len or the pool. Both are
    # sized past the ~75,000 drafts of a run, timed and stubbed (their calls count the capacity syncs all the same).
    max_context_len = 1 << 19
    num_slots = bs * max_context_len
    alloc = specdec_ops.DraftCacheAllocator(num_slots, bs, max_context_len, page_size=16, device=device)
    alloc_rows = alloc.add_requests([7] * bs)
    alloc_out = torch.empty(bs * n, dtype=torch.int64, device=device)
    alloc_last = torch.empty(bs, dtype=torch.int64, device=device)
    accept = torch.zeros(bs, dtype=torch.int64, device=device)  # nothing accepted: every draft reuses its slots
    uniform = ops.CacheLocsWrapper(table)
    uniform.plan(rows, start, end, out, last, num_tokens=bs * n, window_len=n)
    ragged = ops.CacheLocsWrapper(table)
    ragged.plan(rows, start, ragged_end, out, last, num_tokens=ragged_tokens)
    step = specdec_ops.DraftStepWrapper(alloc)
    step.plan(alloc_rows, n, accept_lens=accept, out_cache_loc=alloc_out, last_loc=alloc_last)
    uniform_own = ops.CacheLocsWrapper(table)
    uniform_own.plan(rows, start, end, num_tokens=bs * n, window_len=n)
    step_own = specdec_ops.DraftStepWrapper(alloc)
    step_own.plan(alloc_rows, n, accept_lens=accept)
    # The tree calls' own allocator: once they have taken branch pages through a tensor of rows, the host keeps them
    # on its books, and every draft and commit would launch their release (a chain engine never takes any).
    tree_alloc = specdec_ops.DraftCacheAllocator(num_slots, bs, max_context_len, page_size=16, device=device)
    tree_rows = tree_alloc.add_requests([7] * bs)
    # Tree drafts: branch slots and copy pairs, then the commit of a tree of N nodes (nothing accepted).
    copies = bs * topk * (alloc.page_size - 1)
    tree = dict(
        branch_slots=torch.empty(bs * topk * num_steps, dtype=torch.int64, device=device),
        copy_src=torch.empty(copies, dtype=torch.int64, device=device),
        copy_dst=torch.empty(copies, dtype=torch.int64, device=device),
        kv_src=torch.empty(bs * n, dtype=torch.int64, device=device),
        kv_dst=torch.empty(bs * n, dtype=torch.int64, device=device),
    )
    accept_index = torch.zeros(bs, n, dtype=torch.int64, device=device)
    tree_step = specdec_ops.DraftStepWrapper(tree_alloc)
    tree_step.plan(
        tree_rows,
        n,
        accept_lens=accept,
        out_cache_loc=alloc_out,
        last_loc=alloc_last,
        accept_index=accept_index,
        topk=topk,
        num_steps=num_steps,
        **tree,
    )
    tree_step_own = specdec_ops.DraftStepWrapper(tree_alloc)
    tree_step_own.plan(tree_rows, n, accept_lens=accept, accept_index=accept_index, topk=topk, num_steps=num_steps)

    calls = {
        "empty launch": lambda: empty[(1,)](out),
        "fused uniform": lambda: ops.get_last_loc_and_assign_extend_cache_locs(
            table, rows, start, end, out, last, num_tokens=bs * n, window_len=n
        ),
        "fused ragged": lambda: ops.get_last_loc_and_assign_extend_cache_locs(
            table, rows, start, ragged_end, out, last, num_tokens=ragged_tokens
        ),
        "get_last_loc": lambda: ops.get_last_loc(table, rows, start, last_loc=last),
        "assign_extend_cache_locs": lambda: ops.assign_extend_cache_locs(
            table, rows, start, end, out, num_tokens=bs * n, window_len=n
        ),
        "alloc_draft": lambda: alloc.alloc_draft(alloc_rows, n, out_cache_loc=alloc_out, last_loc=alloc_last),
        "commit": lambda: alloc.commit(alloc_rows, accept),
        "commit_and_draft": lambda: alloc.commit_and_draft(
            alloc_rows, accept, n, out_cache_loc=alloc_out, last_loc=alloc_last
        ),
        "alloc_branches": lambda: tree_alloc.alloc_branches(
            tree_rows, topk, num_steps, out=tree["branch_slots"], copy_src=tree["copy_src"], copy_dst=tree["copy_dst"]
        ),
        "commit_tree": lambda: tree_alloc.commit_tree(
            tree_rows, accept_index, accept, kv_src=tree["kv_src"], kv_dst=tree["kv_dst"]
        ),
        "commit_tree_and_draft": lambda: tree_alloc.commit_tree_and_draft(
            tree_rows,
            accept_index,
            accept,
            n,
            topk,
            num_steps,
            out_cache_loc=alloc_out,
            last_loc=alloc_last,
            **tree,
        ),
        "fused uniform (plan/run)": uniform.run,
        "fused ragged (plan/run)": ragged.run,
        "alloc_draft (plan/run)": step.alloc_draft,
        "commit (plan/run)": step.commit,
        "commit_and_draft (plan/run)": step.commit_and_draft,
        "alloc_branches (plan/run)": tree_step.alloc_branches,
        "commit_tree (plan/run)": tree_step.commit,
        "commit_tree_and_draft (plan/run)": tree_step.commit_tree_and_draft,
        "fused uniform (plan/run, own buffers)": uniform_own.run,
        "alloc_draft (plan/run, own buffers)": step_own.alloc_draft,
        "commit_tree_and_draft (plan/run, own buffers)": tree_step_own.commit_tree_and_draft,
        REQUEST_PAIR: RequestPair(device, bs, bs * (4 * n + 8) * 64, 4 * n + 8 * 64, alloc.page_size),
    }
    for call in calls.values():
        call()
    backend.synchronize(device)
    return calls, (alloc, tree_alloc, calls[REQUEST_PAIR].pool)


def capacity_syncs(pools) -> int:
    """The allocators' capacity syncs so far (``num_syncs``)."""
    return sum(pool.num_syncs for pool in pools)


def summarize(seconds: list[float]) -> tuple[float, float, float]:
    """Median, p20 and p80 of ``seconds`` in µs (``harness.summarize``: quantiles interpolated between the samples,
    so within [min, max] however few there are)."""
    summary = harness.summarize(seconds)
    return summary.median_us, summary.p20_us, summary.p80_us


def round_samples(
    calls: dict[str, object], device: torch.device | None, iters: int, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, one sample (``harness.eager_sample``, ``device`` None: nothing to wait
    for) of ``iters`` back-to-back calls of every call a round: ``warmup`` rounds dropped, then ``repeats`` kept, so
    that each call's samples spread over the whole run. Python's garbage collector is off meanwhile."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with harness.gc_off():
        for r in range(warmup + repeats):
            for name, call in calls.items():
                seconds = harness.eager_sample([call] * iters, device)
                if r >= warmup:
                    samples[name].append(seconds)
    return samples


def paired_ratio(samples: list[float], base: list[float], launches: int = 1) -> float:
    """The median over rounds of ``samples[r] / (launches * base[r])``: a call against the empty launch of the same
    round."""
    if len(samples) != len(base):
        raise ValueError(f"{len(samples)} samples but {len(base)} of the empty launch")
    return float(statistics.median(s / (launches * b) for s, b in zip(samples, base)))


def host_python_times(calls: dict[str, object], args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    """The calls with backend.launch and the calls of backend.Launch and backend.KeptLaunch (prepared and kept
    launches) replaced by no-ops: the wrappers' Python alone, per call, in rounds as the eager table
    (``round_samples``)."""
    real, real_prepared, real_kept = backend.launch, backend.Launch.__call__, backend.KeptLaunch.__call__
    backend.launch = lambda *a, **k: None
    backend.Launch.__call__ = lambda self: None
    backend.KeptLaunch.__call__ = lambda self, tensors: None
    try:
        timed = {name: call for name, call in calls.items() if name != "empty launch"}
        samples = round_samples(timed, None, args.iters, args.repeats, args.warmup)
        return {name: summarize(seconds) for name, seconds in samples.items()}
    finally:
        backend.launch, backend.Launch.__call__, backend.KeptLaunch.__call__ = real, real_prepared, real_kept


def label(name: str) -> str:
    """The row's name in the table of ratios: calls of several launches say how many empty launches they face."""
    launches = LAUNCHES.get(name, 1)
    return f"{name} (vs {launches} launches)" if launches > 1 else name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    env = harness.environment(device)
    interpreted = backend.is_interpreted(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    print("eager_host_time", *harness.format_environment(env), sep="\n")
    print(
        f"bs {args.batch_size}, N {args.window_len}, topk {args.topk}, num_steps {args.num_steps}; samples of "
        f"{args.iters} back-to-back calls, {args.repeats} kept after {args.warmup}"
    )
    calls, pools = make_calls(device, args.batch_size, args.window_len, args.topk, args.num_steps)
    pair_syncs, pair_stream_syncs = calls[REQUEST_PAIR].syncs(10)
    syncs_before = capacity_syncs(pools)  # from here on, only timed calls
    width = max(len(label(name)) for name in calls)
    if interpreted:
        print("\nTriton interpreter: timing the calls would time the interpreter, which says nothing about a device.")
    else:
        samples = round_samples(calls, device, args.iters, args.repeats, args.warmup)
        base = samples["empty launch"]
        print(
            f"\neager host time per call (us), median [p20, p80], and the ratio to the empty launch of the same "
            f"round, median over rounds (target <= {TARGET_RATIO})"
        )
        for name, seconds in samples.items():
            median, p20, p80 = summarize(seconds)
            ratio = paired_ratio(seconds, base, LAUNCHES.get(name, 1))
            verdict = "" if name == "empty launch" else ("PASS" if ratio <= TARGET_RATIO else "FAIL")
            print(f"  {label(name):<{width}} {median:7.2f} [{p20:6.2f}, {p80:6.2f}]  x{ratio:5.2f}  {verdict}")
    print("\nhost Python of the wrappers alone, launch stubbed out (us per call), median [p20, p80]")
    for name, (median, p20, p80) in host_python_times(calls, args).items():
        print(f"  {name:<{width}} {median:7.2f} [{p20:6.2f}, {p80:6.2f}]")
    stream = "not measured off cuda" if pair_stream_syncs is None else f"{pair_stream_syncs:g}"
    syncs = capacity_syncs(pools) - syncs_before
    # Through the interpreter only the second table (launch stubbed) was timed.
    when = "while timing the host Python (launch stubbed)" if interpreted else "while timing (both tables)"
    if syncs == 0:
        room = " (the pools had room for every call)"
    else:
        room = " (some calls synced for capacity: their times include a host-device round trip)"
    print(
        f"\ncapacity syncs of the allocators {when}: {syncs}{room}\n"
        f"{REQUEST_PAIR}, syncs per pair: num_syncs {pair_syncs:g} (capacity syncs), "
        f"stream synchronizations {stream} (torch's sync debug mode).\nEach pair sends 2 host lists to the "
        "device (add_requests: rows and prompt_lens together, copied; free_requests: rows, which on cuda its kernel "
        "reads in place from pinned memory where the device can), without waiting for the stream."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
