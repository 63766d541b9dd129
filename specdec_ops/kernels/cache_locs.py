"""Triton kernels that read the KV-cache slots of one speculative-decoding step out of ``req_to_token``.

Every kernel walks tiles of ``TILE`` requests with a persistent loop
(``for tile in range(pid, num_tiles, num_programs)``): with ``grid = num_tiles`` each program takes one
tile, with ``grid = number of cores`` (Ascend) each program takes several. Programs never wait for one
another; a program that needs the token count of earlier requests sums their window lengths itself, or, in the
second of two launches (``..._from_sums_kernel``, ragged windows of large batches), the per-tile sums that the first
launch (``_window_tile_sums_kernel``) left.

With ``PDL`` (CUDA, compute capability 9.0 and up: ``backend.supports_pdl``) a kernel is launched as a programmatic
dependent of the kernel before it in the stream and waits for that one to end before it reads anything: its launch
overlaps the end of that one (``kernels/pdl.py``). With ``PDL`` 2 it then lets the next kernel start, which waits in
turn (the host asks for that up to 4096 requests: ``ops._NEXT_EARLY_MAX_BATCH``); the first of two launches always
does.

Lengths, positions and output offsets are int32 (Ascend's vector units are int32 machines; the host
wrapper guarantees every output offset fits). Only table addresses (``row * row_stride``) are int64.
Every load is masked against the bounds of its tensor and every store against the output's size, so
bad index values give wrong numbers, never an access outside a tensor.

Sums, maxima and the scan call ``tl.reduce``/``tl.associative_scan`` with Triton's own combine
functions (``tl.standard._sum_combine``, ``_elementwise_max``): that is exactly what ``tl.sum``,
``tl.max`` and ``tl.cumsum`` lower to, but those wrappers are jitted when Triton is imported, so the CPU
copy of this module that ``backend`` builds in interpreter mode could not call them. Passing the combine
functions themselves also lets the interpreter recognise them and reduce with NumPy.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import pdl

_add = tl.standard._sum_combine
_maximum = tl.standard._elementwise_max
_pdl_start = pdl.start


@triton.jit
def _store_last_loc(req_to_token, rows, prefix_lens, last_loc, offs, in_batch, num_rows, max_context_len, row_stride):
    """``last_loc[offs] = req_to_token[rows, prefix_lens - 1]`` where ``prefix_lens > 0``, else -1."""
    row_ok = (rows >= 0) & (rows < num_rows)
    has_prefix = in_batch & row_ok & (prefix_lens > 0) & (prefix_lens <= max_context_len)
    addr = rows.to(tl.int64) * row_stride + (prefix_lens - 1)
    slot = tl.load(req_to_token + addr, mask=has_prefix, other=-1)  # [TILE]
    tl.store(last_loc + offs, slot.to(last_loc.dtype.element_ty), mask=in_batch)


@triton.jit
def _load_window_block(
    req_to_token, rows, starts, lengths, in_batch, col0, num_rows, max_context_len, row_stride, BLOCK_N: tl.constexpr
):
    """``req_to_token[rows[i], starts[i] + col0 + j]`` for ``j < BLOCK_N`` inside the window, else -1."""
    row_ok = (rows >= 0) & (rows < num_rows)
    j = col0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    in_window = in_batch[:, None] & (j[None, :] < lengths[:, None])  # [TILE, BLOCK_N]
    pos = starts[:, None] + j[None, :]
    readable = in_window & row_ok[:, None] & (pos >= 0) & (pos < max_context_len)
    return tl.load(req_to_token + (rows.to(tl.int64)[:, None] * row_stride + pos), mask=readable, other=-1)


@triton.jit
def _store_window_block(slot, lengths, dst_base, out_cache_loc, in_batch, col0, num_tokens, BLOCK_N: tl.constexpr):
    """``out_cache_loc[dst_base[i] + col0 + j] = slot[i, j]`` for ``j < BLOCK_N`` inside the window."""
    j = col0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    in_window = in_batch[:, None] & (j[None, :] < lengths[:, None])  # [TILE, BLOCK_N]
    dst = dst_base[:, None] + j[None, :]
    writable = in_window & (dst >= 0) & (dst < num_tokens)
    tl.store(out_cache_loc + dst, slot.to(out_cache_loc.dtype.element_ty), mask=writable)


@triton.jit
def _store_windows(
    req_to_token,
    rows,
    starts,
    lengths,
    dst_base,
    out_cache_loc,
    in_batch,
    first_col,
    num_cols,
    num_rows,
    max_context_len,
    row_stride,
    num_tokens,
    BLOCK_N: tl.constexpr,
):
    """``out_cache_loc[dst_base[i] + j] = req_to_token[rows[i], starts[i] + j]`` for ``first_col <= j < lengths[i]``
    (``j < num_cols``)."""
    for col0 in range(first_col, num_cols, BLOCK_N):
        slot = _load_window_block(
            req_to_token, rows, starts, lengths, in_batch, col0, num_rows, max_context_len, row_stride, BLOCK_N
        )
        _store_window_block(slot, lengths, dst_base, out_cache_loc, in_batch, col0, num_tokens, BLOCK_N)


@triton.jit
def _add_window_block(acc, start_offset, end_offset, lo, hi, SCAN_BLOCK: tl.constexpr):
    """``acc`` plus ``max(end_offset[k] - start_offset[k], 0)`` for ``k`` in ``[lo, min(lo + SCAN_BLOCK, hi))``,
    spread over its lanes."""
    k = lo + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
    mask = k < hi
    starts = tl.load(start_offset + k, mask=mask, other=0).to(tl.int32)
    ends = tl.load(end_offset + k, mask=mask, other=0).to(tl.int32)
    return acc + tl.maximum(ends - starts, 0)


@triton.jit
def _add_window_lengths(acc, start_offset, end_offset, lo, hi, SCAN_BLOCK: tl.constexpr):
    """``acc`` plus ``max(end_offset[k] - start_offset[k], 0)`` for ``k`` in ``[lo, hi)``, spread over its lanes."""
    for k0 in range(lo, hi, SCAN_BLOCK):
        acc = _add_window_block(acc, start_offset, end_offset, k0, hi, SCAN_BLOCK)
    return acc


@triton.jit
def _cache_locs_program(
    req_to_token,
    req_pool_indices,
    start_offset,
    end_offset,
    out_cache_loc,
    last_loc,
    tile_sums,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    num_tokens,
    window_len,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    UNIFORM: tl.constexpr,
    PREFETCH: tl.constexpr,
    EARLY_SUM: tl.constexpr,
    WITH_LAST_LOC: tl.constexpr,
    SUMS: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program of the window gather, optionally fused with ``last_loc``.

    ``len_i = max(end_i - start_i, 0)`` (``window_len`` for every request when ``UNIFORM``),
    ``excl_i = sum(len_k for k < i)`` (``i * window_len`` when ``UNIFORM``),
    ``out_cache_loc[excl_i + j] = req_to_token[row_i, start_i + j]`` for ``j < len_i``, and with
    ``WITH_LAST_LOC`` also ``last_loc[i] = req_to_token[row_i, start_i - 1]`` or -1 when ``start_i == 0``.
    With ``SUMS`` (ragged windows) this is the second launch of two: ``_window_tile_sums_kernel`` left the window
    lengths of each tile of ``TILE`` requests summed at ``tile_sums[t]``, and ``excl_i`` adds those of the tiles before
    request ``i``'s instead of every earlier request's lengths.
    """
    if PDL:
        _pdl_start(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    # Window lengths of requests [0, scanned) (SUMS: of the tiles [0, scanned)), summed lane-wise: carried from one
    # tile of this program to its next. The carry is a vector reduced afresh for each tile: a scalar accumulator of
    # reduce results that is also read inside the loop is miscompiled by some Triton versions (3.6 was seen to drop
    # every tile after a program's first).
    lane_sums = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
    scanned = tl.full([], 0, dtype=tl.int32)
    for tile in range(pid, num_tiles, num_programs):
        tile_start = tile * TILE
        offs = tile_start + tl.arange(0, TILE)  # [TILE]
        in_batch = offs < bs
        rows = tl.load(req_pool_indices + offs, mask=in_batch, other=0).to(tl.int32)
        starts = tl.load(start_offset + offs, mask=in_batch, other=0).to(tl.int32)
        if WITH_LAST_LOC:
            _store_last_loc(req_to_token, rows, starts, last_loc, offs, in_batch, num_rows, max_context_len, row_stride)
        if UNIFORM:
            # Not tl.where(in_batch, window_len, 0): a tl.where on in_batch that feeds the 2-D mask crashes
            # triton-ascend 3.2's triton-adapter-opt (docs/design.md). in_batch masks the gather anyway.
            lengths = tl.full([TILE], 0, tl.int32) + window_len
            dst_base = offs * window_len
            num_cols = window_len
            first_col = 0
        else:
            ends = tl.load(end_offset + offs, mask=in_batch, other=0).to(tl.int32)
            lengths = tl.maximum(ends - starts, 0)
            sums_from = scanned
            if EARLY_SUM:
                # The first block of earlier windows is read here, with the tile's own offsets and before anything
                # waits on those: both sets of loads are then in flight together. Inside the loop below, behind the
                # first column block's loads (which wait for the offsets), it cost a round trip of its own.
                lane_sums = _add_window_block(lane_sums, start_offset, end_offset, scanned, tile_start, SCAN_BLOCK)
                sums_from = scanned + SCAN_BLOCK
            if PREFETCH:
                # The first column block is read before the windows of earlier requests are summed: its loads do
                # not depend on the sum, so their latencies overlap (most windows fit in that one block). It pays
                # where the sum is short; over long sums the block held in registers costs more than it hides.
                slot = _load_window_block(
                    req_to_token, rows, starts, lengths, in_batch, 0, num_rows, max_context_len, row_stride, BLOCK_N
                )
            if SUMS:  # the first launch's sums of the tiles before this one, SCAN_BLOCK of them a step
                for t0 in range(scanned, tile, SCAN_BLOCK):
                    t = t0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
                    lane_sums += tl.load(tile_sums + t, mask=t < tile, other=0)
                scanned = tile
            else:
                lane_sums = _add_window_lengths(lane_sums, start_offset, end_offset, sums_from, tile_start, SCAN_BLOCK)
                scanned = tile_start
            # The first tile has nothing before it: skip the [SCAN_BLOCK] reduce (all of a small batch's work).
            earlier = tl.full([], 0, dtype=tl.int32)
            if tile_start > 0:
                earlier = tl.reduce(lane_sums, 0, _add)
            dst_base = earlier + tl.associative_scan(lengths, 0, _add) - lengths
            # No column past what is left of out_cache_loc after the tile's first window starts: with garbage
            # lengths (validate=False) the tiles past the output loop no more, and the first one no further.
            num_cols = tl.minimum(tl.reduce(lengths, 0, _maximum), num_tokens - earlier)
            first_col = 0
            if PREFETCH:
                _store_window_block(slot, lengths, dst_base, out_cache_loc, in_batch, 0, num_tokens, BLOCK_N)
                first_col = BLOCK_N
        # No column past what can be read or written: garbage offsets (validate=False) cannot make the loop long.
        num_cols = tl.minimum(num_cols, tl.minimum(max_context_len, num_tokens))
        _store_windows(
            req_to_token,
            rows,
            starts,
            lengths,
            dst_base,
            out_cache_loc,
            in_batch,
            first_col,
            num_cols,
            num_rows,
            max_context_len,
            row_stride,
            num_tokens,
            BLOCK_N,
        )


# No integer argument is specialised on its value: a new batch size never recompiles, and a kernel is
# identified by its tensors' dtypes and alignment and its constexprs alone (see backend.launch).
_SCALARS = ["bs", "num_rows", "max_context_len", "row_stride"]


@triton.jit(do_not_specialize=_SCALARS)
def _get_last_loc_kernel(
    req_to_token,
    req_pool_indices,
    prefix_lens,
    last_loc,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    TILE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """``last_loc[i] = req_to_token[req_pool_indices[i], prefix_lens[i] - 1]`` if ``prefix_lens[i] > 0`` else -1."""
    if PDL:
        _pdl_start(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    for tile in range(pid, num_tiles, num_programs):
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        in_batch = offs < bs
        rows = tl.load(req_pool_indices + offs, mask=in_batch, other=0).to(tl.int32)
        prefix = tl.load(prefix_lens + offs, mask=in_batch, other=0).to(tl.int32)
        _store_last_loc(req_to_token, rows, prefix, last_loc, offs, in_batch, num_rows, max_context_len, row_stride)


@triton.jit(do_not_specialize=_SCALARS + ["num_tokens", "window_len"])
def _assign_extend_cache_locs_kernel(
    req_to_token,
    req_pool_indices,
    start_offset,
    end_offset,
    out_cache_loc,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    num_tokens,
    window_len,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    UNIFORM: tl.constexpr,
    PREFETCH: tl.constexpr,
    EARLY_SUM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """``out_cache_loc[excl_i + j] = req_to_token[req_pool_indices[i], start_offset[i] + j]``, ``j < len_i``."""
    _cache_locs_program(
        req_to_token,
        req_pool_indices,
        start_offset,
        end_offset,
        out_cache_loc,
        out_cache_loc,
        out_cache_loc,
        bs,
        num_rows,
        max_context_len,
        row_stride,
        num_tokens,
        window_len,
        TILE,
        BLOCK_N,
        SCAN_BLOCK,
        UNIFORM,
        PREFETCH,
        EARLY_SUM,
        False,
        False,
        PDL,
    )


@triton.jit(do_not_specialize=_SCALARS + ["num_tokens", "window_len"])
def _get_last_loc_and_assign_extend_cache_locs_kernel(
    req_to_token,
    req_pool_indices,
    start_offset,
    end_offset,
    out_cache_loc,
    last_loc,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    num_tokens,
    window_len,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    UNIFORM: tl.constexpr,
    PREFETCH: tl.constexpr,
    EARLY_SUM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The window gather of ``_assign_extend_cache_locs_kernel`` and ``last_loc[i]`` (at ``start_offset[i]``)."""
    _cache_locs_program(
        req_to_token,
        req_pool_indices,
        start_offset,
        end_offset,
        out_cache_loc,
        last_loc,
        out_cache_loc,
        bs,
        num_rows,
        max_context_len,
        row_stride,
        num_tokens,
        window_len,
        TILE,
        BLOCK_N,
        SCAN_BLOCK,
        UNIFORM,
        PREFETCH,
        EARLY_SUM,
        True,
        False,
        PDL,
    )


@triton.jit(do_not_specialize=["bs"])
def _window_tile_sums_kernel(start_offset, end_offset, tile_sums, bs, TILE: tl.constexpr, PDL: tl.constexpr):
    """The first of a ragged gather's two launches: ``tile_sums[t] = sum(max(end_i - start_i, 0))`` over the
    requests ``i`` of tile ``t`` (``TILE`` requests a tile, as in the second launch). With ``PDL`` it waits for the
    kernel before it, then lets the second launch start (which waits for this one before it reads anything)."""
    if PDL:
        _pdl_start(2)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    for tile in range(pid, num_tiles, num_programs):
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        in_batch = offs < bs
        starts = tl.load(start_offset + offs, mask=in_batch, other=0).to(tl.int32)
        ends = tl.load(end_offset + offs, mask=in_batch, other=0).to(tl.int32)
        tl.store(tile_sums + tile, tl.reduce(tl.maximum(ends - starts, 0), 0, _add))


@triton.jit(do_not_specialize=_SCALARS + ["num_tokens", "window_len"])
def _assign_extend_cache_locs_from_sums_kernel(
    req_to_token,
    req_pool_indices,
    start_offset,
    end_offset,
    out_cache_loc,
    tile_sums,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    num_tokens,
    window_len,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    UNIFORM: tl.constexpr,
    PREFETCH: tl.constexpr,
    EARLY_SUM: tl.constexpr,
    PDL: tl.constexpr,
):
    """``_assign_extend_cache_locs_kernel`` of ragged windows after ``_window_tile_sums_kernel`` (its ``tile_sums``)."""
    _cache_locs_program(
        req_to_token,
        req_pool_indices,
        start_offset,
        end_offset,
        out_cache_loc,
        out_cache_loc,
        tile_sums,
        bs,
        num_rows,
        max_context_len,
        row_stride,
        num_tokens,
        window_len,
        TILE,
        BLOCK_N,
        SCAN_BLOCK,
        UNIFORM,
        PREFETCH,
        EARLY_SUM,
        False,
        True,
        PDL,
    )


@triton.jit(do_not_specialize=_SCALARS + ["num_tokens", "window_len"])
def _get_last_loc_and_assign_extend_cache_locs_from_sums_kernel(
    req_to_token,
    req_pool_indices,
    start_offset,
    end_offset,
    out_cache_loc,
    last_loc,
    tile_sums,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    num_tokens,
    window_len,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    UNIFORM: tl.constexpr,
    PREFETCH: tl.constexpr,
    EARLY_SUM: tl.constexpr,
    PDL: tl.constexpr,
):
    """``_get_last_loc_and_assign_extend_cache_locs_kernel`` of ragged windows after ``_window_tile_sums_kernel``."""
    _cache_locs_program(
        req_to_token,
        req_pool_indices,
        start_offset,
        end_offset,
        out_cache_loc,
        last_loc,
        tile_sums,
        bs,
        num_rows,
        max_context_len,
        row_stride,
        num_tokens,
        window_len,
        TILE,
        BLOCK_N,
        SCAN_BLOCK,
        UNIFORM,
        PREFETCH,
        EARLY_SUM,
        True,
        True,
        PDL,
    )
