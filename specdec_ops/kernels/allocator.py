"""Triton kernels of ``DraftCacheAllocator``: page allocation from a device free-page stack, fused with the read-back.

State (all on the device): ``req_to_token[row, pos]`` is the slot of position ``pos`` of the request in ``row``;
``alloc_lens[row]`` positions ``[0, alloc_len)`` own slots; ``seq_lens[row]`` of them are committed;
``window_lens[row]`` is the open draft window; ``free_pages[0 : num_free_pages[0]]`` is a stack of free pages,
popped from the top. Slots of page ``p`` are ``p * PAGE_SIZE + (0 .. PAGE_SIZE - 1)`` and position ``pos`` of a
request lives at offset ``pos % PAGE_SIZE`` of its page.

Allocation and release are a scan over the batch (each request's pages start after those of the requests before
it) followed by one update of the stack counter, so both kernels run as a single program that walks the tiles of
requests in order and carries the running page count: no program waits for another and nothing races on the
counter. Inside that program, a value that one thread reads and another overwrites (a request's lengths, the
counter) is overwritten only after a ``tl.debug_barrier()``. Lengths, positions and page numbers are int32 (the
host keeps them below 2**31); table addresses are int64. Every access is masked, so rows out of range are skipped
rather than read out of bounds.

Sums, maxima and the scan call ``tl.reduce``/``tl.associative_scan`` with Triton's own combine functions
(``tl.standard._sum_combine``, ``_elementwise_max``), which is what ``tl.sum``, ``tl.max`` and ``tl.cumsum`` lower
to: those wrappers are jitted when Triton is imported, so the interpreter copy of this module that ``backend``
builds could not call them, while the combine functions themselves are recognised by the interpreter and run in
NumPy.
"""

from __future__ import annotations

import triton
import triton.language as tl

_add = tl.standard._sum_combine
_maximum = tl.standard._elementwise_max


