"""``DraftCacheAllocator``: owns ``req_to_token`` through the draft/verify loop of speculative decoding.

Slots are reserved ahead of the committed length and reused across steps. The draft window of a step is positions
``[seq_len, seq_len + N)``; verification commits ``seq_len += accepted``; rejected positions keep their slots for
the next window. Slots return to the pool only when a request is freed.

Slot layout (SGLang's paged layout): page 0, slots ``0 .. page_size - 1``, is the padding page and is never
handed out; pages ``1 .. num_slots // page_size`` are the pool, so the KV buffer needs ``num_slots + page_size``
slots (:attr:`DraftCacheAllocator.total_slots`). Position ``pos`` of a request sits at offset ``pos % page_size``
of one of the request's pages; a window first fills the request's last partial page, then takes whole pages from
a device-side free-page stack in a fixed order, so the same calls give the same table on every rank.

Hot path: :meth:`~DraftCacheAllocator.alloc_draft` is one kernel launch (the page scan, the pops from the stack,
the table update and the read-back of ``out_cache_loc`` and ``last_loc``) and :meth:`~DraftCacheAllocator.commit`
one more. Neither reads anything back to the host while a host-side upper bound of the pages in use and of the
longest request says the call cannot fail; only when that bound reaches the capacity does the call sync once, take
exact numbers, and either go on or raise. So a whole step can be captured in a CUDA/NPU graph.

A replayed graph runs no host code, so nothing checks capacity during replays: size the pool and
``max_context_len`` for every step you replay, and call :meth:`~DraftCacheAllocator.refresh` afterwards. Past
capacity the kernels still touch no memory outside the allocator's tensors, but hand out the padding page and
stop windows at ``max_context_len``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Union

import torch

from . import backend
from .checks import INDEX_DTYPES as _INDEX_DTYPES
from .checks import INT32_LIMIT as _INT32_LIMIT
from .checks import check_vector as _check_vector
from .ops import _MAX_BLOCK_N, _block_n

__all__ = [
    "AllocationError",
    "ContextLengthError",
    "DraftCacheAllocator",
    "OutOfRowsError",
    "OutOfSlotsError",
]

# Elements of the [TILE, BLOCK_N] window tile of the allocation kernel: about a dozen such tiles are live at once,
# which must stay well inside Ascend's 192 KB on-chip buffer.
_ALLOC_ELEMENTS = 1024
# [TILE, BLOCK_P] tile of the kernel that returns pages to the stack.
_FREE_TILE = 128
_FREE_BLOCK_P = 16
# Requests per program of the commit kernel.
_COMMIT_TILE = 1024
# CUDA warps per program (ignored by triton-ascend and the interpreter).
_NUM_WARPS = 8

IntVector = Union[torch.Tensor, Sequence[int]]


class AllocationError(RuntimeError):
    """The allocator is out of slots, rows or context length; it is left exactly as before the call."""


class OutOfSlotsError(AllocationError):
    """Not enough free pages for the call."""


class OutOfRowsError(AllocationError):
    """Not enough free rows of ``req_to_token`` for the new requests."""


class ContextLengthError(AllocationError):
    """A request would grow past ``max_context_len``."""


def _check_size(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value < _INT32_LIMIT:
        raise ValueError(f"{name} must be in [{minimum}, 2**31), got {value}")


def _pages(length: int, page_size: int) -> int:
    return -(-length // page_size)


class DraftCacheAllocator:
    """KV-cache slots of up to ``max_requests`` requests of up to ``max_context_len`` tokens, from a pool of
    ``num_slots`` slots in pages of ``page_size``.

    A step is ``alloc_draft(rows, N)`` (one launch), verification, then ``commit(rows, accept_lens)`` (one launch).
    Rows given as tensors are trusted on the hot path: they must be rows in use, without duplicates, and each
    accept length must lie in ``[0, N]`` of the row's last window; ``validate=True`` checks this at the cost of a
    sync. After replaying a captured step, call :meth:`refresh` before the next eager call.

    Attributes (device tensors, read them freely, change them only through the methods):
        req_to_token: ``[max_requests, max_context_len]`` int32, the slot of every position; 0 (padding) where
            a position owns no slot.
        seq_lens: ``[max_requests]`` int64, committed tokens of each row.
        alloc_lens: ``[max_requests]`` int64, positions ``[0, alloc_len)`` own slots; ``alloc_len >= seq_len``.
        window_lens: ``[max_requests]`` int64, the draft window opened by the last :meth:`alloc_draft`, 0 once
            committed (``commit(validate=True)`` checks accept lengths against it).
        free_pages: ``[num_pages]`` int32; ``free_pages[:num_free_pages[0]]`` is the stack of free pages.
        num_free_pages: ``[1]`` int32.
        page_size, num_slots, num_pages, max_requests, max_context_len, device.
        num_syncs: device→host syncs that :meth:`alloc_draft`, :meth:`reserve_draft` and :meth:`add_requests`
            made because the host bound reached the capacity.
    """

    def __init__(
        self,
        num_slots: int,
        max_requests: int,
        max_context_len: int,
        *,
        page_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        _check_size("page_size", page_size, 1)
        _check_size("num_slots", num_slots, 0)
        _check_size("max_requests", max_requests, 1)
        _check_size("max_context_len", max_context_len, 1)
        if num_slots % page_size:
            raise ValueError(f"num_slots must be a multiple of page_size = {page_size}, got {num_slots}")
        if num_slots + page_size >= _INT32_LIMIT:
            raise ValueError(f"num_slots + page_size must be below 2**31 (int32 slots), got {num_slots + page_size}")
        device = backend.default_device() if device is None else torch.device(device)
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0"
        self.page_size = page_size
        self.num_slots = num_slots
        self.num_pages = num_slots // page_size
        self.max_requests = max_requests
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros(max_requests, max_context_len, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(max_requests, dtype=torch.int64, device=self.device)
        self.alloc_lens = torch.zeros(max_requests, dtype=torch.int64, device=self.device)
        self.window_lens = torch.zeros(max_requests, dtype=torch.int64, device=self.device)
        # Popped from the top: page 1 first, then 2, ...
        self.free_pages = torch.arange(self.num_pages, 0, -1, dtype=torch.int32, device=self.device)
        self.num_free_pages = torch.full((1,), self.num_pages, dtype=torch.int32, device=self.device)
        self.num_syncs = 0
        # Host state: free rows (a min-heap, so new requests take the lowest rows), rows in use, and the bounds.
        self._free_rows = list(range(max_requests))
        self._in_use = [False] * max_requests
        self._pages_bound = 0  # >= pages in use
        self._alloc_len_bound = 0  # >= alloc_len of every row in use
        self._min_pages = [0] * max_requests  # <= pages owned by each row in use
        # Since the last exact count (_used_at_sync pages): pages of prompts added less pages surely freed, rows
        # that could be drafted, tokens drafted in all. A row that drafts windows summing to S gains at most
        # ceil(S / page_size) pages (its windows advance by at most what it drafted): a far tighter bound than a
        # page per step when windows are shorter than pages.
        self._used_at_sync = 0
        self._net_pages_since_sync = 0
        self._rows_since_sync = 0
        self._drafted_since_sync = 0

    @property
    def total_slots(self) -> int:
        """Slots the KV buffer needs: the padding page plus the pool."""
        return self.num_slots + self.page_size

    @property
    def num_requests(self) -> int:
        """Rows in use."""
        return self.max_requests - len(self._free_rows)

    def rows_in_use(self) -> list[int]:
        """The rows in use, in increasing order (host state, no sync)."""
        return [row for row, used in enumerate(self._in_use) if used]

    # ----------------------------------------------------------------------------------------------- requests

    def add_requests(self, prompt_lens: IntVector) -> torch.Tensor:
        """Take a free row for each prompt, give slots to its ``prompt_len`` positions and commit them.

        Args:
            prompt_lens: ``[n]`` ints >= 0, a list or an int tensor (on any device; a device tensor is read back).

        Returns:
            ``[n]`` int64 on the allocator's device: the rows (``req_pool_indices``), lowest free rows first.

        Raises:
            OutOfRowsError, ContextLengthError, OutOfSlotsError: nothing changed.
        """
        lens = self._host_ints("prompt_lens", prompt_lens)
        for i, length in enumerate(lens):
            if length < 0:
                raise ValueError(f"prompt_lens[{i}] must be >= 0, got {length}")
        n = len(lens)
        if n > len(self._free_rows):
            raise OutOfRowsError(
                f"add_requests: asked for {n} rows but {len(self._free_rows)} of {self.max_requests} are free"
            )
        too_long = [i for i, length in enumerate(lens) if length > self.max_context_len]
        if too_long:
            i = too_long[0]
            raise ContextLengthError(
                f"add_requests: prompt_lens[{i}] = {lens[i]} is longer than max_context_len = {self.max_context_len}"
            )
        pages = [_pages(length, self.page_size) for length in lens]
        need = sum(pages)
        if self._pages_bound + need > self.num_pages:
            self._sync_bounds()
            free = self.num_pages - self._pages_bound
            if need > free:
                raise OutOfSlotsError(
                    f"add_requests: {n} prompts of {sum(lens)} tokens need {need} pages ({need * self.page_size} "
                    f"slots) but {free} pages ({free * self.page_size} slots) are free"
                )
        rows = [heapq.heappop(self._free_rows) for _ in range(n)]
        rows_t = torch.tensor(rows, dtype=torch.int64, device=self.device)
        if n:
            ends = torch.tensor(lens, dtype=torch.int64, device=self.device)
            self._launch_alloc(rows_t, 0, ends, None, None, prefill=True)
        for row, row_pages in zip(rows, pages):
            self._in_use[row] = True
            self._min_pages[row] = row_pages
        self._pages_bound += need
        self._net_pages_since_sync += need
        self._rows_since_sync += n
        self._alloc_len_bound = max([self._alloc_len_bound, *lens])
        return rows_t

    def free_requests(self, req_pool_indices: IntVector) -> None:
        """Return the requests' pages to the pool and clear their rows (one launch plus a fill of the rows).

        Args:
            req_pool_indices: rows in use, no duplicates; a list or an int tensor (a device tensor is read back).
        """
        rows = self._host_ints("req_pool_indices", req_pool_indices)
        self._check_rows_in_use(rows)
        if not rows:
            return
        rows_t = torch.tensor(rows, dtype=torch.int64, device=self.device)
        backend.launch(
            backend.kernels("allocator", self.device)._free_pages_kernel,
            (1,),
            self.device,
            (
                self.req_to_token,
                rows_t,
                self.seq_lens,
                self.alloc_lens,
                self.window_lens,
                self.free_pages,
                self.num_free_pages,
            ),
            (len(rows), self.max_requests, self.num_pages, self.req_to_token.stride(0)),
            (("PAGE_SIZE", self.page_size), ("TILE", _FREE_TILE), ("BLOCK_P", _FREE_BLOCK_P)),
            _NUM_WARPS,
        )
        self.req_to_token.index_fill_(0, rows_t, 0)
        for row in rows:
            self._in_use[row] = False
            heapq.heappush(self._free_rows, row)
            self._pages_bound -= self._min_pages[row]
            self._net_pages_since_sync -= self._min_pages[row]
            self._min_pages[row] = 0
        if not self.num_requests:
            self._set_exact(0, 0)

    # ------------------------------------------------------------------------------------------------- steps

    def alloc_draft(
        self,
        req_pool_indices: IntVector,
        num_draft_tokens: int,
        *,
        out_cache_loc: torch.Tensor | None = None,
        last_loc: torch.Tensor | None = None,
        validate: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make positions ``[seq_len, seq_len + N)`` of every request own slots and return them, in one launch.

        Args:
            req_pool_indices: ``[bs]`` rows in use, no duplicates: an int32/int64 tensor on the allocator's
                device (a list is copied there, and checked on the host).
            num_draft_tokens: ``N >= 0``.
            out_cache_loc: optional int32/int64 buffer of at least ``bs * N`` elements (keep it for graphs).
            last_loc: optional ``[bs]`` int32/int64 buffer.
            validate: check the rows (in range, in use, no duplicates); one device→host sync.

        Returns:
            ``(out_cache_loc[:bs * N], last_loc)``, int64 unless given: ``out_cache_loc[i * N + j]`` is the slot
            of position ``seq_len_i + j`` of request ``i``, ``last_loc[i]`` the slot of ``seq_len_i - 1``, or -1.

        Raises:
            ContextLengthError, OutOfSlotsError: nothing changed. Only raised after a sync, which happens only
            when the host bound says the call might not fit.
        """
        rows, host_rows, n = self._check_draft(req_pool_indices, num_draft_tokens, validate)
        bs = rows.size(0)
        if out_cache_loc is None:
            out_cache_loc = torch.empty(bs * n, dtype=torch.int64, device=self.device)
        else:
            self._check_buffer("out_cache_loc", out_cache_loc, bs * n, exact=False)
        if last_loc is None:
            last_loc = torch.empty(bs, dtype=torch.int64, device=self.device)
        else:
            self._check_buffer("last_loc", last_loc, bs, exact=True)
        if bs:
            self._ensure_draft_fits(rows, host_rows, n)
            self._launch_alloc(rows, n, None, out_cache_loc, last_loc, prefill=False)
        return out_cache_loc[: bs * n], last_loc

    def reserve_draft(self, req_pool_indices: IntVector, num_draft_tokens: int, *, validate: bool = False) -> None:
        """:meth:`alloc_draft` without the read-back: only make positions ``[seq_len, seq_len + N)`` own slots.

        For callers that read the slots themselves (``get_last_loc_and_assign_extend_cache_locs``).
        """
        rows, host_rows, n = self._check_draft(req_pool_indices, num_draft_tokens, validate)
        if rows.size(0):
            self._ensure_draft_fits(rows, host_rows, n)
            self._launch_alloc(rows, n, None, None, None, prefill=False)

    def commit(self, req_pool_indices: IntVector, accept_lens: IntVector, *, validate: bool = False) -> None:
        """After verification: ``seq_lens[req_pool_indices] += accept_lens`` (one launch, no sync).

        Args:
            req_pool_indices: ``[bs]`` rows in use, no duplicates (as for :meth:`alloc_draft`).
            accept_lens: ``[bs]`` int32/int64 tensor on the device (or a list), each in ``[0, N]`` where ``N`` is
                the row's last draft window; accepted positions keep their slots.
            validate: check rows and that ``0 <= accept_lens <= window_lens[rows]``; one device→host sync.
        """
        rows, host_rows = self._device_rows(req_pool_indices)
        bs = rows.size(0)
        accept, _ = self._device_ints("accept_lens", accept_lens)
        if accept.size(0) != bs:
            raise ValueError(f"accept_lens has {accept.size(0)} elements but req_pool_indices has {bs}")
        if validate and host_rows is None:
            host_rows = rows.tolist()
        if host_rows is not None:
            self._check_rows_in_use(host_rows)
        if validate and bs:
            window = self.window_lens[rows]
            bad = (accept < 0) | (accept > window)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"accept_lens[{i}] must be in [0, {int(window[i])}] (the draft window of row {int(rows[i])}), "
                    f"got {int(accept[i])}"
                )
        if not bs:
            return
        num_tiles = (bs + _COMMIT_TILE - 1) // _COMMIT_TILE
        if backend.prefers_persistent_grid(self.device):
            num_tiles = min(num_tiles, backend.num_cores(self.device))
        backend.launch(
            backend.kernels("allocator", self.device)._commit_kernel,
            (num_tiles,),
            self.device,
            (rows, accept, self.seq_lens, self.window_lens),
            (bs, self.max_requests),
            (("TILE", _COMMIT_TILE),),
            _NUM_WARPS,
        )

    # ------------------------------------------------------------------------------------------------- pool

    def num_free_slots(self) -> int:
        """Free slots of the pool (a multiple of ``page_size``); one device→host sync, which also tightens the
        host bound."""
        self._sync_bounds()
        return (self.num_pages - self._pages_bound) * self.page_size

    def refresh(self) -> None:
        """Re-read the exact usage from the device (one sync).

        Call it after replaying captured steps: a graph replay does not run the host code that keeps the bound,
        so the next eager call would otherwise trust a bound that the replays outgrew.
        """
        self._sync_bounds()

    # ---------------------------------------------------------------------------------------------- internals

    def _sync_bounds(self) -> None:
        """Make the host bounds exact: one device→host copy."""
        live = self.rows_in_use()
        live_t = torch.tensor(live, dtype=torch.int64, device=self.device)
        values = torch.cat([self.num_free_pages.long(), self.alloc_lens[live_t]]).tolist()
        free, allocs = values[0], values[1:]
        self._set_exact(self.num_pages - free, max(allocs, default=0))
        for row, alloc in zip(live, allocs):
            self._min_pages[row] = _pages(alloc, self.page_size)

    def _set_exact(self, used_pages: int, longest: int) -> None:
        """Restart the bounds from exact counts: ``used_pages`` in use, ``longest`` the longest alloc_len."""
        self._pages_bound = self._used_at_sync = used_pages
        self._alloc_len_bound = longest
        self._net_pages_since_sync = self._drafted_since_sync = 0
        self._rows_since_sync = self.num_requests

    def _check_draft(self, req_pool_indices: IntVector, num_draft_tokens: int, validate: bool):
        """Check the arguments of a draft; returns (rows on the device, rows on the host or None, N)."""
        rows, host_rows = self._device_rows(req_pool_indices)
        _check_size("num_draft_tokens", num_draft_tokens, 0)
        if rows.size(0) * num_draft_tokens >= _INT32_LIMIT:
            raise ValueError(f"bs * num_draft_tokens must be below 2**31, got {rows.size(0)} * {num_draft_tokens}")
        if validate and host_rows is None:
            host_rows = rows.tolist()
        if host_rows is not None:
            self._check_rows_in_use(host_rows)
        return rows, host_rows, num_draft_tokens

    def _ensure_draft_fits(self, rows: torch.Tensor, host_rows: list[int] | None, n: int) -> None:
        """Make sure the draft fits (syncing only if the bound says it might not) and update the bounds."""
        bs = rows.size(0)
        worst_pages = bs * _pages(n, self.page_size)
        worst_since_sync = (
            self._used_at_sync
            + self._net_pages_since_sync
            + self._rows_since_sync * _pages(self._drafted_since_sync + n, self.page_size)
        )
        bound = min(self._pages_bound + worst_pages, worst_since_sync)
        if bound <= self.num_pages and self._alloc_len_bound + n <= self.max_context_len:
            self._pages_bound = bound
            self._drafted_since_sync += n
            self._alloc_len_bound += n
            return
        # Near capacity: one sync for the exact numbers, then go on or raise with nothing changed.
        self.num_syncs += 1
        live = self.rows_in_use()
        live_t = torch.tensor(live, dtype=torch.int64, device=self.device)
        # Clamped, so that rows out of range cannot fault before the host has checked them.
        rows64 = rows.long().clamp(0, self.max_requests - 1)
        seqs = self.seq_lens[rows64]
        allocs = self.alloc_lens[rows64]
        ends = seqs + n
        p = self.page_size
        need = ((torch.maximum(allocs, ends) + p - 1) // p - (allocs + p - 1) // p).sum()
        summary = torch.stack([need, ends.max(), ends.argmax(), self.num_free_pages[0].long()])
        values = torch.cat([summary, self.alloc_lens[live_t], rows.long()]).tolist()
        need, longest, i, free = values[:4]
        live_allocs = values[4 : 4 + len(live)]
        if host_rows is None:
            host_rows = values[4 + len(live) :]
            self._check_rows_in_use(host_rows)
        if longest > self.max_context_len:
            raise ContextLengthError(
                f"alloc_draft: request {i} (row {host_rows[i]}) has {longest - n} committed tokens; a window of "
                f"{n} needs {longest} positions but max_context_len is {self.max_context_len}"
            )
        if need > free:
            raise OutOfSlotsError(
                f"alloc_draft: {bs} requests with {n} draft tokens need {need} new pages ({need * p} slots) but "
                f"{free} pages ({free * p} slots) are free"
            )
        self._set_exact(self.num_pages - free, max(live_allocs, default=0))
        self._pages_bound += need
        self._drafted_since_sync = n
        self._alloc_len_bound = max(self._alloc_len_bound, longest)
        for row, alloc in zip(live, live_allocs):
            self._min_pages[row] = _pages(alloc, p)

    def _launch_alloc(
        self,
        rows: torch.Tensor,
        window_len: int,
        window_ends: torch.Tensor | None,
        out_cache_loc: torch.Tensor | None,
        last_loc: torch.Tensor | None,
        *,
        prefill: bool,
    ) -> None:
        emit = out_cache_loc is not None
        block_n = _MAX_BLOCK_N if prefill else _block_n(window_len)
        # Pointers a specialisation does not read get a tensor of the right kind.
        placeholder = self.seq_lens
        backend.launch(
            backend.kernels("allocator", self.device)._alloc_windows_kernel,
            (1,),
            self.device,
            (
                self.req_to_token,
                rows,
                self.seq_lens,
                self.alloc_lens,
                self.window_lens,
                placeholder if window_ends is None else window_ends,
                self.free_pages,
                self.num_free_pages,
                out_cache_loc if emit else placeholder,
                last_loc if emit else placeholder,
            ),
            (rows.size(0), window_len, self.max_requests, self.max_context_len, self.req_to_token.stride(0)),
            (
                ("PAGE_SIZE", self.page_size),
                ("TILE", _ALLOC_ELEMENTS // block_n),
                ("BLOCK_N", block_n),
                ("PREFILL", prefill),
                ("EMIT", emit),
            ),
            _NUM_WARPS,
        )

    def _check_rows_in_use(self, rows: list[int]) -> None:
        seen = set()
        for i, row in enumerate(rows):
            if not 0 <= row < self.max_requests:
                raise ValueError(f"req_pool_indices[{i}] must be in [0, {self.max_requests}), got {row}")
            if not self._in_use[row]:
                raise ValueError(f"req_pool_indices[{i}] = {row} is not a row in use")
            if row in seen:
                raise ValueError(f"req_pool_indices[{i}] = {row} appears twice")
            seen.add(row)

    def _host_ints(self, name: str, values: IntVector) -> list[int]:
        if isinstance(values, torch.Tensor):
            self._check_int_tensor(name, values, check_device=False)
            return values.tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a 1-D int tensor or a sequence of ints, got {type(values).__name__}")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}[{i}] must be an int, got {type(value).__name__}")
        return list(values)

    def _device_ints(self, name: str, values: IntVector) -> tuple[torch.Tensor, list[int] | None]:
        """``values`` as a tensor on the device, and as a host list when they came as one (no sync)."""
        if isinstance(values, torch.Tensor):
            self._check_int_tensor(name, values, check_device=True)
            return values, None
        host = self._host_ints(name, values)
        return torch.tensor(host, dtype=torch.int64, device=self.device), host

    def _device_rows(self, req_pool_indices: IntVector) -> tuple[torch.Tensor, list[int] | None]:
        return self._device_ints("req_pool_indices", req_pool_indices)

    def _check_int_tensor(self, name: str, tensor: torch.Tensor, *, check_device: bool) -> None:
        if check_device:  # the ops' check: 1-D, int32/int64, contiguous, on the device of req_to_token
            _check_vector(name, tensor, self.device, None)
            return
        if tensor.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {tensor.dtype}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")

    def _check_buffer(self, name: str, out: torch.Tensor, length: int, *, exact: bool) -> None:
        self._check_int_tensor(name, out, check_device=True)
        if (out.size(0) != length) if exact else (out.size(0) < length):
            expected = f"{length}" if exact else f"at least {length}"
            raise ValueError(f"{name} must have {expected} elements, got {out.size(0)}")
