#!/usr/bin/env python
"""Simulate the draft/verify loop of speculative decoding on a DraftCacheAllocator and check its guarantees.

Requests arrive with random prompt lengths into free rows, every step drafts N tokens for every live request
(``alloc_draft``), verification accepts a random number of them (``commit``), and requests finish at random or
when the next window would not fit their context. When the pool runs dry, the allocator's all-or-nothing
``OutOfSlotsError`` makes the loop preempt the longest request and retry, as an engine's scheduler would. It runs
on the default device (npu, then cuda, then cpu through Triton's interpreter) unless --device says otherwise.

Every --check-every steps, and at the end, the state is checked: each draft's slots against the PyTorch reference,
no slot owned twice, slots inside the pool, SGLang's page layout (slot % page_size == pos % page_size, no page
split), owned positions that never change slot, the free-page stack, and, once every request is freed, the whole
pool back. The summary reports steps, tokens, slot usage, the bookkeeping time per step (alloc_draft + commit,
host wall-clock between synchronizations) and the allocator's single-launch step against the same step built from
the unfused components (reserve_draft, then get_last_loc_and_assign_extend_cache_locs, or get_last_loc and
assign_extend_cache_locs), after checking that all three give the same slots.

Tree mode (--topk > 1): every step first takes the draft model's branch slots (alloc_branches, its partial-page
copies applied), then verifies a tree of N nodes and commits a random path of increasing nodes (commit_tree, its
KV pairs applied). In both modes a simulated KV buffer holds a tag per written slot; every committed position must
read the tag of the token it committed, checked with the other invariants and at the end.

Exit status: 0 when every check passed, 1 otherwise.

Examples:
  python scripts/draft_loop.py                                   # small defaults: seconds on the CPU interpreter
  python scripts/draft_loop.py --batch-size 256 --num-draft-tokens 8 --page-size 64 --steps 5000   # GPU/NPU
  python scripts/draft_loop.py --device cpu --page-size 1 --steps 50 --check-every 1
  python scripts/draft_loop.py --topk 4 --num-steps 5 -n 8 --page-size 64 --steps 100   # EAGLE's default tree
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # run from a checkout: specdec_ops if not installed

import specdec_ops  # noqa: E402
from specdec_ops import DraftCacheAllocator, backend  # noqa: E402
from specdec_ops.allocator import OutOfSlotsError  # noqa: E402
from specdec_ops.reference import get_last_loc_and_assign_extend_cache_locs_torch  # noqa: E402


class InvariantError(AssertionError):
    """A guarantee of the allocator does not hold."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="concurrent requests (rows of req_to_token)")
    parser.add_argument("--num-draft-tokens", "-n", type=int, default=4, help="N, tokens drafted per step")
    parser.add_argument(
        "--topk",
        type=int,
        default=1,
        help="tree mode when > 1 (EAGLE's speculative_eagle_topk): every step takes topk branches of --num-steps "
        "slots (alloc_branches), verifies a tree of N nodes and commits a random path (commit_tree)",
    )
    parser.add_argument(
        "--num-steps",
        type=int,
        default=5,
        help="tree mode: draft depth of each branch (EAGLE's speculative_num_steps; --steps is the loop length)",
    )
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-context-len", type=int, default=512)
    parser.add_argument("--max-prompt-len", type=int, default=128, help="prompt lengths are uniform in [1, this]")
    parser.add_argument(
        "--num-slots",
        type=int,
        default=None,
        help="pool size (rounded down to whole pages); default: a quarter of batch-size * max-context-len, so the pool "
        "fills up and the loop has to preempt",
    )
    parser.add_argument("--finish-prob", type=float, default=0.03, help="chance that a request finishes each step")
    parser.add_argument("--arrival-prob", type=float, default=0.5, help="chance that a free row gets a request")
    parser.add_argument("--device", default=None, help="cpu, cuda, npu (default: the best available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=50, help="full invariant check every this many steps")
    parser.add_argument("--timing-reps", type=int, default=20, help="samples of the fused/unfused comparison")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    for name in ("batch_size", "page_size", "steps", "max_context_len", "max_prompt_len", "check_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_draft_tokens < 0:
        parser.error("--num-draft-tokens must be >= 0")
    if args.topk < 1 or args.num_steps < 1:
        parser.error("--topk and --num-steps must be at least 1")
    if args.max_prompt_len + args.num_draft_tokens > args.max_context_len:
        parser.error("--max-prompt-len + --num-draft-tokens must fit in --max-context-len")
    if args.num_slots is None:
        args.num_slots = args.batch_size * args.max_context_len // 4
    args.num_slots -= args.num_slots % args.page_size
    if args.num_slots < args.page_size * triton.cdiv(args.max_context_len, args.page_size):
        parser.error("--num-slots must hold at least one request of --max-context-len tokens")
    return args


# ------------------------------------------------------------------------------------------------- checks


def check_state(
    alloc: DraftCacheAllocator, request_ids: dict[int, int], previous: dict | None, committed_only: bool = False
) -> dict:
    """Check the guarantees that the device state must keep, vectorised; returns the state for the next check.

    ``request_ids`` maps each row in use to its request, so that a row reused by a new request is not compared
    with its previous owner; ``previous`` is what the last check returned. ``committed_only``: only committed
    positions must keep their slots (a tree commit with page 1 re-points the window's uncommitted ones).
    """
    p = alloc.page_size
    table = alloc.req_to_token.long()
    seq_lens, alloc_lens = alloc.seq_lens, alloc.alloc_lens
    live = torch.zeros(alloc.max_requests, dtype=torch.bool, device=alloc.device)
    live[list(request_ids)] = True
    pos = torch.arange(alloc.max_context_len, device=alloc.device)
    owned = live[:, None] & (pos[None, :] < alloc_lens[:, None])  # [rows, positions]

    def require(ok: torch.Tensor | bool, what: str) -> None:
        if not bool(ok):
            raise InvariantError(what)

    require(((seq_lens <= alloc_lens) | ~live).all(), "seq_len > alloc_len for a live request")
    require((alloc_lens <= alloc.max_context_len).all(), "alloc_len past max_context_len")
    require((table[~owned] == 0).all(), "a position without a slot holds a non-zero entry")
    slots = table[owned]
    require(((slots >= p) & (slots < alloc.total_slots)).all(), "a slot outside the pool")
    require((slots % p == pos.expand_as(table)[owned] % p).all(), "slot % page_size != pos % page_size")
    first = table.gather(1, (pos - pos % p).expand_as(table))
    require((first[owned] // p == slots // p).all(), "a page split between positions of different pages")
    page_starts = owned & (pos[None, :] % p == 0)
    owned_pages = table[page_starts] // p
    free_pages = torch.tensor(alloc.free_page_list(), dtype=torch.int64, device=alloc.device)  # the ring, in order
    held = torch.arange(alloc.branch_pages.size(1), device=alloc.device)[None, :] < alloc.num_branch_pages[:, None]
    branch_pages = alloc.branch_pages[held].long()  # tree mode's branch pages, owned by their rows
    every = torch.cat([owned_pages, free_pages, branch_pages]).sort().values
    expected = torch.arange(1, alloc.num_pages + 1, device=alloc.device)
    require(every.numel() == alloc.num_pages and torch.equal(every, expected), "a page owned twice, or lost")
    require(
        alloc.num_free_slots() == alloc.num_slots - p * (owned_pages.numel() + branch_pages.numel()),
        "num_free_slots() is off",
    )
    if previous is not None:
        for row, request in request_ids.items():
            if previous["request_ids"].get(row) == request:
                n = previous["seq_lens" if committed_only else "alloc_lens"][row]
                require(torch.equal(table[row, :n], previous["table"][row, :n]), f"row {row}: an owned slot moved")
    return {
        "request_ids": dict(request_ids),
        "alloc_lens": alloc_lens.tolist(),
        "seq_lens": seq_lens.tolist(),
        "table": table.clone(),
    }


def check_draft(alloc, rows, starts, n, out_cache_loc, last_loc) -> None:
    ref_out, ref_last = get_last_loc_and_assign_extend_cache_locs_torch(alloc.req_to_token, rows, starts, starts + n)
    if not (torch.equal(out_cache_loc, ref_out) and torch.equal(last_loc, ref_last)):
        raise InvariantError("alloc_draft's out_cache_loc/last_loc differ from the PyTorch reference")


# ------------------------------------------------------------------------------------------------- timing


def timed(fn, device: torch.device) -> float:
    backend.synchronize(device)
    start = time.perf_counter()
    fn()
    backend.synchronize(device)
    return time.perf_counter() - start


def quantiles(seconds: list[float]) -> str:
    if not seconds:
        return "n/a"
    ordered = sorted(seconds)

    def at(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return f"median {statistics.median(ordered) * 1e3:.3f} ms (p20 {at(0.2):.3f}, p80 {at(0.8):.3f})"


def compare_read_back(alloc: DraftCacheAllocator, rows: list[int], n: int, reps: int) -> list[tuple[str, list]]:
    """Time one step's allocation + read-back three ways on the same state (the step is idempotent: the slots
    it needs are already there), after checking that the three agree."""
    device = alloc.device
    bs = len(rows)
    rows_t = torch.tensor(rows, dtype=torch.int64, device=device)
    out = torch.empty(bs * n, dtype=torch.int64, device=device)
    last = torch.empty(bs, dtype=torch.int64, device=device)

    def allocator_step():
        alloc.alloc_draft(rows_t, n, out_cache_loc=out, last_loc=last)

    def fused_op():
        alloc.reserve_draft(rows_t, n)
        start = alloc.seq_lens[rows_t]
        specdec_ops.get_last_loc_and_assign_extend_cache_locs(
            alloc.req_to_token, rows_t, start, start + n, out, last, window_len=n
        )

    def components():
        alloc.reserve_draft(rows_t, n)
        start = alloc.seq_lens[rows_t]
        specdec_ops.get_last_loc(alloc.req_to_token, rows_t, start, last_loc=last)
        specdec_ops.assign_extend_cache_locs(alloc.req_to_token, rows_t, start, start + n, out, window_len=n)

    variants = [
        ("allocator.alloc_draft: 1 launch", allocator_step),
        ("reserve_draft + fused get_last_loc_and_assign_extend_cache_locs", fused_op),
        ("reserve_draft + get_last_loc + assign_extend_cache_locs", components),
    ]
    results = []
    for name, fn in variants:
        out.fill_(-7)
        last.fill_(-7)
        fn()
        got = (out.clone(), last.clone())
        if results and not (torch.equal(got[0], results[0][2][0]) and torch.equal(got[1], results[0][2][1])):
            raise InvariantError(f"{name} gives other slots than the allocator's step")
        samples = []
        for _ in range(reps):
            alloc.refresh()  # repeated identical drafts inflate the host bound; reset it outside the timed region
            samples.append(timed(fn, device))
        results.append((name, samples, got))
    return [(name, samples) for name, samples, _ in results]


# -------------------------------------------------------------------------------------------------- loop


@dataclass
class Stats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    arrived: int = 0
    finished: int = 0
    preempted: int = 0
    refused_arrivals: int = 0
    peak_used_slots: int = 0
    step_seconds: list = field(default_factory=list)
    add_free_seconds: list = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    device = backend.default_device() if args.device is None else torch.device(args.device)
    rng = random.Random(args.seed)
    n, p = args.num_draft_tokens, args.page_size
    alloc = DraftCacheAllocator(args.num_slots, args.batch_size, args.max_context_len, page_size=p, device=device)
    where = "Triton interpreter" if backend.is_interpreted(alloc.device) else "compiled Triton"
    print(f"draft_loop: device {alloc.device} ({where}), torch {torch.__version__}, triton {triton.__version__}")
    print(
        f"  batch {args.batch_size}, N {n}, page {p}, {args.num_slots} slots ({alloc.num_pages} pages), "
        f"max_context_len {args.max_context_len}, prompts 1..{args.max_prompt_len}, {args.steps} steps, "
        f"seed {args.seed}"
    )
    stats = Stats()
    # Host mirrors of the lengths (the host draws the accept lengths, so it knows them without a sync).
    seq: dict[int, int] = {}
    alloc_len: dict[int, int] = {}
    request_ids: dict[int, int] = {}
    next_id = 0
    previous = None
    out = torch.empty(args.batch_size * n, dtype=torch.int64, device=alloc.device)
    last = torch.empty(args.batch_size, dtype=torch.int64, device=alloc.device)
    tree_mode = args.topk > 1
    repoints = tree_mode and p == 1  # commit_tree re-points uncommitted window slots
    kv = KVSimulation(alloc)
    started = last_report = time.perf_counter()

    def free(rows: list[int]) -> None:
        if rows:
            alloc.free_requests(rows)
            for row in rows:
                del seq[row], alloc_len[row], request_ids[row]
                kv.forget(row)

    def used_slots() -> int:
        return p * sum(triton.cdiv(length, p) for length in alloc_len.values())

    def draft(rows: list[int]):
        """alloc_draft for ``rows``, preempting the longest request while the pool cannot hold the windows.

        Returns (rows drafted, their tensor, out_cache_loc, last_loc, seconds), or None once no request is left.
        """
        while rows:
            rows_t = torch.tensor(rows, dtype=torch.int64, device=alloc.device)
            backend.synchronize(alloc.device)
            t0 = time.perf_counter()
            try:
                if tree_mode:
                    _, copy_src, copy_dst = alloc.alloc_branches(rows_t, args.topk, args.num_steps, return_copies=True)
                    kv.apply(copy_src, copy_dst)
                out_cache_loc, last_loc = alloc.alloc_draft(rows_t, n, out_cache_loc=out, last_loc=last[: len(rows)])
            except OutOfSlotsError:  # nothing changed: preempt and retry
                victim = max(rows, key=lambda row: seq[row])
                free([victim])
                stats.preempted += 1
                rows = [row for row in rows if row != victim]
                continue
            backend.synchronize(alloc.device)
            seconds = time.perf_counter() - t0
            for row in rows:
                alloc_len[row] = max(alloc_len[row], seq[row] + n)
            return rows, rows_t, out_cache_loc, last_loc, seconds
        return None

    for step in range(args.steps):
        t0 = time.perf_counter()
        # Finishes: at random, or when the next window would pass the context.
        done = [row for row in seq if rng.random() < args.finish_prob or seq[row] + n > args.max_context_len]
        free(done)
        stats.finished += len(done)
        # Arrivals into free rows, all in one call; if the pool cannot take them, they are refused.
        free_rows = args.batch_size - len(seq)
        prompts = [rng.randint(1, args.max_prompt_len) for _ in range(free_rows) if rng.random() < args.arrival_prob]
        if prompts:
            try:
                new_rows = alloc.add_requests(prompts).tolist()
            except OutOfSlotsError:
                stats.refused_arrivals += len(prompts)
            else:
                for row, length in zip(new_rows, prompts):
                    seq[row], alloc_len[row], request_ids[row] = length, length, next_id
                    next_id += 1
                kv.prompt(new_rows, prompts)
                stats.arrived += len(prompts)
        backend.synchronize(alloc.device)
        stats.add_free_seconds.append(time.perf_counter() - t0)
        check = (step + 1) % args.check_every == 0
        starts = alloc.seq_lens.clone() if check else None
        drafted = draft(sorted(seq))
        if drafted is not None:
            rows, rows_t, out_cache_loc, last_loc, seconds = drafted
            if check:
                check_draft(alloc, rows_t, starts[rows_t], n, out_cache_loc, last_loc)
            tags = kv.verify(out_cache_loc)
            paths = [random_path(rng, n, tree_mode) for _ in rows]
            accepted = [len(path) for path in paths]
            accept_t = torch.tensor(accepted, dtype=torch.int64, device=alloc.device)
            index_t = torch.tensor([path + [0] * (n - len(path)) for path in paths], dtype=torch.int64)
            index_t = index_t.reshape(len(rows), n).to(alloc.device)
            backend.synchronize(alloc.device)
            t0 = time.perf_counter()
            if tree_mode:
                kv_src, kv_dst = alloc.commit_tree(rows_t, index_t, accept_t)
            else:
                alloc.commit(rows_t, accept_t)
            backend.synchronize(alloc.device)
            if tree_mode:
                kv.apply(kv_src, kv_dst)
            kv.accept(rows, tags, n, paths)
            stats.step_seconds.append(seconds + time.perf_counter() - t0)
            for row, a in zip(rows, accepted):
                seq[row] += a
            stats.steps += 1
            stats.drafted += len(rows) * n
            stats.accepted += sum(accepted)
        stats.peak_used_slots = max(stats.peak_used_slots, used_slots())
        if check:
            previous = check_state(alloc, request_ids, previous, repoints)
            check_mirrors(alloc, seq, alloc_len)
            kv.check()
        now = time.perf_counter()
        if not args.quiet and (now - last_report > 2.0 or step + 1 == args.steps):
            last_report = now
            print(
                f"  step {step + 1}/{args.steps}  live {len(seq)}  used slots {used_slots()}/{args.num_slots}  "
                f"accepted {stats.accepted}  preempted {stats.preempted}  {now - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    # Final checks with the requests still live, the fused/unfused comparison on the last batch, then free all.
    previous = check_state(alloc, request_ids, previous, repoints)
    check_mirrors(alloc, seq, alloc_len)
    kv.check()
    live_at_end, used_at_end = len(seq), used_slots()
    # The comparison repeats one step on the same state: draft it once first, so that every repetition finds its
    # slots already there (and the pool cannot run dry in the middle).
    loop_syncs = alloc.num_syncs
    drafted = draft(sorted(seq))
    syncs_before = alloc.num_syncs
    comparison = compare_read_back(alloc, drafted[0], n, args.timing_reps) if drafted else []
    comparison_syncs = alloc.num_syncs - syncs_before
    check_state(alloc, request_ids, previous, repoints)
    check_mirrors(alloc, seq, alloc_len)
    free(sorted(seq))
    check_state(alloc, request_ids, None, repoints)
    if alloc.num_free_slots() != alloc.num_slots or bool(alloc.req_to_token.any()):
        raise InvariantError("freeing every request did not restore the pool")
    elapsed = time.perf_counter() - started

    print(f"steps              {stats.steps} in {elapsed:.1f} s")
    print(
        f"requests           arrived {stats.arrived}, finished {stats.finished}, preempted {stats.preempted}, "
        f"arrivals refused (pool full) {stats.refused_arrivals}, live at the end {live_at_end}"
    )
    rate = stats.accepted / stats.drafted if stats.drafted else 0.0
    print(f"tokens             drafted {stats.drafted}, accepted {stats.accepted} ({rate:.1%})")
    print(
        f"slots              peak {stats.peak_used_slots} of {args.num_slots} "
        f"({stats.peak_used_slots / args.num_slots:.0%}), {used_at_end} at the end"
    )
    print(f"host syncs         {loop_syncs} calls synced because the host bound neared capacity")
    step_calls = "alloc_branches + alloc_draft + commit_tree" if tree_mode else "alloc_draft + commit"
    print(f"bookkeeping/step   {step_calls}: {quantiles(stats.step_seconds)}")
    print(f"                   add_requests + free_requests: {quantiles(stats.add_free_seconds)}")
    if comparison:
        base = statistics.median(comparison[0][1])
        print(
            f"one step's allocation + read-back (bs {len(drafted[0])}, N {n}, {args.timing_reps} samples; "
            f"{comparison_syncs} timed calls synced, the bound being near capacity):"
        )
        for name, samples in comparison:
            ratio = statistics.median(samples) / base if base else float("nan")
            print(f"  {name:<66} {quantiles(samples)}  x{ratio:.2f}")
    print(f"simulated KV       {kv.checked} committed positions read their own token's KV")
    print("invariants         ok")
    return 0


def random_path(rng: random.Random, n: int, tree: bool) -> list[int]:
    """The accepted nodes of a window of n: a prefix for a chain; for a tree, the root then increasing nodes."""
    a = rng.randint(0, n)
    if not tree or a == 0:
        return list(range(a))
    return [0, *sorted(rng.sample(range(1, n), a - 1))]


class KVSimulation:
    """A KV buffer of tags on the device: each written slot gets a fresh tag, and each committed position must read
    the tag of the token committed there."""

    def __init__(self, alloc: DraftCacheAllocator) -> None:
        self.alloc = alloc
        self.kv = torch.full((alloc.total_slots,), -1, dtype=torch.int64, device=alloc.device)
        self.expected: dict[int, list[int]] = {}
        self.next_tag = 1
        self.checked = 0

    def _tags(self, count: int) -> torch.Tensor:
        tags = torch.arange(self.next_tag, self.next_tag + count, device=self.alloc.device)
        self.next_tag += count
        return tags

    def prompt(self, rows: list[int], lens: list[int]) -> None:
        for row, length in zip(rows, lens):
            tags = self._tags(length)
            self.kv[self.alloc.req_to_token[row, :length].long()] = tags
            self.expected[row] = tags.tolist()

    def verify(self, out_cache_loc: torch.Tensor) -> list[int]:
        tags = self._tags(out_cache_loc.numel())
        self.kv[out_cache_loc.long()] = tags
        return tags.tolist()

    def apply(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.kv[dst.long()] = self.kv[src.long()]

    def accept(self, rows: list[int], tags: list[int], n: int, paths: list[list[int]]) -> None:
        for i, (row, path) in enumerate(zip(rows, paths)):
            self.expected[row] += [tags[i * n + node] for node in path]

    def forget(self, row: int) -> None:
        self.expected.pop(row, None)

    def check(self) -> None:
        for row, expected in self.expected.items():
            got = self.kv[self.alloc.req_to_token[row, : len(expected)].long()].tolist()
            if got != expected:
                raise InvariantError(f"row {row}: a committed position reads another token's KV")
            self.checked += len(expected)


def check_mirrors(alloc: DraftCacheAllocator, seq: dict[int, int], alloc_len: dict[int, int]) -> None:
    """The device lengths equal what the host predicted from its own calls."""
    seq_lens, alloc_lens = alloc.seq_lens.tolist(), alloc.alloc_lens.tolist()
    for row in seq:
        if (seq_lens[row], alloc_lens[row]) != (seq[row], alloc_len[row]):
            raise InvariantError(
                f"row {row}: device seq_len/alloc_len {seq_lens[row]}/{alloc_lens[row]}, "
                f"expected {seq[row]}/{alloc_len[row]}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except InvariantError as error:
        print(f"INVARIANT FAILED: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