# No integer argument is specialised on its value: a new batch size or window never recompiles, and a kernel is
# identified by its tensors' dtypes and alignment and its constexprs alone (see backend.launch).
@triton.jit(do_not_specialize=["bs", "window_len", "num_rows", "max_context_len", "row_stride"])
def _alloc_windows_kernel(
    req_to_token,
    req_pool_indices,
    seq_lens,
    alloc_lens,
    window_lens,
    window_ends,
    free_pages,
    num_free_pages,
    out_cache_loc,
    last_loc,
    bs,
    window_len,
    num_rows,
    max_context_len,
    row_stride,
    PAGE_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFILL: tl.constexpr,
    EMIT: tl.constexpr,
):
    """Give slots to the windows ``[start_i, end_i)``, ``start_i = seq_lens[row_i]``, and optionally read them back.

    ``end_i = start_i + window_len``, or ``window_ends[i]`` with ``PREFILL`` (which then also commits the window:
    ``seq_lens[row_i] = end_i``). Request ``i`` needs ``need_i = pages(max(alloc_i, end_i)) - pages(alloc_i)``
    new pages, ``pages(n) = ceil(n / PAGE_SIZE)``; they are ``free_pages[top - 1 - excl_i - k]`` for
    ``k < need_i``, ``excl_i = sum(need_k for k < i)``. New positions ``pos >= alloc_i`` of the last partial page
    use the page of ``req_to_token[row_i, alloc_i - 1]``, the others their ``(pos // PAGE_SIZE - pages(alloc_i))``-th
    new page. With ``EMIT``: ``out_cache_loc[i * window_len + j] = req_to_token[row_i, start_i + j]`` and
    ``last_loc[i] = req_to_token[row_i, start_i - 1]`` (-1 when ``start_i == 0``), as after the allocation.
    Run with one program.
    """
    top = tl.load(num_free_pages).to(tl.int32)
    popped = tl.full([], 0, dtype=tl.int32)
    num_tiles = (bs + TILE - 1) // TILE
    cols = tl.arange(0, BLOCK_N)
    for tile in range(0, num_tiles):
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        in_batch = offs < bs
        rows = tl.load(req_pool_indices + offs, mask=in_batch, other=0).to(tl.int32)
        valid = in_batch & (rows >= 0) & (rows < num_rows)
        starts = tl.load(seq_lens + rows, mask=valid, other=0).to(tl.int32)
        allocs = tl.load(alloc_lens + rows, mask=valid, other=0).to(tl.int32)
        if PREFILL:
            ends = tl.load(window_ends + offs, mask=valid, other=0).to(tl.int32)
        else:
            ends = starts + window_len
        ends = tl.minimum(tl.maximum(ends, starts), max_context_len)
        new_allocs = tl.maximum(allocs, ends)
        have = (allocs + PAGE_SIZE - 1) // PAGE_SIZE
        need = tl.where(valid, (new_allocs + PAGE_SIZE - 1) // PAGE_SIZE - have, 0)
        excl = popped + tl.associative_scan(need, 0, _add) - need  # [TILE]
        popped += tl.reduce(need, 0, _add)
        row_addr = rows.to(tl.int64) * row_stride  # [TILE]
        # The page of the last partial page, which new positions fill first.
        has_partial = valid & (allocs < have * PAGE_SIZE)
        last_page = tl.load(req_to_token + (row_addr + allocs - 1), mask=has_partial, other=0).to(tl.int32)
        last_page = last_page // PAGE_SIZE
        if EMIT:
            has_prefix = valid & (starts > 0) & (starts <= max_context_len)
            prev = tl.load(req_to_token + (row_addr + starts - 1), mask=has_prefix, other=-1)
            tl.store(last_loc + offs, prev.to(last_loc.dtype.element_ty), mask=in_batch)
        lengths = tl.where(valid, ends - starts, 0)
        if PREFILL:
            num_cols = tl.reduce(lengths, 0, _maximum)
        else:
            num_cols = window_len
        for col0 in range(0, num_cols, BLOCK_N):
            j = col0 + cols  # [BLOCK_N]
            in_window = valid[:, None] & (j[None, :] < lengths[:, None])  # [TILE, BLOCK_N]
            pos = starts[:, None] + j[None, :]
            is_new = in_window & (pos >= allocs[:, None])
            page_no = pos // PAGE_SIZE
            k = page_no - have[:, None]
            stack_idx = top - 1 - excl[:, None] - k
            popped_page = tl.load(free_pages + stack_idx, mask=is_new & (k >= 0) & (stack_idx >= 0), other=0)
            page = tl.where(k >= 0, popped_page.to(tl.int32), last_page[:, None])
            new_slot = page * PAGE_SIZE + (pos - page_no * PAGE_SIZE)
            addr = row_addr[:, None] + pos
            tl.store(req_to_token + addr, new_slot.to(req_to_token.dtype.element_ty), mask=is_new)
            if EMIT:
                # Old positions are read, new ones written: disjoint masks, so no read-after-write in this launch.
                old_slot = tl.load(req_to_token + addr, mask=in_window & (pos < allocs[:, None]), other=-1)
                slot = tl.where(is_new, new_slot, old_slot.to(tl.int32))
                in_out = in_batch[:, None] & (j[None, :] < window_len)
                dst = offs.to(tl.int64)[:, None] * window_len + j[None, :]
                tl.store(out_cache_loc + dst, slot.to(out_cache_loc.dtype.element_ty), mask=in_out)
        # Other threads of this program read these lengths at the top of the tile: let them finish first.
        tl.debug_barrier()
        tl.store(alloc_lens + rows, new_allocs.to(alloc_lens.dtype.element_ty), mask=valid)
        if PREFILL:
            tl.store(seq_lens + rows, ends.to(seq_lens.dtype.element_ty), mask=valid)
            tl.store(window_lens + rows, tl.full([TILE], 0, dtype=window_lens.dtype.element_ty), mask=valid)
        else:
            tl.store(window_lens + rows, lengths.to(window_lens.dtype.element_ty), mask=valid)
    tl.debug_barrier()  # every thread has read the counter
    tl.store(num_free_pages, (top - popped).to(num_free_pages.dtype.element_ty))


@triton.jit(do_not_specialize=["bs", "num_rows", "num_pages", "row_stride"])
def _free_pages_kernel(
    req_to_token,
    req_pool_indices,
    seq_lens,
    alloc_lens,
    window_lens,
    free_pages,
    num_free_pages,
    bs,
    num_rows,
    num_pages,
    row_stride,
    PAGE_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Push every page of the requests back and zero the rows' lengths.

    Request ``i`` owns ``owned_i = pages(alloc_i)`` pages, the ``k``-th one ``req_to_token[row_i, k * PAGE_SIZE]
    // PAGE_SIZE``; it goes to ``free_pages[top + total - 1 - excl_i - k]`` (``excl_i = sum(owned_k for k < i)``,
    ``total = sum(owned)``), so the pops that follow hand the pages out again in batch and position order.
    Run with one program.
    """
    top = tl.load(num_free_pages).to(tl.int32)
    num_tiles = (bs + TILE - 1) // TILE
    total = tl.full([], 0, dtype=tl.int32)
    for tile in range(0, num_tiles):
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        rows = tl.load(req_pool_indices + offs, mask=offs < bs, other=-1).to(tl.int32)
        valid = (offs < bs) & (rows >= 0) & (rows < num_rows)
        allocs = tl.load(alloc_lens + rows, mask=valid, other=0).to(tl.int32)
        total += tl.reduce(tl.where(valid, (allocs + PAGE_SIZE - 1) // PAGE_SIZE, 0), 0, _add)
    tl.debug_barrier()  # the lengths are zeroed below: every thread must have summed them
    pushed = tl.full([], 0, dtype=tl.int32)
    cols = tl.arange(0, BLOCK_P)
    for tile in range(0, num_tiles):
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        rows = tl.load(req_pool_indices + offs, mask=offs < bs, other=-1).to(tl.int32)
        valid = (offs < bs) & (rows >= 0) & (rows < num_rows)
        allocs = tl.load(alloc_lens + rows, mask=valid, other=0).to(tl.int32)
        owned = tl.where(valid, (allocs + PAGE_SIZE - 1) // PAGE_SIZE, 0)
        last = top + total - 1 - pushed - (tl.associative_scan(owned, 0, _add) - owned)  # [TILE]
        pushed += tl.reduce(owned, 0, _add)
        row_addr = rows.to(tl.int64) * row_stride
        for k0 in range(0, tl.reduce(owned, 0, _maximum), BLOCK_P):
            k = k0 + cols  # [BLOCK_P]
            mine = valid[:, None] & (k[None, :] < owned[:, None])  # [TILE, BLOCK_P]
            first_slot = tl.load(req_to_token + (row_addr[:, None] + k[None, :] * PAGE_SIZE), mask=mine, other=0)
            dst = last[:, None] - k[None, :]
            page = first_slot.to(tl.int32) // PAGE_SIZE
            tl.store(free_pages + dst, page.to(free_pages.dtype.element_ty), mask=mine & (dst >= 0) & (dst < num_pages))
        zero = tl.full([TILE], 0, dtype=tl.int32)
        tl.debug_barrier()  # other threads read these lengths at the top of the tile
        tl.store(alloc_lens + rows, zero.to(alloc_lens.dtype.element_ty), mask=valid)
        tl.store(seq_lens + rows, zero.to(seq_lens.dtype.element_ty), mask=valid)
        tl.store(window_lens + rows, zero.to(window_lens.dtype.element_ty), mask=valid)
    tl.debug_barrier()  # every thread has read the counter
    tl.store(num_free_pages, (top + total).to(num_free_pages.dtype.element_ty))


@triton.jit(do_not_specialize=["bs", "num_rows"])
def _commit_kernel(req_pool_indices, accept_lens, seq_lens, window_lens, bs, num_rows, TILE: tl.constexpr):
    """``seq_lens[row_i] += accept_lens[i]``; ``window_lens[row_i] = 0`` (the draft window is closed)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    for tile in range(pid, num_tiles, num_programs):
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        in_batch = offs < bs
        rows = tl.load(req_pool_indices + offs, mask=in_batch, other=0).to(tl.int32)
        valid = in_batch & (rows >= 0) & (rows < num_rows)
        accepted = tl.load(accept_lens + offs, mask=valid, other=0).to(tl.int32)
        seq = tl.load(seq_lens + rows, mask=valid, other=0).to(tl.int32)
        tl.store(seq_lens + rows, (seq + accepted).to(seq_lens.dtype.element_ty), mask=valid)
        tl.store(window_lens + rows, tl.full([TILE], 0, dtype=window_lens.dtype.element_ty), mask=valid)
