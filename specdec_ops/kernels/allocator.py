"""Triton kernels of ``DraftCacheAllocator``: pages from a device ring of free pages, fused with the read-back.

State (all on the device): ``req_to_token[row, pos]`` is the slot of position ``pos`` of the request in ``row``;
``alloc_lens[row]``: positions ``[0, alloc_len)`` own slots; ``seq_lens[row]`` of them are committed;
``window_lens[row]`` is the open draft window; ``prefix_lens[row]``: positions ``[0, prefix_len)`` sit on pages that
the caller's prefix cache owns. Free pages form a FIFO ring: ``counters = [head, count, ticket, epoch, tiles,
push epoch, push tiles]`` (the last four for ``LOOKBACK``, below) and the free pages
are ``free_pages[(head + k) % num_pages]`` for ``k < count``; pops take from the head, pushes append at the tail.
Slots of page ``p`` are ``p * PAGE_SIZE + (0 .. PAGE_SIZE - 1)`` and position ``pos`` of a request lives at offset
``pos % PAGE_SIZE`` of its page.

Many programs, no waiting. A launch hands out (or takes back) pages in batch order: request ``i`` pops the pages
at ring offsets ``[excl_i, excl_i + need_i)``, ``excl_i = sum(need_k for k < i)``. Each program computes the
``excl`` of its tiles itself, summing the needs of every earlier request (as the cache-location kernels do). So
that no program reads what another one writes, a launch writes the per-row values that the needs are computed
from (``alloc_lens``, ``prefix_lens``) and the ring counters only in its *last* program: every program takes a
ticket (``atomic_add`` on ``counters[2]``, ``sem="acq_rel"``, the only atomics triton-ascend supports) after its
last read of shared state, and the program that draws the last ticket rewrites those values for the whole batch,
moves the counters and resets the ticket. A draft that commits first past one program may take two launches
instead (``_count_pops_kernel`` for a chain, ``_commit_tree_count_kernel`` for a tree, then ``SUMS``): the first
writes each tile's pops (and pushes) to scratch, so the second reads one sum per earlier tile, and each program
writes its own rows, with no ticket and no last pass.

Looking back (``LOOKBACK``, a draft in one launch past one program: a chain or a tree draft, either of which may
release branch pages; off Ascend). Each program publishes its tile's pops (``-1 - pops`` at ``statuses[tile]``, an
atomic exchange that *releases*: its loads of the counters are done before any program sees it), and with
``RELEASE`` first its pushes the same way in banks of their own, then reads those of every earlier tile, re-reading
until all are published (``_look_back``).
No program reads another's requests, so each writes its own rows, and the program of the last tile, which waits for
every other tile's status with loads that *acquire*, moves the counters: no sums over earlier requests, no ticket,
no last pass. This waits on other programs, so it needs them all running at once: the host caps the grid at one
program per SM (``DraftCacheAllocator._look_back_programs``; the interpreter runs programs in order). Ascend gives
no such guarantee and never looks back. Statuses take one of two banks in scratch by the parity of
``counters[3]``, the launches that looked back; the last tile advances it, records its launch's tiles in
``counters[4]`` and clears the other bank (the previous such launch's, which has ended), so the next launch finds
its bank all 0; the pushes' banks go by ``counters[5]`` and ``counters[6]`` the same way, among the launches that
release. Pops read the ring at
``[head, head + count)``, pushes write at ``[head + count, ...)``: disjoint, since the pages pushed are pages in
use, so ``count + pushed <= num_pages``.

With ``PDL`` (CUDA, compute capability 9.0 and up: ``backend.supports_pdl``) every kernel is launched as a
programmatic dependent of the kernel before it in the stream and waits for that one to end (``kernels/pdl.py``)
before it reads anything; the second launch of two (``SUMS``) waits later, after loading what the first launch does
not write. Once it has waited, a kernel launched with ``PDL`` 2 lets the next one start (``launch_dependents``),
which then waits in turn: when the next kernel starts, every kernel before this one has ended. The allocator asks for
2, but 1 (wait only) for the launches that give branches (``DraftCacheAllocator._pdl_branches``); a first launch of
two lets the second start at either level.

Ascend rules (shared/ASCEND.md): lengths, positions, page numbers and ring offsets are int32 (the host keeps pools
below 2**30 pages and contexts below 2**30); table addresses are int64. Page arithmetic uses shifts when
``PAGE_SIZE`` is a power of two (``PAGE_SHIFT >= 0``), as bishengir lowers vector int32 ``//`` through float32,
exact only below 2**24 (an NPU takes only power-of-two page sizes, allocator.NPU_PAGE_SIZES).
Every access is masked, so rows out of range are skipped and garbage values never lead outside a tensor.

Sums and scans call ``tl.reduce``/``tl.associative_scan`` with Triton's own combine functions: the wrappers
``tl.sum``/``tl.cumsum`` are jitted at import time, so the interpreter copy of this module that ``backend`` builds
could not call them (see ``kernels/cache_locs.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import pdl

_add = tl.standard._sum_combine
_maximum = tl.standard._elementwise_max

_pdl_start = pdl.start


@triton.jit
def _floor_page(x, PAGE_SIZE: tl.constexpr, PAGE_SHIFT: tl.constexpr):
    """``x // PAGE_SIZE`` for ``x >= 0``: a shift for powers of two (exact on every backend)."""
    if PAGE_SHIFT >= 0:
        q = x >> PAGE_SHIFT
    else:
        q = x // PAGE_SIZE
    return q


@triton.jit
def _unsummed(tile, num_programs, OWN: tl.constexpr):
    """The first tile whose requests a program has not summed before its tile ``tile`` (it takes tiles ``pid``,
    ``pid + num_programs``, ...): 0 at its first tile, else its previous tile, or with ``OWN`` (it carries its own
    tiles' sums apart) the tile after that. Derived from the tile, not carried from one tile to the next: Triton 3.6
    on an H200 miscompiles a loop whose lower bound is a scalar carried by the loop around it, and every tile after
    a program's first took wrong pages (docs/design.md, "A loop's lower bound carried from the tile before")."""
    return tl.maximum(tile - num_programs + OWN, 0)


@triton.jit
def _ring_index(head, offset, num_pages):
    """``(head + offset) % num_pages`` for ``0 <= head, offset < num_pages``, without ``%``."""
    idx = head + offset
    return tl.where(idx >= num_pages, idx - num_pages, idx)


@triton.jit
def _window_needs(
    k,
    in_range,
    req_pool_indices,
    seq_lens,
    alloc_lens,
    window_starts,
    window_ends,
    accept_lens,
    window_lens,
    window_len,
    num_rows,
    max_context_len,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    PREFILL: tl.constexpr,
    PREFIX: tl.constexpr,
    COMMIT: tl.constexpr,
):
    """For batch entries ``k``: the row, whether it is valid and whether it is in use (1 or 0, see
    ``_window_span``), its window ``[start, end)``, its allocated length before and after, the pages it has and the
    pages it needs (``_window_rows``, then ``_window_span``)."""
    rows, valid, allocs = _window_rows(k, in_range, req_pool_indices, alloc_lens, num_rows, PREFILL)
    in_use, starts, allocs, ends, new_allocs, have, need = _window_span(
        k,
        rows,
        valid,
        allocs,
        seq_lens,
        window_starts,
        window_ends,
        accept_lens,
        window_lens,
        window_len,
        max_context_len,
        PAGE_SIZE,
        PAGE_SHIFT,
        PREFILL,
        PREFIX,
        COMMIT,
    )
    return rows, valid, in_use, starts, allocs, ends, new_allocs, have, need


@triton.jit
def _window_rows(k, in_range, req_pool_indices, alloc_lens, num_rows, PREFILL: tl.constexpr):
    """The rows of batch entries ``k``, which of them are valid, and (decode) their ``alloc_lens`` as loaded."""
    rows = tl.load(req_pool_indices + k, mask=in_range, other=-1).to(tl.int32)
    valid = in_range & (rows >= 0) & (rows < num_rows)
    if PREFILL:
        allocs = rows * 0
    else:
        allocs = tl.load(alloc_lens + rows, mask=valid, other=0).to(tl.int32)
    return rows, valid, allocs


@triton.jit
def _window_span(
    k,
    rows,
    valid,
    allocs,
    seq_lens,
    window_starts,
    window_ends,
    accept_lens,
    window_lens,
    window_len,
    max_context_len,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    PREFILL: tl.constexpr,
    PREFIX: tl.constexpr,
    COMMIT: tl.constexpr,
):
    """The window ``[start, end)`` of batch entries ``k`` (rows ``rows``, ``alloc_lens`` ``allocs`` from
    ``_window_rows``), whether the row is in use, their allocated length before and after, the pages they have and
    the pages they need. Decode reads the row's lengths (with ``COMMIT``, its window starts at ``seq_len +
    clamp(accept_lens[k], 0, window_lens[row])``, the length a commit would leave); prefill reads the batch's own
    ``window_starts`` (the prefix a new row starts from) and ``window_ends``.

    A row not in use carries ``alloc_len`` -1 (``_free_pages_kernel``). ``in_use`` is 1 for a row in use, 0 for such
    a row, as an int32 from a shift (``1 + (alloc >> 31)``), not a mask: Triton 3.6's compiler fails on some
    allocation kernels when a mask made from a loaded length joins the batch mask (docs/design.md). Its pages come
    from ``alloc & 0x7fffffff``, which leaves every length in use as it is and makes -1 a full row, so it needs
    nothing: the sums over earlier requests pay no extra operation. Its new ``alloc_len`` stays -1."""
    if PREFILL:
        if PREFIX:
            starts = tl.load(window_starts + k, mask=valid, other=0).to(tl.int32)
            starts = tl.minimum(tl.maximum(starts, 0), max_context_len)
        else:
            starts = rows * 0
        allocs = starts
        ends = tl.load(window_ends + k, mask=valid, other=0).to(tl.int32)
    else:
        starts = tl.load(seq_lens + rows, mask=valid, other=0).to(tl.int32)
        if COMMIT:
            # As _commit_kernel: clamped in the caller's dtype, then narrowed.
            accepted = tl.load(accept_lens + k, mask=valid, other=0)
            window = tl.load(window_lens + rows, mask=valid, other=0)
            accepted = tl.minimum(tl.maximum(accepted, 0), tl.maximum(window, 0).to(accepted.dtype))
            starts += accepted.to(tl.int32)
        starts = tl.minimum(tl.maximum(starts, 0), max_context_len)
        in_use = 1 + (allocs >> 31)
        allocs = tl.minimum(allocs & 0x7FFFFFFF, max_context_len)
        ends = starts + window_len
    ends, new_allocs, have, need = _grow(valid, starts, allocs, ends, max_context_len, PAGE_SIZE, PAGE_SHIFT)
    if PREFILL:
        in_use = rows * 0 + 1
    else:
        new_allocs = new_allocs * in_use + (in_use - 1)  # -1 stays -1
    return in_use, starts, allocs, ends, new_allocs, have, need


@triton.jit
def _grow(valid, starts, allocs, ends, max_context_len, PAGE_SIZE: tl.constexpr, PAGE_SHIFT: tl.constexpr):
    """Windows ``[starts, ends)`` of rows that own ``[0, allocs)``: the window's end (within
    ``[starts, max_context_len]``), the allocated length after it, the pages owned before it and the pages it needs
    (0 where not ``valid``)."""
    ends = tl.minimum(tl.maximum(ends, starts), max_context_len)
    new_allocs = tl.maximum(allocs, ends)
    have = _floor_page(allocs + (PAGE_SIZE - 1), PAGE_SIZE, PAGE_SHIFT)
    need = tl.where(valid, _floor_page(new_allocs + (PAGE_SIZE - 1), PAGE_SIZE, PAGE_SHIFT) - have, 0)
    return ends, new_allocs, have, need


@triton.jit
def _tile_counts(scratch, scanned, counted, num_rows, SCAN_BLOCK: tl.constexpr, RELEASE: tl.constexpr):
    """What the first launch of a draft in two left for a tile of the second (``SUMS``): the ring's head and count
    (its copy, as the second launch moves the counters), and the pops and (``RELEASE``) pushes of the first
    launch's tiles ``[scanned, counted)``, lane-wise, for up to ``SCAN_BLOCK`` of them (the caller sums the rest).
    All loads, no use: the caller's next loads go out with them."""
    head = tl.load(scratch + num_rows)
    count = tl.load(scratch + num_rows + 1)
    pops, pushes = _tile_sums(scratch, scanned, counted, num_rows, SCAN_BLOCK, RELEASE)
    return head, count, pops, pushes


@triton.jit
def _tile_sums(scratch, t0, counted, num_rows, SCAN_BLOCK: tl.constexpr, RELEASE: tl.constexpr):
    """The pops and (``RELEASE``) pushes that the first launch of a draft in two left for its tiles
    ``[t0, min(t0 + SCAN_BLOCK, counted))``, lane-wise (0 elsewhere)."""
    t = t0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
    earlier_tile = (t < counted) & (t < num_rows)
    pops = tl.load(scratch + t, mask=earlier_tile, other=0)
    if RELEASE:
        pushes = tl.load(scratch + 2 * num_rows + t, mask=earlier_tile, other=0)
    else:
        pushes = pops * 0
    return pops, pushes


