#!/usr/bin/env python
"""Simulate the draft/verify loop of speculative decoding on a DraftCacheAllocator and check its guarantees.

Requests arrive with random prompt lengths into free rows, every step drafts N tokens for every live request
(``alloc_draft``), verification accepts a random number of them (``commit``), and requests finish at random or
when the next window would not fit their context. When the pool runs dry, the allocator's all-or-nothing
``OutOfSlotsError`` makes the loop preempt the longest request and retry, as an engine's scheduler would. It runs
on the default device (npu, then cuda, then cpu through Triton's interpreter) unless --device says otherwise.

Every --check-every steps, and at the end, the state is checked: each draft's slots against the PyTorch reference,
no slot owned twice, slots inside the pool, SGLang's page layout (slot % page_size == pos % page_size, no page
split), owned positions that never change slot, the free-page ring, and, once every request is freed, the whole
pool back. The summary reports steps, tokens, slot usage, the bookkeeping time per step (alloc_draft + commit, and
the add_requests and free_requests calls of the step's arrivals, finishes and preemptions, each timed alone, over the
steps that made any: host wall-clock between synchronizations) and the allocator's single-launch step against the
same step built from the unfused components (reserve_draft, then get_last_loc_and_assign_extend_cache_locs, or
get_last_loc and assign_extend_cache_locs), after checking that all three give the same slots.

Tree mode (--topk > 1): every step first takes the draft model's branch slots (alloc_branches, its partial-page
copies applied to the simulated KV outside the timed step), then verifies a tree of N nodes and commits a random
path of increasing nodes (commit_tree, its KV pairs applied). In both modes a simulated KV buffer holds a tag per
written slot; every committed position must read the tag of the token it committed, checked with the other
invariants and at the end.

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
from benchmarks import harness  # noqa: E402
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
    parser.add_argument(
        "--max-prompt-len",
        type=int,
        default=128,
        help="prompt lengths are uniform in [1, this]; with --prefix-sharing a prompt is one of the shared system "
        "prompts (each of a quarter to a half of this, at least 1) and a random suffix, at most this in all",
    )
    parser.add_argument(
        "--num-slots",
        type=int,
        default=None,
        help="pool size (rounded down to whole pages); default: a quarter of batch-size * max-context-len, so the pool "
        "fills up and the loop has to preempt, but at least one request of max-context-len (batch sizes below 4), "
        "plus in tree mode the branches' scratch pages of every request",
    )
    parser.add_argument("--finish-prob", type=float, default=0.03, help="chance that a request finishes each step")
    parser.add_argument("--arrival-prob", type=float, default=0.5, help="chance that a free row gets a request")
    parser.add_argument("--device", default=None, help="cpu, cuda, npu (default: the best available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=50, help="full invariant check every this many steps")
    parser.add_argument("--timing-reps", type=int, default=20, help="samples of the fused/unfused comparison")
    parser.add_argument(
        "--prefix-sharing",
        action="store_true",
        help="requests start with one of a few shared system prompts; a small prefix cache (whole pages of token "
        "prefixes) gives arrivals the pages it holds, takes finished requests' pages and evicts when the pool runs "
        "low; reports the cache's hit rate and pool use",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    positive = ("batch_size", "page_size", "steps", "max_context_len", "max_prompt_len", "check_every", "timing_reps")
    # (and args.device resolved: cuda:1 made the current device, so that the timing's synchronizations wait for it)
    harness.check_options(
        parser, args, {**dict.fromkeys(positive, 1), "num_draft_tokens": 0, "topk": 1, "num_steps": 1}
    )
    if args.max_prompt_len + args.num_draft_tokens > args.max_context_len:
        parser.error("--max-prompt-len + --num-draft-tokens must fit in --max-context-len")
    if args.num_slots is None:
        one_request = args.page_size * triton.cdiv(args.max_context_len, args.page_size)
        args.num_slots = max(args.batch_size * args.max_context_len // 4, one_request)
        if args.topk > 1:  # and the branches' scratch: each branch has pages of its own
            per_branch = triton.cdiv(args.page_size - 1 + args.num_steps, args.page_size) * args.page_size
            args.num_slots += args.batch_size * args.topk * per_branch
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
    table = alloc.req_to_token.long()
    seq_lens, alloc_lens = alloc.seq_lens, alloc.alloc_lens
    live = torch.zeros(alloc.max_requests, dtype=torch.bool, device=alloc.device)
    live[list(request_ids)] = True
    if not bool(((seq_lens <= alloc_lens) | ~live).all()):
        raise InvariantError("seq_len > alloc_len for a live request")
    if sorted(request_ids) != alloc.rows_in_use():
        raise InvariantError("the allocator's rows in use are not the loop's requests")
    try:  # every page free, a live row's, a branch page or the cache's, exactly once; slots within their pages
        harness.check_pool(alloc)
    except harness.PoolMismatch as error:
        raise InvariantError(str(error)) from None

    if previous is not None:
        for row, request in request_ids.items():
            if previous["request_ids"].get(row) == request:
                n = previous["seq_lens" if committed_only else "alloc_lens"][row]
                if not torch.equal(table[row, :n], previous["table"][row, :n]):
                    raise InvariantError(f"row {row}: an owned slot moved")
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


class PrefixCache:
    """A toy radix cache: whole pages of token prefixes -> the page that holds their KV, with reader counts.

    Arrivals match their longest cached whole-page prefix; finished requests insert their committed pages
    (``free_requests(keep_lens=)``); a page that duplicates a cached prefix goes straight back to the pool, and
    leaves no live request reads are evicted (``release_slots``) when the pool runs low.
    """

    def __init__(self, alloc: DraftCacheAllocator, rng: random.Random, num_prompts: int, max_len: int) -> None:
        self.alloc, self.p = alloc, alloc.page_size
        self.pages: dict[tuple[int, ...], int] = {}
        self.readers: dict[int, int] = {}
        self.last_use: dict[tuple[int, ...], int] = {}
        self.clock = 0
        lengths = [rng.randint(max(1, max_len // 4), max_len) for _ in range(num_prompts)]
        self.system_prompts = [[10**6 * (i + 1) + j for j in range(n)] for i, n in enumerate(lengths)]
        self.prompt_tokens = self.hit_tokens = self.evicted_pages = 0

    def match(self, tokens: list[int]) -> list[int]:
        pages: list[int] = []
        self.clock += 1
        while (len(pages) + 1) * self.p <= len(tokens):
            key = tuple(tokens[: (len(pages) + 1) * self.p])
            if key not in self.pages:
                break
            pages.append(self.pages[key])
            self.last_use[key] = self.clock
        return pages

    def count(self, tokens: list[int], pages: list[int]) -> None:
        """A prompt of ``tokens`` arrived, with ``pages`` of it cached (``match``): the hit rate counts arrivals only,
        not prompts refused for lack of room."""
        self.prompt_tokens += len(tokens)
        self.hit_tokens += len(pages) * self.p

    def lock(self, pages: list[int], delta: int) -> None:
        for page in pages:
            self.readers[page] = self.readers.get(page, 0) + delta

    def insert(self, tokens: list[int], kept_slots: list[int]) -> None:
        duplicates = []
        for k in range(len(kept_slots) // self.p):
            key = tuple(tokens[: (k + 1) * self.p])
            page = kept_slots[k * self.p] // self.p
            if self.pages.setdefault(key, page) != page:
                duplicates.append(kept_slots[k * self.p])
            self.last_use[key] = self.clock
        if duplicates:
            self.alloc.release_slots(duplicates)

    def evict(self, pages_wanted: int) -> None:
        """Release least recently used leaves that no live request reads until ``pages_wanted`` pages are free."""
        while self.alloc.num_free_slots() // self.p < pages_wanted:
            parents = {key[: -self.p] for key in self.pages}
            leaves = [k for k, page in self.pages.items() if k not in parents and not self.readers.get(page)]
            if not leaves:
                return
            leaves.sort(key=self.last_use.__getitem__)
            batch = leaves[: max(1, len(leaves) // 4)]
            self.alloc.release_slots([self.pages.pop(key) * self.p for key in batch])
            for key in batch:
                del self.last_use[key]
            self.evicted_pages += len(batch)


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
    device = args.device
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
    previous = None
    out = torch.empty(args.batch_size * n, dtype=torch.int64, device=alloc.device)
    last = torch.empty(args.batch_size, dtype=torch.int64, device=alloc.device)
    # With --prefix-sharing: each row's tokens (prompt, then accepted drafts) and the cache pages it reads.
    cache = PrefixCache(alloc, rng, 4, max(1, args.max_prompt_len // 2)) if args.prefix_sharing else None
    tokens: dict[int, list[int]] = {}
    prefix_pages: dict[int, list[int]] = {}
    peak_cached = 0
    tree_mode = args.topk > 1
    repoints = tree_mode and p == 1  # commit_tree re-points uncommitted window slots
    kv = KVSimulation(alloc)
    started = last_report = time.perf_counter()

    def free(rows: list[int]) -> None:
        if not rows:
            return
        if cache is None:
            request_seconds[0] += timed(lambda: alloc.free_requests(rows), alloc.device)
            request_calls[0] += 1
        else:  # committed whole pages go to the cache
            keep = [seq[row] // p * p for row in rows]
            kept_t = []
            request_seconds[0] += timed(lambda: kept_t.append(alloc.free_requests(rows, keep_lens=keep)), alloc.device)
            request_calls[0] += 1
            kept = kept_t[0].tolist()
            offset = 0
            for row, length in zip(rows, keep):
                cache.lock(prefix_pages.pop(row), -1)
                cache.insert(tokens.pop(row)[:length], kept[offset : offset + length])
                offset += length
        for row in rows:
            del seq[row], alloc_len[row], request_ids[row]
            kv.forget(row)

    def arrive(count: int) -> None:
        prompts = [rng.randint(1, args.max_prompt_len) for _ in range(count) if rng.random() < args.arrival_prob]
        if not prompts:
            return
        kwargs = {}
        if cache is not None:
            texts = []
            for i in range(len(prompts)):
                system = rng.choice(cache.system_prompts)
                room = args.max_prompt_len - len(system)  # (>= 0: a system prompt is at most max(1, half) of it)
                texts.append(system + [rng.randrange(10**6) for _ in range(rng.randint(min(1, room), room))])
                prompts[i] = len(texts[-1])
            matched = [cache.match(text) for text in texts]
            for pages in matched:  # read from now on: eviction must not take them
                cache.lock(pages, +1)
            width = max(1, p * max(len(pages) for pages in matched))
            slots = torch.zeros(len(prompts), width, dtype=torch.int64)
            for i, pages in enumerate(matched):
                for k, page in enumerate(pages):
                    slots[i, k * p : (k + 1) * p] = torch.arange(page * p, (page + 1) * p)
            kwargs = {"prefix_slots": slots, "prefix_lens": [len(pages) * p for pages in matched]}
            # Make room: the new pages of the prompts and a window for every request.
            need = sum(triton.cdiv(length, p) - len(pages) for length, pages in zip(prompts, matched))
            cache.evict(need + (len(seq) + len(prompts)) * triton.cdiv(n + p, p))
        added = []
        try:
            request_seconds[0] += timed(lambda: added.append(alloc.add_requests(prompts, **kwargs)), alloc.device)
            request_calls[0] += 1
            new_rows = added[0].tolist()
        except OutOfSlotsError:
            stats.refused_arrivals += len(prompts)
            if cache is not None:
                for pages in matched:
                    cache.lock(pages, -1)
            return
        for i, (row, length) in enumerate(zip(new_rows, prompts)):
            seq[row], alloc_len[row], request_ids[row] = length, length, stats.arrived + i
            if cache is not None:
                tokens[row], prefix_pages[row] = texts[i], matched[i]
                cache.count(texts[i], matched[i])
        kv.prompt(new_rows, prompts, kwargs.get("prefix_lens"))
        stats.arrived += len(prompts)

    def used_slots() -> int:
        """Slots that live requests own (pages they read from the prefix cache not counted)."""
        return p * sum(triton.cdiv(length, p) - len(prefix_pages.get(row, ())) for row, length in alloc_len.items())

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
                out_cache_loc, last_loc = alloc.alloc_draft(rows_t, n, out_cache_loc=out, last_loc=last[: len(rows)])
            except OutOfSlotsError:  # nothing changed: evict from the cache, else preempt, and retry
                if cache is not None:
                    evicted = cache.evicted_pages
                    cache.evict(len(rows) * triton.cdiv(n + p, p))
                    if cache.evicted_pages > evicted:
                        continue
                victim = max(rows, key=lambda row: seq[row])
                free([victim])
                stats.preempted += 1
                rows = [row for row in rows if row != victim]
                continue
            backend.synchronize(alloc.device)
            seconds = time.perf_counter() - t0
            if tree_mode:  # the simulated KV copy of the branches' partial pages: not the allocator's, not timed
                kv.apply(copy_src, copy_dst)
            for row in rows:
                alloc_len[row] = max(alloc_len[row], seq[row] + n)
            return rows, rows_t, out_cache_loc, last_loc, seconds
        return None

    # Seconds this step spent in add_requests and free_requests themselves (each timed alone, device work included;
    # the toy prefix cache and the KV simulation around them are not).
    # Preemptions' free_requests count too; steps that made no such call are left out of the figures.
    request_seconds, request_calls = [0.0], [0]
    for step in range(args.steps):
        request_seconds[0], request_calls[0] = 0.0, 0
        # Finishes: at random, or when the next window would pass the context.
        done = [row for row in seq if rng.random() < args.finish_prob or seq[row] + n > args.max_context_len]
        free(done)
        stats.finished += len(done)
        # Arrivals into free rows, all in one call; if the pool cannot take them, they are refused.
        arrive(args.batch_size - len(seq))
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
                if cache is not None:
                    tokens[row] += [rng.randrange(10**6) for _ in range(a)]
            stats.steps += 1
            stats.drafted += len(rows) * n
            stats.accepted += sum(accepted)
        if request_calls[0]:
            stats.add_free_seconds.append(request_seconds[0])
        stats.peak_used_slots = max(stats.peak_used_slots, used_slots())
        if cache is not None:
            peak_cached = max(peak_cached, alloc.num_cached_slots())
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
    cached_at_end = alloc.num_cached_slots()
    if cache is not None:
        cache.evict(alloc.num_pages)  # nothing reads the cache any more: all of it goes
    if alloc.num_free_slots() != alloc.num_slots or bool(alloc.req_to_token.any()):
        raise InvariantError("freeing every request and evicting the cache did not restore the pool")
    elapsed = time.perf_counter() - started

    print(f"steps              {stats.steps} in {elapsed:.1f} s")
    print(
        f"requests           arrived {stats.arrived}, finished {stats.finished}, preempted {stats.preempted}, "
        f"arrivals refused (pool full) {stats.refused_arrivals}, live at the end {live_at_end}"
    )
    rate = stats.accepted / stats.drafted if stats.drafted else 0.0
    print(f"tokens             drafted {stats.drafted}, accepted {stats.accepted} ({rate:.1%})")
    print(
        f"slots              owned by live requests: peak {stats.peak_used_slots} of {args.num_slots} "
        f"({stats.peak_used_slots / args.num_slots:.0%}), {used_at_end} at the end"
    )
    if cache is not None:
        hit = cache.hit_tokens / cache.prompt_tokens if cache.prompt_tokens else 0.0
        print(
            f"prefix cache       hit rate {hit:.1%} of prompt tokens ({cache.hit_tokens} of {cache.prompt_tokens}), "
            f"cached slots peak {peak_cached} during the loop ({peak_cached / args.num_slots:.0%} of the pool), "
            f"{cached_at_end} after the last requests finished; {cache.evicted_pages} pages evicted"
        )
    print(f"host syncs         {loop_syncs} calls synced because the host bound neared capacity")
    # In Triton's interpreter a launch costs milliseconds of NumPy: its timings say nothing about device speed,
    # and differences between variants are mostly noise, so they are labelled as such and not compared.
    interpreted = backend.is_interpreted(alloc.device)
    label = "interpreter wall-clock, not device speed: " if interpreted else ""
    step_calls = "alloc_branches + alloc_draft + commit_tree" if tree_mode else "alloc_draft + commit"
    print(f"bookkeeping/step   {label}{step_calls}: {quantiles(stats.step_seconds)}")
    print(
        f"                   {label}add_requests + free_requests (the calls alone, preemptions' included; per step "
        f"that made any, {len(stats.add_free_seconds)} of {args.steps} steps): {quantiles(stats.add_free_seconds)}"
    )
    if comparison:
        base = statistics.median(comparison[0][1])
        print(
            f"one step's allocation + read-back (bs {len(drafted[0])}, N {n}, {args.timing_reps} samples; "
            f"{comparison_syncs} timed calls synced, the bound being near capacity)"
            + (": Triton interpreter wall-clock, no ratios (they say nothing about a device):" if interpreted else ":")
        )
        for name, samples in comparison:
            ratio = statistics.median(samples) / base if base else float("nan")
            print(f"  {name:<66} {quantiles(samples)}" + ("" if interpreted else f"  x{ratio:.2f}"))
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

    def prompt(self, rows: list[int], lens: list[int], prefix_lens: list[int] | None = None) -> None:
        """The prefill writes the prompts' KV; positions ``[0, prefix_len)`` read the prefix cache's KV as it is."""
        for i, (row, length) in enumerate(zip(rows, lens)):
            cached = prefix_lens[i] if prefix_lens else 0
            slots = self.alloc.req_to_token[row, :length].long()
            tags = self._tags(length - cached)
            self.kv[slots[cached:]] = tags
            self.expected[row] = self.kv[slots[:cached]].tolist() + tags.tolist()

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
