"""DraftCacheAllocator beside a prefix cache: requests start from cached pages, finished ones hand pages to the cache,
and the cache gives pages back when it evicts. Pages are conserved whatever the order of calls.

A toy radix cache (a dict from whole-page token prefixes to pages) stands in for SGLang's radix cache.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from conftest import examples
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_allocator import assert_unchanged, check_layout, snapshot

from specdec_ops.allocator import DraftCacheAllocator, OutOfSlotsError


class ToyRadixCache:
    """Whole pages of token prefixes -> the page holding their KV. A page is evictable when no cached prefix
    extends it and no live request reads it."""

    def __init__(self, page_size: int):
        self.p = page_size
        self.pages: dict[tuple[int, ...], int] = {}
        self.readers: Counter[int] = Counter()
        self.lookups = self.hits = 0

    def match(self, tokens: list[int], limit: int) -> list[int]:
        """Pages of the longest cached whole-page prefix of ``tokens[:limit]``."""
        pages = []
        while (len(pages) + 1) * self.p <= limit:
            page = self.pages.get(tuple(tokens[: (len(pages) + 1) * self.p]))
            if page is None:
                break
            pages.append(page)
        self.lookups += limit // self.p
        self.hits += len(pages)
        return pages

    def insert(self, tokens: list[int], kept_slots: list[int]) -> list[int]:
        """Cache the pages of ``kept_slots``; returns the slots of pages that duplicate a cached prefix."""
        duplicates = []
        for k in range(len(kept_slots) // self.p):
            key = tuple(tokens[: (k + 1) * self.p])
            page = kept_slots[k * self.p] // self.p
            cached = self.pages.setdefault(key, page)
            if cached != page:
                duplicates.append(kept_slots[k * self.p])
        return duplicates

    def evictable(self) -> list[tuple[int, ...]]:
        parents = {key[: -self.p] for key in self.pages}
        return sorted(key for key, page in self.pages.items() if key not in parents and not self.readers[page])


SYSTEM_PROMPTS = [[1000 + i for i in range(n)] for n in (9, 20, 33)]


class PrefixCacheMachine(RuleBasedStateMachine):
    """Arrivals that match the cache, draft/verify steps, finishes that insert, evictions when the pool is low."""

    PAGE_SIZE = 4
    NUM_PAGES = 40
    MAX_REQUESTS = 5
    MAX_CONTEXT_LEN = 64

    @initialize()
    def start(self):
        self.alloc = DraftCacheAllocator(
            self.NUM_PAGES * self.PAGE_SIZE,
            self.MAX_REQUESTS,
            self.MAX_CONTEXT_LEN,
            page_size=self.PAGE_SIZE,
            device="cpu",
        )
        self.cache = ToyRadixCache(self.PAGE_SIZE)
        self.tokens: dict[int, list[int]] = {}  # row -> tokens of its committed positions (and its prompt)
        self.committed: dict[int, list[int]] = {}  # row -> slots of its committed positions
        self.prefix: dict[int, list[int]] = {}  # row -> cache pages it reads
        self.next_id = 0

    def new_token(self) -> int:
        self.next_id += 1
        return self.next_id

    def learn(self, row: int) -> None:
        n = int(self.alloc.seq_lens[row])
        slots = self.alloc.req_to_token[row, :n].tolist()
        old = self.committed.get(row, [])
        assert slots[: len(old)] == old, f"row {row}: a committed position moved"
        self.committed[row] = slots

    @rule(system=st.integers(0, len(SYSTEM_PROMPTS) - 1), suffix=st.integers(0, 9))
    def arrive(self, system, suffix):
        if self.alloc.num_requests == self.MAX_REQUESTS:
            return
        tokens = SYSTEM_PROMPTS[system] + [self.new_token() for _ in range(suffix)]
        pages = self.cache.match(tokens, len(tokens))
        p = self.PAGE_SIZE
        need = -(-len(tokens) // p) - len(pages)
        if need > self.alloc.num_free_slots() // p:
            event("arrive: out of slots")
            with pytest.raises(OutOfSlotsError):
                self.alloc.add_requests([len(tokens)])
            return
        width = max(len(pages) * p, 1)
        prefix_slots = torch.zeros(1, width, dtype=torch.int64)
        for k, page in enumerate(pages):
            prefix_slots[0, k * p : (k + 1) * p] = torch.arange(page * p, (page + 1) * p)
        row = self.alloc.add_requests([len(tokens)], prefix_slots=prefix_slots, prefix_lens=[len(pages) * p]).item()
        event(f"arrive: {len(pages)} cached pages")
        self.cache.readers.update(pages)
        self.tokens[row], self.prefix[row] = tokens, pages
        assert self.alloc.req_to_token[row, : len(pages) * p].tolist() == prefix_slots[0, : len(pages) * p].tolist()
        self.learn(row)

    @rule(n=st.integers(1, 6), data=st.data())
    def step(self, n, data):
        rows = sorted(self.tokens)
        if not rows or max(len(self.tokens[r]) for r in rows) + n > self.MAX_CONTEXT_LEN:
            return
        try:
            out, _ = self.alloc.alloc_draft(torch.tensor(rows), n)
        except OutOfSlotsError:
            event("step: out of slots")
            return
        # A draft never writes into a cache page: its slots lie on the request's own pages.
        cache_pages = set(self.alloc.cached_pages())
        assert not {slot // self.PAGE_SIZE for slot in out.tolist()} & cache_pages
        accept = [data.draw(st.integers(0, n), label="accept") for _ in rows]
        self.alloc.commit(torch.tensor(rows), torch.tensor(accept))
        for row, a in zip(rows, accept):
            self.tokens[row] += [self.new_token() for _ in range(a)]
            self.learn(row)

    @rule(data=st.data())
    def finish(self, data):
        if not self.tokens:
            return
        row = data.draw(st.sampled_from(sorted(self.tokens)), label="row")
        seq = len(self.tokens[row])
        keep = data.draw(st.integers(0, seq // self.PAGE_SIZE), label="kept pages") * self.PAGE_SIZE
        kept = self.alloc.free_requests([row], keep_lens=[keep]).tolist()
        assert kept == self.committed[row][:keep]
        self.cache.readers.subtract(self.prefix.pop(row))
        duplicates = self.cache.insert(self.tokens.pop(row), kept)
        del self.committed[row]
        if duplicates:
            event("finish: duplicate pages released")
            self.alloc.release_slots(duplicates)

    @precondition(lambda self: hasattr(self, "cache") and self.cache.pages)
    @rule(data=st.data(), many=st.booleans())
    def evict(self, data, many):
        keys = self.cache.evictable()
        if not keys:
            return
        chosen = keys if many else [data.draw(st.sampled_from(keys), label="key")]
        pages = [self.cache.pages.pop(key) for key in chosen]
        # Each page by one of its slots, or by its full slot list.
        p = self.PAGE_SIZE
        slots = [page * p + (page % p) for page in pages] if many else list(range(pages[0] * p, pages[0] * p + p))
        self.alloc.release_slots(slots)

    @invariant()
    def conserved(self):
        if not hasattr(self, "alloc"):
            return
        owned = check_layout(self.alloc, ask_free_slots=False)
        assert set(owned) == set(self.tokens)
        assert sorted(self.alloc.cached_pages()) == sorted(self.cache.pages.values())
        for row, slots in self.committed.items():
            assert owned[row][: len(slots)] == slots, f"row {row}: a committed position moved"

    def teardown(self):
        if not hasattr(self, "alloc"):
            return
        check_layout(self.alloc)
        self.alloc.free_requests(self.alloc.rows_in_use())
        self.alloc.release_slots([page * self.PAGE_SIZE for page in self.alloc.cached_pages()])
        assert self.alloc.num_free_slots() == self.alloc.num_slots
        assert self.alloc.num_cached_slots() == 0


class PrefixCachePage1(PrefixCacheMachine):
    PAGE_SIZE, NUM_PAGES = 1, 120


class PrefixCachePage16(PrefixCacheMachine):
    PAGE_SIZE, NUM_PAGES, MAX_CONTEXT_LEN = 16, 12, 96


STATEFUL_SETTINGS = settings(
    max_examples=examples(25), stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPrefixCachePage1 = PrefixCachePage1.TestCase
TestPrefixCachePage4 = PrefixCacheMachine.TestCase
TestPrefixCachePage16 = PrefixCachePage16.TestCase
for _case in (TestPrefixCachePage1, TestPrefixCachePage4, TestPrefixCachePage16):
    _case.settings = STATEFUL_SETTINGS
del _case


# ------------------------------------------------------------------------------------------ examples


def cached_allocator():
    """Page size 4; a finished request left pages with slots 4..7 and 8..11 to the cache; row 0 is live and reads
    the first as its prefix, row 1 owns its own pages."""
    alloc = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    first = alloc.add_requests([9])  # pages 1, 2, 3
    alloc.alloc_draft(first, 3)
    alloc.commit(first, torch.tensor([3]))
    kept = alloc.free_requests(first, keep_lens=[8])
    assert kept.tolist() == list(range(4, 12)) and alloc.cached_pages() == [1, 2]
    assert alloc.num_cached_slots() == 8 and alloc.num_free_slots() == 64 - 8
    rows = alloc.add_requests([6, 5], prefix_slots=torch.tensor([[4, 5, 6, 7], [0, 0, 0, 0]]), prefix_lens=[4, 0])
    return alloc, rows


def test_a_request_starts_from_cached_pages_and_drafts_like_any_other():
    alloc, rows = cached_allocator()
    assert alloc.req_to_token[0, :6].tolist() == [4, 5, 6, 7, 16, 17]  # the cache's page, then a new one (page 4)
    assert alloc.prefix_lens.tolist()[:2] == [4, 0]
    out, last = alloc.alloc_draft(rows, 3)
    assert last.tolist()[0] == 17 and out.tolist()[:3] == [18, 19, 28]  # the rest of page 4, then a new page
    alloc.commit(rows, torch.tensor([3, 1]))
    check_layout(alloc)
    assert alloc.free_requests(rows).tolist() == []
    assert alloc.cached_pages() == [1, 2]  # the prefix page stays with the cache
    assert alloc.num_free_slots() == 64 - 8
    check_layout(alloc)
    alloc.release_slots([7, 8, 9, 10, 11])  # page 1 by one slot, page 2 by its full list
    assert alloc.num_free_slots() == 64 and alloc.num_cached_slots() == 0


def test_keeping_pages_reads_back_once_and_keeps_the_bound(monkeypatch):
    """free_requests(keep_lens=) reads the committed lengths and the kept pages' first slots in one read-back, and
    moves the host bound itself (no re-read of the exact usage) while requests stay live."""
    alloc, rows = cached_allocator()
    alloc.alloc_draft(rows, 4)
    alloc.commit(rows, torch.tensor([4, 0]))
    other = alloc.add_requests([3])  # stays live
    finished = rows.tolist()
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    monkeypatch.setattr(alloc, "_read_exact", lambda *a: pytest.fail("free_requests re-read the exact usage"))
    alloc.free_requests(finished, keep_lens=[8, 4])
    assert len(reads) == 1
    # Two committed lengths and the first slot of each newly kept page (row 0's second, row 1's first), no more: not
    # a [rows, longest keep] block of the table.
    assert reads == [torch.Size([4])]
    monkeypatch.undo()
    check_layout(alloc)  # the bound still holds every page not free
    alloc.free_requests(other)
    check_layout(alloc)


def test_kept_pages_past_a_cached_prefix_join_the_cache():
    alloc, rows = cached_allocator()
    alloc.alloc_draft(rows, 4)
    alloc.commit(rows, torch.tensor([4, 0]))
    expected = alloc.req_to_token[0, :8].tolist() + alloc.req_to_token[1, :4].tolist()
    kept = alloc.free_requests(rows, keep_lens=[8, 4])
    assert kept.tolist() == expected
    assert expected[:4] == [4, 5, 6, 7]  # row 0's cached prefix, kept again: still the cache's
    assert alloc.cached_pages() == sorted({1, 2, expected[4] // 4, expected[8] // 4})
    assert alloc.num_free_slots() == 64 - 4 * len(alloc.cached_pages())
    check_layout(alloc)


def test_keeping_only_a_cached_prefix_keeps_the_host_bound_exact():
    """A row that keeps no more than its cache-owned prefix hands the cache no new page: its own page leaves the host
    bound of used pages, which stays exact (the kept pages are read past the prefix only, so the prefix page is not
    counted as newly kept)."""
    alloc, rows = cached_allocator()
    alloc.add_requests([3])  # stays live
    row0, row1 = rows.tolist()
    alloc.free_requests([row0], keep_lens=[4])  # row 0's prefix page (slots 4..7), the cache's already
    bound = alloc._pages_bound
    assert alloc.cached_pages() == [1, 2]
    assert bound == alloc.num_pages - alloc.num_free_slots() // alloc.page_size  # (the read syncs: after the bound)
    check_layout(alloc)


BAD_PREFIX_CALLS = [
    (
        "misaligned",
        lambda a: a.add_requests([6], prefix_slots=torch.tensor([[4, 5]]), prefix_lens=[2]),
        r"prefix_lens\[0\] must be a multiple of page_size = 4 and >= 0, got 2",
    ),
    (
        "longer-than-prompt",
        lambda a: a.add_requests([3], prefix_slots=torch.tensor([[4, 5, 6, 7]]), prefix_lens=[4]),
        r"prefix_lens\[0\] = 4 is longer than prompt_lens\[0\] = 3",
    ),
    (
        "longer-than-slots",
        lambda a: a.add_requests([9], prefix_slots=torch.tensor([[4, 5, 6, 7]]), prefix_lens=[8]),
        r"prefix_lens\[0\] = 8 is longer than prefix_slots' 4 columns",
    ),
    (
        "free-page",
        lambda a: a.add_requests([5], prefix_slots=torch.tensor([[60, 61, 62, 63]]), prefix_lens=[4]),
        r"prefix_slots\[0, 0\] = 60 is on page 15, which the prefix cache does not own",
    ),
    (
        "live-page",
        lambda a: a.add_requests([5], prefix_slots=a.req_to_token[1:2, :4], prefix_lens=[4]),
        r"which the prefix cache does not own",
    ),
    (
        "padding-page",
        lambda a: a.add_requests([5], prefix_slots=torch.tensor([[0, 1, 2, 3]]), prefix_lens=[4]),
        r"prefix_slots\[0, 0\] = 0 is on page 0, which the prefix cache does not own",
    ),
    (
        "not-consecutive",
        lambda a: a.add_requests([5], prefix_slots=torch.tensor([[4, 6, 5, 7]]), prefix_lens=[4]),
        r"prefix_slots\[0, 1\] must be 5 \(slot % page_size == position % page_size",
    ),
    (
        "page-twice",
        lambda a: a.add_requests([9], prefix_slots=torch.tensor([[4, 5, 6, 7, 4, 5, 6, 7]]), prefix_lens=[8]),
        r"prefix_slots\[0, 4\] = 4: page 1 appears twice in the prefix",
    ),
    (
        # The slot checks run on tensors first; a violation is then named slot by slot, in batch and position order.
        "head-misaligned",
        lambda a: a.add_requests([5], prefix_slots=torch.tensor([[5, 6, 7, 8]]), prefix_lens=[4]),
        r"prefix_slots\[0, 0\] must be 4 \(slot % page_size == position % page_size",
    ),
    (
        "second-request",
        lambda a: a.add_requests([5, 5], prefix_slots=torch.tensor([[4, 5, 6, 7], [4, 6, 5, 7]]), prefix_lens=[4, 4]),
        r"prefix_slots\[1, 1\] must be 5",
    ),
    (
        "negative-slot",
        lambda a: a.add_requests([5], prefix_slots=torch.tensor([[-4, -3, -2, -1]]), prefix_lens=[4]),
        r"prefix_slots\[0, 0\] = -4 is on page -1, which the prefix cache does not own",
    ),
    (
        "slots-alone",
        lambda a: a.add_requests([5], prefix_slots=torch.tensor([[4, 5, 6, 7]])),
        "prefix_slots and prefix_lens must be given together",
    ),
    (
        "slots-shape",
        lambda a: a.add_requests([5, 5], prefix_slots=torch.tensor([[4, 5, 6, 7]]), prefix_lens=[4, 4]),
        r"prefix_slots must have shape \[2, P\], got \(1, 4\)",
    ),
    ("release-live", lambda a: a.release_slots(a.req_to_token[1, :1]), r"which the prefix cache does not own"),
    ("release-read", lambda a: a.release_slots([5]), r"page 1, which 1 live request\(s\) still read as their prefix"),
    ("release-padding", lambda a: a.release_slots([0]), r"slots\[0\] = 0 is on page 0, which the prefix cache"),
    (
        "keep-misaligned",
        lambda a: a.free_requests([1], keep_lens=[3]),
        r"keep_lens\[0\] must be a multiple of page_size = 4 and >= 0, got 3",
    ),
    (
        "keep-uncommitted",
        lambda a: a.free_requests([0, 1], keep_lens=[4, 8]),
        r"keep_lens\[1\] must be <= the committed length 5 of row 1, got 8",
    ),
    ("keep-length", lambda a: a.free_requests([0, 1], keep_lens=[4]), "keep_lens has 1 elements but"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in BAD_PREFIX_CALLS], ids=[c[0] for c in BAD_PREFIX_CALLS])
def test_bad_prefix_cache_calls_change_nothing(call, message):
    alloc, _ = cached_allocator()
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=message):
        call(alloc)
    assert_unchanged(alloc, before)


def test_releasing_twice_is_refused():
    alloc, rows = cached_allocator()
    alloc.release_slots([8])
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=r"slots\[0\] = 9 is on page 2, which the prefix cache does not own"):
        alloc.release_slots([9])
    assert_unchanged(alloc, before)


@pytest.mark.gpu
def test_gpu_keeping_pages_synchronizes_once():
    """free_requests(keep_lens=) on CUDA: one synchronization, its read-back of the committed lengths and the kept
    pages; the kept slots are gathered on the device without one."""
    alloc = DraftCacheAllocator(1 << 14, 8, 256, page_size=16, device="cuda")
    rows = alloc.add_requests([40, 70, 33]).tolist()
    alloc.add_requests([5])  # stays live: the bound moves on the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kept = alloc.free_requests(rows, keep_lens=[32, 64, 32])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in caught) == 1
    assert kept.numel() == 128
    check_layout(alloc)