@triton.jit
def _look_back(statuses, push_statuses, tile, BLOCK: tl.constexpr, ACQUIRE: tl.constexpr, PUSHES: tl.constexpr):
    """The pops of tiles ``[0, tile)``, as their programs published them at ``statuses[t]`` (``-1 - pops``; 0 while
    unpublished), and with ``PUSHES`` their pushes, published the same way at ``push_statuses[t]`` (else 0),
    ``BLOCK`` tiles a load, each load repeated until all of its tiles are published; ``ACQUIRE``: atomic loads that
    acquire what each publishing program released. Only where every program of the launch runs at once (CUDA: a grid
    of at most one program per SM; the interpreter runs the programs in order), so that every earlier tile's program
    makes progress: never on Ascend."""
    popped = tl.full([BLOCK], 0, dtype=tl.int32)
    pushed = tl.full([BLOCK], 0, dtype=tl.int32)
    for t0 in range(0, tile, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        earlier = t < tile
        status = _statuses(statuses + t, earlier, ACQUIRE)
        if PUSHES:  # (a tile's two words are both published before either counts)
            pushes = _statuses(push_statuses + t, earlier, ACQUIRE)
            while tl.reduce(tl.maximum(status, pushes), 0, _maximum) >= 0:  # a tile not published yet
                status = _statuses(statuses + t, earlier, ACQUIRE)
                pushes = _statuses(push_statuses + t, earlier, ACQUIRE)
            pushed += -1 - pushes
        else:
            while tl.reduce(status, 0, _maximum) >= 0:  # a tile not published yet
                status = _statuses(statuses + t, earlier, ACQUIRE)
        popped += -1 - status
    return tl.reduce(popped, 0, _add), tl.reduce(pushed, 0, _add)


@triton.jit
def _turn_banks(epochs, epoch, num_tiles, banks, num_rows, prev_tiles, BLOCK: tl.constexpr):
    """After a launch that looked back: ``epochs[0]`` (``epoch``, whose parity picked this launch's bank of the two
    at ``banks``, ``num_rows`` each) advances, ``epochs[1]`` records this launch's ``num_tiles``, and the other bank
    is cleared over the ``prev_tiles`` that the launch before published there (it has ended), ``BLOCK`` a store."""
    tl.store(epochs, (epoch + 1).to(epochs.dtype.element_ty))
    tl.store(epochs + 1, num_tiles.to(epochs.dtype.element_ty))
    other = banks + (1 - (epoch & 1)) * num_rows
    for t0 in range(0, prev_tiles, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        tl.store(other + t, t * 0, mask=t < prev_tiles)


@triton.jit
def _look_back_banks(counters, scratch, num_rows, PUSHES: tl.constexpr):
    """The banks of published tiles that a launch looking back takes: the pops' epoch (``counters[3]``, whose parity
    picks this launch's bank of the two at ``scratch[4n:6n]``), the tiles the launch before it published
    (``counters[4]``) and that bank; with ``PUSHES`` the same for the pushes (``counters[5..6]``, ``scratch[6n:8n]``),
    taken by the launches that release only, else the pops' again (never written)."""
    epoch = tl.load(counters + 3).to(tl.int32)
    prev_tiles = tl.load(counters + 4).to(tl.int32)
    statuses = scratch + 4 * num_rows + (epoch & 1) * num_rows
    if PUSHES:
        push_epoch = tl.load(counters + 5).to(tl.int32)
        prev_push_tiles = tl.load(counters + 6).to(tl.int32)
        push_statuses = scratch + 6 * num_rows + (push_epoch & 1) * num_rows
    else:
        push_epoch, prev_push_tiles, push_statuses = epoch, prev_tiles, statuses
    return epoch, prev_tiles, statuses, push_epoch, prev_push_tiles, push_statuses


@triton.jit
def _publish_and_look_back(
    statuses, push_statuses, tile, num_tiles, pops, pushes, BLOCK: tl.constexpr, PUSHES: tl.constexpr
):
    """Publish tile ``tile``'s ``pops`` (with ``PUSHES`` its ``pushes`` first), released: this program's loads of the
    counters are done before any program can see them. Then the pops and pushes of every earlier tile
    (``_look_back``), acquired by the last tile, whose program moves the counters that every program read."""
    if PUSHES:
        tl.atomic_xchg(push_statuses + tile, -1 - pushes, sem="release", scope="gpu")
    tl.atomic_xchg(statuses + tile, -1 - pops, sem="release", scope="gpu")
    if tile == num_tiles - 1:
        before, pushed = _look_back(statuses, push_statuses, tile, BLOCK, True, PUSHES)
    else:
        before, pushed = _look_back(statuses, push_statuses, tile, BLOCK, False, PUSHES)
    return before, pushed


@triton.jit
def _finish_look_back(
    counters,
    head,
    count,
    pops,
    pushes,
    num_pages,
    num_tiles,
    scratch,
    num_rows,
    epoch,
    prev_tiles,
    push_epoch,
    prev_push_tiles,
    BLOCK: tl.constexpr,
    PUSHES: tl.constexpr,
):
    """The last tile's program of a launch that looked back (``_look_back_banks``): every pop and push of the batch
    is known, so it moves the counters, then turns the banks. The next launch that looks back takes the other bank,
    which this one clears: the launch that used it has ended. So for the pushes' banks, among the launches that
    release (``PUSHES``)."""
    _move_counters(counters, head, count, pops, pushes, num_pages)
    _turn_banks(counters + 3, epoch, num_tiles, scratch + 4 * num_rows, num_rows, prev_tiles, BLOCK)
    if PUSHES:
        _turn_banks(counters + 5, push_epoch, num_tiles, scratch + 6 * num_rows, num_rows, prev_push_tiles, BLOCK)


@triton.jit
def _move_counters(counters, head, count, pops, pushes, num_pages):
    """After a launch's ``pops`` and ``pushes`` (as summed; 0 for no pushes): the ring's head moves past the pages
    popped (at most ``count``), and its count loses those and gains the pages pushed (at most the room left)."""
    popped = tl.minimum(pops, count)
    pushed = tl.minimum(num_pages - count, pushes)
    tl.store(counters, _ring_index(head, popped, num_pages).to(counters.dtype.element_ty))
    tl.store(counters + 1, (count - popped + pushed).to(counters.dtype.element_ty))


@triton.jit
def _statuses(pointers, mask, ACQUIRE: tl.constexpr):
    """Published statuses (-1 where masked off), read past any cache; ``ACQUIRE``: as atomics that acquire."""
    if ACQUIRE:
        status = tl.atomic_add(pointers, 0, mask=mask, sem="acquire", scope="gpu")
        status = tl.where(mask, status, -1)
    else:
        status = tl.load(pointers, mask=mask, other=-1, volatile=True)
    return status


@triton.jit
def _take_ticket(counters):
    """This program's place among the programs that finished reading shared state (0 .. num_programs - 1)."""
    tl.debug_barrier()  # every thread of this program is done with its reads
    return tl.atomic_add(counters + 2, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _branch_counts(k, in_range, req_pool_indices, num_branch_pages, num_rows, branch_width):
    """For batch entries ``k``: the row, whether it is valid, and the branch pages it holds (clamped to
    ``[0, branch_width]``)."""
    rows = tl.load(req_pool_indices + k, mask=in_range, other=-1).to(tl.int32)
    valid = in_range & (rows >= 0) & (rows < num_rows)
    # Masked lanes load 0. No tl.where on the mask here: held feeds 2-D masks, and a where on the batch mask that
    # feeds one crashes triton-adapter-opt (docs/design.md).
    held = tl.load(num_branch_pages + rows, mask=valid, other=0).to(tl.int32)
    return rows, valid, tl.minimum(tl.maximum(held, 0), branch_width)


@triton.jit
def _push_branch_pages(
    rows, valid, held, ring_start, branch_pages, free_pages, head, num_pages, branch_stride, BLOCK_R: tl.constexpr
):
    """``free_pages[(head + ring_start_i + k) % num_pages] = branch_pages[row_i, k]`` for ``k < held_i``."""
    row_addr = rows.to(tl.int64) * branch_stride  # [TILE]
    cols = tl.arange(0, BLOCK_R)
    for k0 in range(0, tl.reduce(held, 0, _maximum), BLOCK_R):
        k = k0 + cols  # [BLOCK_R]
        mine = valid[:, None] & (k[None, :] < held[:, None])  # [TILE, BLOCK_R]
        page = tl.load(branch_pages + (row_addr[:, None] + k[None, :]), mask=mine, other=0)
        ring_off = ring_start[:, None] + k[None, :]
        to_ring = mine & (ring_off < num_pages)
        ring_idx = _ring_index(head, tl.where(to_ring, ring_off, 0), num_pages)
        tl.store(free_pages + ring_idx, page.to(free_pages.dtype.element_ty), mask=to_ring)


# No integer argument is specialised on its value: a new batch size or window never recompiles, and a kernel is
# identified by its tensors' dtypes and alignment and its constexprs alone (see backend.launch).
@triton.jit
def _alloc_windows(
    req_to_token,
    req_pool_indices,
    seq_lens,
    alloc_lens,
    window_lens,
    prefix_lens,
    window_starts,
    window_ends,
    accept_lens,
    prefix_slots,
    free_pages,
    counters,
    scratch,
    out_cache_loc,
    last_loc,
    branch_pages,
    num_branch_pages,
    branch_slots,
    copy_src,
    copy_dst,
    bs,
    window_len,
    num_rows,
    max_context_len,
    row_stride,
    num_pages,
    prefix_stride,
    branch_stride,
    branch_width,
    topk,
    num_steps,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    PREFILL: tl.constexpr,
    PREFIX: tl.constexpr,
    EMIT: tl.constexpr,
    RELEASE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BRANCH: tl.constexpr,
    BLOCK_E: tl.constexpr,
    COPY: tl.constexpr,
    EARLY_COPY: tl.constexpr,
    COMMIT: tl.constexpr,
    SUMS: tl.constexpr,
    LOOKBACK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Give slots to the windows ``[start_i, end_i)`` and optionally read them back.

    Decode: ``start_i = seq_lens[row_i]``, ``end_i = start_i + window_len``; the window opens
    (``window_lens[row_i] = end_i - start_i``). Prefill (new rows): ``start_i = window_starts[i]``,
    ``end_i = window_ends[i]``, and the window is committed (``seq_lens = alloc_lens = end_i``); with ``PREFIX``,
    positions ``[0, start_i)`` take ``prefix_slots[i, :start_i]`` (cache-owned pages, ``prefix_lens[row_i] =
    start_i``). Request ``i`` needs ``need_i = pages(max(alloc_i, end_i)) - pages(alloc_i)`` new pages, popped at
    ring offsets ``excl_i + k``. New positions of the last partial page use the page of ``req_to_token[row_i,
    alloc_i - 1]``, the others their ``(pos // PAGE_SIZE - pages(alloc_i))``-th new page. With ``EMIT``:
    ``out_cache_loc[i * window_len + j] = req_to_token[row_i, start_i + j]`` and ``last_loc[i] =
    req_to_token[row_i, start_i - 1]`` (-1 when ``start_i == 0``), as after the allocation. With ``RELEASE``
    (decode only), the rows' branch pages go back to the ring first (see ``_release_branches_kernel``); the pops
    do not see them. With ``BRANCH`` (decode only) each request also takes its ``topk`` branches of ``num_steps``
    positions from ``seq_len`` (see ``_alloc_branches_kernel``; ``branch_slots`` and, with ``COPY``, ``copy_src`` and
    ``copy_dst`` as there): its ``need_b_i`` branch pages follow its window's pages in the ring. With both, a
    request that holds exactly the pages its branches take keeps them instead (``_reused``): no push, no pop.
    With ``COMMIT`` (decode, not ``BRANCH``) the row's open window is committed first, as ``_commit_kernel`` does:
    ``start_i = seq_lens[row_i] + clamp(accept_lens[i], 0, window_lens[row_i])``, which becomes ``seq_lens[row_i]``.
    With ``SUMS`` (decode) this is the second launch of a draft in two: the first (``_count_pops_kernel`` for a
    chain, ``_commit_tree_count_kernel`` for a tree step with ``BRANCH``) left the pops of each of its tiles at
    ``scratch[t]`` (``SUMS`` of its tiles make one of this launch's), with ``RELEASE`` the pushes at
    ``scratch[2 * num_rows + t]``, and the ring's head and count at ``scratch[num_rows]`` and
    ``scratch[num_rows + 1]``, so no program reads another's requests: each writes its own rows' lengths and branch
    counts, and the program of the last tile moves the counters (no ticket, no pass over the batch). With
    ``LOOKBACK`` (decode, not ``SUMS``; that many statuses a load) each program publishes its tiles' pops (with
    ``RELEASE`` also their pushes) and reads those of earlier tiles instead of summing earlier requests (module
    docstring): each writes its own rows, the program of the last tile moves the counters. ``PDL``: launched
    as a programmatic dependent (CUDA, ``backend.supports_pdl``), so it may start before the previous kernel of the
    stream has ended. Each program waits for that one (``gdc_wait``) before it reads anything, or, with ``SUMS``,
    before it reads scratch or writes anything: the first launch let this one start only once the kernel before it
    had ended, so a chain draft loads its own requests first (the count wrote none of them), a tree draft its rows,
    their ``alloc_lens`` and branch pages held (the first launch committed the rest). Once it has waited, with
    ``PDL`` 2 it lets the next kernel start (module docstring).
    """
    if PDL:
        if not SUMS:
            _pdl_start(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    if not SUMS:  # (SUMS: from the first launch's copy, in the loop below, as this launch moves the counters)
        head = tl.load(counters).to(tl.int32)
        count = tl.load(counters + 1).to(tl.int32)
    if LOOKBACK:  # the banks of published tiles this launch takes (the pushes' where it releases pages)
        epoch, prev_tiles, statuses, push_epoch, prev_push_tiles, push_statuses = _look_back_banks(
            counters, scratch, num_rows, RELEASE
        )
    cols = tl.arange(0, BLOCK_N)
    # A launch of one program owns everything: it writes the shared state as it goes, with no ticket. So does each
    # program of a second pass (SUMS), as none reads the requests of another.
    alone = num_programs == 1
    # (triton-ascend's frontend takes no chain of three boolean operands: pairs in parentheses.)
    owner = alone or (SUMS > 0 or LOOKBACK > 0)
    tl.static_assert(LOOKBACK == 0 or not (PREFILL or SUMS > 0), "look-back: drafts in one launch")
    # Needs (and branch pages held) of the requests before this program's next tile, carried lane-wise from one tile
    # to the next (a scalar carry of reduce results read inside the loop is miscompiled by Triton 3.6, see
    # docs/design.md): other programs' requests in lane_sums/held_sums, read from memory; this program's own
    # earlier tiles in own_sums/own_held.
    lane_sums = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
    held_sums = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
    own_sums = tl.full([TILE], 0, dtype=tl.int32)
    own_held = tl.full([TILE], 0, dtype=tl.int32)
    for tile in range(pid, num_tiles, num_programs):
        tile_start = tile * TILE
        if SUMS:  # the first launch's tiles this program has not summed yet start here
            scanned = _unsummed(tile, num_programs, 0) * SUMS
        else:  # its own earlier tiles are in own_sums: other programs' requests start here
            scanned = _unsummed(tile, num_programs, 1) * TILE
        if not SUMS and LOOKBACK == 0:  # every request before this tile, from its row's lengths (SUMS: its tiles'
            # sums, below; LOOKBACK: what the programs of earlier tiles published)
            for k0 in range(scanned, tile_start, SCAN_BLOCK):
                k = k0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
                if RELEASE:
                    _, _, held_earlier = _branch_counts(
                        k, k < tile_start, req_pool_indices, num_branch_pages, num_rows, branch_width
                    )
                _, valid_earlier, in_use_earlier, seq_earlier, _, _, _, _, earlier = _window_needs(
                    k,
                    k < tile_start,
                    req_pool_indices,
                    seq_lens,
                    alloc_lens,
                    window_starts,
                    window_ends,
                    accept_lens,
                    window_lens,
                    window_len,
                    num_rows,
                    max_context_len,
                    PAGE_SIZE,
                    PAGE_SHIFT,
                    PREFILL,
                    PREFIX,
                    COMMIT,
                )
                if BRANCH:
                    width_earlier = branch_width * in_use_earlier  # (no branches for a row not in use)
                    _, per_branch_earlier, branch_earlier = _branch_shape(
                        seq_earlier, valid_earlier, width_earlier, topk, num_steps, PAGE_SIZE, PAGE_SHIFT
                    )
                    if RELEASE:  # requests that keep their pages neither push nor pop them
                        _, branch_earlier, held_earlier = _trade(held_earlier, branch_earlier, per_branch_earlier, topk)
                    earlier += branch_earlier
                if RELEASE:
                    held_sums += held_earlier
                lane_sums += earlier
        offs = tile_start + tl.arange(0, TILE)  # [TILE]
        in_batch = offs < bs
        if RELEASE:
            held = _branch_counts(offs, in_batch, req_pool_indices, num_branch_pages, num_rows, branch_width)[2]
        rows, valid, allocs = _window_rows(offs, in_batch, req_pool_indices, alloc_lens, num_rows, PREFILL)
        if SUMS and BRANCH:
            # A tree draft's first launch committed its rows: with PDL it waits for it once it has loaded what that
            # launch does not write (the rows, their alloc_lens and branch pages held), then issues the loads of the
            # first launch's counts with those of the committed lengths, one round trip for both (a chain draft,
            # whose first launch wrote none of its requests' lengths, waits below). Both waits sit inside the loop
            # over tiles: right as long as Triton does not software-pipeline it (which may hoist loads above a wait,
            # triton-lang/triton issue 11905); tests/test_pdl.py checks the PTX for that.
            if PDL:
                _pdl_start(PDL)
            head, count, first_pops, first_pushes = _tile_counts(
                scratch, scanned, tile * SUMS, num_rows, SCAN_BLOCK, RELEASE
            )
        in_use, starts, allocs, ends, new_allocs, have, need = _window_span(
            offs,
            rows,
            valid,
            allocs,
            seq_lens,
            window_starts,
            window_ends,
            accept_lens,
            window_lens,
            window_len,
            max_context_len,
            PAGE_SIZE,
            PAGE_SHIFT,
            PREFILL,
            PREFIX,
            COMMIT,
        )
        # Loads that need only the rows and their lengths are issued here (the branch pages held above), before the
        # scan below, whose barriers would make each of them a round trip of its own: the slot of the last partial
        # page and last_loc's slot (positions below alloc_len, which this launch never writes). H100, per kernel:
        # 0.1-0.4 us less from bs 1 to 4096 (0.05 more at bs 64). Not above the sums over earlier requests: held
        # across that loop they cost more at bs >= 1024 (docs/design.md).
        row_addr = rows.to(tl.int64) * row_stride  # [TILE]
        has_partial = valid & (allocs < have * PAGE_SIZE)
        last_slot = tl.load(req_to_token + (row_addr + allocs - 1), mask=has_partial, other=0).to(tl.int32)
        if EMIT or COPY:  # (COPY: the branches' copy pairs read the committed part of its page)
            has_prefix = valid & (starts > 0)
            prev = tl.load(req_to_token + (row_addr + starts - 1), mask=has_prefix, other=-1)
        # Pages this request pops: its window's, then (BRANCH) its branches', unless (RELEASE) it keeps the branch
        # pages it holds for them; then it pushes none either.
        pops = need
        if BRANCH:
            branch_off, per_branch, branch_need = _branch_shape(
                starts, valid, branch_width * in_use, topk, num_steps, PAGE_SIZE, PAGE_SHIFT
            )
            if RELEASE:
                reuse, branch_pops, held = _trade(held, branch_need, per_branch, topk)
            else:
                reuse, branch_pops = rows * 0, branch_need
            pops += branch_pops
        if SUMS:  # every tile before this one, this program's own included, from the first launch
            if BRANCH:  # the first SCAN_BLOCK of them loaded above
                lane_sums += first_pops
                if RELEASE:
                    held_sums += first_pushes
                summed = scanned + SCAN_BLOCK
            else:
                if PDL:
                    _pdl_start(PDL)  # the first launch has ended: its scratch is written, and so may this be
                # The counters' copy first: loads after the loop below would wait for its last load to come back.
                # (Loading the first sums out of the loop, as the tree draft does, cost 0.04-0.10 us at bs 1024, H200.)
                head = tl.load(scratch + num_rows)
                count = tl.load(scratch + num_rows + 1)
                summed = scanned
            counted = tile * SUMS  # the first launch's tiles before this one (SUMS of them a tile)
            for t0 in range(summed, counted, SCAN_BLOCK):  # (scanned counts the first launch's tiles here)
                pops_t, pushes_t = _tile_sums(scratch, t0, counted, num_rows, SCAN_BLOCK, RELEASE)
                lane_sums += pops_t
                if RELEASE:
                    held_sums += pushes_t
            before = tl.reduce(lane_sums, 0, _add)
        elif LOOKBACK:
            before = tl.reduce(own_sums, 0, _add)  # (one program: its own earlier tiles)
            if RELEASE:
                pushed_before = tl.reduce(own_held, 0, _add)
                tile_pushes = tl.reduce(held, 0, _add)
            else:
                tile_pushes = 0
            if num_programs > 1:  # publish this tile's pops (and pushes), then add those every earlier tile published
                pops_before, pushes_before = _publish_and_look_back(
                    statuses, push_statuses, tile, num_tiles, tl.reduce(pops, 0, _add), tile_pushes, LOOKBACK, RELEASE
                )
                before = pops_before
                if RELEASE:
                    pushed_before = pushes_before
        else:
            before = tl.reduce(own_sums, 0, _add)
            if (tile_start > 0) & (num_programs > 1):  # other programs' requests came before this tile
                before += tl.reduce(lane_sums, 0, _add)
        excl = before + tl.associative_scan(pops, 0, _add) - pops  # [TILE]
        own_sums += pops
        if RELEASE:
            if SUMS:
                held_before = tl.reduce(held_sums, 0, _add)
            elif LOOKBACK:
                held_before = pushed_before
            else:
                held_before = tl.reduce(own_held, 0, _add) + tl.reduce(held_sums, 0, _add)
            held_start = count + held_before + tl.associative_scan(held, 0, _add) - held
            own_held += held
            _push_branch_pages(
                rows, valid, held, held_start, branch_pages, free_pages, head, num_pages, branch_stride, BLOCK_R
            )
            if not owner:  # for the last program, which sums them
                tl.store(scratch + 2 * num_rows + offs, held, mask=in_batch)
        if BRANCH:
            tl.debug_barrier()  # the released pages are read before the new ones overwrite them
            if COPY:  # the last partial page, whose committed slots the copy pairs copy (unused where off is 0)
                tail_page = _floor_page(tl.maximum(prev, 0).to(tl.int32), PAGE_SIZE, PAGE_SHIFT)
            else:
                tail_page = rows * 0
            _write_branches(
                offs,
                in_batch,
                rows,
                valid,
                tail_page,
                branch_off,
                per_branch,
                branch_need,
                excl + need,
                reuse,
                branch_pages,
                free_pages,
                branch_slots,
                copy_src,
                copy_dst,
                head,
                count,
                num_pages,
                branch_stride,
                topk,
                num_steps,
                PAGE_SIZE,
                PAGE_SHIFT,
                BLOCK_R,
                BLOCK_E,
                COPY,
                EARLY_COPY,
            )
            if not owner:  # for the last program, which writes them
                tl.store(scratch + 3 * num_rows + offs, branch_need, mask=in_batch)
        if RELEASE or BRANCH:
            if owner:  # no other program reads these counts
                if BRANCH:
                    held_now = branch_need
                else:
                    held_now = rows * 0
                tl.store(num_branch_pages + rows, held_now.to(num_branch_pages.dtype.element_ty), mask=valid)
        # The page of the last partial page, which new positions fill first.
        last_page = _floor_page(tl.maximum(last_slot, 0), PAGE_SIZE, PAGE_SHIFT)
        if EMIT:
            tl.store(last_loc + offs, prev.to(last_loc.dtype.element_ty), mask=in_batch)
        if PREFIX:
            # Positions [0, start) take the caller's cached slots.
            slots_addr = offs.to(tl.int64) * prefix_stride  # [TILE]
            for col0 in range(0, tl.reduce(tl.where(valid, starts, 0), 0, _maximum), BLOCK_N):
                j = col0 + cols  # [BLOCK_N]
                mine = valid[:, None] & (j[None, :] < starts[:, None])  # [TILE, BLOCK_N]
                cached = tl.load(prefix_slots + (slots_addr[:, None] + j[None, :]), mask=mine, other=0)
                tl.store(req_to_token + (row_addr[:, None] + j[None, :]), cached.to(tl.int32), mask=mine)
        lengths = tl.where(valid, ends - starts, 0) * in_use  # a row not in use: no window
        if PREFILL:
            num_cols = tl.reduce(lengths, 0, _maximum)
        else:
            num_cols = tl.minimum(window_len, max_context_len)
        for col0 in range(0, num_cols, BLOCK_N):
            j = col0 + cols  # [BLOCK_N]
            in_window = valid[:, None] & (j[None, :] < lengths[:, None])  # [TILE, BLOCK_N]
            pos = starts[:, None] + j[None, :]
            is_new = in_window & (pos >= allocs[:, None])
            addr = row_addr[:, None] + pos
            if EMIT:
                # Old positions are read, new ones written: disjoint masks, so no read-after-write in this launch. The
                # read comes first: after the store below (same addresses) it would also wait for the ring's pages.
                old_slot = tl.load(req_to_token + addr, mask=in_window & (pos < allocs[:, None]), other=-1)
            page_no = _floor_page(pos, PAGE_SIZE, PAGE_SHIFT)
            k = page_no - have[:, None]
            ring_off = excl[:, None] + k
            from_ring = is_new & (k >= 0) & (ring_off >= 0) & (ring_off < count)
            ring_idx = _ring_index(head, tl.where(from_ring, ring_off, 0), num_pages)
            popped_page = tl.load(free_pages + ring_idx, mask=from_ring, other=0).to(tl.int32)
            page = tl.where(k >= 0, popped_page, last_page[:, None])
            new_slot = page * PAGE_SIZE + (pos - page_no * PAGE_SIZE)
            tl.store(req_to_token + addr, new_slot.to(req_to_token.dtype.element_ty), mask=is_new)
            if EMIT:
                slot = tl.where(is_new, new_slot, old_slot.to(tl.int32))
                in_out = in_batch[:, None] & (j[None, :] < window_len)
                dst = offs.to(tl.int64)[:, None] * window_len + j[None, :]
                tl.store(out_cache_loc + dst, slot.to(out_cache_loc.dtype.element_ty), mask=in_out)
        # Values no other program reads are written here; the rest by the last program.
        if PREFILL:
            zero = tl.full([TILE], 0, dtype=tl.int32)
            tl.store(seq_lens + rows, ends.to(seq_lens.dtype.element_ty), mask=valid)
            tl.store(alloc_lens + rows, ends.to(alloc_lens.dtype.element_ty), mask=valid)
            tl.store(window_lens + rows, zero.to(window_lens.dtype.element_ty), mask=valid)
            tl.store(prefix_lens + rows, starts.to(prefix_lens.dtype.element_ty), mask=valid)
        elif owner:  # no other program reads these lengths
            tl.store(window_lens + rows, lengths.to(window_lens.dtype.element_ty), mask=valid)
            tl.store(alloc_lens + rows, new_allocs.to(alloc_lens.dtype.element_ty), mask=valid)
            if COMMIT:  # (a row not in use keeps seq_len -1)
                tl.store(seq_lens + rows, (starts * in_use + (in_use - 1)).to(seq_lens.dtype.element_ty), mask=valid)
            if RELEASE:
                pushed_all = held_before + tl.reduce(held, 0, _add)
            else:
                pushed_all = 0
            if LOOKBACK:
                if (tile == num_tiles - 1) & (num_programs > 1):  # the last tile: every pop of the batch is known
                    _finish_look_back(
                        counters,
                        head,
                        count,
                        before + tl.reduce(pops, 0, _add),
                        pushed_all,
                        num_pages,
                        num_tiles,
                        scratch,
                        num_rows,
                        epoch,
                        prev_tiles,
                        push_epoch,
                        prev_push_tiles,
                        LOOKBACK,
                        RELEASE,
                    )
            if SUMS:
                if tile == num_tiles - 1:  # the last tile: every pop (and push) of the batch is known
                    _move_counters(counters, head, count, before + tl.reduce(pops, 0, _add), pushed_all, num_pages)
        else:  # for the last program, which writes them (COMMIT: other programs read the open windows too)
            if COMMIT:  # (-1 for a row not in use, which keeps seq_len -1 and opens no window)
                tl.store(scratch + 3 * num_rows + offs, starts * in_use + (in_use - 1), mask=in_batch)
            else:
                tl.store(window_lens + rows, lengths.to(window_lens.dtype.element_ty), mask=valid)
            tl.store(scratch + offs, new_allocs, mask=in_batch)
        if not owner:
            tl.store(scratch + num_rows + offs, pops, mask=in_batch)
    if SUMS:
        pass  # the program of the last tile moved the counters
    elif alone:
        if RELEASE:
            own_pushes = tl.reduce(own_held, 0, _add)
        else:  # (no reduce of the carried zeros)
            own_pushes = 0
        _move_counters(counters, head, count, tl.reduce(own_sums, 0, _add), own_pushes, num_pages)
    elif LOOKBACK:
        pass  # the program of the last tile moved the counters
    elif _take_ticket(counters) == num_programs - 1:
        # The last program: no other one reads shared state any more. The owners left each request's new
        # alloc_len at scratch[i], its need at scratch[num_rows + i] and (RELEASE) its branch pages at
        # scratch[2 * num_rows + i] and (BRANCH) its new branch pages or (COMMIT) its committed length at
        # scratch[3 * num_rows + i]: loads masked by the batch, not by the rows, so none waits for the rows' load.
        popped_lanes = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
        pushed_lanes = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
        for k0 in range(0, bs, SCAN_BLOCK):
            k = k0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
            in_range = k < bs
            rows = tl.load(req_pool_indices + k, mask=in_range, other=-1).to(tl.int32)
            valid = in_range & (rows >= 0) & (rows < num_rows)
            if not PREFILL:
                new_allocs = tl.load(scratch + k, mask=in_range, other=0)
                tl.store(alloc_lens + rows, new_allocs.to(alloc_lens.dtype.element_ty), mask=valid)
            if COMMIT:  # the committed length (scratch[3 * num_rows + i]) and the new window
                seqs = tl.load(scratch + 3 * num_rows + k, mask=in_range, other=0)
                opened = (tl.minimum(seqs + window_len, max_context_len) - seqs) * (1 + (seqs >> 31))
                tl.store(seq_lens + rows, seqs.to(seq_lens.dtype.element_ty), mask=valid)
                tl.store(window_lens + rows, opened.to(window_lens.dtype.element_ty), mask=valid)
            popped_lanes += tl.load(scratch + num_rows + k, mask=in_range, other=0)
            if RELEASE:
                pushed_lanes += tl.load(scratch + 2 * num_rows + k, mask=in_range, other=0)
            if BRANCH:
                held_now = tl.load(scratch + 3 * num_rows + k, mask=in_range, other=0)
                tl.store(num_branch_pages + rows, held_now.to(num_branch_pages.dtype.element_ty), mask=valid)
            elif RELEASE:
                tl.store(num_branch_pages + rows, (rows * 0).to(num_branch_pages.dtype.element_ty), mask=valid)
        if RELEASE:
            pushed_all = tl.reduce(pushed_lanes, 0, _add)
        else:
            pushed_all = 0
        _move_counters(counters, head, count, tl.reduce(popped_lanes, 0, _add), pushed_all, num_pages)
        tl.store(counters + 2, tl.full([], 0, dtype=counters.dtype.element_ty))


@triton.jit(
    do_not_specialize=[
        "bs",
        "window_len",
        "num_rows",
        "max_context_len",
        "row_stride",
        "num_pages",
        "prefix_stride",
        "branch_stride",
        "branch_width",
        "topk",
        "num_steps",
    ]
)
def _alloc_windows_kernel(
    req_to_token,
    req_pool_indices,
    seq_lens,
    alloc_lens,
    window_lens,
    prefix_lens,
    window_starts,
    window_ends,
    accept_lens,
    prefix_slots,
    free_pages,
    counters,
    scratch,
    out_cache_loc,
    last_loc,
    branch_pages,
    num_branch_pages,
    branch_slots,
    copy_src,
    copy_dst,
    bs,
    window_len,
    num_rows,
    max_context_len,
    row_stride,
    num_pages,
    prefix_stride,
    branch_stride,
    branch_width,
    topk,
    num_steps,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    PREFILL: tl.constexpr,
    PREFIX: tl.constexpr,
    EMIT: tl.constexpr,
    RELEASE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BRANCH: tl.constexpr,
    BLOCK_E: tl.constexpr,
    COPY: tl.constexpr,
    EARLY_COPY: tl.constexpr,
    COMMIT: tl.constexpr,
    SUMS: tl.constexpr,
    LOOKBACK: tl.constexpr = 0,
    PDL: tl.constexpr = False,
):
    """Give slots to the windows ``[start_i, end_i)`` and optionally read them back (see ``_alloc_windows``)."""
    _alloc_windows(
        req_to_token,
        req_pool_indices,
        seq_lens,
        alloc_lens,
        window_lens,
        prefix_lens,
        window_starts,
        window_ends,
        accept_lens,
        prefix_slots,
        free_pages,
        counters,
        scratch,
        out_cache_loc,
        last_loc,
        branch_pages,
        num_branch_pages,
        branch_slots,
        copy_src,
        copy_dst,
        bs,
        window_len,
        num_rows,
        max_context_len,
        row_stride,
        num_pages,
        prefix_stride,
        branch_stride,
        branch_width,
        topk,
        num_steps,
        PAGE_SIZE,
        PAGE_SHIFT,
        TILE,
        BLOCK_N,
        SCAN_BLOCK,
        PREFILL,
        PREFIX,
        EMIT,
        RELEASE,
        BLOCK_R,
        BRANCH,
        BLOCK_E,
        COPY,
        EARLY_COPY,
        COMMIT,
        SUMS,
        LOOKBACK,
        PDL,
    )


@triton.jit(do_not_specialize=["bs", "window_len", "num_rows", "max_context_len"])
def _count_pops_kernel(
    req_pool_indices,
    seq_lens,
    alloc_lens,
    window_lens,
    accept_lens,
    counters,
    scratch,
    bs,
    window_len,
    num_rows,
    max_context_len,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    TILE: tl.constexpr,
    COMMIT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The first launch of a draft in two (``SUMS`` of ``_alloc_windows_kernel``, same ``TILE`` and grid):
    ``scratch[t]`` = the pages that the requests of tile ``t`` (batch entries ``[t * TILE, (t + 1) * TILE)``) pop,
    and ``scratch[num_rows]``, ``scratch[num_rows + 1]`` = the ring's head and count. Writes nothing else, so the
    allocator's state is unchanged until the second launch. ``PDL`` (launched as a programmatic dependent, as is
    the second): wait for the previous kernel to end, then let the second start, so that what the second loads
    before its own wait was written before it started."""
    if PDL:
        _pdl_start(2)  # the previous kernel has ended: the second launch may load what it wrote
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    for tile in range(pid, num_tiles, num_programs):
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        need = _window_needs(
            offs,
            offs < bs,
            req_pool_indices,
            seq_lens,
            alloc_lens,
            seq_lens,
            seq_lens,
            accept_lens,
            window_lens,
            window_len,
            num_rows,
            max_context_len,
            PAGE_SIZE,
            PAGE_SHIFT,
            False,
            False,
            COMMIT,
        )[8]
        tl.store(scratch + tile, tl.reduce(need, 0, _add), mask=tile < num_rows)
    if pid == 0:
        tl.store(scratch + num_rows, tl.load(counters).to(tl.int32))
        tl.store(scratch + num_rows + 1, tl.load(counters + 1).to(tl.int32))


@triton.jit
def _pages_to_push(
    k,
    in_range,
    req_pool_indices,
    alloc_lens,
    prefix_lens,
    keep_lens,
    num_branch_pages,
    num_rows,
    max_context_len,
    branch_width,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    KEEP: tl.constexpr,
    BRANCHES: tl.constexpr,
):
    """For batch entries ``k``: the row, the first page it gives back and how many (pages ``[first, first + n)``
    of the row: past the cache-owned prefix and, with ``KEEP``, past the pages kept for the cache), the row's
    alloc_len clamped to ``[0, max_context_len]``, and with ``BRANCHES`` the branch pages the row holds (clamped to
    ``[0, branch_width]``; else 0)."""
    rows = tl.load(req_pool_indices + k, mask=in_range, other=-1).to(tl.int32)
    valid = in_range & (rows >= 0) & (rows < num_rows)
    allocs = tl.load(alloc_lens + rows, mask=valid, other=0).to(tl.int32)
    allocs = tl.minimum(tl.maximum(allocs, 0), max_context_len)
    kept = tl.load(prefix_lens + rows, mask=valid, other=0).to(tl.int32)
    if KEEP:
        kept = tl.maximum(kept, tl.load(keep_lens + k, mask=valid, other=0).to(tl.int32))
    kept = tl.minimum(tl.maximum(kept, 0), allocs)
    first = _floor_page(kept + (PAGE_SIZE - 1), PAGE_SIZE, PAGE_SHIFT)
    owned = _floor_page(allocs + (PAGE_SIZE - 1), PAGE_SIZE, PAGE_SHIFT)
    n = tl.where(valid, tl.maximum(owned - first, 0), 0)
    held = n * 0
    if BRANCHES:
        # Masked lanes load 0: no tl.where on the mask (held feeds 2-D masks, see _branch_counts).
        held = tl.load(num_branch_pages + rows, mask=valid, other=0).to(tl.int32)
        held = tl.minimum(tl.maximum(held, 0), branch_width)
    return rows, valid, first, n, allocs, held


@triton.jit(
    do_not_specialize=["bs", "num_rows", "max_context_len", "num_pages", "row_stride", "branch_stride", "branch_width"]
)
def _free_pages_kernel(
    req_to_token,
    req_pool_indices,
    keep_lens,
    seq_lens,
    alloc_lens,
    window_lens,
    prefix_lens,
    free_pages,
    counters,
    branch_pages,
    num_branch_pages,
    bs,
    num_rows,
    max_context_len,
    num_pages,
    row_stride,
    branch_stride,
    branch_width,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    KEEP: tl.constexpr,
    BRANCHES: tl.constexpr = False,
    BLOCK_R: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """Push the pages of the requests back to the ring, clear their rows and reset their lengths: ``seq_len`` and
    ``alloc_len`` -1, the mark of a row not in use (which the other kernels leave alone, see ``_window_span``), the
    others 0. With ``BRANCHES`` also the branch pages the rows hold (``alloc_branches``), in the same launch.

    Request ``i`` gives back its pages ``first_i + k``, ``k < n_i`` (``first_i = pages(max(prefix_len,
    keep_lens[i]))``: cache-owned and kept pages stay with the cache); page ``first_i + k`` is
    ``req_to_token[row_i, (first_i + k) * PAGE_SIZE] // PAGE_SIZE`` and goes to ring offset ``count + excl_i + k``,
    then its ``held_i`` branch pages ``branch_pages[row_i, k]`` (``BRANCHES``, else none) to ``count + excl_i + n_i +
    k`` (``excl_i = sum(n_k + held_k for k < i)``), so the ring hands them out again in batch and position order;
    ``num_branch_pages[row_i] = 0``.
    """
    if PDL:
        _pdl_start(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    head = tl.load(counters).to(tl.int32)
    count = tl.load(counters + 1).to(tl.int32)
    cols = tl.arange(0, BLOCK_P)
    lane_sums = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
    for tile in range(pid, num_tiles, num_programs):
        tile_start = tile * TILE
        for k0 in range(_unsummed(tile, num_programs, 0) * TILE, tile_start, SCAN_BLOCK):
            k = k0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
            _, _, _, earlier, _, earlier_held = _pages_to_push(
                k,
                k < tile_start,
                req_pool_indices,
                alloc_lens,
                prefix_lens,
                keep_lens,
                num_branch_pages,
                num_rows,
                max_context_len,
                branch_width,
                PAGE_SIZE,
                PAGE_SHIFT,
                KEEP,
                BRANCHES,
            )
            lane_sums += earlier + earlier_held
        offs = tile_start + tl.arange(0, TILE)  # [TILE]
        rows, valid, first, n, allocs, held = _pages_to_push(
            offs,
            offs < bs,
            req_pool_indices,
            alloc_lens,
            prefix_lens,
            keep_lens,
            num_branch_pages,
            num_rows,
            max_context_len,
            branch_width,
            PAGE_SIZE,
            PAGE_SHIFT,
            KEEP,
            BRANCHES,
        )
        pushes = n + held
        excl = count + tl.reduce(lane_sums, 0, _add) + tl.associative_scan(pushes, 0, _add) - pushes  # [TILE]
        row_addr = rows.to(tl.int64) * row_stride
        for k0 in range(0, tl.reduce(n, 0, _maximum), BLOCK_P):
            k = k0 + cols  # [BLOCK_P]
            mine = valid[:, None] & (k[None, :] < n[:, None])  # [TILE, BLOCK_P]
            pos = (first[:, None] + k[None, :]) * PAGE_SIZE
            first_slot = tl.load(req_to_token + (row_addr[:, None] + pos), mask=mine, other=0).to(tl.int32)
            ring_off = excl[:, None] + k[None, :]
            to_ring = mine & (ring_off < num_pages)
            ring_idx = _ring_index(head, tl.where(to_ring, ring_off, 0), num_pages)
            page = _floor_page(tl.maximum(first_slot, 0), PAGE_SIZE, PAGE_SHIFT)
            tl.store(free_pages + ring_idx, page.to(free_pages.dtype.element_ty), mask=to_ring)
        if BRANCHES:
            _push_branch_pages(
                rows, valid, held, excl + n, branch_pages, free_pages, head, num_pages, branch_stride, BLOCK_R
            )
        # The rows go back to padding: positions [0, alloc_len) are cleared, the others hold 0 already (no kernel
        # writes past alloc_len).
        tl.debug_barrier()  # every page was read above before its slots are cleared
        clear = tl.full([TILE, BLOCK_C], 0, dtype=req_to_token.dtype.element_ty)
        for c0 in range(0, tl.reduce(allocs, 0, _maximum), BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
            owned_pos = valid[:, None] & (c[None, :] < allocs[:, None])  # [TILE, BLOCK_C]
            tl.store(req_to_token + (row_addr[:, None] + c[None, :]), clear, mask=owned_pos)
        zero = tl.full([TILE], 0, dtype=tl.int32)
        tl.store(seq_lens + rows, (zero - 1).to(seq_lens.dtype.element_ty), mask=valid)  # not in use
        tl.store(window_lens + rows, zero.to(window_lens.dtype.element_ty), mask=valid)
    if _take_ticket(counters) == num_programs - 1:
        pushed_lanes = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
        for k0 in range(0, bs, SCAN_BLOCK):
            k = k0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
            rows, valid, first, n, _, held = _pages_to_push(
                k,
                k < bs,
                req_pool_indices,
                alloc_lens,
                prefix_lens,
                keep_lens,
                num_branch_pages,
                num_rows,
                max_context_len,
                branch_width,
                PAGE_SIZE,
                PAGE_SHIFT,
                KEEP,
                BRANCHES,
            )
            zero = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
            tl.debug_barrier()  # every lane has read the lengths it sums
            tl.store(alloc_lens + rows, (zero - 1).to(alloc_lens.dtype.element_ty), mask=valid)  # not in use
            tl.store(prefix_lens + rows, zero.to(prefix_lens.dtype.element_ty), mask=valid)
            if BRANCHES:
                tl.store(num_branch_pages + rows, zero.to(num_branch_pages.dtype.element_ty), mask=valid)
            pushed_lanes += n + held
        pushed = tl.minimum(tl.reduce(pushed_lanes, 0, _add), num_pages - count)
        tl.store(counters + 1, (count + pushed).to(counters.dtype.element_ty))
        tl.store(counters + 2, tl.full([], 0, dtype=counters.dtype.element_ty))


@triton.jit(do_not_specialize=["n", "num_pages"])
def _push_pages_kernel(pages, free_pages, counters, n, num_pages, TILE: tl.constexpr, PDL: tl.constexpr = False):
    """Append ``pages[:n]`` to the ring: ``free_pages[(head + count + i) % num_pages] = pages[i]``. One program."""
    if PDL:
        _pdl_start(PDL)
    head = tl.load(counters).to(tl.int32)
    count = tl.load(counters + 1).to(tl.int32)
    for k0 in range(0, n, TILE):
        k = k0 + tl.arange(0, TILE)  # [TILE]
        ring_off = count + k
        ok = (k < n) & (ring_off < num_pages)
        page = tl.load(pages + k, mask=ok, other=0)
        ring_idx = _ring_index(head, tl.where(ok, ring_off, 0), num_pages)
        tl.store(free_pages + ring_idx, page.to(free_pages.dtype.element_ty), mask=ok)
    pushed = tl.minimum(n, num_pages - count)
    tl.debug_barrier()  # every thread has read the counters
    tl.store(counters + 1, (count + pushed).to(counters.dtype.element_ty))


@triton.jit(do_not_specialize=["bs", "num_rows"])
def _commit_kernel(
    req_pool_indices, accept_lens, seq_lens, window_lens, bs, num_rows, TILE: tl.constexpr, PDL: tl.constexpr = False
):
    """``seq_lens[row_i] += clamp(accept_lens[i], 0, window_lens[row_i])``; the draft window closes (``= 0``)."""
    if PDL:
        _pdl_start(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    for tile in range(pid, num_tiles, num_programs):
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        in_batch = offs < bs
        rows = tl.load(req_pool_indices + offs, mask=in_batch, other=0).to(tl.int32)
        valid = in_batch & (rows >= 0) & (rows < num_rows)
        # Clamped in the caller's dtype, then narrowed: an int64 past 2**31 must not wrap into the window.
        accepted = tl.load(accept_lens + offs, mask=valid, other=0)
        window = tl.load(window_lens + rows, mask=valid, other=0)
        accepted = tl.minimum(tl.maximum(accepted, 0), tl.maximum(window, 0).to(accepted.dtype)).to(tl.int32)
        seq = tl.load(seq_lens + rows, mask=valid, other=0).to(tl.int32)
        tl.store(seq_lens + rows, (seq + accepted).to(seq_lens.dtype.element_ty), mask=valid)
        tl.store(window_lens + rows, tl.full([TILE], 0, dtype=window_lens.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["bs", "num_rows", "num_pages", "branch_stride", "branch_width"])
def _release_branches_kernel(
    req_pool_indices,
    branch_pages,
    num_branch_pages,
    free_pages,
    counters,
    bs,
    num_rows,
    num_pages,
    branch_stride,
    branch_width,
    TILE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Push the branch pages of the requests back to the ring: request ``i``'s ``held_i`` pages go to ring offsets
    ``count + excl_i + k`` (``excl_i = sum(held_k for k < i)``); ``num_branch_pages[row_i] = 0``."""
    if PDL:
        _pdl_start(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    head = tl.load(counters).to(tl.int32)
    count = tl.load(counters + 1).to(tl.int32)
    held_sums = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
    for tile in range(pid, num_tiles, num_programs):
        held_sums = _release_tile(
            tile * TILE,
            _unsummed(tile, num_programs, 0) * TILE,
            held_sums,
            req_pool_indices,
            branch_pages,
            num_branch_pages,
            free_pages,
            head,
            count,
            bs,
            num_rows,
            num_pages,
            branch_stride,
            branch_width,
            TILE,
            BLOCK_R,
            SCAN_BLOCK,
        )
    _release_finish(
        counters, req_pool_indices, num_branch_pages, count, bs, num_rows, num_pages, branch_width, SCAN_BLOCK
    )


@triton.jit
def _release_tile(
    tile_start,
    scanned,
    held_sums,
    req_pool_indices,
    branch_pages,
    num_branch_pages,
    free_pages,
    head,
    count,
    bs,
    num_rows,
    num_pages,
    branch_stride,
    branch_width,
    TILE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    """Push the branch pages of the batch entries ``[tile_start, tile_start + TILE)`` (see
    ``_release_branches_kernel``). ``held_sums``: lane-wise sums of the pages held by entries ``[0, scanned)``;
    returns them for ``[0, tile_start)``."""
    for k0 in range(scanned, tile_start, SCAN_BLOCK):
        k = k0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
        held_sums += _branch_counts(k, k < tile_start, req_pool_indices, num_branch_pages, num_rows, branch_width)[2]
    offs = tile_start + tl.arange(0, TILE)  # [TILE]
    rows, valid, held = _branch_counts(offs, offs < bs, req_pool_indices, num_branch_pages, num_rows, branch_width)
    held_start = count + tl.reduce(held_sums, 0, _add) + tl.associative_scan(held, 0, _add) - held  # [TILE]
    _push_branch_pages(rows, valid, held, held_start, branch_pages, free_pages, head, num_pages, branch_stride, BLOCK_R)
    return held_sums


@triton.jit
def _release_finish(
    counters, req_pool_indices, num_branch_pages, count, bs, num_rows, num_pages, branch_width, SCAN_BLOCK: tl.constexpr
):
    """After ``_release_tile`` over the batch: the program that takes the last ticket counts the pushed pages,
    sets ``num_branch_pages`` of the rows to 0 and moves the ring's count."""
    if _take_ticket(counters) == tl.num_programs(0) - 1:
        pushed_lanes = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
        for k0 in range(0, bs, SCAN_BLOCK):
            k = k0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
            rows, valid, held = _branch_counts(k, k < bs, req_pool_indices, num_branch_pages, num_rows, branch_width)
            pushed_lanes += held
            tl.debug_barrier()  # every lane has read the counts it sums
            tl.store(num_branch_pages + rows, (held * 0).to(num_branch_pages.dtype.element_ty), mask=valid)
        pushed = tl.minimum(tl.reduce(pushed_lanes, 0, _add), num_pages - count)
        tl.store(counters + 1, (count + pushed).to(counters.dtype.element_ty))
        tl.store(counters + 2, tl.full([], 0, dtype=counters.dtype.element_ty))


@triton.jit
def _branch_needs(
    k,
    in_range,
    req_pool_indices,
    seq_lens,
    num_branch_pages,
    num_rows,
    max_context_len,
    branch_width,
    topk,
    num_steps,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
):
    """For batch entries ``k``: the row, whether it is valid, the branch pages it holds, its committed length, the
    offset of that length in its last page, the pages of one branch and the pages of all its branches (none for a
    row not in use, whose ``seq_len`` is -1, as its ``alloc_len``: see ``_window_span``; from the length loaded
    anyway, as a load of ``alloc_lens`` here cost the one-program kernel a round trip, 0.6-0.7 us on an H200)."""
    rows, valid, held = _branch_counts(k, in_range, req_pool_indices, num_branch_pages, num_rows, branch_width)
    seq = tl.load(seq_lens + rows, mask=valid, other=0).to(tl.int32)
    in_use = 1 + (seq >> 31)
    seq = tl.minimum(tl.maximum(seq, 0), max_context_len)
    off, per_branch, need = _branch_shape(seq, valid, branch_width * in_use, topk, num_steps, PAGE_SIZE, PAGE_SHIFT)
    return rows, valid, held, seq, off, per_branch, need


@triton.jit
def _branch_moves(
    k,
    in_range,
    req_pool_indices,
    seq_lens,
    num_branch_pages,
    num_rows,
    max_context_len,
    branch_width,
    topk,
    num_steps,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
):
    """For batch entries ``k``: the row, whether it is valid, the branch pages it needs, and the pages it pops and
    pushes for them (``_branch_needs``, then ``_trade``: none where it keeps the pages it holds)."""
    rows, valid, held, _, _, per_branch, need = _branch_needs(
        k,
        in_range,
        req_pool_indices,
        seq_lens,
        num_branch_pages,
        num_rows,
        max_context_len,
        branch_width,
        topk,
        num_steps,
        PAGE_SIZE,
        PAGE_SHIFT,
    )
    _, pops, pushes = _trade(held, need, per_branch, topk)
    return rows, valid, need, pops, pushes


@triton.jit
def _branch_shape(seq, valid, branch_width, topk, num_steps, PAGE_SIZE: tl.constexpr, PAGE_SHIFT: tl.constexpr):
    """For committed lengths ``seq``: the offset of ``seq`` in its last page, the pages of one branch and the pages
    of all the request's branches (0 where not ``valid``)."""
    off = seq - _floor_page(seq, PAGE_SIZE, PAGE_SHIFT) * PAGE_SIZE
    per_branch = _floor_page(off + num_steps + (PAGE_SIZE - 1), PAGE_SIZE, PAGE_SHIFT)
    need = tl.where(valid, tl.minimum(per_branch * topk, branch_width), 0)
    return off, per_branch, need


@triton.jit
def _reused(held, need, per_branch, topk):
    """Requests whose branch pages held are exactly as many as their new branches take (same ``topk``, same pages
    per branch): they keep them, with no push and no pop, and their new branches are laid out on them. 1 or 0
    (int32)."""
    return ((need > 0) & (held == need) & (need == per_branch * topk)).to(tl.int32)


@triton.jit
def _trade(held, need, per_branch, topk):
    """The branch pages a request pops and pushes for ``need`` new ones while it holds ``held``: none where it keeps
    them (``_reused``), else all ``need`` popped and all ``held`` pushed. Returns ``(reuse, pops, pushes)``: every
    kernel that moves branch pages counts them here, so that a launch's counts and its pops agree."""
    reuse = _reused(held, need, per_branch, topk)
    return reuse, need * (1 - reuse), held * (1 - reuse)


@triton.jit
def _popped_page(page_k, in_out, popping, excl, free_pages, head, count, num_pages):
    """The ``page_k``-th branch page of each popping request (``[TILE, E]``), at ring offset ``excl + page_k`` (0
    elsewhere), and where that is."""
    ring_off = excl[:, None] + page_k
    from_ring = in_out & popping[:, None] & (ring_off < count)
    ring_idx = _ring_index(head, tl.where(from_ring, ring_off, 0), num_pages)
    return tl.load(free_pages + ring_idx, mask=from_ring, other=0).to(tl.int32), from_ring


@triton.jit
def _kept_page(page_k, in_out, reuse, branch_addr, branch_pages):
    """The ``page_k``-th branch page of each request that keeps its pages (``reuse``), from ``branch_pages`` (0
    elsewhere), and where that is. The launch neither pushes nor overwrites those pages."""
    from_held = in_out & (reuse != 0)[:, None]
    return tl.load(branch_pages + (branch_addr[:, None] + page_k), mask=from_held, other=0).to(tl.int32), from_held


@triton.jit
def _branch_page(page_k, in_out, popping, reuse, excl, branch_addr, branch_pages, free_pages, head, count, num_pages):
    """The ``page_k``-th branch page of each request (``[TILE, E]``) and where there is one: popped at ring offset
    ``excl + page_k``, or kept in ``branch_pages`` where ``reuse``."""
    # Two masked gathers: one through a select of the two pointers crashes triton-adapter-opt, and skipping either
    # when no request of the tile needs it (a branch on a reduction) cost more on an H200 than the gather.
    popped, from_ring = _popped_page(page_k, in_out, popping, excl, free_pages, head, count, num_pages)
    kept, from_held = _kept_page(page_k, in_out, reuse, branch_addr, branch_pages)
    return tl.where(from_held, kept, popped), from_ring | from_held


@triton.jit
def _copy_block(c0, in_batch, per_branch, copy_width, PAGE_SIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    """Copy pairs ``[c0, c0 + BLOCK_E)`` of each request (``c = b * (PAGE_SIZE - 1) + q``): which are written, the
    offset ``q`` in the page and the branch's first page (of the request's need)."""
    c = c0 + tl.arange(0, BLOCK_E)  # [BLOCK_E]: branch b = c // (PAGE_SIZE - 1), offset q
    b = c // (PAGE_SIZE - 1)
    q = c - b * (PAGE_SIZE - 1)
    in_out = in_batch[:, None] & (c[None, :] < copy_width)  # [TILE, BLOCK_E]
    page_k = b[None, :] * per_branch[:, None] + q[None, :] * 0  # the branch's first page
    return c, q, in_out, page_k


@triton.jit
def _copy_pairs(c, q, in_out, page, has_page, tail_page, off, copy_base, copy_src, copy_dst, PAGE_SIZE: tl.constexpr):
    """Write copy pairs ``c`` of each request: ``copy_dst`` the slot at offset ``q`` of the branch's first page
    ``page``, ``copy_src`` the committed slot at offset ``q < off`` of the last partial page ``tail_page``, else
    ``copy_dst`` (0 -> 0 without a page)."""
    dst = tl.where(has_page, page * PAGE_SIZE + q[None, :], 0)
    src = tl.where(has_page & (q[None, :] < off[:, None]), tail_page[:, None] * PAGE_SIZE + q[None, :], dst)
    dst_addr = copy_base[:, None] + c[None, :]
    tl.store(copy_src + dst_addr, src.to(copy_src.dtype.element_ty), mask=in_out)
    tl.store(copy_dst + dst_addr, dst.to(copy_dst.dtype.element_ty), mask=in_out)


@triton.jit
def _write_branches(
    offs,
    in_batch,
    rows,
    valid,
    tail_page,
    off,
    per_branch,
    need,
    excl,
    reuse,
    branch_pages,
    free_pages,
    branch_slots,
    copy_src,
    copy_dst,
    head,
    count,
    num_pages,
    branch_stride,
    topk,
    num_steps,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    COPY: tl.constexpr,
    EARLY_COPY: tl.constexpr,
):
    """Give batch entries ``offs`` their branches (see ``_alloc_branches_kernel``): request ``i`` pops ``need_i``
    pages at ring offsets ``excl_i + k`` into ``branch_pages[row_i, k]`` (where ``reuse_i``, see ``_reused``, it
    keeps the pages there instead), and writes its branch slots and, with ``COPY``, its copy pairs, whose sources are
    the committed slots of the last partial page ``tail_page`` (``req_to_token`` keeps SGLang's page layout: the
    slot at offset ``q`` of a row's page is the page's first slot plus ``q``, so no pair reads the table). With
    ``EARLY_COPY`` (off Ascend, whose on-chip buffer the extra live tiles overflow) the first block of copy pairs
    loads its kept pages together with the branch slots' loads."""
    cols = tl.arange(0, BLOCK_R)
    width = topk * num_steps
    branch_addr = rows.to(tl.int64) * branch_stride  # [TILE]
    popping = valid & (reuse == 0) & (need > 0)  # (a row not in use needs none, see _window_span)
    for k0 in range(0, tl.reduce(tl.where(popping, need, 0), 0, _maximum), BLOCK_R):
        k = k0 + cols  # [BLOCK_R]
        mine = popping[:, None] & (k[None, :] < need[:, None])  # [TILE, BLOCK_R]
        ring_off = excl[:, None] + k[None, :]
        from_ring = mine & (ring_off < count)
        ring_idx = _ring_index(head, tl.where(from_ring, ring_off, 0), num_pages)
        page = tl.load(free_pages + ring_idx, mask=from_ring, other=0)
        tl.store(branch_pages + (branch_addr[:, None] + k[None, :]), page, mask=mine)
    if COPY:
        copy_width = topk * (PAGE_SIZE - 1)
        if EARLY_COPY:
            # The first block of copy pairs loads its kept pages with the branch slots' loads, before their stores:
            # one round trip for both (H200, tree step: page 64 bs 1024 5.96 -> 5.70 us, page 16 5.81 -> 5.26). Held
            # across the scan instead, such loads cost more than they saved (docs/performance.md).
            c, q, in_copy, copy_k = _copy_block(0, in_batch, per_branch, copy_width, PAGE_SIZE, BLOCK_E)
            kept, held_copy = _kept_page(copy_k, in_copy, reuse, branch_addr, branch_pages)
    out_base = offs.to(tl.int64) * width  # [TILE]
    for e0 in range(0, width, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)  # [BLOCK_E]: branch b = e // num_steps, step s
        b = e // num_steps
        s = e - b * num_steps
        in_out = in_batch[:, None] & (e[None, :] < width)  # [TILE, BLOCK_E]
        pos = off[:, None] + s[None, :]  # offset from the start of the last partial page
        page_no = _floor_page(pos, PAGE_SIZE, PAGE_SHIFT)
        page_k = b[None, :] * per_branch[:, None] + page_no  # the branch page, of the request's need
        page, has_page = _branch_page(
            page_k, in_out, popping, reuse, excl, branch_addr, branch_pages, free_pages, head, count, num_pages
        )
        slot = tl.where(has_page, page * PAGE_SIZE + (pos - page_no * PAGE_SIZE), 0)
        tl.store(branch_slots + (out_base[:, None] + e[None, :]), slot.to(branch_slots.dtype.element_ty), mask=in_out)
    if COPY:
        copy_base = offs.to(tl.int64) * copy_width  # [TILE]
        if EARLY_COPY:  # the first block from the loads above (peeled off the loop: an `if` on the block inside it
            # crashes triton-adapter-opt)
            popped, from_ring = _popped_page(copy_k, in_copy, popping, excl, free_pages, head, count, num_pages)
            page = tl.where(held_copy, kept, popped)
            has_page = from_ring | held_copy
            _copy_pairs(c, q, in_copy, page, has_page, tail_page, off, copy_base, copy_src, copy_dst, PAGE_SIZE)
        for c0 in range(BLOCK_E if EARLY_COPY else 0, copy_width, BLOCK_E):
            c, q, in_copy, copy_k = _copy_block(c0, in_batch, per_branch, copy_width, PAGE_SIZE, BLOCK_E)
            page, has_page = _branch_page(
                copy_k, in_copy, popping, reuse, excl, branch_addr, branch_pages, free_pages, head, count, num_pages
            )
            _copy_pairs(c, q, in_copy, page, has_page, tail_page, off, copy_base, copy_src, copy_dst, PAGE_SIZE)


@triton.jit(
    do_not_specialize=[
        "bs",
        "num_rows",
        "max_context_len",
        "row_stride",
        "num_pages",
        "branch_stride",
        "branch_width",
        "topk",
        "num_steps",
    ]
)
def _alloc_branches_kernel(
    req_to_token,
    req_pool_indices,
    seq_lens,
    branch_pages,
    num_branch_pages,
    free_pages,
    counters,
    branch_slots,
    copy_src,
    copy_dst,
    scratch,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    num_pages,
    branch_stride,
    branch_width,
    topk,
    num_steps,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    COPY: tl.constexpr,
    EARLY_COPY: tl.constexpr,
    LOOKBACK: tl.constexpr = 0,
    PDL: tl.constexpr = False,
):
    """Release the rows' branch pages, then give each request ``topk`` branches of ``num_steps`` positions (a
    request that holds exactly the pages its branches take keeps them instead, see ``_reused``).

    Request ``i`` (committed length ``seq``, ``off = seq % PAGE_SIZE``) pushes its ``held_i`` old pages at ring
    offsets ``count + excl_held_i + k`` and pops ``need_i = topk * per_branch`` pages at ``excl_need_i + k``,
    ``per_branch = pages(off + num_steps)``: branch ``b`` takes pages ``b * per_branch + (0 .. per_branch - 1)``,
    and its step ``s`` (position ``seq + s``) the slot at offset ``(off + s) % PAGE_SIZE`` of its page
    ``(off + s) // PAGE_SIZE``: ``branch_slots[(i * topk + b) * num_steps + s]``. With ``COPY`` (``PAGE_SIZE >
    1``): ``copy_dst[(i * topk + b) * (PAGE_SIZE - 1) + q] = first_page_b * PAGE_SIZE + q`` and ``copy_src`` the
    slot of committed position ``seq - off + q`` for ``q < off`` (the committed part of the last partial page);
    ``copy_src = copy_dst`` for ``q >= off``. Rows out of range give slot 0 and pairs ``0 -> 0``. With ``LOOKBACK``
    (that many statuses a load) each program publishes its tiles' pushes and pops in ``scratch`` and reads those of
    earlier tiles instead of summing earlier requests, as ``_alloc_windows`` does for a draft that releases: each
    writes its own rows' branch counts, the program of the last tile moves the counters (no ticket).
    """
    if PDL:
        _pdl_start(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    head = tl.load(counters).to(tl.int32)
    count = tl.load(counters + 1).to(tl.int32)
    if LOOKBACK:  # the banks of published tiles this launch takes, the pushes' too (it releases pages)
        epoch, prev_tiles, statuses, push_epoch, prev_push_tiles, push_statuses = _look_back_banks(
            counters, scratch, num_rows, True
        )
    # A launch of one program writes the shared state as it goes (no ticket), and so does each program that looks
    # back. Sums of the requests before the next tile: other programs' from memory (held_sums, need_sums), this
    # program's own earlier tiles carried (own_*).
    alone = num_programs == 1
    owner = alone or LOOKBACK > 0
    held_sums = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
    need_sums = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
    own_held = tl.full([TILE], 0, dtype=tl.int32)
    own_need = tl.full([TILE], 0, dtype=tl.int32)
    for tile in range(pid, num_tiles, num_programs):
        tile_start = tile * TILE
        if LOOKBACK == 0:  # (LOOKBACK: what the programs of earlier tiles published, below)
            for k0 in range(_unsummed(tile, num_programs, 1) * TILE, tile_start, SCAN_BLOCK):
                k = k0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
                _, _, _, popped_earlier, pushed_earlier = _branch_moves(
                    k,
                    k < tile_start,
                    req_pool_indices,
                    seq_lens,
                    num_branch_pages,
                    num_rows,
                    max_context_len,
                    branch_width,
                    topk,
                    num_steps,
                    PAGE_SIZE,
                    PAGE_SHIFT,
                )
                held_sums += pushed_earlier
                need_sums += popped_earlier
        offs = tile_start + tl.arange(0, TILE)  # [TILE]
        in_batch = offs < bs
        rows, valid, held, seq, off, per_branch, need = _branch_needs(
            offs,
            in_batch,
            req_pool_indices,
            seq_lens,
            num_branch_pages,
            num_rows,
            max_context_len,
            branch_width,
            topk,
            num_steps,
            PAGE_SIZE,
            PAGE_SHIFT,
        )
        # Requests that keep their branch pages (_reused) push and pop none.
        reuse, to_pop, to_push = _trade(held, need, per_branch, topk)
        if COPY:  # the last partial page (from its last committed slot), whose committed slots the copy pairs copy
            tail_addr = rows.to(tl.int64) * row_stride + (seq - 1)
            tail = tl.load(req_to_token + tail_addr, mask=valid & (off > 0), other=0).to(tl.int32)
            tail_page = _floor_page(tl.maximum(tail, 0), PAGE_SIZE, PAGE_SHIFT)
        else:
            tail_page = rows * 0
        held_before = tl.reduce(own_held, 0, _add)
        need_before = tl.reduce(own_need, 0, _add)
        if LOOKBACK:
            if num_programs > 1:  # publish this tile's pushes and pops; add those every earlier tile published
                need_before, held_before = _publish_and_look_back(
                    statuses,
                    push_statuses,
                    tile,
                    num_tiles,
                    tl.reduce(to_pop, 0, _add),
                    tl.reduce(to_push, 0, _add),
                    LOOKBACK,
                    True,
                )
        elif (tile_start > 0) & (num_programs > 1):  # other programs' requests came before this tile
            held_before += tl.reduce(held_sums, 0, _add)
            need_before += tl.reduce(need_sums, 0, _add)
        held_start = count + held_before + tl.associative_scan(to_push, 0, _add) - to_push  # [TILE]
        own_held += to_push
        own_need += to_pop
        _push_branch_pages(
            rows, valid, to_push, held_start, branch_pages, free_pages, head, num_pages, branch_stride, BLOCK_R
        )
        tl.debug_barrier()  # the old pages are read before the new ones overwrite them
        excl = need_before + tl.associative_scan(to_pop, 0, _add) - to_pop  # [TILE]
        if owner:  # no other program reads these counts
            tl.store(num_branch_pages + rows, need.to(num_branch_pages.dtype.element_ty), mask=valid)
        if LOOKBACK:
            if (tile == num_tiles - 1) & (num_programs > 1):  # the last tile: every pop and push of the batch is known
                _finish_look_back(
                    counters,
                    head,
                    count,
                    need_before + tl.reduce(to_pop, 0, _add),
                    held_before + tl.reduce(to_push, 0, _add),
                    num_pages,
                    num_tiles,
                    scratch,
                    num_rows,
                    epoch,
                    prev_tiles,
                    push_epoch,
                    prev_push_tiles,
                    LOOKBACK,
                    True,
                )
        _write_branches(
            offs,
            in_batch,
            rows,
            valid,
            tail_page,
            off,
            per_branch,
            need,
            excl,
            reuse,
            branch_pages,
            free_pages,
            branch_slots,
            copy_src,
            copy_dst,
            head,
            count,
            num_pages,
            branch_stride,
            topk,
            num_steps,
            PAGE_SIZE,
            PAGE_SHIFT,
            BLOCK_R,
            BLOCK_E,
            COPY,
            EARLY_COPY,
        )
    if alone:
        _move_counters(counters, head, count, tl.reduce(own_need, 0, _add), tl.reduce(own_held, 0, _add), num_pages)
    elif LOOKBACK:
        pass  # the program of the last tile moved the counters
    elif _take_ticket(counters) == num_programs - 1:
        pushed_lanes = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
        popped_lanes = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
        for k0 in range(0, bs, SCAN_BLOCK):
            k = k0 + tl.arange(0, SCAN_BLOCK)  # [SCAN_BLOCK]
            rows, valid, need, moved_pops, moved_pushes = _branch_moves(
                k,
                k < bs,
                req_pool_indices,
                seq_lens,
                num_branch_pages,
                num_rows,
                max_context_len,
                branch_width,
                topk,
                num_steps,
                PAGE_SIZE,
                PAGE_SHIFT,
            )
            pushed_lanes += moved_pushes
            popped_lanes += moved_pops
            tl.debug_barrier()  # every lane has read the counts it sums
            tl.store(num_branch_pages + rows, need.to(num_branch_pages.dtype.element_ty), mask=valid)
        _move_counters(
            counters, head, count, tl.reduce(popped_lanes, 0, _add), tl.reduce(pushed_lanes, 0, _add), num_pages
        )
        tl.store(counters + 2, tl.full([], 0, dtype=counters.dtype.element_ty))


@triton.jit
def _commit_tree_tile(
    tile_start,
    req_to_token,
    req_pool_indices,
    accept_index,
    accept_lens,
    seq_lens,
    window_lens,
    kv_src,
    kv_dst,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    tree_size,
    index_stride,
    TILE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    REPOINT: tl.constexpr,
):
    """The tree commit of requests ``[tile_start, tile_start + TILE)`` (see ``_commit_tree_kernel``). Returns their
    rows, whether each is valid and their committed lengths."""
    m = tl.arange(0, BLOCK_T)
    offs = tile_start + tl.arange(0, TILE)  # [TILE]
    in_batch = offs < bs
    rows = tl.load(req_pool_indices + offs, mask=in_batch, other=-1).to(tl.int32)
    valid = in_batch & (rows >= 0) & (rows < num_rows)
    seq = tl.load(seq_lens + rows, mask=valid, other=0).to(tl.int32)
    in_use = 1 + (seq >> 31)  # a row not in use (seq_len -1) has no window, and keeps its -1
    seq = tl.minimum(tl.maximum(seq, 0), max_context_len)
    window = tl.load(window_lens + rows, mask=valid, other=0).to(tl.int32)
    window = tl.minimum(tl.minimum(tl.maximum(window, 0), max_context_len - seq), tree_size)
    accepted = tl.load(accept_lens + offs, mask=valid, other=0)
    accepted = tl.minimum(tl.maximum(accepted, 0), tree_size).to(tl.int32)  # clamped before it narrows
    accepted = tl.minimum(accepted, window)
    in_tree = valid[:, None] & (m[None, :] < tree_size)  # [TILE, BLOCK_T]
    index_addr = offs.to(tl.int64)[:, None] * index_stride + m[None, :]
    node = tl.load(accept_index + index_addr, mask=in_tree, other=-1)
    node = tl.minimum(tl.maximum(node, -1), tree_size).to(tl.int32)
    prev = tl.load(accept_index + (index_addr - 1), mask=in_tree & (m[None, :] > 0), other=-1)
    prev = tl.minimum(tl.maximum(prev, -1), tree_size).to(tl.int32)
    ok = (m[None, :] < accepted[:, None]) & (node >= 0) & (node < window[:, None]) & (node > prev)
    # The first entry that is not ok ends the path: a = BLOCK_T - max(BLOCK_T - m over entries not ok).
    a = BLOCK_T - tl.reduce(tl.where(ok, 0, BLOCK_T - m[None, :]), 1, _maximum)  # [TILE]
    taken = m[None, :] < a[:, None]  # [TILE, BLOCK_T]
    in_window = valid[:, None] & (m[None, :] < window[:, None])
    row_addr = rows.to(tl.int64) * row_stride + seq  # [TILE]
    out = offs[:, None] * tree_size + m[None, :]
    in_out = in_batch[:, None] & (m[None, :] < tree_size)
    if REPOINT > 0:
        # Old slot of node j moves to position dest_j: accepted nodes to their rank among accepted nodes, the others
        # after the a accepted ones, in node order.
        if REPOINT == 1:
            # O(T) a request: the accepted nodes as a bitmask (distinct, so their sum is their OR), and each node's
            # old slot scattered to its position (dest is a permutation of [0, W)).
            one = tl.full([TILE, BLOCK_T], 1, dtype=tl.int64)
            shift = tl.minimum(tl.maximum(node, 0), BLOCK_T - 1).to(tl.int64)  # taken nodes are below W <= BLOCK_T
            bits = tl.where(taken, one << shift, 0)
            accepted_nodes = tl.reduce(bits, 1, _add)  # [TILE]
            chosen = ((accepted_nodes[:, None] >> m[None, :].to(tl.int64)) & 1).to(tl.int32)  # [TILE, j]
            before = tl.associative_scan(chosen, 1, _add) - chosen
            dest = tl.where(chosen > 0, before, a[:, None] + m[None, :] - before)
            old = tl.load(req_to_token + (row_addr[:, None] + m[None, :]), mask=in_window, other=0)
            tl.debug_barrier()  # every old slot is read before the window is rewritten
            tl.store(req_to_token + (row_addr[:, None] + dest), old, mask=in_window)
            moved = offs[:, None] * tree_size + dest
            tl.store(kv_src + moved, old.to(kv_src.dtype.element_ty), mask=in_window)
            tl.store(kv_dst + moved, old.to(kv_dst.dtype.element_ty), mask=in_window)
            # Past the window (all of it for rows out of range, whose window is 0): 0 -> 0.
            past = in_out & (m[None, :] >= window[:, None])
            zero = tl.full([TILE, BLOCK_T], 0, dtype=tl.int32)
            tl.store(kv_src + out, zero.to(kv_src.dtype.element_ty), mask=past)
            tl.store(kv_dst + out, zero.to(kv_dst.dtype.element_ty), mask=past)
        else:
            # [TILE, m, j] tiles (trees past 64 nodes, and Ascend: see allocator._REPOINT_MASK_NODES). Position m
            # takes the old slot of the node j that moves there: reduce to j, then gather the slot. (A reduce result
            # stored under a mask wrote masked-out lanes in triton-ascend 3.2's interpreter.)
            hit = taken[:, :, None] & (node[:, :, None] == m[None, None, :])  # [TILE, m, j]
            chosen = tl.reduce(hit.to(tl.int32), 1, _maximum)  # [TILE, j]
            before = tl.associative_scan(chosen, 1, _add) - chosen
            dest = tl.where(chosen > 0, before, a[:, None] + m[None, :] - before)
            moves = in_window[:, None, :] & (dest[:, None, :] == m[None, :, None])  # [TILE, m, j]
            src_node = tl.reduce(tl.where(moves, m[None, None, :], 0), 2, _add)  # [TILE, m]
            new = tl.load(req_to_token + (row_addr[:, None] + src_node), mask=in_window, other=0).to(tl.int32)
            tl.debug_barrier()  # every old slot is read before the window is rewritten
            tl.store(
                req_to_token + (row_addr[:, None] + m[None, :]), new.to(req_to_token.dtype.element_ty), mask=in_window
            )
            dst = tl.where(in_window, new, 0)
            tl.store(kv_src + out, dst.to(kv_src.dtype.element_ty), mask=in_out)
            tl.store(kv_dst + out, dst.to(kv_dst.dtype.element_ty), mask=in_out)
    else:
        dst = tl.load(req_to_token + (row_addr[:, None] + m[None, :]), mask=in_window, other=0).to(tl.int32)
        src = tl.load(req_to_token + (row_addr[:, None] + node), mask=taken, other=0).to(tl.int32)
        src = tl.where(taken, src, dst)
        tl.store(kv_src + out, src.to(kv_src.dtype.element_ty), mask=in_out)
        tl.store(kv_dst + out, dst.to(kv_dst.dtype.element_ty), mask=in_out)
    tl.store(seq_lens + rows, ((seq + a) * in_use + (in_use - 1)).to(seq_lens.dtype.element_ty), mask=valid)
    tl.store(window_lens + rows, (a * 0).to(window_lens.dtype.element_ty), mask=valid)
    return rows, valid, seq + a


@triton.jit
def _tree_draft_pops(
    valid,
    starts,
    allocs,
    held,
    window_len,
    max_context_len,
    branch_width,
    topk,
    num_steps,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    RELEASE: tl.constexpr,
):
    """The pages that the tree draft (``_alloc_windows`` with ``BRANCH``) pops and pushes for rows whose committed
    lengths are ``starts`` (within ``[0, max_context_len]``), whose ``alloc_lens`` are ``allocs`` and (with
    ``RELEASE``) which hold ``held`` branch pages (both clamped as the draft clamps them): its window's pages and its
    branches', unless it keeps the branch pages it holds for them; the pages it holds otherwise go back."""
    need = _grow(valid, starts, allocs, starts + window_len, max_context_len, PAGE_SIZE, PAGE_SHIFT)[3]
    _, per_branch, branch_need = _branch_shape(starts, valid, branch_width, topk, num_steps, PAGE_SIZE, PAGE_SHIFT)
    if RELEASE:
        _, branch_pops, pushes = _trade(held, branch_need, per_branch, topk)
    else:
        branch_pops, pushes = branch_need, starts * 0
    return need + branch_pops, pushes


@triton.jit(
    do_not_specialize=[
        "bs",
        "num_rows",
        "max_context_len",
        "row_stride",
        "tree_size",
        "index_stride",
        "num_pages",
        "branch_stride",
        "branch_width",
    ]
)
def _commit_tree_kernel(
    req_to_token,
    req_pool_indices,
    accept_index,
    accept_lens,
    seq_lens,
    window_lens,
    kv_src,
    kv_dst,
    branch_pages,
    num_branch_pages,
    free_pages,
    counters,
    bs,
    num_rows,
    max_context_len,
    row_stride,
    tree_size,
    index_stride,
    num_pages,
    branch_stride,
    branch_width,
    TILE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    REPOINT: tl.constexpr,
    RELEASE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Commit the accepted path of each request's tree: ``seq_lens[row_i] += a_i``, the window closes.

    ``a_i``: the leading entries ``m < min(accept_lens[i], W_i)`` (``W_i = min(window_lens[row_i], tree_size)``)
    whose node ``n_m = accept_index[i, m]`` is in ``[0, W_i)`` and greater than ``n_{m-1}``. With ``REPOINT`` (1 or 2,
    ``PAGE_SIZE == 1``: by a bitmask of the accepted nodes or by ``[T, T]`` tiles) the window's slots are permuted:
    position ``seq + m`` takes the slot of ``seq + n_m`` for ``m < a_i``, positions ``seq + a_i + r`` the unaccepted
    nodes' slots in node order, and ``kv_src = kv_dst`` is the new slot of ``seq + m``. Otherwise
    ``kv_dst[i * tree_size + m]`` is the slot of ``seq + m`` and ``kv_src`` that of ``seq + n_m`` (``m < a_i``) or
    ``kv_dst`` (``a_i <= m < W_i``). Past the window, and for rows out of range, pairs are ``0 -> 0``. With
    ``RELEASE``, the rows' branch pages go back to the ring first (see ``_release_branches_kernel``).
    """
    if PDL:
        _pdl_start(PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    if RELEASE:
        head = tl.load(counters).to(tl.int32)
        count = tl.load(counters + 1).to(tl.int32)
        held_sums = tl.full([SCAN_BLOCK], 0, dtype=tl.int32)
    for tile in range(pid, num_tiles, num_programs):
        if RELEASE:
            held_sums = _release_tile(
                tile * TILE,
                _unsummed(tile, num_programs, 0) * TILE,
                held_sums,
                req_pool_indices,
                branch_pages,
                num_branch_pages,
                free_pages,
                head,
                count,
                bs,
                num_rows,
                num_pages,
                branch_stride,
                branch_width,
                TILE,
                BLOCK_R,
                SCAN_BLOCK,
            )
        _commit_tree_tile(
            tile * TILE,
            req_to_token,
            req_pool_indices,
            accept_index,
            accept_lens,
            seq_lens,
            window_lens,
            kv_src,
            kv_dst,
            bs,
            num_rows,
            max_context_len,
            row_stride,
            tree_size,
            index_stride,
            TILE,
            BLOCK_T,
            REPOINT,
        )
    if RELEASE:
        _release_finish(
            counters, req_pool_indices, num_branch_pages, count, bs, num_rows, num_pages, branch_width, SCAN_BLOCK
        )


@triton.jit(
    do_not_specialize=[
        "bs",
        "window_len",
        "num_rows",
        "max_context_len",
        "row_stride",
        "tree_size",
        "index_stride",
        "branch_width",
        "topk",
        "num_steps",
    ]
)
def _commit_tree_count_kernel(
    req_to_token,
    req_pool_indices,
    accept_index,
    accept_lens,
    seq_lens,
    window_lens,
    alloc_lens,
    num_branch_pages,
    kv_src,
    kv_dst,
    counters,
    scratch,
    bs,
    window_len,
    num_rows,
    max_context_len,
    row_stride,
    tree_size,
    index_stride,
    branch_width,
    topk,
    num_steps,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    REPOINT: tl.constexpr,
    RELEASE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The first launch of a tree step in two (``commit_tree_and_draft`` past one program): the tree commit of each
    ``TILE``-request tile (``_commit_tree_kernel`` without ``RELEASE``), then, from the lengths it leaves in
    registers, the pages the tree draft of ``window_len`` nodes will pop for the tile at ``scratch[tile]`` and (with
    ``RELEASE``, the draft's) push at ``scratch[2 * num_rows + tile]`` (``_tree_draft_pops``), and the ring's head and
    count at ``scratch[num_rows]``, ``scratch[num_rows + 1]``. The second launch, ``_alloc_windows_kernel`` with
    ``BRANCH`` and ``SUMS`` (its tiles a multiple of these), then reads one sum per earlier tile instead of every
    earlier request's lengths, and needs no ticket and no pass over the batch. ``PDL``: as for
    ``_count_pops_kernel``."""
    if PDL:
        _pdl_start(2)  # the previous kernel has ended: the second launch may load what it wrote
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = (bs + TILE - 1) // TILE
    for tile in range(pid, num_tiles, num_programs):
        # What the draft reads that the commit does not write, loaded before the commit's chain of loads.
        offs = tile * TILE + tl.arange(0, TILE)  # [TILE]
        rows, valid, held = _branch_counts(offs, offs < bs, req_pool_indices, num_branch_pages, num_rows, branch_width)
        allocs = tl.load(alloc_lens + rows, mask=valid, other=0).to(tl.int32)
        in_use = 1 + (allocs >> 31)  # as _window_span: a row not in use (-1) pops and pushes nothing
        allocs = tl.minimum(allocs & 0x7FFFFFFF, max_context_len)
        seqs = _commit_tree_tile(
            tile * TILE,
            req_to_token,
            req_pool_indices,
            accept_index,
            accept_lens,
            seq_lens,
            window_lens,
            kv_src,
            kv_dst,
            bs,
            num_rows,
            max_context_len,
            row_stride,
            tree_size,
            index_stride,
            TILE,
            BLOCK_T,
            REPOINT,
        )[2]
        pops, pushes = _tree_draft_pops(
            valid,
            seqs,
            allocs,
            held,
            window_len,
            max_context_len,
            branch_width * in_use,
            topk,
            num_steps,
            PAGE_SIZE,
            PAGE_SHIFT,
            RELEASE,
        )
        tl.store(scratch + tile, tl.reduce(pops, 0, _add), mask=tile < num_rows)
        if RELEASE:
            tl.store(scratch + 2 * num_rows + tile, tl.reduce(pushes, 0, _add), mask=tile < num_rows)
    if pid == 0:
        tl.store(scratch + num_rows, tl.load(counters).to(tl.int32))
        tl.store(scratch + num_rows + 1, tl.load(counters + 1).to(tl.int32))


@triton.jit(
    do_not_specialize=[
        "bs",
        "window_len",
        "num_rows",
        "max_context_len",
        "row_stride",
        "num_pages",
        "prefix_stride",
        "branch_stride",
        "branch_width",
        "topk",
        "num_steps",
        "tree_size",
        "index_stride",
    ]
)
def _commit_tree_draft_kernel(
    req_to_token,
    req_pool_indices,
    seq_lens,
    alloc_lens,
    window_lens,
    prefix_lens,
    window_starts,
    window_ends,
    accept_lens,
    prefix_slots,
    free_pages,
    counters,
    scratch,
    out_cache_loc,
    last_loc,
    branch_pages,
    num_branch_pages,
    branch_slots,
    copy_src,
    copy_dst,
    accept_index,
    kv_src,
    kv_dst,
    bs,
    window_len,
    num_rows,
    max_context_len,
    row_stride,
    num_pages,
    prefix_stride,
    branch_stride,
    branch_width,
    topk,
    num_steps,
    tree_size,
    index_stride,
    PAGE_SIZE: tl.constexpr,
    PAGE_SHIFT: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    PREFILL: tl.constexpr,
    PREFIX: tl.constexpr,
    EMIT: tl.constexpr,
    RELEASE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BRANCH: tl.constexpr,
    BLOCK_E: tl.constexpr,
    COPY: tl.constexpr,
    EARLY_COPY: tl.constexpr,
    COMMIT: tl.constexpr,
    SUMS: tl.constexpr,
    LOOKBACK: tl.constexpr,
    PDL: tl.constexpr,
    TREE_TILE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    REPOINT: tl.constexpr,
):
    """``_commit_tree_kernel`` (without ``RELEASE``) of the batch, then the tree draft ``_alloc_windows`` (``BRANCH``,
    ``EMIT``; ``RELEASE`` optional) from the committed lengths, in one program (the host launches a grid of 1): a
    tree step's bookkeeping after verification in one launch. The commit writes ``seq_lens``, ``window_lens`` and,
    with ``REPOINT``, the windows' slots; the barrier between the two makes those writes visible to every thread
    of the program before the draft reads them. The commit walks ``TREE_TILE``-request tiles, the draft its own."""
    if PDL:
        _pdl_start(PDL)
    for tile_start in range(0, bs, TREE_TILE):
        _commit_tree_tile(
            tile_start,
            req_to_token,
            req_pool_indices,
            accept_index,
            accept_lens,
            seq_lens,
            window_lens,
            kv_src,
            kv_dst,
            bs,
            num_rows,
            max_context_len,
            row_stride,
            tree_size,
            index_stride,
            TREE_TILE,
            BLOCK_T,
            REPOINT,
        )
    tl.debug_barrier()  # every commit is written before the draft reads the rows' lengths and slots
    _alloc_windows(
        req_to_token,
        req_pool_indices,
        seq_lens,
        alloc_lens,
        window_lens,
        prefix_lens,
        window_starts,
        window_ends,
        accept_lens,
        prefix_slots,
        free_pages,
        counters,
        scratch,
        out_cache_loc,
        last_loc,
        branch_pages,
        num_branch_pages,
        branch_slots,
        copy_src,
        copy_dst,
        bs,
        window_len,
        num_rows,
        max_context_len,
        row_stride,
        num_pages,
        prefix_stride,
        branch_stride,
        branch_width,
        topk,
        num_steps,
        PAGE_SIZE,
        PAGE_SHIFT,
        TILE,
        BLOCK_N,
        SCAN_BLOCK,
        PREFILL,
        PREFIX,
        EMIT,
        RELEASE,
        BLOCK_R,
        BRANCH,
        BLOCK_E,
        COPY,
        EARLY_COPY,
        COMMIT,
        SUMS,
        LOOKBACK,
        False,  # (waited above)
    )
