"""``DraftCacheAllocator``: owns ``req_to_token`` through the draft/verify loop of speculative decoding.

Slots are reserved ahead of the committed length and reused across steps. The draft window of a step is positions
``[seq_len, seq_len + N)``; verification commits ``seq_len += accepted``; rejected positions keep their slots for
the next window. Slots return to the pool when a request is freed, or go to the caller's prefix cache.

Slot layout (SGLang's paged layout): page 0, slots ``0 .. page_size - 1``, is the padding page and is never
handed out; pages ``1 .. num_slots // page_size`` are the pool, so the KV buffer needs ``num_slots + page_size``
slots (:attr:`DraftCacheAllocator.total_slots`). Position ``pos`` of a request sits at offset ``pos % page_size``
of one of the request's pages; a window first fills the request's last partial page, then takes whole pages from
a device-side FIFO ring of free pages in a fixed order (batch order, then position order), so the same calls give
the same table on every rank.

Prefix cache: a request may start from pages that the caller's prefix cache owns (``add_requests(prefix_slots=,
prefix_lens=)``); the allocator reads them but never frees them. A finished request can hand its leading pages to
the cache instead of the pool (``free_requests(keep_lens=)``), and the cache gives pages back when it evicts
(:meth:`~DraftCacheAllocator.release_slots`). Free pages, pages owned by live requests and pages handed to the cache
are three disjoint sets that together make up the pool.

Hot path: :meth:`~DraftCacheAllocator.alloc_draft` is one kernel launch (the page scan, the pops from the ring,
the table update and the read-back of ``out_cache_loc`` and ``last_loc``) and :meth:`~DraftCacheAllocator.commit`
one more. The allocation kernel runs on many programs. On a GPU a draft past one program looks back: each program
publishes its tile's pops and reads those of the tiles before it, and the program of the last tile moves the shared
counters. Elsewhere (Ascend, prefills) each program recomputes the page needs of the requests before its tile and
the program that draws the last ticket updates the shared counters; a draft that commits first may take two
launches, the first counting each tile's pops (see ``kernels/allocator.py``). Neither call reads anything back
to the host while a host-side upper bound of the pages in use and of the longest request says the call cannot fail;
only when that bound reaches the capacity does the call sync once, take exact numbers, and either go on or raise.
So a whole step can be captured in a CUDA/NPU graph.

A replayed graph runs no host code, so nothing checks capacity during replays: size the pool and
``max_context_len`` for every step you replay, and call :meth:`~DraftCacheAllocator.refresh` afterwards. Past
capacity the kernels still touch no memory outside the allocator's tensors, but hand out the padding page and
stop windows at ``max_context_len``.

On an NPU (the kernels the offline Ascend compile check compiles): ``page_size`` is one of ``NPU_PAGE_SIZES``, and
every tensor the kernels read or write (rows, accept lengths, ``accept_index``, output buffers) is int64; lists and
tensors read on the host (``free_requests``' rows) may be any int type.
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import numbers
import operator
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch

from . import backend, tiles
from .bounded import remember
from .buffers import share_one_allocation
from .checks import INDEX_DTYPES as _INDEX_DTYPES
from .checks import INT32_LIMIT as _INT32_LIMIT
from .checks import UNPLANNED, BoundTensors
from .checks import check_dense as _check_dense
from .checks import check_disjoint as _check_disjoint
from .checks import check_flag as _check_flag
from .checks import check_npu_dtypes as _check_npu_dtypes
from .checks import check_vector as _check_vector
from .checks import memory_span as _memory_span
from .checks import type_name as _type_name
from .staging import HostStaging

__all__ = [
    "AllocationError",
    "ContextLengthError",
    "DraftCacheAllocator",
    "DraftStepWrapper",
    "OutOfRowsError",
    "OutOfSlotsError",
]

# Pools and contexts stay below 2**30 so that ring offsets and window ends stay exact int32 sums in the kernels.
_SIZE_LIMIT = 2**30
# The page sizes an NPU takes: those whose kernel variants the offline Ascend compile check compiles
# (scripts/ascend_compile_check.py exercises exactly these). PAGE_SIZE is a constexpr, so another size would run
# kernels no check compiled. All are powers of two, so page numbers are shifts: bishengir lowers vector int32 `//`
# through float32, exact only below 2**24.
NPU_PAGE_SIZES = (1, 16, 64, 128)
# Launch configuration of the allocation kernel: [TILE, BLOCK_N] window tiles of at most _ALLOC_ELEMENTS slots and
# at most _MAX_TILE requests per program; every program sums the page needs of earlier requests _SCAN_BLOCK at a
# time. Tests shrink them to span many programs with few requests. Ascend takes smaller tiles (its on-chip buffer,
# checked by scripts/ascend_compile_check.py).
_ALLOC_ELEMENTS = 2048
# The name under which the reference Ascend checker (../shared/tools/ascend_compile_check.py) reads the widest block.
_MAX_BLOCK_N = tiles.MAX_BLOCK_N
_MAX_TILE = 256
# Off Ascend the batch size picks the tile: a batch of at most _MAX_TILE requests runs on one program (no ticket),
# its tile the smallest power of two that holds it but at least _MIN_TILE; up to _LARGE_BATCH requests take
# _MIN_TILE-request tiles (H100 graph replay of a step: bs 1 4.4 -> 3.5 us, bs 1024 8.1 -> 6.9 us with the commit
# tile below); past it every program's sum over earlier requests dominates, and _MAX_TILE-request tiles cut it.
# That is the rule of prefills, of drafts with branches, and of everything on Ascend; a chain draft on a GPU past
# one program (one that releases branch pages too) looks back instead, on tiles of its own (_LOOK_BACK_MIN_TILE);
# a tree draft in one launch looks back on these tiles.
_MIN_TILE = 32
_LARGE_BATCH = 4096
# ... but a draft with branches past _LARGE_BATCH takes the smallest power of two of at least _MIN_TILE requests that
# keeps the grid within one program per core (SM), at most _BRANCH_LARGE_TILE: with 256, Triton 3.6 fails to compile
# the tree draft at page 1 on 8 warps (TritonGPURemoveLayoutConversions: `PassManager::run failed`, found by
# scripts/cuda_compile_check.py with batches past 4096). H200 graph replay, topk 4, 5 steps, T 8, page 1, tiles of
# 32 / 64 / 128 requests: bs 8192 `commit_tree_and_draft` 7.75 / 7.56 / 9.25 us, `alloc_tree_draft` + `commit_tree`
# 27.1 / 23.7 / 26.9-27.5; bs 16384 18.0 / 14.1 / 12.2 and 66.2-67.1 / 51.9-52.1 / 43.8-43.9 (docs/performance.md).
_BRANCH_LARGE_TILE = 128
# A prefill whose prompts average at least _WIDE_PREFILL_TOKENS tokens (twice that past _WIDE_PREFILL_MAX_BATCH
# requests) reads them in [TILE, _WIDE_PREFILL_BLOCK_N] column blocks (TILE = _ALLOC_ELEMENTS // that: 4 requests)
# instead of [32, 64]: each program walks its requests' whole prompts, so long prompts go to more programs in fewer
# steps. Off Ascend; H200, torch.profiler: 64 prompts of 2000 tokens 24.5 -> 5.6 us (page 16), 42.2 -> 5.7 us
# (page 1); short prompts and 4096 prompts of 256 tokens or fewer keep the narrow blocks (docs/performance.md).
_WIDE_PREFILL_TOKENS = 256
_WIDE_PREFILL_MAX_BATCH = 1024
_WIDE_PREFILL_BLOCK_N = 512
# A draft that also returns branch pages (RELEASE) with page_size 1 pushes topk * num_steps pages a request and pops
# one a token: past _RELEASE_ONE_PROGRAM requests it takes _MIN_TILE-request tiles (H100, tree step's draft, topk 4,
# 5 steps, T 8: bs 128 6.4 -> 5.1 us, bs 256 8.9 -> 5.3 us; with page 64, one program stays as fast or faster).
_RELEASE_ONE_PROGRAM = 64
# ... and the draft of a tree step in two launches that reads its counts from the tree commit's launch (no sums over
# earlier requests, no ticket: _tree_step_counts) takes them past _MIN_TILE requests: H200 graph replay, topk 4,
# 5 steps, T 8, page 1: bs 64 7.1 us a step as the tree commit and one program of 64, 5.1 with 32-request tiles.
_SCAN_BLOCK = 2048
# The allocation kernel sums earlier requests in blocks of half the batch (rounded up to a power of two), between
# _SCAN_BLOCK / 2 and 4 * _SCAN_BLOCK: H100 graph replay of a step, N 4 page 16, against 2048 everywhere: bs 1024
# 7.04 -> 6.71 us, bs 16384 28.5 -> 24.6 us, bs 4096 unchanged (9.8).
# A chain draft past one program looks back (off Ascend): the published pops of this many earlier tiles a load.
# Its tile is the smallest power of two, at least _LOOK_BACK_MIN_TILE requests, that keeps the grid within one
# program per SM (_batch_tile): H200 graph replay of alloc_draft + commit, against 32-request tiles, bs 1024
# 4.71-5.02 -> 4.67-4.84 us, bs 2048 4.71-4.78 -> 4.56 (N 4-8, pages 1-128; 64-request tiles 0.1-0.3 us slower,
# 4 warps no better); up to _MAX_TILE requests one program stays faster (bs 128 3.45 against 3.86-3.99 us,
# bs 256 4.08 against 4.13-4.18).
_LOOK_BACK_BLOCK = 256
_LOOK_BACK_MIN_TILE = 16
# ... unless the batch is more than one tile of _ALLOC_ELEMENTS slots holds (windows wider than 8 tokens: past
# _ALLOC_ELEMENTS / block requests). Such a draft looked back anyway, on two to eight tiles of 2048 slots ([128, 16] at
# N 16); it now takes the per-SM tiles it takes past _MAX_TILE. H200 graph replay, in one process, rows of 48K and of
# 128K positions: alloc_draft + commit, N 16 bs 256 (page 128) 5.90-6.03 -> 4.50-4.60 us, N 32 bs 128 (page 16)
# 6.18-6.23 -> 4.40-4.48, N 64 bs 256 (page 1) 5.59-5.61 -> 5.18-5.22; commit_and_draft in one launch, N 32 bs 128,
# 6.20-6.24 -> 4.21-4.31. Not for a batch within one tile, which stays one program: there looking back on small tiles
# gained little or lost (N 16 bs 128 page 16: alloc_draft + commit 4.36 -> 4.08 us but commit_and_draft 3.65 -> 4.10;
# page 1 N 8 at 96-256 requests -0.2 to +0.5 by row length) (docs/performance.md).
# Entries a cache of launch configs or launch choices keyed by batch size keeps before it starts over (_remember).
_MAX_LAUNCH_CONFIGS = 4096
# Output buffers whose checks a DraftCacheAllocator keeps (_check_buffer): an engine's few, and then some.
_MAX_CHECKED_BUFFERS = 64
# Calls given the tensors of an earlier call (_kept_step): plans a DraftCacheAllocator keeps, and calls that wait
# with their tensors held for their next call (_keep_step).
_MAX_KEPT_STEPS = 16
_MAX_SEEN_STEPS = 8


def _remember(cache: dict, key: object, value: object) -> object:
    """``cache[key] = value`` in a cache of at most _MAX_LAUNCH_CONFIGS entries (``bounded.remember``); returns
    ``value``."""
    return remember(cache, key, value, _MAX_LAUNCH_CONFIGS)


_NPU_ALLOC_ELEMENTS = 128
_NPU_MAX_TILE = 32
# A draft that also releases branch pages (RELEASE) carries more per request: 16 requests, [16, 16] at most.
_NPU_RELEASE_ALLOC_ELEMENTS = 256
_NPU_RELEASE_MAX_TILE = 16
_NPU_SCAN_BLOCK = 256
# Ascend: the free kernel that also releases branch pages sums the requests before its tile this many times fewer at
# a step (scripts/ascend_compile_check.py: UB 148-159 KiB at pages > 1 with the full scan block).
_NPU_FREE_BRANCHES_SHRINK = 2
# [TILE, BLOCK_P] tile of the kernel that returns branch pages to the ring (_release_tiles; BLOCK_P is also BLOCK_R
# of the kernels that release branch pages in their own launch). The names are older than _FREE_CLASSES, which now
# sizes the kernel that frees requests; the reference Ascend checker still reads them.
_FREE_TILE = 64
_FREE_BLOCK_P = 16
# The kernel that frees requests, off Ascend, by batch size: (largest batch, TILE, BLOCK), [TILE, BLOCK] tiles of
# the page heads it pushes and of the positions it clears. Every program walks its requests' whole rows, so small
# tiles spread long rows over many programs (64 requests of 2000 tokens at page 1: 172 -> 7.5 us with 4-request
# tiles instead of 64); past 1024 requests each program's sum over the requests before its tile dominates, and
# 16-request tiles cost least (H200, torch.profiler, docs/performance.md). Ascend: [16, 8] and [16, 32] tiles.
_FREE_CLASSES = ((256, 4, 256), (1024, 8, 128), (None, 16, 64))
_NPU_FREE_TILE = 16
_NPU_FREE_BLOCK_P = 8
_NPU_FREE_BLOCK_C = 32
# Pages per step of the kernel that pushes evicted pages.
_PUSH_TILE = 1024
# Requests per program of the commit kernel (small tiles won at every batch size on the H100).
_COMMIT_TILE = 64
# Tree drafts: [TILE, BLOCK_E] tiles of the branch allocation (branch slots and copy pairs), and the commit of a
# tree of at most _MAX_TREE nodes, _TREE_ELEMENTS elements per tile (_tree_commit_width).
_BRANCH_TILE = 32
_BRANCH_BLOCK = 128
# With page_size 1, a batch of up to 2 * _BRANCH_TILE requests takes one program (no ticket, no last pass): H100,
# tree step at bs 64: 12.2 -> 10.8 us (at bs 16, 256 and 1024 _BRANCH_TILE-request tiles stay best).
# With page_size > 1 every request also writes topk * (page_size - 1) copy pairs: [4, 64] tiles (H100, page 64:
# alloc_branches 8.5 -> 3.5 us at bs 4, 13.5 -> 7.1 us at bs 1024, against [32, 128] ones).
_COPY_BRANCH_TILE = 4
_COPY_BRANCH_BLOCK = 64
# ... but a batch of at most _COPY_BRANCH_ONE_PROGRAM_BS requests and _COPY_BRANCH_ONE_PROGRAM copy pairs takes one
# program (H100 profiler, topk 4, 5 steps, 4-request tiles against one program: page 16 bs 8 5.01 against 3.10 us,
# bs 16 5.24 against 3.74, bs 32 5.30 against 4.89; page 64 bs 8 5.76 against 4.17, bs 16 5.83 against 5.66, bs 32
# 5.73 against 8.93).
_COPY_BRANCH_ONE_PROGRAM = 4096
_COPY_BRANCH_ONE_PROGRAM_BS = 32
_NPU_BRANCH_TILE = 8
_NPU_BRANCH_BLOCK = 32  # every BLOCK_E on Ascend with pages > 1 (_branch_block) ...
_NPU_PAGE1_BRANCH_BLOCK = 16  # ... and at page 1
# A draft that also gives branches (alloc_tree_draft) with page_size > 1 writes topk * (page_size - 1) copy pairs a
# request: at most _COPY_TREE_DRAFT_TILE requests a tile (H200 profiler, page 64, topk 4, 5 steps, T 8, caps 4 / 8 /
# 16 / 32 / none: bs 4 3.5 / 4.0 / 4.8 / 6.6 / 6.6 us, bs 64 5.7 / 6.0 / 7.1 / 9.7 / 15.9, bs 1024 7.0 / 7.1 / 8.1 /
# 10.7 / 10.7, every program summing the earlier requests) ... Where it looks back (a GPU), at least that many
# but the smallest power of two that keeps the grid within one program per SM, at most _BRANCH_LARGE_TILE: H200
# graph replay of alloc_tree_draft + commit_tree, topk 4, 5 steps, T 8, page 64, tiles of 4 / 8 / 16 requests at
# bs 1024: 12.0-12.4 / 8.4-8.8 / 9.9-10.1 us; 4 / 16 / 32 / 64 at bs 4096: 41.3 / 17.5 / 14.2 / 21.6-21.8; 4 / 128
# at bs 16384: 248 / 81 (256 fails to compile, as at page 1); page 16, 4 / 8 / 16 at bs 1024: 11.8 / 8.1 / 8.6,
# 4 / 32 at bs 4096: 37.8-38.2 / 10.5-10.6.
_COPY_TREE_DRAFT_TILE = 4
# ... whose copy pairs a counted draft (the second of a tree step's two launches, _tree_step_counts) writes in
# [TILE, _COPY_COUNTED_BLOCK] blocks: H200 graph replay of commit_tree_and_draft, page 64, topk 4, 5 steps, T 8, two
# runs alternated: bs 16 / 64 / 256 / 1024 4.93 / 5.43 / 5.54 / 6.32 us against 5.06 / 5.42 / 5.52 / 6.69 with 64
# (256: 5.37 / 5.65 / 5.88 / 7.33). The one-program draft of a one-launch step keeps 64 (bs 8: 5.10 against 5.44).
_COPY_COUNTED_BLOCK = 128
# ... unless the batch has at most _COPY_ONE_PROGRAM_BS requests and _COPY_ONE_PROGRAM copy pairs (bs * topk *
# (page_size - 1)): then one program, with no ticket and no last pass (H100 profiler, topk 4, 5 steps, T 8, 4-request
# tiles against one program: page 16 bs 8 5.74 against 3.77 us, bs 16 5.61 against 4.55, bs 32 5.69 against 5.87-5.93;
# page 64 bs 8 5.97 against 4.64-4.68, bs 16 6.01 against 6.27).
_COPY_ONE_PROGRAM = 2048
_COPY_ONE_PROGRAM_BS = 16
# ... and a counted draft (the second of a tree step's two launches) only up to _COPY_COUNTED_ONE_PROGRAM pairs, and
# so commit_tree_and_draft's one launch, taken where the counted draft would be one program: past them the commit
# that counts, then the draft on 4-request tiles, wins (H200 graph replay of commit_tree_and_draft, topk 4, 5 steps,
# T 8, one launch against two, alternated twice: page 16 bs 16 (960 pairs) 5.35 against 4.51-4.52 us, page 64 bs 8
# (2016) 5.09-5.10 against 4.55-4.89; page 16 bs 8 (480) 4.35-4.37 against 4.49, page 4 bs 16 (192) 4.29-4.30
# against 4.32-4.33).
_COPY_COUNTED_ONE_PROGRAM = 512
# A draft that also gives branches (alloc_tree_draft) on Ascend: 4 requests a tile (with 8 or 16, the on-chip buffer
# peaked at 144-180 KiB for some windows and page sizes; with 4 at 113 KiB at most).
_NPU_TREE_DRAFT_TILE = 4
# Small tiles on 4 warps won (H100 profiler over graph replays, T 8: page 1 4.8/5.6/6.1 -> 2.2/2.3/2.9 us at
# bs 4/64/1024, page 64 2.3/2.7/3.0 -> 1.6/1.6/2.1 us, against 4096 elements, 64 requests and 8 warps).
_TREE_ELEMENTS = 256
_TREE_MAX_TILE = 8
_TREE_NUM_WARPS = 4
_NPU_TREE_ELEMENTS = 512
_NPU_TREE_CUBE_ELEMENTS = 2048
_NPU_TREE_MAX_TILE = 8
_MAX_TREE = 256
# With page 1 the tree commit re-points the window (its REPOINT constexpr; 0 for pages > 1, which copy): through a
# 64-bit mask of the accepted nodes, O(T) a request (1), for trees of at most _REPOINT_MASK_NODES nodes, and through
# [T, T] tiles (2) past that and on Ascend, where the mask's int64 vectors took the one-launch tree step's on-chip
# buffer from 139-142 to 165-175 KiB. H200 profiler, T 8, per kernel: commit_tree 2.09 / 2.12 / 2.45 us against
# 2.11 / 2.27 / 2.65 at bs 4 / 64 / 1024; commit_tree_and_draft's one program 4.21 us against 2.99 + 2.14 for the
# two kernels at bs 16.
_REPOINT_MASK_NODES = 64
# On an NPU, page 1 re-points through [TILE, T, T] tiles: T <= 32 keeps them in the on-chip buffer (and TILE >= 2,
# as triton-adapter-opt rejects some one-request tiles).
_NPU_MAX_TREE = 64
_NPU_MAX_TREE_REPOINT = 32
# On an NPU commit_tree_and_draft always makes two launches (the tree commit, then the tree draft): the one launch
# holds the tree commit's tiles and the tree draft's in one kernel, and bishengir-compile 1.2.0 plans its on-chip
# buffer anywhere from 60 to 178 KiB by topk, num_steps, tree size and the callers' dtypes, not monotonically (an
# audit of 2026-11-24: trees of 4 nodes fit at topk 4 and need 170-178 KiB at topk 1, 8 nodes fit with int64 buffers
# and need 146.5 KiB with an int32 kv_src), past the 144 KiB budget where the compile check's workload never went.
# Off Ascend, commit_tree_and_draft in one launch commits the batch as one tile of at most _TREE_STEP_ELEMENTS
# elements (_tree_commit_width: [bs, T] with page 1 since its mask re-pointing, [bs, T, T] past 64 nodes; larger
# batches take two launches): its one program does the commit, then the draft, where two launches overlap nothing but
# spread the commit over programs. H200 graph replay, topk 4, 5 steps, T 8, page 1, mask re-pointing: one launch
# 3.9 / 4.3 / 4.4 / 4.8 us a step at bs 4 / 8 / 16 / 32, against 5.3 / 5.4 / 5.5 / 5.6 in two launches, and at bs 64
# (a cap of 512) 7.3 against 7.1 (profiler, per kernel: 7.14 us against 4.52 + 2.15); page 64 (its draft is one
# program up to bs 4 since _COPY_COUNTED_ONE_PROGRAM, 8 before): 4.5 / 5.2 at bs 4 / 8 against 5.6 / 6.5.
_TREE_STEP_ELEMENTS = 256
# CUDA warps per program (ignored by triton-ascend and the interpreter).
_NUM_WARPS = 8
# ... except for a chain draft (no branches, no release), whose allocation kernel takes 4 warps on tiles of 64 or 128
# requests: one program (H100 profiler, per kernel, alternated twice in one run: bs 128 2.72 -> 2.55 us (N 1, page
# 1), 2.95 -> 2.63 (N 4, page 16)) or the tiles of a draft that looks back past 4224 requests (H200, bs 16384: 128-
# request tiles 6.84 us a step on 4 warps, 256-request ones 7.76 on 8 and 8.88 on 16). 8 warps stay best at bs
# 256-2048, and for drafts with branches or a release. (While every program summed the earlier requests, 16 warps
# were best past 4096 requests: bs 16384 22.3-23.3 -> 19.5-20.1 us, H100.)
_SMALL_TILE_NUM_WARPS = 4
# commit_and_draft is one launch of the allocation kernel while one program holds the batch; past it (with no branch
# pages to release) two: _count_pops_kernel writes each tile's pops to scratch, then the allocation kernel (SUMS)
# reads the sums of the tiles before its own instead of every earlier request's lengths, and each program writes its
# own rows, with no ticket and no last pass over the batch; on CUDA 9.0+ the second is a programmatic dependent launch
# (PDL) that loads its requests while the first runs. Tiles of _TWO_PASS_TILE requests on _TWO_PASS_NUM_WARPS warps,
# past _LARGE_BATCH of _MAX_TILE on _NUM_WARPS. H100 graph replay of a step, N 1-8, pages 1-128, two launches (no
# PDL) against one: bs 256 4.0-4.2 against 3.0-4.0 us, bs 1024 4.2-4.4 against 5.9-6.2, bs 4096 4.5-4.7 against
# 13.0-13.5, bs 16384 6.4-7.1 against 36.5-39.3 (and 8.0-8.7 with 32-request tiles); 4 warps as good as 8 or better
# on 32-request tiles, 64- and 128-request tiles slower up to 4096. PDL on an H200: 0.6-1.0 us less from bs 1024.
_COMMIT_DRAFT_MAX_BATCH = 256
# Where the second launch is a programmatic dependent launch (CUDA, compute capability 9.0 and up), it loads its
# requests while the first runs: two launches then also win for 129-256 requests with windows of at least
# _COMMIT_DRAFT_WIDE_MIN_N tokens. H200 graph replay of a step, every kernel a programmatic dependent launch, pages 1,
# 16 and 128, bs 129-256, two rounds: N 3-4 2.62-2.89 against 3.02-3.35 us; N 2 2.73-3.08 against 2.49-2.87; N 1
# 2.36-2.90 against 2.28-2.74. (Before every launch was one, only windows of more than 4 tokens gained: bs 256 N 8
# 3.65-3.78 against 4.02-4.14 us, N 4 3.54-3.70 against 3.55-3.59.)
_COMMIT_DRAFT_WIDE_MAX_BATCH = 128
_COMMIT_DRAFT_WIDE_MIN_N = 3
# Two-launch tiles: 16 requests on pages of more than one token for windows of 2 to _COMMIT_DRAFT_WIDE_N tokens, and
# more warps past it (_two_pass_tile, _alloc_config).
_COMMIT_DRAFT_WIDE_N = 4
# Eager (not capturing a graph), two launches cost the host a second launch: back-to-back eager steps on an H200
# host, N 4 page 16, one launch against two: DraftStepWrapper 11.6-12.6 against 16.6-17.7 us a step from bs 256 to
# 2048, 14.5 against 17.3-18.1 at 4096, 39.6 against 16.9-17.2 at 16384 (where the device sets the pace); the method
# 24.4-25.5 against 37.5-39.1 up to 4096, 40.0 against 38.5 at 16384. So eager calls take one launch up to this
# many requests (the interpreter on cpu keeps the limits above: there is no device to weigh).
_COMMIT_DRAFT_EAGER_MAX_BATCH = 4096
_TWO_PASS_TILE = 32
_TWO_PASS_NUM_WARPS = 4
_COUNT_NUM_WARPS = 4
# Pages of one token take _TWO_PASS_SMALL_TILE-request tiles up to _TWO_PASS_SMALL_TILE_MAX_BATCH requests; larger
# pages take them for windows of 2 to _COMMIT_DRAFT_WIDE_N tokens up to _LARGE_BATCH, and keep 32-request tiles for
# the others, on _TWO_PASS_WIDE_NUM_WARPS warps for longer windows. H200 graph replay of a step, against 32-request
# tiles on 4 warps in the same run (median of 3 alternations): N 4, pages 16 and 128, bs 512-4096: 0.07-0.29 us less;
# page 1, bs 512 / 1024: N 8 3.91 -> 3.72 and 4.06 -> 3.85, N 4 0.08-0.11 less, N 1 3.56 -> 3.48 at 1024 (at 2048-4096
# 0.06 more); N 8, pages 16 and 128, bs 256-2048: 0.16-0.22 us less on 8 warps (16-request tiles: 0.25-0.38 more);
# N 1, pages 16 and 128: 16-request tiles 0.33-0.42 us more at bs 1024-4096. Up to _TWO_PASS_TINY_TILE_MAX_BATCH
# requests, pages of one token with windows of _TWO_PASS_TINY_TILE_MIN_N tokens or more take _TWO_PASS_TINY_TILE-request
# tiles (H200, the same step against 16-request tiles, alternated two or three times: N 8 bs 129 / 256 / 512
# 3.29-3.32 -> 3.26-3.27, 3.78-3.83 -> 3.70-3.74, 3.96-3.98 -> 3.88; N 4 bs 384 / 512 0.04-0.07 less; N 3 bs 512
# 3.66-3.67 -> 3.59; but N 1 and N 2 at bs 300-512 3.32-3.38 -> 3.78-3.80, so they keep 16; at 1024 requests
# 8-request tiles cost 0.07-0.09 more).
_TWO_PASS_SMALL_TILE = 16
_TWO_PASS_SMALL_TILE_MAX_BATCH = 1024
_TWO_PASS_TINY_TILE = 8
_TWO_PASS_TINY_TILE_MAX_BATCH = 512
_TWO_PASS_TINY_TILE_MIN_N = 3
_TWO_PASS_WIDE_NUM_WARPS = 8

_INT_TYPE = {int}
_INT64_LIMIT = 1 << 63


IntVector = Union[torch.Tensor, Sequence[int]]


class _Usage(NamedTuple):
    """What a sync reads back: the exact usage that the host bounds restart from."""

    free: int  # free pages
    held: int  # branch pages held
    rows: list[int]  # the rows in use; min_pages, ends and branch_pages are theirs
    min_pages: list[int]  # the pages it owns: those of [0, alloc_len), less its cache-owned prefix's
    ends: list[int]  # seq_len + open window: the longest seq_len a commit can make
    branch_pages: list[int]  # the branch pages each of those rows holds


class AllocationError(RuntimeError):
    """The allocator is out of slots, rows or context length; it is left exactly as before the call."""


class OutOfSlotsError(AllocationError):
    """Not enough free pages for the call."""


class OutOfRowsError(AllocationError):
    """Not enough free rows of ``req_to_token`` for the new requests."""


class ContextLengthError(AllocationError):
    """A request would grow past ``max_context_len``."""


def _check_size(name: str, value: int, minimum: int, limit: int = _INT32_LIMIT) -> int:
    """``value``: an integer (any ``numbers.Integral``, e.g. ``numpy.int64``, but not ``bool``) in ``[minimum,
    limit)``; returned as a Python ``int``."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {_type_name(value)}")
        value = operator.index(value)
    if not minimum <= value < limit:
        raise ValueError(f"{name} must be in [{minimum}, 2**{limit.bit_length() - 1}), got {value}")
    return value


def _resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` (None: ``backend.default_device()``) with its index ("cuda" -> "cuda:0"): one that is present,
    else ``ValueError`` naming it (torch raised RuntimeError, or AssertionError for a CUDA device on a build or
    machine without one)."""
    if device is None:
        device = backend.default_device()
    elif isinstance(device, numbers.Integral) and not isinstance(device, bool):
        device = operator.index(device)  # (an index, e.g. numpy.int64: torch takes Python ints)
    elif not isinstance(device, (torch.device, str)):
        raise TypeError(f"device must be a torch.device, a str, an int or None, got {_type_name(device)}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must name a torch device (cpu, cuda, npu), got {device!r}") from None
    backend.check_device(device, "device (where the allocator's tensors live)")  # not meta, which holds no values
    try:
        return torch.empty(0, device=device).device  # "cuda" -> "cuda:0"
    except (AssertionError, RuntimeError) as error:
        raise ValueError(f"device {device} is not available here: {str(error).splitlines()[0]}") from None


def _storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` of the storage ``tensor`` is a view of."""
    storage = tensor.untyped_storage()
    start = storage.data_ptr()
    return start, start + storage.nbytes()


def _entries(values: object) -> int:
    """How many values a vector argument holds, found without reading them: a lazy sequence such as ``range(10**7)``
    is measured before it is expanded (that took seconds before the error its length calls for). -1 for what is no
    1-D tensor or sequence (the checks that read it say what it must be)."""
    if type(values) is list:  # (the common case, before the slower ABC check below)
        return len(values)
    if isinstance(values, torch.Tensor):
        return values.size(0) if values.dim() == 1 else -1  # (not .shape: a nested tensor has none; checks name it)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        return -1
    try:
        return len(values)
    except OverflowError:  # a range past sys.maxsize
        return _INT64_LIMIT


def _pages(length: int, page_size: int) -> int:
    return -(-length // page_size)


def _tree_commit_width(block_t: int, repoint: int) -> int:
    """Elements per request of a tree commit's tile: ``[BLOCK_T]``, or ``[BLOCK_T, BLOCK_T]`` where page 1
    re-points through tiles (``REPOINT`` 2)."""
    return block_t * block_t if repoint == 2 else block_t


def _per_core_tile(bs: int, cores: int, least: int) -> int:
    """The smallest power-of-two tile of at least ``least`` requests that keeps a batch of ``bs`` within ``cores``
    programs."""
    return max(1 << (-(-bs // cores) - 1).bit_length(), least)


def _page_shift(page_size: int) -> int:
    """log2(page_size) for a power of two, else -1 (the kernels then divide)."""
    return page_size.bit_length() - 1 if page_size & (page_size - 1) == 0 else -1


class DraftCacheAllocator:
    """KV-cache slots of up to ``max_requests`` requests of up to ``max_context_len`` tokens, from a pool of
    ``num_slots`` slots in pages of ``page_size``.

    A step is ``alloc_draft(rows, N)`` (one launch), verification, then ``commit(rows, accept_lens)`` (one launch).
    Rows given as tensors are trusted on the hot path: they must be rows in use, without duplicates;
    ``validate=True`` checks this at the cost of a sync. A tensor of rows may be rewritten in any way between calls:
    the host never takes a release through a tensor for that of particular rows, so it keeps the branch pages that
    tree calls took (at most every row's worst case) on its books until a call given every row in use as a list
    releases them, :meth:`free_requests` included, or a sync counts them exactly. Accept lengths are clamped on the
    device to the row's open
    draft window, so no value corrupts the pool. After replaying a captured step, call :meth:`refresh` before the
    next eager call. A table the device cannot hold (``max_requests * max_context_len`` int32 entries) raises
    ``ValueError`` naming those sizes at construction.

    Eager calls given the tensors of an earlier call: from the second call of :meth:`alloc_draft`,
    :meth:`commit_and_draft`, :meth:`alloc_branches`, :meth:`commit_tree` or :meth:`commit_tree_and_draft` with the
    same tensor objects (rows as a tensor, every output buffer given, ``validate=False``, counts as ``int``), the
    allocator keeps a :class:`DraftStepWrapper` planned with them (it holds those tensors) and later such calls take
    its path: the same results, errors and state, without the checks while no tensor has moved, been resized,
    re-typed or re-strided (docs/design.md, "Calls given the tensors of an earlier call").

    Attributes (device tensors, read them freely, change them only through the methods):
        req_to_token: ``[max_requests, max_context_len]`` int32, the slot of every position; 0 (padding) where
            a position owns no slot.
        seq_lens: ``[max_requests]`` int64, committed tokens of each row; -1 for a row not in use.
        alloc_lens: ``[max_requests]`` int64, positions ``[0, alloc_len)`` own slots; ``alloc_len >= seq_len``;
            -1 for a row not in use. A row not in use that comes in a tensor of rows anyway (a stale row) is left as
            it is by every call: no slots, no pages, its outputs as for a row out of range (a call that syncs for
            capacity reads the rows back and raises ``ValueError`` for it instead, changing nothing).
        window_lens: ``[max_requests]`` int64, the draft window opened by the last :meth:`alloc_draft`, 0 once
            committed.
        prefix_lens: ``[max_requests]`` int64, positions ``[0, prefix_len)`` sit on pages of the prefix cache.
        free_pages: ``[num_pages]`` int32 ring: the free pages are ``free_pages[(free_head + k) % num_pages]``,
            ``k < num_free_pages``, handed out from the head (:meth:`free_page_list` lists them).
        free_head, num_free_pages: ``[1]`` int32 views of the ring's counters.
        page_size, num_slots, num_pages, max_requests, max_context_len, device.
        num_syncs: device→host syncs that the calls that take pages (the drafts, :meth:`reserve_draft`,
            :meth:`commit_and_draft`, the tree calls, :meth:`alloc_branches`, :meth:`add_requests`, and the wrappers'
            forms of them) made because the host bound reached the capacity. A call that raises after such
            a sync (out of slots, a launch that fails) still counts it, and keeps the exact bounds it read: the one
            exception to "a call that raises changes nothing", which concerns the pool and its requests.
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
        page_size = _check_size("page_size", page_size, 1)
        num_slots = _check_size("num_slots", num_slots, 0)
        max_requests = _check_size("max_requests", max_requests, 1)
        max_context_len = _check_size("max_context_len", max_context_len, 1, _SIZE_LIMIT)
        if num_slots % page_size:
            raise ValueError(f"num_slots must be a multiple of page_size = {page_size}, got {num_slots}")
        if num_slots + page_size >= _INT32_LIMIT:
            raise ValueError(f"num_slots + page_size must be below 2**31 (int32 slots), got {num_slots + page_size}")
        if num_slots // page_size >= _SIZE_LIMIT:
            raise ValueError(f"num_slots // page_size must be below 2**30 pages, got {num_slots // page_size}")
        self.device = _resolve_device(device)
        self._page_shift = _page_shift(page_size)
        # Every launch a programmatic dependent launch where the device has them: each kernel waits for the one
        # before it at its start, then lets the next one start (backend.pdl_level). The launches that give branches
        # (tree drafts, alloc_branches) only wait: with the next kernel's programs resident beside them the tree steps
        # took 0.5-1.9 us more at 4096-16384 requests (H200, docs/performance.md).
        self._pdl = backend.pdl_level(self.device)
        self._pdl_branches = backend.pdl_level(self.device, next_early=False)
        if backend.is_npu(self.device) and page_size not in NPU_PAGE_SIZES:
            raise ValueError(
                f"on an NPU, page_size must be one of {', '.join(map(str, NPU_PAGE_SIZES))} (the sizes the offline "
                f"Ascend compile check compiles), got {page_size}"
            )
        self.page_size = page_size
        self._context_pages = _pages(max_context_len, page_size)  # pages of a full context
        self.num_slots = num_slots
        self.num_pages = num_slots // page_size
        self.max_requests = max_requests
        self.max_context_len = max_context_len
        try:
            self.req_to_token = torch.zeros(max_requests, max_context_len, dtype=torch.int32, device=self.device)
            # -1 in seq_lens and alloc_lens: the row is not in use (add_requests sets them, free_requests puts -1 back);
            # the kernels skip such rows.
            self.seq_lens = torch.full((max_requests,), -1, dtype=torch.int64, device=self.device)
            self.alloc_lens = torch.full((max_requests,), -1, dtype=torch.int64, device=self.device)
            self.window_lens = torch.zeros(max_requests, dtype=torch.int64, device=self.device)
            self.prefix_lens = torch.zeros(max_requests, dtype=torch.int64, device=self.device)
            # Handed out from the head: page 1 first, then 2, ...
            self.free_pages = torch.arange(1, self.num_pages + 1, dtype=torch.int32, device=self.device)
            # [head, count, ticket, epoch, tiles, push epoch, push tiles]: the ticket is the kernels' last-program
            # counter, 0 between launches; the epoch counts the drafts that looked back (its parity picks their bank in
            # scratch), tiles is the number of tiles of the last of them; the push epoch and push tiles the same for
            # those of them that released branch pages (_look_back_programs).
            self._counters = torch.tensor([0, self.num_pages, 0, 0, 0, 0, 0], dtype=torch.int32, device=self.device)
            # Per batch entry, a request's new alloc_len, its page need, the branch pages it gives back and the branch
            # pages it takes, for the last program of a launch; then two banks of max_requests: per tile of a draft
            # that looks back, the pops its program published, and two more: the pushes of one that releases branch
            # pages (the bank of the next such draft is 0: each clears the other one; see _look_back_programs).
            self._scratch = torch.zeros(8 * max_requests, dtype=torch.int32, device=self.device)
        except RuntimeError as error:  # (torch.OutOfMemoryError too): name the sizes asked for, not an allocator line
            entries = max_requests * max_context_len
            raise ValueError(
                f"req_to_token of max_requests * max_context_len = {max_requests} * {max_context_len} = {entries} "
                f"int32 entries ({entries * 4 / 2**30:.1f} GiB), with {self.num_pages} pages and {max_requests} rows "
                f"of bookkeeping, cannot be allocated on {self.device}: {str(error).splitlines()[0][:200]}"
            ) from error
        self.free_head = self._counters[0:1]
        self.num_free_pages = self._counters[1:2]
        self.num_syncs = 0
        # Host state: free rows (a stack: the top is the last entry, so a new allocator hands out 0, 1, 2, ... and
        # freed rows come back first), rows in use, and the bounds.
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self._in_use = [False] * max_requests
        # >= pages not free, branch pages aside (owned by live requests or by the prefix cache); the branch pages
        # held have a bound of their own (_branch_bound), and every capacity check adds the two.
        self._pages_bound = 0
        # A row commits at most what was drafted: seq_len + open window <= _seq_base[row] + _drafted_since_sync
        # for every row in use (its exact end at the last sync, or its prompt, less what was drafted before).
        # _seq_base_max >= the largest of them; freed rows leave it high until a draft needs it tight.
        self._seq_base = [0] * max_requests
        self._seq_base_max = 0
        self._min_pages = [0] * max_requests  # <= pages owned by each row in use (its cache-owned prefix excluded)
        # Since the last exact count (_used_at_sync pages): pages of prompts added less pages surely freed (each
        # row's _min_pages: what it owned at the count or at its prefill), and tokens drafted in all. A row that
        # drafts windows summing to S gains at most ceil(S / page_size) pages (its windows advance by at most what
        # it drafted), and a freed row gives back what it gained with what it had: so the rows in use own at most
        # _used_at_sync + _net_pages_since_sync + rows in use * ceil(S / page_size) pages, a far tighter bound than
        # a page per step when windows are shorter than pages.
        self._used_at_sync = 0
        self._net_pages_since_sync = 0
        self._drafted_since_sync = 0
        # Prefix cache: pages handed to the cache, and for each row the cache pages it reads.
        self._cache_pages: set[int] = set()
        self._prefix_pages: list[list[int]] = [[] for _ in range(max_requests)]
        self._prefix_readers: Counter[int] = Counter()
        # Draft windows the host knows of (rows given as lists), for checking host-given accept lengths; drafts of
        # rows given as device tensors raise _unknown_window_bound instead.
        self._known_windows: dict[int, int] = {}
        # Bumped whenever rows are taken or freed: a DraftStepWrapper planned on host rows checks them again then.
        self._rows_version = 0
        self._live: tuple[int, list[int], torch.Tensor | None] = (-1, [], None)  # _live_rows(), by _rows_version
        self._unknown_window_bound = 0
        # Launch configurations of the allocation kernel, found on first use: the arguments of _alloc_config ->
        # (TILE, constexprs, num_warps, the most programs the launch may have: 0 for one per tile).
        self._alloc_configs: dict[tuple, tuple[int, tuple, int, int]] = {}
        # The same by the launch's own arguments (batch size included): a method call asks once per launch.
        self._launch_configs: dict[tuple, tuple[int, tuple, int, int]] = {}
        self._tree_commit_configs: dict[int, tuple[int, int, int]] = {}
        # _tree_step_in_one_launch by its arguments: (in a graph or interpreted, eager)
        self._tree_step_launches: dict[tuple, tuple[bool, bool]] = {}
        self._tree_step_counted: dict[tuple, bool] = {}  # _tree_step_counts, by its arguments
        self._free_launches: dict[tuple[int, bool, bool], tuple] = {}  # _free_launch_config, by its arguments
        self._kernel_module = None  # _kernels(), found on first use
        self._max_programs: int | None = None  # _grid's bound (0: one program per tile), found on first use
        # Tree drafts: row r holds branch pages branch_pages[r, :num_branch_pages[r]] (alloc_branches). The host
        # knows which rows may hold some, and at most how many (the worst case, or the exact count when the call
        # synced): rows given as lists, one by one (_branch_rows), and batches given as tensors, in all
        # (_branch_batch_pages). The host cannot know what a tensor of rows holds when a call reads it, so a release
        # through a tensor forgets nothing: only a release of every row in use given as a list (as free_requests has
        # them) or a sync does (see _set_exact).
        self.branch_pages = torch.zeros(max_requests, 0, dtype=torch.int32, device=self.device)
        self.num_branch_pages = torch.zeros(max_requests, dtype=torch.int64, device=self.device)
        # The memory of the allocator's tensors that never change (branch_pages is widened: _check_buffer)
        fixed = (self.req_to_token, self.seq_lens, self.alloc_lens, self.window_lens, self.prefix_lens)
        fixed += (self.free_pages, self._counters, self._scratch, self.num_branch_pages)
        spans = sorted(_storage_span(t) for t in fixed)
        self._own_starts, self._own_ends = [start for start, _ in spans], [end for _, end in spans]
        self._branch_span = (self.branch_pages, *_storage_span(self.branch_pages))  # (the tensor, then its span)
        # Output buffers that passed _check_buffer, against the branch_pages of _branch_span
        self._checked_buffers: dict[tuple, None] = {}
        # Method calls kept by the identity of their tensors (_kept_step): key -> its plan
        self._kept_steps: dict[tuple, DraftStepWrapper] = {}
        # Calls waiting for the next call under their key (_keep_step): key -> its tensors, held (ids stay theirs)
        self._seen_steps: dict[tuple, tuple] = {}
        self._branch_rows: dict[int, int] = {}
        self._branch_rows_sum = 0  # sum(_branch_rows.values()), kept up to date by each call (no pass over them)
        self._branch_batch_pages = 0
        # Host lists on their way to a CUDA device: add_requests sends up to three values a request.
        self._staging = HostStaging(self.device, 3 * max_requests)
        self._cuda = self.device.type == "cuda"  # (torch.device.type costs more than this attribute)

    def __repr__(self) -> str:
        """The constructor's arguments, the rows in use and the slots cached: host state, no sync (so no free
        count: :meth:`num_free_slots` syncs)."""
        return (
            f"DraftCacheAllocator(num_slots={self.num_slots}, max_requests={self.max_requests}, "
            f"max_context_len={self.max_context_len}, page_size={self.page_size}, device={str(self.device)!r}; "
            f"num_requests={self.num_requests}, num_cached_slots={self.num_cached_slots()})"
        )

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
        return list(self._live_rows())

    def _live_rows(self) -> list[int]:
        """:meth:`rows_in_use`, kept until rows are taken or freed (``_rows_version``): capacity syncs read them, and
        finding them is a pass over every row of the table (1 ms at 65536 rows on the development machine). The
        caller must not change the list."""
        if self._live[0] != self._rows_version:
            self._live = (self._rows_version, [row for row, used in enumerate(self._in_use) if used], None)
        return self._live[1]

    def _live_rows_on_device(self) -> tuple[list[int], torch.Tensor]:
        """:meth:`_live_rows`, and the same as an int64 tensor on the device, kept as long: for a capacity sync only
        (the copy to the device is not one a graph can capture)."""
        rows = self._live_rows()
        version, _, tensor = self._live
        if tensor is None:
            tensor = torch.tensor(rows, dtype=torch.int64, device=self.device)
            self._live = (version, rows, tensor)
        return rows, tensor

    # ----------------------------------------------------------------------------------------------- requests

    def add_requests(
        self,
        prompt_lens: IntVector,
        *,
        prefix_slots: torch.Tensor | None = None,
        prefix_lens: IntVector | None = None,
    ) -> torch.Tensor:
        """Take a free row for each prompt, give slots to its ``prompt_len`` positions and commit them (one launch).

        Args:
            prompt_lens: ``[n]`` ints >= 0, a list or an int tensor (on any device; a device tensor is read back).
            prefix_slots: ``[n, P]`` int tensor (any device): request ``i``'s positions ``[0, prefix_lens[i])`` take
                ``prefix_slots[i, :prefix_lens[i]]``, slots of pages that the prefix cache owns (handed to it by
                ``free_requests(keep_lens=)``). The allocator never frees them.
            prefix_lens: ``[n]`` ints, multiples of ``page_size``, ``<= prompt_lens`` and ``<= P``; positions
                ``[prefix_lens[i], prompt_lens[i])`` get new pages. Checked on the host (one read of
                ``prefix_slots``).

        Returns:
            ``[n]`` int64 on the allocator's device: the rows (``req_pool_indices``). A new allocator hands out rows
            0, 1, 2, ...; rows freed come back first, the last :meth:`free_requests` first, in its order (a stack, as
            cheap as a slice: no per-row work).

        Raises:
            OutOfRowsError, ContextLengthError, OutOfSlotsError, ValueError: nothing changed.
        """
        asked = _entries(prompt_lens)
        if asked > len(self._free_rows):  # (before the values are read: a lazy sequence is not expanded)
            raise OutOfRowsError(
                f"add_requests: asked for {asked} rows but {len(self._free_rows)} of {self.max_requests} are free"
            )
        lens = self._host_ints("prompt_lens", prompt_lens)
        n = len(lens)
        if n and min(lens) < 0:
            i = next(i for i, length in enumerate(lens) if length < 0)
            raise ValueError(f"prompt_lens[{i}] must be >= 0, got {lens[i]}")
        prefix, prefix_pages = self._check_prefix(lens, prefix_slots, prefix_lens)
        longest = max(lens) if n else 0
        if longest > self.max_context_len:
            i = next(i for i, length in enumerate(lens) if length > self.max_context_len)
            raise ContextLengthError(
                f"add_requests: prompt_lens[{i}] = {lens[i]} is longer than max_context_len = {self.max_context_len}"
            )
        p = self.page_size
        pages = lens if p == 1 else [(length + p - 1) // p for length in lens]
        if prefix is not None:
            pages = [row_pages - len(cached) for row_pages, cached in zip(pages, prefix_pages)]
        need = sum(pages)
        used = min(self._pages_bound, self._most_pages())
        if used + self._branch_bound() + need > self.num_pages:
            self.num_syncs += 1
            usage, _ = self._read_exact()
            free = usage.free
            if need > free:
                raise OutOfSlotsError(
                    f"add_requests: {n} prompts of {sum(lens)} tokens need {need} new pages "
                    f"({need * self.page_size} slots) but {free} pages ({free * self.page_size} slots) are free"
                )
            self._set_exact(usage)
            used = self._pages_bound
        # The top of the free-row stack (C-level slices); put back if anything below raises.
        free_rows = self._free_rows
        rows = free_rows[len(free_rows) - n :]
        rows.reverse()
        del free_rows[len(free_rows) - n :]
        try:
            # One copy to the device: rows, window ends (the prompt lengths) and, with a prefix, window starts.
            values = self._to_device(rows + lens if prefix is None else rows + lens + prefix)
            rows_t = values[:n]
            if n:
                ends = values[n : 2 * n]
                tokens = sum(lens)
                wide = tokens >= _WIDE_PREFILL_TOKENS * n * (1 if n <= _WIDE_PREFILL_MAX_BATCH else 2)
                if prefix is None:
                    self._launch_alloc(rows_t, 0, None, ends, None, None, None, wide=wide)
                else:
                    # (on an NPU as int64, the dtype its kernels are compiled for: check_npu_dtypes)
                    dtype = torch.int64 if backend.is_npu(self.device) else prefix_slots.dtype
                    slots = prefix_slots.to(self.device, dtype)
                    if slots.stride()[-1] != 1:
                        slots = slots.contiguous()
                    self._launch_alloc(rows_t, 0, values[2 * n :], ends, slots, None, None, wide=wide)
        except BaseException:
            free_rows.extend(reversed(rows))
            raise
        # The launch went through: now the host state.
        in_use, seq_base, min_pages = self._in_use, self._seq_base, self._min_pages
        drafted = self._drafted_since_sync
        for row, length, row_pages in zip(rows, lens, pages):
            in_use[row] = True
            seq_base[row] = length - drafted
            min_pages[row] = row_pages
        if n:
            self._seq_base_max = max(self._seq_base_max, longest - drafted)
        if prefix is not None:
            for row, cached in zip(rows, prefix_pages):
                self._prefix_pages[row] = cached
                self._prefix_readers.update(cached)
        self._pages_bound = used + need
        self._net_pages_since_sync += need
        self._rows_version += 1
        return rows_t

    def free_requests(self, req_pool_indices: IntVector, *, keep_lens: IntVector | None = None) -> torch.Tensor:
        """Return the requests' pages to the pool, and the branch pages their rows hold, and clear their rows (one
        launch).

        Args:
            req_pool_indices: rows in use, no duplicates; a list or an int tensor (a device tensor is read back).
            keep_lens: optional ``[bs]`` ints, multiples of ``page_size``, each ``<= `` the request's committed
                length: the pages covering positions ``[0, keep_lens[i])`` go to the caller's prefix cache instead
                of the pool (one more read-back, to check the lengths and learn the pages).

        Returns:
            The kept slots: ``req_to_token[row_i, :keep_lens[i]]`` of every request, concatenated in batch order
            (int64 on the device; empty without ``keep_lens``). Pages that came in as ``prefix_slots`` stay with
            the cache whether kept or not; they are never returned to the pool by the allocator.
        """
        self._check_row_count(_entries(req_pool_indices))
        rows = self._host_ints("req_pool_indices", req_pool_indices)
        self._check_rows_in_use(rows)
        n = len(rows)
        if keep_lens is not None and _entries(keep_lens) not in (-1, n):  # (before reading them)
            raise ValueError(f"keep_lens has {_entries(keep_lens)} elements but req_pool_indices has {n}")
        keep = None if keep_lens is None else self._host_ints("keep_lens", keep_lens)
        if keep is not None:  # (also for no rows: the same errors whatever the batch)
            p, most = self.page_size, self.max_context_len
            for i, length in enumerate(keep):
                if length < 0 or length % p:
                    raise ValueError(f"keep_lens[{i}] must be a multiple of page_size = {p} and >= 0, got {length}")
                if length > most:
                    raise ValueError(f"keep_lens[{i}] must be <= max_context_len = {most}, got {length}")
        kept_slots = torch.empty(0, dtype=torch.int64, device=self.device)
        if not rows:
            return kept_slots
        kept_pages: list[int] = []
        if keep is None:
            rows_t = keep_t = self._host_visible(rows)
        else:
            values = self._to_device(rows + keep)  # one copy to the device
            rows_t, keep_t = values[:n], values[n:]
            kept_slots, kept_pages = self._check_keep(rows, rows_t, keep, keep_t)
        branches = self._branches_may_exist()  # the rows' branch pages go back in the same launch
        kernel, grid, constexprs = self._free_launch_config(n, keep is not None, branches)
        backend.launch(
            kernel,
            grid,
            self.device,
            (
                self.req_to_token,
                rows_t,
                keep_t,
                self.seq_lens,
                self.alloc_lens,
                self.window_lens,
                self.prefix_lens,
                self.free_pages,
                self._counters,
                self.branch_pages,
                self.num_branch_pages,
            ),
            (
                n,
                self.max_requests,
                self.max_context_len,
                self.num_pages,
                self.req_to_token.stride()[0],
                self.branch_pages.stride()[0],
                self.branch_pages.shape[1],
            ),
            constexprs,
            _NUM_WARPS,
        )
        if branches:
            self._forget_branches(rows, n)
        # The launches went through: now the host state.
        in_use = self._in_use
        for row in rows:
            in_use[row] = False
        self._free_rows.extend(reversed(rows))  # the first row freed is the first handed out again
        if self._prefix_readers:
            readers, prefix_pages = self._prefix_readers, self._prefix_pages
            for row in rows:
                for page in prefix_pages[row]:
                    readers[page] -= 1
                    if not readers[page]:
                        del readers[page]
                prefix_pages[row] = []
        if self._known_windows:
            for row in rows:
                self._known_windows.pop(row, None)
        self._rows_version += 1
        self._cache_pages.update(kept_pages)
        if not self.num_requests and not self._capturing():  # (a capture cannot sync: the bound below holds)
            self._sync_bounds()
        else:
            # The freed rows' pages leave the bound, less the pages they hand to the cache (still not free): each
            # row owned at least _min_pages[row] pages, and the kept ones among them.
            gone = sum(map(self._min_pages.__getitem__, rows)) - len(kept_pages)
            self._pages_bound -= gone
            self._net_pages_since_sync -= gone
        return kept_slots

    def release_slots(self, slots: IntVector) -> None:
        """The prefix cache evicts: the pages of ``slots`` go back to the free pool (one launch).

        Args:
            slots: slots of pages the cache owns (a list or an int tensor, read back): each slot names its page,
                so a page may be given by any of its slots or by its full slot list; it is released once.

        Raises:
            ValueError: a page is not owned by the cache (never handed to it, or released already), or a live
                request still reads it as its prefix; nothing changed.
        """
        values = self._host_ints("slots", slots)
        pages: list[int] = []
        seen: set[int] = set()
        for i, slot in enumerate(values):
            page = slot // self.page_size
            if page not in self._cache_pages:
                raise ValueError(
                    f"slots[{i}] = {slot} is on page {page}, which the prefix cache does not own "
                    f"(never handed to it by free_requests(keep_lens=), or released already)"
                )
            if self._prefix_readers[page]:
                raise ValueError(
                    f"slots[{i}] = {slot} is on page {page}, which {self._prefix_readers[page]} live request(s) "
                    f"still read as their prefix"
                )
            if page not in seen:
                seen.add(page)
                pages.append(page)
        if not pages:
            return
        pages_t = self._to_device(pages, torch.int32)
        backend.launch(
            self._kernels()._push_pages_kernel,
            (1,),
            self.device,
            (pages_t, self.free_pages, self._counters),
            (len(pages), self.num_pages),
            (("TILE", _PUSH_TILE), ("PDL", self._pdl)),
            _NUM_WARPS,
        )
        self._cache_pages.difference_update(pages)
        self._pages_bound -= len(pages)
        self._net_pages_since_sync -= len(pages)

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
        key = given = None
        if validate is False:
            key, given = _step_key("alloc_draft", req_pool_indices, (num_draft_tokens,), (), out_cache_loc, last_loc)
            step = self._kept_step(key)
            if step is not None:
                step._run_draft(self)
                return step._fresh_draft_result()
        rows, host_rows, n = self._check_draft(req_pool_indices, num_draft_tokens, validate)
        bs = rows.shape[0]
        out_cache_loc, last_loc = self._draft_buffers(bs, n, out_cache_loc, last_loc)
        if validate:
            self._check_shared_memory(rows, dict(out_cache_loc=out_cache_loc, last_loc=last_loc))
        if bs:
            self._draft(rows, host_rows, n, out_cache_loc, last_loc)
            self._keep_step(key, given, rows, n, out_cache_loc=out_cache_loc, last_loc=last_loc)
        return (out_cache_loc if out_cache_loc.shape[0] == bs * n else out_cache_loc[: bs * n]), last_loc

    def alloc_tree_draft(
        self,
        req_pool_indices: IntVector,
        num_draft_tokens: int,
        topk: int,
        num_steps: int,
        *,
        out_cache_loc: torch.Tensor | None = None,
        last_loc: torch.Tensor | None = None,
        branch_slots: torch.Tensor | None = None,
        copy_src: torch.Tensor | None = None,
        copy_dst: torch.Tensor | None = None,
        validate: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A tree step's slots in one launch: :meth:`alloc_draft` ``(rows, T)`` for the tree's ``T`` nodes and
        :meth:`alloc_branches` ``(rows, topk, num_steps)`` for the draft model's branches, both from the committed
        length ``seq_len``.

        The same slots, pairs and guarantees as the two calls (the rows' previous branch pages are kept or released
        as :meth:`alloc_branches` says, in the same launch; the new ones are released by the calls listed there), in
        one launch instead of two. With :meth:`commit_tree` after it a tree step takes two launches: the tree commit
        releases the branch pages in its own launch, or, with ``keep_branches=True``, leaves them to this call's
        next run, which keeps them when the shape is the same (see :meth:`commit_tree`). Each request's window pages
        come first in the ring, then its branch pages, so the page numbers differ from those of the two calls.

        Args:
            req_pool_indices, num_draft_tokens, out_cache_loc, last_loc, validate: as for :meth:`alloc_draft`.
            topk, num_steps: ``>= 1``.
            branch_slots, copy_src, copy_dst: as ``out``, ``copy_src`` and ``copy_dst`` of :meth:`alloc_branches`.

        Returns:
            ``(out_cache_loc[:bs * T], last_loc, branch_slots, copy_src[:bs * topk * (page_size - 1)],
            copy_dst[:...])``: those of :meth:`alloc_draft` and of :meth:`alloc_branches` with
            ``return_copies=True``.

        Raises:
            ContextLengthError, OutOfSlotsError: nothing changed. Only raised after a sync, which happens only
            when the host bound says the call might not fit.
        """
        rows, host_rows, n = self._check_draft(req_pool_indices, num_draft_tokens, validate)
        bs = rows.shape[0]
        out_cache_loc, last_loc = self._draft_buffers(bs, n, out_cache_loc, last_loc)
        slots, src, dst, topk, num_steps = self._check_branches(
            rows, topk, num_steps, branch_slots, copy_src, copy_dst, False, "branch_slots"
        )[2:]
        if validate:
            written = dict(out_cache_loc=out_cache_loc, last_loc=last_loc)
            self._check_shared_memory(rows, {**written, "branch_slots": slots, "copy_src": src, "copy_dst": dst})
        if bs:
            self._draft(rows, host_rows, n, out_cache_loc, last_loc, branches=(topk, num_steps, slots, src, dst))
        copy_n = bs * topk * (self.page_size - 1)
        return (
            out_cache_loc if out_cache_loc.shape[0] == bs * n else out_cache_loc[: bs * n],
            last_loc,
            slots[: bs * topk * num_steps].view(bs, topk, num_steps),
            src[:copy_n],
            dst[:copy_n],
        )

    def commit_tree_and_draft(
        self,
        req_pool_indices: IntVector,
        accept_index: torch.Tensor,
        accept_lens: IntVector,
        num_draft_tokens: int,
        topk: int,
        num_steps: int,
        *,
        kv_src: torch.Tensor | None = None,
        kv_dst: torch.Tensor | None = None,
        out_cache_loc: torch.Tensor | None = None,
        last_loc: torch.Tensor | None = None,
        branch_slots: torch.Tensor | None = None,
        copy_src: torch.Tensor | None = None,
        copy_dst: torch.Tensor | None = None,
        validate: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`commit_tree` ``(rows, accept_index, accept_lens, keep_branches=True)``, then
        :meth:`alloc_tree_draft` ``(rows, T, topk, num_steps)``: a tree step's bookkeeping after verification, from
        the accepted paths to the next tree's window and branches, in **one launch** while the draft runs as one
        program, two past it.

        The same results, slots and guarantees as the two calls, and all or nothing: if the draft cannot fit,
        nothing is committed either. The branch pages the rows hold are kept for the new branches when they take as
        many, else released in the same launch.

        Off Ascend, one launch where the tree draft is one program and the tree commit one tile of at most 256
        elements: ``bs * T`` (32 requests of 8-node trees at ``page_size == 1``; ``bs * T * T`` past 64 nodes there);
        with larger pages the draft is one program up to 16 requests and 512 copy pairs
        (``bs * topk * (page_size - 1)``), or 4 requests, and in eager calls on a device (not capturing a graph) up to
        16 requests and 2048 pairs. Otherwise, and always on Ascend (the one kernel's on-chip buffer is not within
        budget for every tree there), two launches: the tree commit's, then the draft's, compiled before the first
        runs, so that once the commit has run only a launch could fail.

        Order of the engine's copies: ``kv[kv_dst] = kv[kv_src]`` (the accepted KV into place) **before**
        ``kv[copy_dst] = kv[copy_src]`` (the committed prefix into the branches' pages), as with the two calls.

        Args:
            req_pool_indices: ``[bs]`` rows in use, no duplicates (as for :meth:`alloc_draft`); rows with no open
                window commit nothing.
            accept_index, accept_lens, kv_src, kv_dst: as for :meth:`commit_tree`.
            num_draft_tokens, topk, num_steps, out_cache_loc, last_loc, branch_slots, copy_src, copy_dst: as for
                :meth:`alloc_tree_draft`.
            validate: the checks of both calls; one device->host sync.

        Returns:
            ``(kv_src[:bs * T_commit], kv_dst[:...], out_cache_loc[:bs * T], last_loc, branch_slots,
            copy_src[:bs * topk * (page_size - 1)], copy_dst[:...])``: those of :meth:`commit_tree`, then those of
            :meth:`alloc_tree_draft` from the committed lengths (``T_commit = accept_index.shape[1]``).

        Raises:
            ContextLengthError, OutOfSlotsError: nothing changed (nothing committed). Only raised after a sync,
            which happens only when the host bound says the call might not fit.
        """
        key = given = None
        buffers = (kv_src, kv_dst, out_cache_loc, last_loc, branch_slots, copy_src, copy_dst)
        if validate is False:
            counts = (num_draft_tokens, topk, num_steps)
            key, given = _step_key(
                "commit_tree_and_draft", req_pool_indices, counts, (), accept_index, accept_lens, *buffers
            )
            step = self._kept_step(key)
            if step is not None:
                step._run_tree_step(self)
                return step._fresh_tree_step_result()
        rows, host_rows, n = self._check_draft(req_pool_indices, num_draft_tokens, validate)
        bs = rows.shape[0]
        src, dst, pairs = self._check_tree_commit(accept_index, bs, kv_src, kv_dst)
        accept = self._check_accept(rows, host_rows, accept_lens, accept_index.shape[1])
        out_cache_loc, last_loc = self._draft_buffers(bs, n, out_cache_loc, last_loc)
        slots, copy_from, copy_to, topk, num_steps = self._check_branches(
            rows, topk, num_steps, branch_slots, copy_src, copy_dst, False, "branch_slots"
        )[2:]
        if validate:
            written = dict(out_cache_loc=out_cache_loc, last_loc=last_loc, kv_src=src, kv_dst=dst)
            written.update(branch_slots=slots, copy_src=copy_from, copy_dst=copy_to)
            self._check_shared_memory(rows, written, accept_lens=accept, accept_index=accept_index)
        if validate and bs:
            self._validate_tree(rows, accept_index, accept)
        if bs:
            branches = (topk, num_steps, slots, copy_from, copy_to)
            self._draft(
                rows, host_rows, n, out_cache_loc, last_loc, branches=branches, tree=(accept, accept_index, src, dst)
            )
            plan = dict(accept_lens=accept, accept_index=accept_index, kv_src=src, kv_dst=dst, topk=topk)
            plan.update(num_steps=num_steps, branch_slots=slots, copy_src=copy_from, copy_dst=copy_to)
            self._keep_step(key, given, rows, n, out_cache_loc=out_cache_loc, last_loc=last_loc, **plan)
        copy_n = bs * topk * (self.page_size - 1)
        return (
            src[:pairs],
            dst[:pairs],
            out_cache_loc if out_cache_loc.shape[0] == bs * n else out_cache_loc[: bs * n],
            last_loc,
            slots[: bs * topk * num_steps].view(bs, topk, num_steps),
            copy_from[:copy_n],
            copy_to[:copy_n],
        )

    def reserve_draft(self, req_pool_indices: IntVector, num_draft_tokens: int, *, validate: bool = False) -> None:
        """:meth:`alloc_draft` without the read-back: only make positions ``[seq_len, seq_len + N)`` own slots.

        For callers that read the slots themselves (``get_last_loc_and_assign_extend_cache_locs``).
        """
        rows, host_rows, n = self._check_draft(req_pool_indices, num_draft_tokens, validate)
        if rows.shape[0]:
            self._draft(rows, host_rows, n, None, None)

    def commit(self, req_pool_indices: IntVector, accept_lens: IntVector, *, validate: bool = False) -> None:
        """After verification: ``seq_lens[req_pool_indices] += accept_lens`` (one launch, no sync).

        Each accept length is clamped on the device to ``[0, window]``, ``window`` the row's open draft window
        (``window_lens``): committing more than was drafted commits the whole window, committing with no window
        open (a second commit, or no draft) commits nothing. The window closes either way. So no value can make a
        row's committed length pass the slots it owns.

        Args:
            req_pool_indices: ``[bs]`` rows in use, no duplicates (as for :meth:`alloc_draft`).
            accept_lens: ``[bs]`` int32/int64 tensor on the device, or a list of ints (checked on the host against
                the windows the host knows of: a ``ValueError`` instead of a clamp); accepted positions keep their
                slots.
            validate: check rows and that ``0 <= accept_lens <= window_lens[rows]``; one device→host sync.
        """
        rows, host_rows, accept = self._check_commit(req_pool_indices, accept_lens, validate)
        if validate:
            self._validate_accept(rows, accept)
        if rows.shape[0]:
            self._commit(rows, host_rows, accept)

    def commit_and_draft(
        self,
        req_pool_indices: IntVector,
        accept_lens: IntVector,
        num_draft_tokens: int,
        *,
        out_cache_loc: torch.Tensor | None = None,
        last_loc: torch.Tensor | None = None,
        validate: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`commit` ``(rows, accept_lens)``, then :meth:`alloc_draft` ``(rows, N)``, in one launch: a chain
        step's bookkeeping after verification, from the accepted tokens to the next window's slots.

        The same results, guarantees and errors as the two calls (accept lengths clamped to the open windows on the
        device, or checked on the host when given as a list; rows that may hold branch pages release them in the
        same launch), but one launch instead of two, and all or nothing: if the draft cannot fit, nothing is
        committed either. Past 256 requests (past 128 with windows of 3 tokens or more on a GPU that takes
        programmatic dependent launches, compute capability 9.0 and up), with no branch pages to release, it makes
        two launches, which take less device time there: the first counts the pages each tile of requests takes,
        the second allocates; only the second changes the allocator's state. Called eagerly (not while a graph is
        captured) on a GPU or NPU it stays one launch up to 4096 requests, where a second launch costs the host more
        than it saves on the device.

        Args:
            req_pool_indices, num_draft_tokens, out_cache_loc, last_loc: as for :meth:`alloc_draft`.
            accept_lens: as for :meth:`commit`.
            validate: the checks of both calls; one device→host sync.

        Returns:
            ``(out_cache_loc[:bs * N], last_loc)`` as :meth:`alloc_draft`, from the committed lengths.

        Raises:
            ContextLengthError, OutOfSlotsError: nothing changed (nothing committed). Only raised after a sync,
            which happens only when the host bound says the call might not fit.
        """
        key = given = None
        if validate is False:
            key, given = _step_key(
                "commit_and_draft", req_pool_indices, (num_draft_tokens,), (), accept_lens, out_cache_loc, last_loc
            )
            step = self._kept_step(key)
            if step is not None:
                step._run_commit_and_draft(self)
                return step._fresh_draft_result()
        rows, host_rows, n = self._check_draft(req_pool_indices, num_draft_tokens, validate)
        accept = self._check_accept(rows, host_rows, accept_lens)
        if validate:
            self._validate_accept(rows, accept)
        bs = rows.shape[0]
        out_cache_loc, last_loc = self._draft_buffers(bs, n, out_cache_loc, last_loc)
        if validate:
            self._check_shared_memory(rows, dict(out_cache_loc=out_cache_loc, last_loc=last_loc), accept_lens=accept)
        if bs:
            self._draft(rows, host_rows, n, out_cache_loc, last_loc, accept=accept)
            self._keep_step(key, given, rows, n, accept_lens=accept, out_cache_loc=out_cache_loc, last_loc=last_loc)
        return (out_cache_loc if out_cache_loc.shape[0] == bs * n else out_cache_loc[: bs * n]), last_loc

    def _validate_accept(self, rows: torch.Tensor, accept: torch.Tensor) -> None:
        """``validate=True`` of a commit: ``0 <= accept_lens <= window_lens[rows]`` (one sync)."""
        if not rows.shape[0]:
            return
        window = self.window_lens[rows]
        bad = (accept < 0) | (accept > window)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"accept_lens[{i}] must be in [0, {int(window[i])}] (the draft window of row {int(rows[i])}), "
                f"got {int(accept[i])}"
            )

    def _commit(
        self,
        rows: torch.Tensor,
        host_rows: list[int] | None,
        accept: torch.Tensor,
        tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        step: DraftStepWrapper | None = None,
        keep_branches: bool = False,
    ) -> None:
        """Launch the commit (``tree``: ``(accept_index, kv_src, kv_dst)`` of a tree commit), returning the rows'
        branch pages in the same launch if any may exist (unless ``keep_branches``), then close the windows the host
        knows of (nothing changes if the launch raises). ``step``: the launches a DraftStepWrapper prepared. A chain
        commit that releases is the allocation kernel's commit and release with a window of no tokens
        (:meth:`commit_and_draft` with ``N = 0``: no pops, the window left at 0, as the commit kernel leaves it)."""
        release = self._branches_may_exist()
        if tree is None:
            if not release:
                if step is None:
                    self._launch_commit(rows, accept)
                else:
                    step._prepared("commit")()
            else:
                if step is None:
                    self._launch_alloc(rows, 0, None, None, None, None, None, True, accept=accept)
                else:
                    step._prepared("release commit")()
                self._forget_branches(host_rows, rows.shape[0])
        else:
            release = release and not keep_branches
            if step is None:
                self._launch_commit_tree(rows, accept, *tree, release=release)
            else:
                step._prepared("release commit tree" if release else "commit tree")()
            if release:
                self._forget_branches(host_rows, rows.shape[0])
        self._close_windows(host_rows)

    def _close_windows(self, host_rows: list[int] | None) -> None:
        """Forget the windows a commit closed (host state). Rows not known: any row's window may still be open, so
        the widest known one joins the bound of the windows not known."""
        if host_rows is None:
            if self._known_windows:
                self._unknown_window_bound = max(self._unknown_window_bound, *self._known_windows.values())
                self._known_windows.clear()
        else:  # (popped in C: a pass of Python over the rows cost about 40 ns a row)
            collections.deque(map(self._known_windows.pop, host_rows, itertools.repeat(None)), maxlen=0)

    def _launch_commit(self, rows: torch.Tensor, accept: torch.Tensor, prepare: bool = False) -> backend.Launch | None:
        """Launch the commit kernel; ``prepare=True``: return the launch, made by calling it."""
        bs = rows.shape[0]
        return (backend.prepare if prepare else backend.launch)(
            self._kernels()._commit_kernel,
            self._grid(bs, _COMMIT_TILE),
            self.device,
            (rows, accept, self.seq_lens, self.window_lens),
            (bs, self.max_requests),
            (("TILE", _COMMIT_TILE), ("PDL", self._pdl)),
            _NUM_WARPS,
        )

    # ------------------------------------------------------------------------------------------------ trees

    def commit_tree(
        self,
        req_pool_indices: IntVector,
        accept_index: torch.Tensor,
        accept_lens: IntVector,
        *,
        kv_src: torch.Tensor | None = None,
        kv_dst: torch.Tensor | None = None,
        keep_branches: bool = False,
        validate: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After verifying a tree of ``T`` nodes drafted with :meth:`alloc_draft` ``(rows, T)`` (node ``j``'s KV at
        the slot of position ``seq_len + j``): commit each request's accepted path, in one launch, no sync.

        For ``m < a_i``, position ``seq_len_i + m`` becomes node ``accept_index[i, m]``; then ``seq_lens += a``
        and the window closes. ``a_i`` is ``accept_lens[i]`` clamped to ``[0, min(window, T)]`` and cut at the
        first entry that is not a node of the window (``0 <= node < min(window, T)``) or not greater than the
        entry before: bad values give a wrong KV order but never corrupt the pool.

        Run ``kv[kv_dst] = kv[kv_src]`` (a gather, then a scatter) on every KV buffer afterwards: then the KV at
        ``req_to_token[row_i, seq_len_i + m]`` is the one node ``accept_index[i, m]`` wrote. With ``page_size ==
        1`` nothing is copied: the window's slots are permuted in ``req_to_token`` (accepted nodes' slots first,
        in path order, then the unaccepted ones in node order, kept for the next window) and every pair is
        ``src == dst``. With ``page_size > 1`` slots stay, and pair ``i * T + m`` copies node ``accept_index[i,
        m]``'s slot to position ``seq_len_i + m``'s (``src == dst`` where ``m >= a_i``; ``0 -> 0``, the padding
        slot, past the window). Rejected positions keep their slots for the next window. Branch pages of the rows
        (:meth:`alloc_branches`, :meth:`alloc_tree_draft`) are released in the same launch, unless
        ``keep_branches``.

        Args:
            req_pool_indices: ``[bs]`` rows in use, no duplicates (as for :meth:`commit`).
            accept_index: ``[bs, T]`` int32/int64 tensor on the device, unit stride along ``T``; entries past
                ``accept_lens[i]`` are ignored. ``T <= 256`` (on an NPU 64, and 32 with ``page_size == 1``).
            accept_lens: ``[bs]`` int tensor on the device or a list, values in ``[0, T]``.
            kv_src, kv_dst: optional int32/int64 buffers of at least ``bs * T`` elements (keep them for graphs).
            keep_branches: leave the rows' branch pages held. The row's next :meth:`alloc_tree_draft` (or
                :meth:`alloc_branches`) keeps them if its branches take as many pages (same ``topk`` and
                ``num_steps``, and with ``page_size > 1`` as many pages per branch), with no trip through the
                pool, and otherwise releases them in its own launch, as do :meth:`alloc_draft`,
                :meth:`reserve_draft`, :meth:`release_branches`, :meth:`commit` and :meth:`free_requests`.
                Releasing them here costs the tree commit 2-4 us of device time (its ticket and last pass, H200).
                A release in the next launch needs room for the old and the new pages at once (its pops never
                take the pages it releases).
            validate: check rows, ``0 <= accept_lens <= min(window, T)`` and that each path's nodes are in
                ``[0, min(window, T))`` and strictly increasing; one device->host sync.

        Returns:
            ``(kv_src[:bs * T], kv_dst[:bs * T])``, int64 unless given.
        """
        key = given = None
        if validate is False:
            key, given = _step_key(
                "commit_tree", req_pool_indices, (), (keep_branches,), accept_index, accept_lens, kv_src, kv_dst
            )
            step = self._kept_step(key)
            if step is not None:
                step._run_commit(self)
                return step._fresh_tree_commit_result()
        _check_flag("keep_branches", keep_branches)
        rows, host_rows = self._check_commit_rows(req_pool_indices, validate)
        bs = rows.shape[0]
        src, dst, n = self._check_tree_commit(accept_index, bs, kv_src, kv_dst)
        accept = self._check_accept(rows, host_rows, accept_lens, accept_index.shape[1])
        if validate:
            written = dict(kv_src=src, kv_dst=dst)
            self._check_shared_memory(rows, written, accept_lens=accept, accept_index=accept_index)
        if validate and bs:
            self._validate_tree(rows, accept_index, accept)
        if bs:
            self._commit(rows, host_rows, accept, (accept_index, src, dst), keep_branches=keep_branches)
            plan = dict(accept_lens=accept, accept_index=accept_index, kv_src=src, kv_dst=dst, emit=False)
            self._keep_step(key, given, rows, 1, keep_branches=keep_branches, **plan)
        return src[:n], dst[:n]

    def _launch_commit_tree(
        self,
        rows: torch.Tensor,
        accept: torch.Tensor,
        accept_index: torch.Tensor,
        kv_src: torch.Tensor,
        kv_dst: torch.Tensor,
        prepare: bool = False,
        release: bool = False,
    ) -> backend.Launch | None:
        """Launch the tree commit kernel (``release``: which first returns the rows' branch pages);
        ``prepare=True``: return the launch, made by calling it."""
        bs, tree = accept_index.shape
        tile, block_t, repoint = self._tree_commit_config(tree)
        return (backend.prepare if prepare else backend.launch)(
            self._kernels()._commit_tree_kernel,
            self._grid(bs, tile),
            self.device,
            (
                self.req_to_token,
                rows,
                accept_index,
                accept,
                self.seq_lens,
                self.window_lens,
                kv_src,
                kv_dst,
                self.branch_pages,
                self.num_branch_pages,
                self.free_pages,
                self._counters,
            ),
            (
                bs,
                self.max_requests,
                self.max_context_len,
                self.req_to_token.stride()[0],
                tree,
                accept_index.stride()[0],
                self.num_pages,
                self.branch_pages.stride()[0],
                self.branch_pages.shape[1],
            ),
            (
                ("TILE", tile),
                ("BLOCK_T", block_t),
                ("REPOINT", repoint),
                ("RELEASE", release),
                ("BLOCK_R", self._release_tiles()[1]),
                ("SCAN_BLOCK", self._scan_block()),
                ("PDL", self._pdl),
            ),
            _TREE_NUM_WARPS,
        )

    def _tree_commit_config(self, tree: int) -> tuple[int, int, int]:
        """(TILE, BLOCK_T, REPOINT) of the tree commit of ``tree``-node trees (REPOINT: see _REPOINT_MASK_NODES),
        cached."""
        config = self._tree_commit_configs.get(tree)
        if config is None:
            config = self._tree_commit_configs[tree] = self._make_tree_commit_config(tree)
        return config

    def _make_tree_commit_config(self, tree: int) -> tuple[int, int, int]:
        block_t = max(1 << max(tree - 1, 0).bit_length(), 2)  # size-1 tile dimensions: see docs/design.md
        npu = backend.is_npu(self.device)
        repoint = 0 if self.page_size > 1 else 2 if npu or block_t > _REPOINT_MASK_NODES else 1
        if npu:
            elements = _NPU_TREE_CUBE_ELEMENTS // block_t if repoint else _NPU_TREE_ELEMENTS
            tile = max(min(elements // block_t, _NPU_TREE_MAX_TILE), 2)
        else:
            tile = max(min(_TREE_ELEMENTS // _tree_commit_width(block_t, repoint), _TREE_MAX_TILE), 1)
        return tile, block_t, repoint

    def alloc_branches(
        self,
        req_pool_indices: IntVector,
        topk: int,
        num_steps: int,
        *,
        out: torch.Tensor | None = None,
        copy_src: torch.Tensor | None = None,
        copy_dst: torch.Tensor | None = None,
        return_copies: bool = False,
        validate: bool = False,
    ):
        """Scratch slots for the draft model's ``topk`` branches, ``num_steps`` deep: one launch, no sync while
        the host bound has headroom.

        Branch ``b``, step ``s`` of request ``i`` is position ``seq_len_i + s`` in the paged layout (``slot %
        page_size == pos % page_size``), on pages of its own: the branches' slots are disjoint from every slot a
        live request owns and from each other. The row's previous branch pages are released first, in the same
        launch (the new pages never come from them), unless they are exactly as many as its new branches take:
        then the row keeps them and its new branches lie on them. Branch pages are released by
        :meth:`release_branches`, the next :meth:`alloc_draft`/:meth:`reserve_draft` of the row, its next
        :meth:`alloc_tree_draft`/:meth:`alloc_branches` (unless kept), :meth:`commit`, :meth:`commit_tree` (unless
        ``keep_branches``) and :meth:`free_requests`. Positions past ``max_context_len`` are not checked: branch
        slots are not in ``req_to_token``.

        With ``page_size > 1`` a branch's first page starts at the request's last partial page (``off = seq_len %
        page_size`` committed tokens), so each branch gets its own copy of that page's committed part, as SGLang's
        ``assign_draft_cache_locs`` does for every branch but the first: run ``kv[copy_dst] = kv[copy_src]`` on the
        draft model's KV buffers, then a paged attention kernel reading the table ``req_to_token[row, :seq_len -
        off]`` plus the branch's pages sees the committed prefix. The pairs are ``[bs, topk, page_size - 1]``,
        ``src == dst`` (a slot the draft overwrites) for offsets ``q >= off``, so the size is fixed for graphs.

        Args:
            req_pool_indices: ``[bs]`` rows in use, no duplicates (as for :meth:`alloc_draft`).
            topk, num_steps: ``>= 1``.
            out: optional contiguous int32/int64 buffer of at least ``bs * topk * num_steps`` elements.
            copy_src, copy_dst: optional contiguous int32/int64 buffers of at least ``bs * topk * (page_size - 1)``
                elements; giving them implies ``return_copies``.
            return_copies: also return the copy pairs (empty for ``page_size == 1``).
            validate: check the rows; one device->host sync.

        Returns:
            ``branch_slots``, a ``[bs, topk, num_steps]`` view of ``out`` (int64 unless given), or
            ``(branch_slots, copy_src[:bs * topk * (page_size - 1)], copy_dst[:...])`` with ``return_copies``.

        Raises:
            OutOfSlotsError: nothing changed. Only after a sync, which happens only when the host bound says the
            call might not fit.
        """
        key = given = None
        if validate is False:
            flags = (return_copies,)
            key, given = _step_key(
                "alloc_branches", req_pool_indices, (topk, num_steps), flags, out, copy_src, copy_dst
            )
            step = self._kept_step(key)
            if step is not None:
                step._run_branches(self)
                return step._fresh_branch_result()
        _check_flag("return_copies", return_copies)
        rows, host_rows, slots, src, dst, topk, num_steps = self._check_branches(
            req_pool_indices, topk, num_steps, out, copy_src, copy_dst, validate
        )
        if validate:
            self._check_shared_memory(rows, dict(out=slots, copy_src=src, copy_dst=dst))
        bs = rows.shape[0]
        if bs:
            self._branches(rows, host_rows, topk, num_steps, slots, src, dst)
            branches = dict(topk=topk, num_steps=num_steps, branch_slots=slots, copy_src=src, copy_dst=dst)
            self._keep_step(key, given, rows, 1, emit=False, **branches)
        branch_slots = slots[: bs * topk * num_steps].view(bs, topk, num_steps)
        if return_copies or copy_src is not None or copy_dst is not None:
            copy_width = topk * (self.page_size - 1)
            return branch_slots, src[: bs * copy_width], dst[: bs * copy_width]
        return branch_slots

    def _check_branches(
        self,
        req_pool_indices: IntVector,
        topk: int,
        num_steps: int,
        out: torch.Tensor | None,
        copy_src: torch.Tensor | None,
        copy_dst: torch.Tensor | None,
        validate: bool,
        out_name: str = "out",
    ) -> tuple[torch.Tensor, list[int] | None, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """Check the arguments of alloc_branches (``out`` named ``out_name`` in errors); returns (rows on the
        device, rows on the host or None, the branch slots' buffer, copy_src, copy_dst, topk, num_steps), new int64
        buffers where none was given, the counts as Python ints."""
        _check_flag("validate", validate)
        rows, host_rows = self._device_rows(req_pool_indices)
        bs = rows.shape[0]
        topk = _check_size("topk", topk, 1)
        num_steps = _check_size("num_steps", num_steps, 1)
        width = topk * num_steps
        copy_width = topk * (self.page_size - 1)
        if bs * max(width, copy_width) >= _INT32_LIMIT:
            raise ValueError(f"bs * topk * max(num_steps, page_size - 1) must be below 2**31, got {bs} * {topk} * ...")
        if validate and host_rows is None:
            host_rows = rows.tolist()
        if host_rows is not None:
            self._check_rows_in_use(host_rows)
        slots = self._tree_buffer(out_name, out, bs * width)
        src = self._tree_buffer("copy_src", copy_src, bs * copy_width)
        dst = self._tree_buffer("copy_dst", copy_dst, bs * copy_width)
        return rows, host_rows, slots, src, dst, topk, num_steps

    def _branches(
        self,
        rows: torch.Tensor,
        host_rows: list[int] | None,
        topk: int,
        num_steps: int,
        slots: torch.Tensor,
        copy_src: torch.Tensor,
        copy_dst: torch.Tensor,
        step: DraftStepWrapper | None = None,
    ) -> None:
        """Check the capacity, launch the branch allocation (which first returns the rows' previous branch pages),
        then record the branch pages the host knows the rows may hold (nothing changes if anything raises).
        ``step``: the launches a DraftStepWrapper prepared."""
        bs = rows.shape[0]
        p = self.page_size
        per_row = topk * _pages(p - 1 + num_steps, p)  # the most pages a row's branches take
        needs = self._branch_capacity(rows, host_rows, topk, num_steps, bs * per_row)
        narrow = self._widen_branch_pages(per_row)
        try:
            if step is None:
                self._launch_branches(rows, topk, num_steps, slots, copy_src, copy_dst)
            else:
                step._prepared("branches")()
        except BaseException:
            self.branch_pages = narrow  # the wider copy holds nothing yet
            raise
        self._hold_branches(rows, host_rows, per_row, needs, bs, released=True)

    def _widen_branch_pages(self, per_row: int) -> torch.Tensor:
        """Make ``branch_pages`` at least ``per_row`` wide (on the host, outside graphs: the first call that needs it
        sizes it); returns the table before, for the caller to put back if its launch raises."""
        narrow = self.branch_pages
        if narrow.shape[1] < per_row:
            self.branch_pages = torch.zeros(self.max_requests, per_row, dtype=torch.int32, device=self.device)
            self.branch_pages[:, : narrow.shape[1]] = narrow
        return narrow

    def _hold_branches(
        self,
        rows: torch.Tensor,
        host_rows: list[int] | None,
        per_row: int,
        needs: list[int] | None,
        bs: int,
        released: bool,
    ) -> None:
        """Record that ``rows`` (``bs`` of them) now hold branch pages: ``needs`` each when known exactly, else at
        most ``per_row``. ``released``: the same launch first returned the rows' earlier branch pages
        (:meth:`_forget_branches`)."""
        if host_rows is None:  # added to the batches' pages, at most every row's worst case
            held = self._branch_batch_pages + (bs * per_row if needs is None else sum(needs))
            # num_requests * width, without the property's call (the tree step's hot path: measured 2026-11-25)
            cap = (self.max_requests - len(self._free_rows)) * self.branch_pages.shape[1]
            self._branch_batch_pages = held if held < cap else cap
            return
        if released:
            self._forget_branches(host_rows, bs)
        held = dict.fromkeys(host_rows, per_row) if needs is None else dict(zip(host_rows, needs))
        before = sum(map(self._branch_rows.get, held, itertools.repeat(0)))
        self._branch_rows.update(held)
        self._branch_rows_sum += sum(held.values()) - before

    def _launch_branches(
        self,
        rows: torch.Tensor,
        topk: int,
        num_steps: int,
        slots: torch.Tensor,
        copy_src: torch.Tensor,
        copy_dst: torch.Tensor,
        prepare: bool = False,
    ) -> backend.Launch | None:
        """Launch the branch allocation kernel; ``prepare=True``: return the launch, made by calling it."""
        bs = rows.shape[0]
        p = self.page_size
        if backend.is_npu(self.device):
            tile = _NPU_BRANCH_TILE
        elif p > 1:
            tile = self._copy_pairs_tile(
                bs, topk, _COPY_BRANCH_TILE, _COPY_BRANCH_ONE_PROGRAM_BS, _COPY_BRANCH_ONE_PROGRAM
            )
        elif bs <= 2 * _BRANCH_TILE:
            tile = max(1 << (bs - 1).bit_length(), _BRANCH_TILE)
        else:
            tile = _BRANCH_TILE
        # Past one program it looks back, as a draft does (off Ascend): on a GPU about one program per SM.
        look_back = _LOOK_BACK_BLOCK if tile < bs and not backend.is_npu(self.device) else 0
        if look_back:
            tile = self._look_back_tile(bs, tile)
        grid = self._grid(bs, tile, self._look_back_programs if look_back else 0)
        block_e = self._branch_block(topk, num_steps)
        return (backend.prepare if prepare else backend.launch)(
            self._kernels()._alloc_branches_kernel,
            grid,
            self.device,
            (
                self.req_to_token,
                rows,
                self.seq_lens,
                self.branch_pages,
                self.num_branch_pages,
                self.free_pages,
                self._counters,
                slots,
                copy_src if p > 1 else slots,
                copy_dst if p > 1 else slots,
                self._scratch,
            ),
            (
                bs,
                self.max_requests,
                self.max_context_len,
                self.req_to_token.stride()[0],
                self.num_pages,
                self.branch_pages.stride()[0],
                self.branch_pages.shape[1],
                topk,
                num_steps,
            ),
            (
                ("PAGE_SIZE", p),
                ("PAGE_SHIFT", self._page_shift),
                ("TILE", tile),
                ("BLOCK_R", self._release_tiles()[1]),
                ("BLOCK_E", block_e),
                ("SCAN_BLOCK", self._scan_block()),
                ("COPY", p > 1),
                ("EARLY_COPY", self._early_copy()),
                ("LOOKBACK", look_back),
                ("PDL", self._pdl_branches),
            ),
            _NUM_WARPS,
        )

    def _early_copy(self) -> bool:
        """EARLY_COPY of the kernels that write copy pairs (pages > 1): the first block's loads go out with the branch
        slots' (``_write_branches``); not on Ascend, where the extra live tiles overflow the on-chip buffer."""
        return self.page_size > 1 and not backend.is_npu(self.device)

    def _branch_block(self, topk: int, num_steps: int, counted: bool = False) -> int:
        """BLOCK_E of the kernels that write branch slots and copy pairs: the row of a request's slots or pairs,
        capped (``counted``: a tree draft that reads its counts from the launch before it)."""
        p = self.page_size
        if backend.is_npu(self.device):
            # One block for every tree of a page size: fewer variants for the Ascend check to compile (a page-1 tree
            # draft's BLOCK_E multiplied its variants by 5). UB decides which: with pages > 1 and [TILE, 4] windows a
            # 16-wide block needed 179-188 KiB, and at page 1 a 32-wide one beside [TILE, 4] windows 170 KiB.
            return _NPU_BRANCH_BLOCK if p > 1 else _NPU_PAGE1_BRANCH_BLOCK
        if p > 1:
            block = _COPY_COUNTED_BLOCK if counted else _COPY_BRANCH_BLOCK
        else:
            block = _BRANCH_BLOCK
        return min(1 << (max(topk * num_steps, topk * (p - 1), 2) - 1).bit_length(), block)

    def release_branches(self, req_pool_indices: IntVector, *, validate: bool = False) -> None:
        """Return the branch pages of the rows (:meth:`alloc_branches`) to the pool: one launch, no sync."""
        _check_flag("validate", validate)
        rows, host_rows = self._device_rows(req_pool_indices)
        if validate and host_rows is None:
            host_rows = rows.tolist()
        if host_rows is not None:
            self._check_rows_in_use(host_rows)
        if rows.shape[0] and self.branch_pages.shape[1]:
            self._launch_release(rows, host_rows)

    # ------------------------------------------------------------------------------------------------- pool

    def num_free_slots(self) -> int:
        """Free slots of the pool (a multiple of ``page_size``); one device→host sync, which also tightens the
        host bound."""
        self._sync_bounds()
        return int(self.num_free_pages[0]) * self.page_size

    def num_cached_slots(self) -> int:
        """Slots of the pages handed to the prefix cache and not released yet (host state, no sync)."""
        return len(self._cache_pages) * self.page_size

    def cached_pages(self) -> list[int]:
        """The pages the prefix cache owns, in increasing order (host state, no sync)."""
        return sorted(self._cache_pages)

    def free_page_list(self) -> list[int]:
        """The free pages in the order they will be handed out (one device→host copy)."""
        head, count, *ring = torch.cat([self._counters[:2], self.free_pages]).tolist()
        return [ring[(head + k) % self.num_pages] for k in range(count)]

    def refresh(self) -> None:
        """Re-read the exact usage from the device (one sync).

        Call it after replaying captured steps: a graph replay does not run the host code that keeps the bound,
        so the next eager call would otherwise trust a bound that the replays outgrew.
        """
        self._sync_bounds()

    # ---------------------------------------------------------------------------------------------- internals

    def _capturing(self) -> bool:
        """Whether a CUDA graph is being captured on the current stream (which cannot sync). Not
        ``backend.is_capturing``, which answers True on an NPU whose torch_npu cannot tell (where a sync must go
        on)."""
        return self._cuda and torch.cuda.is_current_stream_capturing()

    def _sync_bounds(self) -> None:
        """Make the host bounds exact: one device→host copy."""
        self._set_exact(self._read_exact()[0])

    def _read_exact(self, *extra: torch.Tensor) -> tuple[_Usage, list[int]]:
        """One device→host copy of the exact usage and of the int64 vectors ``extra`` (their values, concatenated)."""
        if self._capturing():
            raise RuntimeError(
                "the host bound of the pool says this call might not fit, and only an exact count read from the "
                "device (a sync) can tell, which CUDA graph capture cannot make: capture with more free pages (tree "
                "steps given tensors of rows count every row's branch pages at their worst twice), or run the call "
                "eagerly; nothing was changed"
            )
        live, live_t = self._live_rows_on_device()
        counts = torch.stack([self.num_free_pages[0].long(), self.num_branch_pages.sum()])
        ends = self.seq_lens[live_t] + self.window_lens[live_t]
        p = self.page_size
        owned = (self.alloc_lens[live_t] + p - 1).div(p, rounding_mode="floor") - self.prefix_lens[live_t].div(
            p, rounding_mode="floor"
        )
        values = torch.cat([counts, owned, ends, self.num_branch_pages[live_t], *extra]).tolist()
        k = len(live)
        usage = _Usage(
            values[0], values[1], live, values[2 : 2 + k], values[2 + k : 2 + 2 * k], values[2 + 2 * k : 2 + 3 * k]
        )
        return usage, values[2 + 3 * k :]

    def _set_exact(self, usage: _Usage) -> None:
        """Restart the bounds from exact counts. Branch pages are bounded apart (:meth:`_branch_bound`), so the
        pages bound leaves the held ones out."""
        self._pages_bound = self._used_at_sync = self.num_pages - usage.free - usage.held
        # The branch pages of each row, exactly (none: no release to launch until the next alloc_branches); any
        # held by rows not in use (freeing a row returns them, so none) stay on the books as a batch's.
        self._branch_rows = dict(itertools.compress(zip(usage.rows, usage.branch_pages), usage.branch_pages))
        self._branch_rows_sum = sum(self._branch_rows.values())
        self._branch_batch_pages = usage.held - self._branch_rows_sum
        self._net_pages_since_sync = self._drafted_since_sync = 0
        # Row by row, in C (a Python loop over the rows took 1.9 ms at 16384 rows on the development machine).
        collections.deque(map(self._min_pages.__setitem__, usage.rows, usage.min_pages), maxlen=0)
        collections.deque(map(self._seq_base.__setitem__, usage.rows, usage.ends), maxlen=0)
        self._seq_base_max = max(usage.ends, default=0)

    def _check_draft(self, req_pool_indices: IntVector, num_draft_tokens: int, validate: bool):
        """Check the arguments of a draft; returns (rows on the device, rows on the host or None, N as a Python
        int)."""
        _check_flag("validate", validate)
        rows, host_rows = self._device_rows(req_pool_indices)
        num_draft_tokens = _check_size("num_draft_tokens", num_draft_tokens, 0)
        if rows.shape[0] * num_draft_tokens >= _INT32_LIMIT:
            raise ValueError(f"bs * num_draft_tokens must be below 2**31, got {rows.shape[0]} * {num_draft_tokens}")
        if validate and host_rows is None:
            host_rows = rows.tolist()
        if host_rows is not None:
            self._check_rows_in_use(host_rows)
        return rows, host_rows, num_draft_tokens

    def _draft_buffers(
        self, bs: int, n: int, out_cache_loc: torch.Tensor | None, last_loc: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The output buffers of alloc_draft: checked when given, else new int64 ones."""
        if out_cache_loc is None:
            out_cache_loc = torch.empty(bs * n, dtype=torch.int64, device=self.device)
        else:
            self._check_buffer("out_cache_loc", out_cache_loc, bs * n, exact=False)
        if last_loc is None:
            last_loc = torch.empty(bs, dtype=torch.int64, device=self.device)
        else:
            self._check_buffer("last_loc", last_loc, bs, exact=True)
        return out_cache_loc, last_loc

    def _draft(
        self,
        rows: torch.Tensor,
        host_rows: list[int] | None,
        n: int,
        out_cache_loc: torch.Tensor | None,
        last_loc: torch.Tensor | None,
        step: DraftStepWrapper | None = None,
        branches: tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        accept: torch.Tensor | None = None,
        tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Check the capacity, launch the draft, then update the host state (nothing changes if anything raises).
        ``step``: the launches a DraftStepWrapper prepared; ``branches``: ``(topk, num_steps, branch_slots,
        copy_src, copy_dst)`` of a tree draft (:meth:`alloc_tree_draft`); ``accept``: the accept lengths of a
        commit made first, in the same launch (:meth:`commit_and_draft`); ``tree``: ``(accept_lens, accept_index,
        kv_src, kv_dst)`` of a tree commit made first, with ``branches`` (:meth:`commit_tree_and_draft`)."""
        if branches is not None:
            self._tree_draft(rows, host_rows, n, out_cache_loc, last_loc, step, branches, tree)
            return
        bound, drafted, _, base_max = self._draft_bounds(rows, host_rows, n, accept=accept)
        release = self._branches_may_exist()
        if accept is not None and self._in_two_launches(rows.shape[0], n, release):
            # The first launch writes only scratch: if the second raises, nothing has changed.
            if step is None:
                self._launch_count(rows, n, accept)
                self._launch_alloc(rows, n, None, None, None, out_cache_loc, last_loc, accept=accept, sums=True)
            else:
                step._prepared("count commit draft")()
                step._prepared("commit draft from counts")()
        elif step is None:
            self._launch_alloc(rows, n, None, None, None, out_cache_loc, last_loc, release, accept=accept)
        else:
            step._prepared(("release " if release else "") + ("commit draft" if accept is not None else "draft"))()
        if release:
            self._forget_branches(host_rows, rows.shape[0])
        self._pages_bound, self._drafted_since_sync, self._seq_base_max = bound, drafted, base_max
        # (a commit made first needs no _close_windows: the windows opened here replace those it closed)
        self._open_windows(host_rows, n, None if step is None else step._opened)

    def _tree_draft(
        self,
        rows: torch.Tensor,
        host_rows: list[int] | None,
        n: int,
        out_cache_loc: torch.Tensor | None,
        last_loc: torch.Tensor | None,
        step: DraftStepWrapper | None,
        branches: tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor],
        tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """``_draft`` of :meth:`alloc_tree_draft`: the draft and the branches in one launch; ``tree``: after the tree
        commit of :meth:`commit_tree_and_draft`, in the same launch where the draft is one program, else in a launch
        before it."""
        per_row = branches[0] * _pages(self.page_size - 1 + branches[1], self.page_size)
        bs = rows.shape[0]
        bound, drafted, needs, base_max = self._draft_bounds(rows, host_rows, n, branches[:2], tree=tree, bs=bs)
        release = bool(self._branch_rows or self._branch_batch_pages)  # (_branches_may_exist)
        narrow = self._widen_branch_pages(per_row)
        kind = "release tree draft" if release else "tree draft"
        try:
            if tree is None:
                if step is None:
                    self._launch_alloc(rows, n, None, None, None, out_cache_loc, last_loc, release, branches=branches)
                else:
                    step._prepared(kind)()
            elif (
                self._tree_step_in_one_launch(bs, n, release, branches, tree[1].shape[1])
                if step is None
                else step._tree_step_in_one_launch(release)
            ):
                if step is None:
                    self._launch_alloc(
                        rows, n, None, None, None, out_cache_loc, last_loc, release, branches=branches, tree=tree
                    )
                else:
                    step._prepared("release commit tree draft" if release else "commit tree draft")()
            else:
                # Two launches: the tree commit, then the draft. Where the draft is many programs the commit also
                # counts each tile's pops and pushes of the draft, which then reads those counts (no sums over
                # earlier requests, no ticket, no pass over the batch). The commit changes state: the draft is
                # compiled before it runs, so that only a launch can fail after.
                counts = self._tree_step_counts(bs, n, release, branches, tree[1].shape[1])
                if step is None:
                    args = (rows, n, None, None, None, out_cache_loc, last_loc, release)
                    count_tile = self._tree_commit_config(tree[1].shape[1])[0] if counts else 0
                    self._launch_alloc(*args, branches=branches, sums=counts, count_tile=count_tile, compile_only=True)
                    if counts:
                        self._launch_commit_tree_count(rows, n, release, branches, tree)
                    else:
                        self._launch_commit_tree(rows, *tree)
                    self._launch_alloc(*args, branches=branches, sums=counts, count_tile=count_tile)
                else:
                    draft = step._prepared(kind + " from counts" if counts else kind)
                    draft.compile()
                    step._prepared(("release " if release else "") + "commit tree count" if counts else "commit tree")()
                    draft()
        except BaseException:
            self.branch_pages = narrow  # the wider copy holds nothing yet
            raise
        self._hold_branches(rows, host_rows, per_row, needs, bs, released=release)
        self._pages_bound, self._drafted_since_sync, self._seq_base_max = bound, drafted, base_max
        # (a tree commit made first needs no _close_windows: the windows opened here replace those it closed)
        self._open_windows(host_rows, n, None if step is None else step._opened)

    def _in_two_launches(self, bs: int, n: int, release: bool) -> bool:
        """Whether commit_and_draft counts each tile's pops in a launch of its own first (``_launch_count``), so that
        the allocation launch needs no sums over earlier requests and no pass over the batch: past
        _COMMIT_DRAFT_MAX_BATCH requests, or past _COMMIT_DRAFT_WIDE_MAX_BATCH with windows of at least
        _COMMIT_DRAFT_WIDE_MIN_N tokens where the second launch overlaps the first (``backend.supports_pdl``); never
        when branch pages are to be released. A call outside graph capture on a device (eager, where the host's second
        launch costs more than it saves on the device) takes one launch up to _COMMIT_DRAFT_EAGER_MAX_BATCH
        requests. Also on Ascend, unmeasured there: the one launch's alternative is a pass over the whole batch by
        one program after every program has summed the requests before its tiles."""
        if release:
            return False
        if bs <= _COMMIT_DRAFT_MAX_BATCH and not (
            bs > _COMMIT_DRAFT_WIDE_MAX_BATCH and n >= _COMMIT_DRAFT_WIDE_MIN_N and backend.supports_pdl(self.device)
        ):
            return False
        device = self.device
        eager = bs <= _COMMIT_DRAFT_EAGER_MAX_BATCH and not backend.is_interpreted(device)
        return not (eager and not backend.is_capturing(device))

    def _tree_step_in_one_launch(self, bs: int, n: int, release: bool, branches: tuple, tree: int) -> bool:
        """Whether commit_tree_and_draft of ``tree``-node trees and ``n``-node windows makes one launch
        (``_commit_tree_draft_kernel``): where the tree draft runs as one program, which may then commit first with no
        other program reading the rows' lengths (one program where the counted draft of the two launches would be,
        see ``_tree_step_counts``: there are no counts to take; a call outside graph capture on a device, eager, where
        the host's second launch costs more than it saves on the device, takes the one launch wherever the tree draft
        alone would be one program); also only where the tree commit is one tile (_TREE_STEP_ELEMENTS); never on an
        NPU, where the one kernel's on-chip buffer is not within budget for every tree (see above)."""
        return self._eager_or_not(self._tree_step_launch_choice(bs, n, release, branches, tree))

    def _tree_step_launch_choice(self, bs: int, n: int, release: bool, branches: tuple, tree: int) -> tuple[bool, bool]:
        """:meth:`_tree_step_in_one_launch`'s answers ``(in a graph or interpreted, eager on a device)``, which depend
        only on the arguments, the device and the module's constants (kept; :meth:`_eager_or_not` picks one)."""
        key = (bs, n, release, branches[0], branches[1], tree)
        one = self._tree_step_launches.get(key)
        if one is None:
            fits = not backend.is_npu(self.device) and bs <= self._tree_step_commit_tile(bs, tree)
            # Eager, the draft's own one-program limit (a second launch costs the host more than it saves the device)
            config = self._alloc_launch_config
            # (in a graph the draft's tile is that of a counted draft, with sums; eager, that of the one launch)
            tiles = [config(bs, n, False, False, True, release, branches, None, sums)[0] for sums in (True, False)]
            one = _remember(
                self._tree_step_launches, key, tuple(fits and self._grid(bs, tile) == (1,) for tile in tiles)
            )
        return one

    def _eager_or_not(self, choice: tuple[bool, bool]) -> bool:
        """``choice[1]`` for a call outside graph capture on a device (eager), else ``choice[0]``."""
        if choice[0] == choice[1]:  # the same either way: no need to ask whether this call is eager
            return choice[0]
        device = self.device
        return choice[not backend.is_interpreted(device) and not backend.is_capturing(device)]

    def _tree_step_counts(self, bs: int, n: int, release: bool, branches: tuple, tree: int) -> bool:
        """Whether commit_tree_and_draft in two launches counts the draft's pops and pushes in its tree commit
        (``_launch_commit_tree_count``, then the draft with ``sums``): where the draft runs on more than one program.
        A draft of one program has no sums over earlier requests and no ticket to save. H200 graph replay, topk 4,
        5 steps, T 8, a step against the tree commit and the draft with its ticket: page 1 bs 256 / 1024 5.8 / 6.2
        against 8.9 / 9.9 us, page 64 bs 16 / 1024 5.0 / 6.5 against 8.0 / 11.1 (docs/performance.md)."""
        key = (bs, n, release, branches[0], branches[1], tree)
        counts = self._tree_step_counted.get(key)
        if counts is None:
            tile = self._tree_count_tiles(bs, n, release, branches, tree)[1]
            counts = _remember(self._tree_step_counted, key, self._grid(bs, tile) != (1,))
        return counts

    def _tree_step_commit_tile(self, bs: int, tree: int) -> int:
        """The tree commit's tile in commit_tree_and_draft's one launch: on Ascend that of commit_tree (its on-chip
        buffer is checked), elsewhere the batch's power of two within _TREE_STEP_ELEMENTS elements."""
        tile, block_t, repoint = self._tree_commit_config(tree)
        if backend.is_npu(self.device):
            return tile
        cap = max(_TREE_STEP_ELEMENTS // _tree_commit_width(block_t, repoint), 1)
        return min(1 << max(bs - 1, 0).bit_length(), 1 << (cap.bit_length() - 1))

    def _open_windows(self, host_rows: list[int] | None, n: int, opened: dict[int, int] | None = None) -> None:
        """Record the windows of ``n`` positions a draft opened (host state). Rows not known: any row may be among
        them, so the windows known so far join the bound of the windows not known. ``opened``: ``{row: n}`` of the
        rows listed, made once by a plan (a dict made afresh cost about 45 ns a row; one copied, 10). Whatever
        windows of these rows a commit in the same call closed, this replaces (listed rows) or folds into the bound
        and forgets (rows not known), as :meth:`_close_windows` would have first."""
        if host_rows is None:
            if self._known_windows:
                self._unknown_window_bound = max(self._unknown_window_bound, n, *self._known_windows.values())
                self._known_windows.clear()
            elif n > self._unknown_window_bound:
                self._unknown_window_bound = n
        else:
            self._known_windows.update(dict.fromkeys(host_rows, n) if opened is None else opened)

    def _draft_bounds(
        self,
        rows: torch.Tensor,
        host_rows: list[int] | None,
        n: int,
        branches: tuple[int, int] | None = None,
        accept: torch.Tensor | None = None,
        tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        bs: int | None = None,
    ) -> tuple[int, int, list[int] | None, int]:
        """The host bounds after the draft (pages, tokens drafted since the last sync), syncing only if the bound
        says it might not fit; raises if it does not. ``branches``: ``(topk, num_steps)`` of a tree draft, whose
        branch pages must fit too; then the third value is each request's branch pages when it synced (else
        None). The fourth is the bound of the rows' committed lengths (``_seq_base_max``), looked at again where
        rows freed may have left it high: the caller keeps it once its launch went through, so that a launch that
        raises leaves every host bound as it was (but those of a sync). ``accept``: the accept lengths of a commit
        in the same launch (the window starts where it leaves the row; the bounds need no change, as a commit never
        passes what was drafted); ``tree``: ``(accept_lens, accept_index, kv_src, kv_dst)`` of a tree commit in the
        same step (likewise). ``bs``: ``rows.shape[0]``, if the caller has it."""
        if bs is None:
            bs = rows.shape[0]
        p = self.page_size
        drafted = self._drafted_since_sync + n
        in_use = self.max_requests - len(self._free_rows)  # (num_requests, read once: this is every draft's path)
        bound = min(
            self._pages_bound + bs * _pages(n, p),
            self._used_at_sync + self._net_pages_since_sync + in_use * _pages(drafted, p),
            self._most_pages(in_use),
        )
        base_max = self._seq_base_max
        if base_max + drafted > self.max_context_len:  # the longest rows may be gone: look again
            base_max = max(map(self._seq_base.__getitem__, self._live_rows()), default=0)
        held = self._branch_bound(in_use)
        if branches is not None:  # the pops never see the pages the call releases
            held += bs * branches[0] * _pages(p - 1 + branches[1], p)
        if bound + held <= self.num_pages and base_max + drafted <= self.max_context_len:
            return bound, drafted, None, base_max
        # Near capacity: one sync for the exact numbers, then go on or raise with nothing changed.
        self.num_syncs += 1
        # Clamped, so that rows out of range cannot fault before the host has checked them.
        rows64 = rows.long().clamp(0, self.max_requests - 1)
        seqs = self.seq_lens[rows64]
        allocs = self.alloc_lens[rows64]
        if accept is not None:
            seqs = seqs + torch.minimum(accept.clamp(min=0), self.window_lens[rows64].clamp(min=0))
        elif tree is not None:
            seqs = seqs + self._tree_accepted(rows64, seqs, tree[0], tree[1])
        ends = seqs + n
        need = ((torch.maximum(allocs, ends) + p - 1) // p - (allocs + p - 1) // p).sum()
        extra = [torch.stack([need, ends.max(), ends.argmax()]), rows.long()]
        if branches is not None:
            extra += self._branch_pops(rows64, seqs, *branches)
        usage, values = self._read_exact(*extra)
        free = usage.free
        need, longest, i = values[:3]
        branch_needs = None if branches is None else values[3 + bs : 3 + 2 * bs]
        branch_pops = 0 if branches is None else values[-1]
        if host_rows is None:
            host_rows = values[3 : 3 + bs]
            self._check_rows_in_use(host_rows)
        if longest > self.max_context_len:
            raise ContextLengthError(
                f"request {i} (row {host_rows[i]}) has {longest - n} committed tokens; a draft window of "
                f"{n} needs {longest} positions but max_context_len is {self.max_context_len}"
            )
        if branches is not None and need + branch_pops > free:
            raise OutOfSlotsError(
                f"a tree draft of {bs} requests with {n} draft tokens and {branches[0]} branches of {branches[1]} "
                f"steps needs {need} + {branch_pops} new pages ({(need + branch_pops) * p} slots) but "
                f"{free} pages ({free * p} slots) are free"
            )
        if need > free:
            raise OutOfSlotsError(
                f"a draft of {bs} requests with {n} draft tokens needs {need} new pages ({need * p} slots) but "
                f"{free} pages ({free * p} slots) are free"
            )
        # Exact now: the next bounds restart from these numbers.
        self._set_exact(usage)
        return self._pages_bound + need, n, branch_needs, self._seq_base_max

    def _tree_accepted(
        self, rows64: torch.Tensor, seqs: torch.Tensor, accept: torch.Tensor, accept_index: torch.Tensor
    ) -> torch.Tensor:
        """The positions a tree commit of ``rows64`` (committed lengths ``seqs``) accepts, on the device, exactly as
        the kernel counts them (``_commit_tree_tile``): for the capacity check after a sync."""
        tree = accept_index.shape[1]
        seq = seqs.clamp(0, self.max_context_len)
        window = torch.minimum(self.window_lens[rows64].clamp(min=0), self.max_context_len - seq).clamp(max=tree)
        accepted = torch.minimum(accept.long().clamp(0, tree), window)
        node = accept_index.long().clamp(-1, tree)
        prev = torch.cat([torch.full_like(node[:, :1], -1), node[:, :-1]], 1)
        m = torch.arange(tree, device=self.device)
        ok = (m < accepted[:, None]) & (node >= 0) & (node < window[:, None]) & (node > prev)
        return ok.long().cumprod(1).sum(1)

    def _most_pages(self, in_use: int | None = None) -> int:
        """Pages the rows in use and the prefix cache own at most, whatever was drafted: a full context each (its
        cache-owned prefix included). Caps the pages bound (host state). ``in_use``: :attr:`num_requests`, if the
        caller has it."""
        if in_use is None:
            in_use = self.num_requests
        return len(self._cache_pages) + in_use * self._context_pages

    def _branch_bound(self, in_use: int | None = None) -> int:
        """An upper bound of the branch pages held (host state). ``in_use``: :attr:`num_requests`, if the caller
        has it."""
        if not (self._branch_rows or self._branch_batch_pages):
            return 0
        if in_use is None:
            in_use = self.num_requests
        return min(self._branch_rows_sum + self._branch_batch_pages, in_use * self.branch_pages.shape[1])

    def _branches_may_exist(self) -> bool:
        return bool(self._branch_rows or self._branch_batch_pages)

    def _forget_branches(self, host_rows: list[int] | None, bs: int) -> None:
        """The branches of ``bs`` rows were released: drop what the host can tell. Rows given as a list (checked:
        distinct rows in use) are forgotten one by one, and as many as the rows in use are all of them. Rows given as
        a tensor (``host_rows`` None) drop nothing: the host cannot know which rows the tensor held when the call
        read it (it may have been rewritten in any way since it was last seen, or hold a stale row in place of one
        in use, which the kernels skip)."""
        if host_rows is None:
            return
        if bs == self.num_requests:
            self._branch_rows.clear()
            self._branch_rows_sum = self._branch_batch_pages = 0
            return
        self._branch_rows_sum -= sum(map(self._branch_rows.pop, host_rows, itertools.repeat(0)))

    def _launch_release(self, rows: torch.Tensor, host_rows: list[int] | None) -> None:
        """Return the rows' branch pages, then forget them."""
        self._release(rows)
        self._forget_branches(host_rows, rows.shape[0])

    def _release(self, rows: torch.Tensor) -> None:
        """Launch the kernel that returns branch pages."""
        tile, block_p = self._release_tiles()
        backend.launch(
            self._kernels()._release_branches_kernel,
            self._grid(rows.shape[0], tile),
            self.device,
            (rows, self.branch_pages, self.num_branch_pages, self.free_pages, self._counters),
            (
                rows.shape[0],
                self.max_requests,
                self.num_pages,
                self.branch_pages.stride()[0],
                self.branch_pages.shape[1],
            ),
            (("TILE", tile), ("BLOCK_R", block_p), ("SCAN_BLOCK", self._scan_block()), ("PDL", self._pdl)),
            _NUM_WARPS,
        )

    def _branch_capacity(
        self, rows: torch.Tensor, host_rows: list[int] | None, topk: int, num_steps: int, worst: int
    ) -> list[int] | None:
        """Raise OutOfSlotsError unless the pops of alloc_branches fit in the free pages (they never see the
        pages the call releases); syncs only when the host bound says they might not. Returns the exact branch
        pages of each request when it synced, else None (``worst`` pages in all at most)."""
        if min(self._pages_bound, self._most_pages()) + self._branch_bound() + worst <= self.num_pages:
            return None
        self.num_syncs += 1
        p = self.page_size
        bs = rows.shape[0]
        rows64 = rows.long().clamp(0, self.max_requests - 1)
        usage, values = self._read_exact(
            *self._branch_pops(rows64, self.seq_lens[rows64], topk, num_steps), rows.long()
        )
        free = usage.free
        needs, need = values[:bs], values[bs]
        if host_rows is None:
            self._check_rows_in_use(values[bs + 1 :])
        if need > free:
            raise OutOfSlotsError(
                f"alloc_branches: {bs} requests with {topk} branches of {num_steps} steps need {need} new "
                f"pages ({need * p} slots) but {free} pages ({free * p} slots) are free"
            )
        self._set_exact(usage)
        return needs

    def _branch_pops(self, rows64: torch.Tensor, seqs: torch.Tensor, topk: int, num_steps: int) -> list[torch.Tensor]:
        """Device values, for a sync: each request's branch pages (``[bs]``), and the pages their branches pop
        (``[1]``): a request that holds exactly as many keeps them (``_reused`` in the kernels)."""
        p = self.page_size
        per_branch = (seqs % p + num_steps + p - 1) // p
        needs = topk * per_branch
        held = self.num_branch_pages[rows64]
        return [needs, torch.where(held == needs, 0, needs).sum().view(1)]

    def _check_accept_index(self, accept_index: torch.Tensor, bs: int) -> int:
        """Check accept_index's metadata; returns T."""
        if not isinstance(accept_index, torch.Tensor):
            raise TypeError(f"accept_index must be a torch.Tensor, got {_type_name(accept_index)}")
        _check_dense("accept_index", accept_index)
        if accept_index.dtype not in _INDEX_DTYPES:
            raise TypeError(f"accept_index must be int32 or int64, got {accept_index.dtype}")
        if accept_index.dim() != 2 or accept_index.shape[0] != bs:
            raise ValueError(f"accept_index must have shape [{bs}, T], got {tuple(accept_index.shape)}")
        if accept_index.device != self.device:
            raise ValueError(f"accept_index must be on {self.device}, got {accept_index.device}")
        if backend.is_npu(self.device):
            _check_npu_dtypes({"accept_index": accept_index})
        tree = accept_index.shape[1]
        if tree > 1 and accept_index.stride()[1] != 1:
            raise ValueError(f"accept_index must have unit stride along T, got strides {accept_index.stride()}")
        limit = _MAX_TREE
        if backend.is_npu(self.device):
            limit = _NPU_MAX_TREE_REPOINT if self.page_size == 1 else _NPU_MAX_TREE
        if tree > limit:
            raise ValueError(f"accept_index must have at most {limit} columns (tree nodes), got {tree}")
        if bs * tree >= _INT32_LIMIT:
            raise ValueError(f"bs * T must be below 2**31, got {bs} * {tree}")
        return tree

    def _check_tree_commit(
        self, accept_index: torch.Tensor, bs: int, kv_src: torch.Tensor | None, kv_dst: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Check accept_index and the kv_src/kv_dst buffers of commit_tree; returns (kv_src, kv_dst, bs * T), new
        int64 buffers where none was given."""
        n = bs * self._check_accept_index(accept_index, bs)
        return self._tree_buffer("kv_src", kv_src, n), self._tree_buffer("kv_dst", kv_dst, n), n

    def _tree_buffer(self, name: str, buffer: torch.Tensor | None, length: int) -> torch.Tensor:
        if buffer is None:
            return torch.empty(length, dtype=torch.int64, device=self.device)
        if isinstance(buffer, torch.Tensor) and buffer.dim() != 1:
            _check_dense(name, buffer)  # (a 1-D one is checked as a vector)
            if not buffer.is_contiguous():
                raise ValueError(
                    f"{name} must be 1-D, or contiguous (it is flattened), got shape {tuple(buffer.shape)} with "
                    f"strides {buffer.stride()}"
                )
            buffer = buffer.view(-1)
        self._check_buffer(name, buffer, length, exact=False)
        return buffer

    def _validate_tree(self, rows: torch.Tensor, accept_index: torch.Tensor, accept: torch.Tensor) -> None:
        """validate=True of commit_tree: one read-back of the windows, the lengths and the paths."""
        tree = accept_index.shape[1]
        windows = self.window_lens[rows.long()].clamp(max=tree)
        values = torch.cat([windows, accept.long(), accept_index.long().reshape(-1)]).tolist()
        bs = rows.shape[0]
        windows, lens, paths = values[:bs], values[bs : 2 * bs], values[2 * bs :]
        for i in range(bs):
            if not 0 <= lens[i] <= windows[i]:
                raise ValueError(
                    f"accept_lens[{i}] must be in [0, {windows[i]}] (the draft window of row {int(rows[i])}, at most "
                    f"T = {tree}), got {lens[i]}"
                )
            path = paths[i * tree : i * tree + lens[i]]
            for m, node in enumerate(path):
                if not 0 <= node < windows[i]:
                    raise ValueError(f"accept_index[{i}, {m}] must be a node in [0, {windows[i]}), got {node}")
                if m and node <= path[m - 1]:
                    raise ValueError(
                        f"accept_index[{i}, {m}] = {node} must be greater than accept_index[{i}, {m - 1}] = "
                        f"{path[m - 1]} (nodes of a path in topological order)"
                    )

    def _scan_block(self) -> int:
        return _NPU_SCAN_BLOCK if backend.is_npu(self.device) else _SCAN_BLOCK

    def _free_launch_config(self, bs: int, keep: bool, branches: bool) -> tuple[object, tuple[int], tuple]:
        """(kernel, grid, constexprs) of the launch that frees ``bs`` requests, ``keep``: with keep_lens,
        ``branches``: also releasing their branch pages; found once for each batch size (``_free_launches``)."""
        config = self._free_launches.get((bs, keep, branches))
        if config is None:
            tile, block_p, block_c = self._free_config(bs)
            scan_block = self._scan_block()
            if branches and backend.is_npu(self.device):  # the branch counts take on-chip buffer too
                scan_block //= _NPU_FREE_BRANCHES_SHRINK
            constexprs = (
                ("PAGE_SIZE", self.page_size),
                ("PAGE_SHIFT", self._page_shift),
                ("TILE", tile),
                ("BLOCK_P", block_p),
                ("BLOCK_C", block_c),
                ("SCAN_BLOCK", scan_block),
                ("KEEP", keep),
                ("BRANCHES", branches),
                ("BLOCK_R", self._release_tiles()[1] if branches else 1),
                ("PDL", self._pdl),
            )
            kernel = self._kernels()._free_pages_kernel
            config = _remember(self._free_launches, (bs, keep, branches), (kernel, self._grid(bs, tile), constexprs))
        return config

    def _free_config(self, bs: int) -> tuple[int, int, int]:
        """(TILE, BLOCK_P, BLOCK_C) of the kernel that frees ``bs`` requests (_FREE_CLASSES)."""
        if backend.is_npu(self.device):
            return _NPU_FREE_TILE, _NPU_FREE_BLOCK_P, _NPU_FREE_BLOCK_C
        # The first class that holds bs (the last one holds any size).
        _, tile, block = next(c for c in _FREE_CLASSES if c[0] is None or bs <= c[0])
        return tile, block, block

    def _release_tiles(self) -> tuple[int, int]:
        """(TILE, BLOCK_P) of the kernel that returns branch pages to the ring (BLOCK_P is also BLOCK_R of the
        kernels that release branch pages in their own launch)."""
        return (_NPU_FREE_TILE, _NPU_FREE_BLOCK_P) if backend.is_npu(self.device) else (_FREE_TILE, _FREE_BLOCK_P)

    @functools.cached_property
    def _num_cores(self) -> int:
        """Programs that run at once on the device (``backend.num_cores``: SMs on CUDA, 1 on the interpreter)."""
        return backend.num_cores(self.device)

    @functools.cached_property
    def _look_back_programs(self) -> int:
        """The most programs of a draft that looks back (``LOOKBACK`` of the allocation kernel; 0: no bound).

        A program waits until every earlier tile's program has published its pops (and pushes), so every program of
        the launch must run at once, or a waiting one could hold the core an earlier one needs. On CUDA a grid of at
        most one program per SM does: each SM holds at least one program of the kernel, and a programmatic dependent
        launch after it starts only once all of them have started. The interpreter runs the programs one after
        another in order, so every earlier tile is published before a program looks back: no bound. Ascend gives no
        such guarantee, and never looks back (``_alloc_config``)."""
        if backend.is_npu(self.device) or backend.is_interpreted(self.device):
            return 0
        return self._num_cores

    def _grid(self, bs: int, tile: int, most: int = 0) -> tuple[int]:
        """One program per tile; on Ascend, which binds programs to cores, at most one per core; at most ``most``
        programs where it is not 0 (a launch that looks back: each program loops over its tiles)."""
        num_tiles = (bs + tile - 1) // tile
        if self._max_programs is None:
            persistent = backend.prefers_persistent_grid(self.device)
            self._max_programs = backend.num_cores(self.device) if persistent else 0
        if self._max_programs:
            num_tiles = min(num_tiles, self._max_programs)
        if most:
            num_tiles = min(num_tiles, most)
        return (max(num_tiles, 1),)

    def _batch_tile(
        self,
        bs: int,
        release: bool = False,
        topk: int = 0,
        sums: bool = False,
        chain: bool = False,
        window_len: int = 0,
    ) -> int:
        """The tile the batch size asks for (capped by the kernel's limits in _alloc_config); 0 on Ascend, whose
        grid is one program per core: there the limits alone decide. ``release``: a draft that also returns branch
        pages; ``topk`` > 0: one that also gives that many branches a request; ``sums``: one that reads its counts
        from the launch before it; ``chain``: a chain draft in one launch (``_chain_draft``), which looks back past
        one program, on per-SM tiles, and so within _MAX_TILE requests too where the batch is more than one tile of
        windows of ``window_len`` tokens (``_exceeds_one_tile``)."""
        branch = topk > 0
        if backend.is_npu(self.device):
            return 0
        if bs > _MAX_TILE:
            if chain and self._look_back_programs:  # at most one program per SM
                tile = _per_core_tile(bs, self._look_back_programs, _LOOK_BACK_MIN_TILE)
            elif bs <= _LARGE_BATCH:
                tile = _MIN_TILE
            elif branch:  # about one program per core
                tile = min(_per_core_tile(bs, self._num_cores, _MIN_TILE), _BRANCH_LARGE_TILE)
            else:
                tile = _MAX_TILE
        elif (release or branch) and self.page_size == 1 and bs > (_MIN_TILE if sums else _RELEASE_ONE_PROGRAM):
            tile = _MIN_TILE
        elif chain and not release and self._exceeds_one_tile(bs, window_len):
            tile = _per_core_tile(bs, self._look_back_programs, _LOOK_BACK_MIN_TILE)
        else:
            tile = max(1 << (bs - 1).bit_length(), _MIN_TILE)
        if branch and self.page_size > 1:
            pairs = _COPY_COUNTED_ONE_PROGRAM if sums else _COPY_ONE_PROGRAM
            tile = self._copy_pairs_tile(bs, topk, _COPY_TREE_DRAFT_TILE, _COPY_ONE_PROGRAM_BS, pairs)
            if tile < bs and not sums:  # it looks back: about one program per SM
                tile = self._look_back_tile(bs, tile)
        return tile

    def _look_back_tile(self, bs: int, tile: int) -> int:
        """The tile of a launch with branches that looks back past one program: the smallest power of two of at least
        ``tile`` requests that keeps the grid within _look_back_programs (about one program per SM on a GPU), at most
        _BRANCH_LARGE_TILE; ``tile`` where nothing bounds the grid (the interpreter)."""
        programs = self._look_back_programs
        return min(_per_core_tile(bs, programs, tile), _BRANCH_LARGE_TILE) if programs else tile

    def _two_pass_tile(self, bs: int, n: int) -> int:
        """The tile of a draft of ``n`` tokens in two launches (off Ascend; capped by the kernel's limits in
        _alloc_config)."""
        if bs > _LARGE_BATCH:
            return _MAX_TILE
        if self.page_size == 1:
            if n >= _TWO_PASS_TINY_TILE_MIN_N and bs <= _TWO_PASS_TINY_TILE_MAX_BATCH:
                return min(_TWO_PASS_TINY_TILE, _TWO_PASS_TILE)
            small = bs <= _TWO_PASS_SMALL_TILE_MAX_BATCH
        else:
            small = 1 < n <= _COMMIT_DRAFT_WIDE_N
        return min(_TWO_PASS_SMALL_TILE, _TWO_PASS_TILE) if small else _TWO_PASS_TILE

    def _copy_pairs_tile(self, bs: int, topk: int, tile: int, max_bs: int, max_pairs: int) -> int:
        """The tile of a launch that writes branch copy pairs (``page_size > 1``): one program for a batch of at most
        ``max_bs`` requests and ``max_pairs`` pairs (``bs * topk * (page_size - 1)``), else ``tile``-request tiles.
        Never below ``tile``: triton-ascend 3.2's interpreter fails on the scans of 2-request tiles."""
        if bs <= max_bs and bs * topk * (self.page_size - 1) <= max_pairs:
            return max(1 << (bs - 1).bit_length(), tile)
        return tile

    def _exceeds_one_tile(self, bs: int, window_len: int) -> bool:
        """Whether a chain draft of ``bs`` windows of ``window_len`` tokens is more than one tile of _ALLOC_ELEMENTS
        slots (so it looks back, where drafts do), on a device where drafts look back."""
        return self._look_back_programs > 0 and bs > _ALLOC_ELEMENTS // tiles.block_n(window_len)

    def _chain_draft(self, prefill: bool, branches: bool, sums: bool) -> bool:
        """Whether an allocation launch is a chain draft in one launch: no prefill, no branches given (branch pages
        may be released), not the second launch of two; off Ascend. ``_batch_tile`` picks its tiles past one
        program for a grid of at most one program per SM, as it looks back there (``_alloc_config``, which also lets
        a tree draft in one launch look back, on the tiles of its own rule)."""
        return not (prefill or branches or sums or backend.is_npu(self.device))

    @staticmethod
    def _alloc_scan_block(bs: int) -> int:
        """How many earlier requests the allocation kernel sums at a time for a batch of ``bs`` off Ascend (on
        Ascend _alloc_config takes _NPU_SCAN_BLOCK; pure arithmetic, as it keys the cached configs)."""
        return min(max((1 << max(bs - 1, 0).bit_length()) // 2, _SCAN_BLOCK // 2), 4 * _SCAN_BLOCK)

    def _alloc_config(
        self,
        window_len: int,
        prefill: bool,
        prefix: bool,
        emit: bool,
        release: bool,
        batch_tile: int,
        scan_block: int,
        branch_block: int,
        large_batch: bool,
        commit: bool,
        sums: bool,
        count_tile: int,
        wide: bool,
        chain: bool,
        one_tile: bool,
    ) -> tuple[int, tuple, int, int]:
        """(TILE, constexprs, num_warps, most programs: 0 for no bound) of the allocation kernel for this kind of
        call, ``_batch_tile``, ``_alloc_scan_block``, ``_branch_block`` (0: no branches), whether the batch is past
        _LARGE_BATCH, whether the draft commits first, whether it is the second launch of two, for the second launch
        of a tree step the tile of the first (0: the first takes this launch's tiles; else it takes
        ``min(count_tile, TILE)``), whether it is a prefill of long prompts (off Ascend), whether it is a chain draft
        in one launch (``_chain_draft``), and whether the batch fits ``_batch_tile``'s tile."""
        npu = backend.is_npu(self.device)
        if prefill:
            block_n = _WIDE_PREFILL_BLOCK_N if wide else tiles.MAX_BLOCK_N
        else:
            block_n = tiles.block_n(window_len)
        if not npu:
            elements, max_tile = _ALLOC_ELEMENTS, min(_MAX_TILE, batch_tile)
        elif branch_block:
            elements, max_tile = _NPU_RELEASE_ALLOC_ELEMENTS, _NPU_TREE_DRAFT_TILE
        elif release:
            elements, max_tile = _NPU_RELEASE_ALLOC_ELEMENTS, _NPU_RELEASE_MAX_TILE
        else:
            elements, max_tile = _NPU_ALLOC_ELEMENTS, _NPU_MAX_TILE
        block_n = min(block_n, elements)
        tile = max(min(elements // block_n, max_tile), 1)
        # A draft in one launch (a chain, or a tree with its branches) past one program looks back (a batch within
        # its tile is one program: nothing to read), on a grid of at most _look_back_programs programs; with a
        # _LOOK_BACK_BLOCK of 0 it sums instead, on a grid of a program per tile (as tests compare).
        look_back = _LOOK_BACK_BLOCK > 0 and not (prefill or sums or npu) and not (one_tile and batch_tile <= tile)
        constexprs = (
            ("PAGE_SIZE", self.page_size),
            ("PAGE_SHIFT", self._page_shift),
            ("TILE", tile),
            ("BLOCK_N", block_n),
            ("SCAN_BLOCK", _NPU_SCAN_BLOCK if npu else scan_block),
            ("PREFILL", prefill),
            ("PREFIX", prefix),
            ("EMIT", emit),
            ("RELEASE", release),
            ("BLOCK_R", self._release_tiles()[1]),
            ("BRANCH", branch_block > 0),
            ("BLOCK_E", max(branch_block, 1)),
            ("COPY", branch_block > 0 and self.page_size > 1),
            ("EARLY_COPY", branch_block > 0 and self._early_copy()),
            ("COMMIT", commit),
            # The first launch's tiles in one of this launch's (0: this is no second launch).
            ("SUMS", tile // min(count_tile or tile, tile) if sums else 0),
            # A draft in one launch past one program: each program publishes its tiles' pops (and pushes) and reads
            # those of earlier tiles, instead of summing every earlier request (_look_back_programs).
            ("LOOKBACK", _LOOK_BACK_BLOCK if look_back else 0),
            ("PDL", self._pdl_branches if branch_block else self._pdl),
        )
        num_warps = _NUM_WARPS
        if sums and not branch_block:
            if large_batch:
                num_warps = _NUM_WARPS
            elif window_len > _COMMIT_DRAFT_WIDE_N and self.page_size > 1:
                num_warps = _TWO_PASS_WIDE_NUM_WARPS
            else:
                num_warps = _TWO_PASS_NUM_WARPS
        elif chain and not release and batch_tile in (64, 128):
            num_warps = _SMALL_TILE_NUM_WARPS
        return tile, constexprs, num_warps, self._look_back_programs if look_back else 0

    def _kernels(self):
        """The allocator's kernel module for this device (looked up once)."""
        module = self._kernel_module
        if module is None:
            module = self._kernel_module = backend.kernels("allocator", self.device)
        return module

    def _launch_alloc(
        self,
        rows: torch.Tensor,
        window_len: int,
        window_starts: torch.Tensor | None,
        window_ends: torch.Tensor | None,
        prefix_slots: torch.Tensor | None,
        out_cache_loc: torch.Tensor | None,
        last_loc: torch.Tensor | None,
        release: bool = False,
        prepare: bool = False,
        branches: tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        accept: torch.Tensor | None = None,
        sums: bool = False,
        wide: bool = False,
        tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        compile_only: bool = False,
        count_tile: int = 0,
    ) -> backend.Launch | None:
        """Launch the allocation kernel: a draft (``window_ends is None``) or a prefill of new rows (``wide``: of
        long prompts, read in wide column blocks, see _WIDE_PREFILL_TOKENS); ``release``:
        a draft that first returns the rows' branch pages; ``branches``: ``(topk, num_steps, branch_slots,
        copy_src, copy_dst)`` of a draft that also gives the rows their branches; ``accept``: the accept lengths
        of a draft that first commits the rows' open windows; ``sums``: the second launch of a draft in two, after
        ``_launch_count`` or, with ``branches``, after ``_launch_commit_tree_count``, whose tree commit tile is
        ``count_tile``; ``tree``: ``(accept_lens, accept_index, kv_src,
        kv_dst)`` of a tree commit made first in the same launch (``_commit_tree_draft_kernel``, with
        ``branches``, only where the draft is one program: see ``_tree_step_in_one_launch``); ``prepare=True``:
        return the launch, made by calling it; ``compile_only=True``: only compile it (``backend.ensure_compiled``)."""
        prefill = window_ends is not None
        emit = out_cache_loc is not None
        tile, constexprs, num_warps, max_programs = self._alloc_launch_config(
            rows.shape[0],
            window_len,
            prefill,
            prefix_slots is not None,
            emit,
            release,
            branches,
            accept,
            sums,
            wide,
            count_tile,
        )
        # Pointers a specialisation does not read get a tensor of the right kind.
        placeholder = self.seq_lens
        topk, num_steps, slots, copy_src, copy_dst = (
            (0, 0, placeholder, placeholder, placeholder) if branches is None else branches
        )
        branch = release or branches is not None
        if tree is not None:
            accept = tree[0]  # read only by the tree commit: COMMIT, the chain's commit, is off (accept was None)
        tensors = (
            self.req_to_token,
            rows,
            self.seq_lens,
            self.alloc_lens,
            self.window_lens,
            self.prefix_lens,
            placeholder if window_starts is None else window_starts,
            placeholder if window_ends is None else window_ends,
            placeholder if accept is None else accept,
            self.req_to_token if prefix_slots is None else prefix_slots,
            self.free_pages,
            self._counters,
            self._scratch,
            out_cache_loc if emit else placeholder,
            last_loc if emit else placeholder,
            self.branch_pages if branch else placeholder,
            self.num_branch_pages if branch else placeholder,
            slots,
            copy_src if self.page_size > 1 else slots,
            copy_dst if self.page_size > 1 else slots,
        )
        scalars = (
            rows.shape[0],
            window_len,
            self.max_requests,
            self.max_context_len,
            self.req_to_token.stride()[0],
            self.num_pages,
            0 if prefix_slots is None else prefix_slots.stride()[0],
            self.branch_pages.stride()[0] if branch else 0,
            self.branch_pages.shape[1] if branch else 0,
            topk,
            num_steps,
        )
        # (a draft that looks back: at most max_programs programs, each looping over its tiles)
        kernel, grid = self._kernels()._alloc_windows_kernel, self._grid(rows.shape[0], tile, max_programs)
        if tree is not None:
            if grid != (1,):
                raise RuntimeError(f"a tree commit and draft in one launch needs one program, got a grid of {grid}")
            accept_index = tree[1]
            _, block_t, repoint = self._tree_commit_config(accept_index.shape[1])
            tree_tile = self._tree_step_commit_tile(rows.shape[0], accept_index.shape[1])
            kernel = self._kernels()._commit_tree_draft_kernel
            tensors += (accept_index, tree[2], tree[3])
            scalars += (accept_index.shape[1], accept_index.stride()[0])
            constexprs += (("TREE_TILE", tree_tile), ("BLOCK_T", block_t), ("REPOINT", repoint))
        run = backend.ensure_compiled if compile_only else backend.prepare if prepare else backend.launch
        return run(kernel, grid, self.device, tensors, scalars, constexprs, num_warps)

    def _alloc_launch_config(
        self,
        bs: int,
        window_len: int,
        prefill: bool,
        prefix: bool,
        emit: bool,
        release: bool,
        branches: tuple | None,
        accept: torch.Tensor | None,
        sums: bool,
        wide: bool = False,
        count_tile: int = 0,
    ) -> tuple[int, tuple, int, int]:
        """(TILE, constexprs, num_warps, most programs) of an allocation launch (arguments as for ``_launch_alloc``),
        cached by these arguments, and by what decides the config (``_alloc_configs``, shared across batch sizes)."""
        asked = (
            bs,
            window_len,
            prefill,
            prefix,
            emit,
            release,
            None if branches is None else branches[:2],
            accept is not None,
            sums,
            wide,
            count_tile,
        )
        config = self._launch_configs.get(asked)
        if config is not None:
            return config
        chain = self._chain_draft(prefill, branches is not None, sums)
        if sums and branches is None:
            batch_tile = self._two_pass_tile(bs, window_len)
        else:
            batch_tile = self._batch_tile(bs, release, 0 if branches is None else branches[0], sums, chain, window_len)
        key = (
            window_len,
            prefill,
            prefix,
            emit,
            release,
            batch_tile,
            self._alloc_scan_block(bs),
            0 if branches is None else self._branch_block(branches[0], branches[1], sums),
            bs > _LARGE_BATCH,
            accept is not None,
            sums,
            count_tile if sums else 0,
            wide and prefill and not backend.is_npu(self.device),
            chain,
            bs <= batch_tile,
        )
        config = self._alloc_configs.get(key)
        if config is None:
            config = self._alloc_configs[key] = self._alloc_config(*key)
        return _remember(self._launch_configs, asked, config)

    def _launch_count(
        self, rows: torch.Tensor, window_len: int, accept: torch.Tensor | None, prepare: bool = False
    ) -> backend.Launch | None:
        """Launch the first of a draft's two launches (``_count_pops_kernel``): each tile's pops and the ring's
        counters to scratch, with the tile and grid of the second (``_launch_alloc(..., sums=True)``) for the same
        arguments; ``prepare=True``: return the launch, made by calling it."""
        bs = rows.shape[0]
        tile = self._alloc_launch_config(bs, window_len, False, False, True, False, None, accept, True)[0]
        placeholder = self.seq_lens
        return (backend.prepare if prepare else backend.launch)(
            self._kernels()._count_pops_kernel,
            self._grid(bs, tile),
            self.device,
            (
                rows,
                self.seq_lens,
                self.alloc_lens,
                self.window_lens,
                placeholder if accept is None else accept,
                self._counters,
                self._scratch,
            ),
            (bs, window_len, self.max_requests, self.max_context_len),
            (
                ("PAGE_SIZE", self.page_size),
                ("PAGE_SHIFT", self._page_shift),
                ("TILE", tile),
                ("COMMIT", accept is not None),
                ("PDL", self._pdl),
            ),
            _COUNT_NUM_WARPS,
        )

    def _tree_count_tiles(self, bs: int, n: int, release: bool, branches: tuple, tree: int) -> tuple[int, int]:
        """(the tree commit's tile in the first launch of a tree step in two, the draft's tile in the second): the
        commit takes commit_tree's tiles, cut to the draft's so that the draft's tiles are whole numbers of them."""
        commit_tile = self._tree_commit_config(tree)[0]
        draft_tile = self._alloc_launch_config(
            bs, n, False, False, True, release, branches, None, True, False, commit_tile
        )[0]
        return min(commit_tile, draft_tile), draft_tile

    def _launch_commit_tree_count(
        self,
        rows: torch.Tensor,
        n: int,
        release: bool,
        branches: tuple,
        tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        prepare: bool = False,
    ) -> backend.Launch | None:
        """Launch the first of a tree step's two launches (``_commit_tree_count_kernel``): the tree commit of
        ``tree`` = ``(accept_lens, accept_index, kv_src, kv_dst)``, and each tile's pops and pushes of the tree draft
        of ``n`` nodes and ``branches`` that follows (``_launch_alloc(..., branches=branches, sums=True)``, ``release``
        as there) to scratch; ``prepare=True``: return the launch, made by calling it."""
        accept, accept_index, kv_src, kv_dst = tree
        bs, nodes = accept_index.shape
        tile = self._tree_count_tiles(bs, n, release, branches, nodes)[0]
        block_t, repoint = self._tree_commit_config(nodes)[1:]
        return (backend.prepare if prepare else backend.launch)(
            self._kernels()._commit_tree_count_kernel,
            self._grid(bs, tile),
            self.device,
            (
                self.req_to_token,
                rows,
                accept_index,
                accept,
                self.seq_lens,
                self.window_lens,
                self.alloc_lens,
                self.num_branch_pages,
                kv_src,
                kv_dst,
                self._counters,
                self._scratch,
            ),
            (
                bs,
                n,
                self.max_requests,
                self.max_context_len,
                self.req_to_token.stride()[0],
                nodes,
                accept_index.stride()[0],
                self.branch_pages.shape[1],
                branches[0],
                branches[1],
            ),
            (
                ("PAGE_SIZE", self.page_size),
                ("PAGE_SHIFT", self._page_shift),
                ("TILE", tile),
                ("BLOCK_T", block_t),
                ("REPOINT", repoint),
                ("RELEASE", release),
                ("PDL", self._pdl),
            ),
            _TREE_NUM_WARPS,
        )

    def _check_prefix(
        self, lens: list[int], prefix_slots: torch.Tensor | None, prefix_lens: IntVector | None
    ) -> tuple[list[int] | None, list[list[int]]]:
        """Check a prefix given to add_requests; returns (prefix lengths or None, cache pages of each request)."""
        n = len(lens)
        if prefix_slots is None and prefix_lens is None:
            return None, []
        if prefix_slots is None or prefix_lens is None:
            raise ValueError("prefix_slots and prefix_lens must be given together")
        if _entries(prefix_lens) not in (-1, n):  # (before reading them)
            raise ValueError(f"prefix_lens has {_entries(prefix_lens)} elements but prompt_lens has {n}")
        prefix = self._host_ints("prefix_lens", prefix_lens)
        if not isinstance(prefix_slots, torch.Tensor):
            raise TypeError(f"prefix_slots must be a torch.Tensor, got {_type_name(prefix_slots)}")
        _check_dense("prefix_slots", prefix_slots)
        if prefix_slots.dtype not in _INDEX_DTYPES:
            raise TypeError(f"prefix_slots must be int32 or int64, got {prefix_slots.dtype}")
        if prefix_slots.dim() != 2 or prefix_slots.shape[0] != n:
            raise ValueError(f"prefix_slots must have shape [{n}, P], got {tuple(prefix_slots.shape)}")
        if prefix_slots.is_meta:
            raise ValueError("prefix_slots must hold values to read (any device but meta), got a tensor on meta")
        p = self.page_size
        width = prefix_slots.shape[1]
        for i, (length, plen) in enumerate(zip(lens, prefix)):
            if plen < 0 or plen % p:
                raise ValueError(f"prefix_lens[{i}] must be a multiple of page_size = {p} and >= 0, got {plen}")
            if plen > length:
                raise ValueError(f"prefix_lens[{i}] = {plen} is longer than prompt_lens[{i}] = {length}")
            if plen > width:
                raise ValueError(f"prefix_lens[{i}] = {plen} is longer than prefix_slots' {width} columns")
        # The slots, checked as tensors on the host (one read of prefix_slots): slot j of a request must be the
        # first slot of its page, plus j % page_size. The pages, one per page_size positions, are then checked in
        # Python. Any violation re-checks slot by slot, to name the first bad entry.
        table = prefix_slots.to("cpu", torch.int64)
        prefix_t = torch.tensor(prefix, dtype=torch.int64)
        j = torch.arange(width)
        head_pages = torch.div(table[:, ::p], p, rounding_mode="floor")  # [n, pages of the widest prefix]
        expected = (head_pages * p).repeat_interleave(p, dim=1)[:, :width] + j % p
        slots_ok = bool(((table == expected) | (j[None, :] >= prefix_t[:, None])).all())
        pages_of = [row[: plen // p] for row, plen in zip(head_pages.tolist(), prefix)]
        cache = self._cache_pages
        if slots_ok and all(len(set(pages)) == len(pages) and cache.issuperset(pages) for pages in pages_of):
            return prefix, pages_of
        self._raise_bad_prefix(table.tolist(), prefix)
        raise AssertionError("unreachable: the vector check found a bad prefix slot")  # pragma: no cover

    def _raise_bad_prefix(self, table: list[list[int]], prefix: list[int]) -> None:
        """Find the first bad entry of a prefix, slot by slot, and raise its ValueError."""
        p = self.page_size
        for i, plen in enumerate(prefix):
            pages: list[int] = []
            for j, slot in enumerate(table[i][:plen]):
                page = slot // p
                if j % p == 0:
                    if page not in self._cache_pages:
                        raise ValueError(
                            f"prefix_slots[{i}, {j}] = {slot} is on page {page}, which the prefix cache does not own"
                        )
                    if page in pages:
                        raise ValueError(f"prefix_slots[{i}, {j}] = {slot}: page {page} appears twice in the prefix")
                    pages.append(page)
                if slot != pages[-1] * p + j % p:
                    raise ValueError(
                        f"prefix_slots[{i}, {j}] must be {pages[-1] * p + j % p} (slot % page_size == position % "
                        f"page_size, consecutive slots within a page), got {slot}"
                    )

    def _check_keep(
        self, rows: list[int], rows_t: torch.Tensor, keep: list[int], keep_t: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """Check keep_lens (as many as rows; ``keep_t`` on the device) against the committed lengths; returns (kept
        slots, newly cached pages; their values were checked by the caller). Reads back the committed lengths and
        first slot of each page newly kept (past the row's cache-owned prefix); the kept slots are gathered on the
        device."""
        p = self.page_size
        bs = len(rows)
        # One read-back: the committed lengths and the first slot of each page newly kept (past the row's cache-owned
        # prefix), gathered at their (row, position) alone: the [bs, longest keep] block of the table would cost time
        # and memory with one long keep among short ones. The kept slots themselves stay on the device (a gather, in
        # batch order).
        firsts = [len(self._prefix_pages[row]) for row in rows]  # each row's first page not the cache's already
        counts = [max(length // p - first, 0) for length, first in zip(keep, firsts)]
        heads = self._gather_rows(rows_t, counts, p, firsts)
        values = torch.cat([self.seq_lens[rows_t], heads.long()]).tolist()
        for i, (row, length, seq) in enumerate(zip(rows, keep, values[:bs])):
            if length > seq:
                raise ValueError(f"keep_lens[{i}] must be <= the committed length {seq} of row {row}, got {length}")
        # Each kept slot's row and position, on the device; the total comes from the host, so nothing syncs.
        kept = self._gather_rows(rows_t, keep, 1, counts_t=keep_t).long()
        new_pages = [slot // p for slot in values[bs:]]
        return kept, new_pages

    def _gather_rows(
        self,
        rows_t: torch.Tensor,
        counts: list[int],
        step: int,
        firsts: list[int] | None = None,
        counts_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``req_to_token[rows_t[i], (firsts[i] + k) * step]`` for ``k < counts[i]`` (``firsts`` 0 when None), in
        batch order, gathered on the device. The total comes from the host list ``counts``, so nothing syncs;
        ``counts_t``: the same counts already on the device (then without ``firsts``)."""
        bs = len(counts)
        firsts = firsts if firsts and any(firsts) else None
        if counts_t is None:  # (one copy to the device for both lists)
            values = self._to_device(counts + (firsts or []))
            counts_t, firsts_t = values[:bs], values[bs:]
        else:
            assert firsts is None, "counts_t comes without firsts"
        total = sum(counts)
        owner = torch.repeat_interleave(torch.arange(bs, device=self.device), counts_t, output_size=total)
        k = torch.arange(total, device=self.device) - (torch.cumsum(counts_t, 0) - counts_t)[owner]
        if firsts is not None:
            k = k + firsts_t[owner]
        return self.req_to_token[rows_t[owner], k * step]

    def _check_commit(
        self, req_pool_indices: IntVector, accept_lens: IntVector, validate: bool
    ) -> tuple[torch.Tensor, list[int] | None, torch.Tensor]:
        """The checks commit and commit_tree share; returns (rows on the device, rows on the host or None, accept
        lengths on the device)."""
        rows, host_rows = self._check_commit_rows(req_pool_indices, validate)
        return rows, host_rows, self._check_accept(rows, host_rows, accept_lens)

    def _check_commit_rows(self, req_pool_indices: IntVector, validate: bool) -> tuple[torch.Tensor, list[int] | None]:
        """The rows of a commit: (on the device, on the host or None), checked where the host has them."""
        _check_flag("validate", validate)
        rows, host_rows = self._device_rows(req_pool_indices)
        if validate and host_rows is None:
            host_rows = rows.tolist()
        if host_rows is not None:
            self._check_rows_in_use(host_rows)
        return rows, host_rows

    def _check_accept(
        self, rows: torch.Tensor, host_rows: list[int] | None, accept_lens: IntVector, nodes: int | None = None
    ) -> torch.Tensor:
        """Accept lengths of checked rows: their number, and as a list their values (``nodes``: the ``T`` of a tree
        commit, which bounds them too); returns them on the device."""
        if not isinstance(accept_lens, torch.Tensor) and _entries(accept_lens) not in (-1, rows.shape[0]):
            raise ValueError(  # (before reading them)
                f"accept_lens has {_entries(accept_lens)} elements but req_pool_indices has {rows.shape[0]}"
            )
        accept, host_accept = self._device_ints("accept_lens", accept_lens)
        if accept.shape[0] != rows.shape[0]:
            raise ValueError(f"accept_lens has {accept.shape[0]} elements but req_pool_indices has {rows.shape[0]}")
        if host_accept is not None:
            self._check_host_accept(host_rows, host_accept, nodes)
        return accept

    def _check_host_accept(self, host_rows: list[int] | None, accept: list[int], nodes: int | None = None) -> None:
        """Accept lengths given as a list: each in [0, the row's window], as far as the host knows the window, and
        in [0, ``nodes``] for a tree commit of ``nodes`` (T) nodes."""
        # (rows as a list: their own windows; the widest of all, a pass over every row in use, only without them)
        widest = None if host_rows is not None else max([self._unknown_window_bound, *self._known_windows.values()])
        for i, value in enumerate(accept):
            row = None if host_rows is None else host_rows[i]
            window = widest if row is None else self._known_windows.get(row, self._unknown_window_bound)
            if nodes is not None and not 0 <= value <= nodes:
                raise ValueError(f"accept_lens[{i}] must be in [0, {nodes}] (T, the tree's nodes), got {value}")
            if not 0 <= value <= window:
                raise ValueError(
                    f"accept_lens[{i}] must be in [0, {window}] (the draft window"
                    f"{'' if row is None else f' of row {row}'}), got {value}"
                )

    def _check_rows_in_use(self, rows: list[int]) -> None:
        in_use = self._in_use
        if not rows or (
            min(rows) >= 0
            and max(rows) < self.max_requests
            and all(map(in_use.__getitem__, rows))
            and len(set(rows)) == len(rows)
        ):
            return
        # Something is wrong: find the first bad entry, to name it.
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
        if type(values) is list and set(map(type, values)) <= _INT_TYPE:  # the common case, checked in C
            return list(values)
        if isinstance(values, torch.Tensor):
            self._check_int_tensor(name, values, check_device=False)
            if values.is_meta:
                raise ValueError(f"{name} must hold values to read (any device but meta), got a tensor on meta")
            return values.tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a 1-D int tensor or a sequence of ints, got {_type_name(values)}")
        exact = True  # (Python ints only: no conversion)
        for i, value in enumerate(values):  # (any numbers.Integral, e.g. numpy.int64, but not bool)
            if type(value) is not int:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{name}[{i}] must be an int, got {_type_name(value)}")
                exact = False
        return list(values) if exact else list(map(operator.index, values))

    def _device_ints(self, name: str, values: IntVector) -> tuple[torch.Tensor, list[int] | None]:
        """``values`` as a tensor on the device, and as a host list when they came as one (no sync)."""
        if isinstance(values, torch.Tensor):
            self._check_int_tensor(name, values, check_device=True)
            return values, None
        host = self._host_ints(name, values)
        try:
            return self._to_device(host), host
        except (OverflowError, RuntimeError, ValueError):  # torch's copy of an int outside int64 names nothing
            bad = next((i for i, value in enumerate(host) if not -_INT64_LIMIT <= value < _INT64_LIMIT), None)
            if bad is None:
                raise
            raise ValueError(f"{name}[{bad}] must fit in int64, got {host[bad]}") from None

    def _to_device(self, values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """``values`` as a tensor on the allocator's device, without waiting for its stream: on CUDA through pinned
        memory and a non-blocking copy (a copy from pageable memory synchronizes the stream), int64 through the
        allocator's ring of pinned slots (:class:`staging.HostStaging`), the rest through torch's pinned-memory
        cache, which keeps the block until the copy is done."""
        if self._cuda:
            if dtype is torch.int64:
                staged = self._staging.to_device(values)
                if staged is not None:
                    return staged
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _host_visible(self, values: list[int]) -> torch.Tensor:
        """``values`` (int64) where the allocator's next launch reads them: on a CUDA device that reads pinned host
        memory in place, a slot of the allocator's ring (``HostStaging.stage``: no device tensor, no copy; only that
        launch may read it, as the ring reuses its slots); elsewhere, or where the ring cannot take them, a tensor on
        the device (:meth:`_to_device`)."""
        if self._cuda:
            staged = self._staging.stage(values)
            if staged is not None:
                return staged
        return self._to_device(values)

    def _device_rows(self, req_pool_indices: IntVector) -> tuple[torch.Tensor, list[int] | None]:
        """Rows on the device, and on the host when they came as a list. At most max_requests of them (rows in use,
        without duplicates, never are more): the kernels of drafts, commits and branches keep per-entry and per-tile
        values in max_requests-long scratch, which a longer tensor of rows (out of range ones, which the device
        skips) would overrun."""
        if not isinstance(req_pool_indices, torch.Tensor):  # (a tensor's length is read below, at no cost)
            self._check_row_count(_entries(req_pool_indices))
        rows, host_rows = self._device_ints("req_pool_indices", req_pool_indices)
        self._check_row_count(rows.shape[0])
        return rows, host_rows

    def _check_row_count(self, count: int) -> None:
        """At most max_requests rows (a list's or lazy sequence's count is taken before its values are read,
        ``_entries``)."""
        if count > self.max_requests:
            raise ValueError(
                f"req_pool_indices must have at most max_requests ({self.max_requests}) entries, got {count}"
            )

    def _kept_step(self, key: tuple | None) -> DraftStepWrapper | None:
        """The plan kept for method calls under ``key`` (:meth:`_keep_step`), if no tensor it was given has moved,
        been resized, re-typed or re-strided since (``BoundTensors``); else None, and the call is checked in full.

        A call given the very tensors (the same objects, which the plan holds) and counts of an earlier call that
        passed its checks passes them again while the tensors are unchanged: every check of a method call with
        ``validate=False`` and a tensor of rows reads only what the plan re-checks, the counts and the allocator's
        own memory, which a caller's tensor cannot come to share while the plan holds it. So such a call takes the
        plan's path, as its DraftStepWrapper would: the same host bounds, books and launches, without the checks and
        with the launches prepared once."""
        if key is None:
            return None
        step = self._kept_steps.get(key)
        if step is None:
            return None
        if step._tree_step_bound.changed():
            del self._kept_steps[key]  # (then this key is kept again only from two calls with the same tensors)
            return None
        return step

    def _keep_step(self, key: tuple | None, given: tuple | None, rows: torch.Tensor, n: int, **plan) -> None:
        """After a method call under ``key`` with the tensors ``given`` (``_step_key``) passed its checks and
        launched: if a call under ``key`` waits in ``_seen_steps``, which holds its tensors (so these are the very
        same: new tensors each call take the ids of the last call's once those are freed, and a key alone would
        keep at every other call), plan its arguments (``rows``, ``n`` and ``plan``, as DraftStepWrapper.plan takes
        them) and keep the plan for the next calls under ``key`` (:meth:`_kept_step`); else the call waits there:
        calls given new tensors each time pay for their key and that. The plan reaches the allocator through a weak
        proxy: the allocator holding a plan that held it would keep its memory until Python's cyclic collector
        ran."""
        if key is None:
            return
        if self._seen_steps.pop(key, None) is None:
            remember(self._seen_steps, key, given, _MAX_SEEN_STEPS)
            return
        step = DraftStepWrapper(weakref.proxy(self))  # (not the allocator: a cycle would outlive its last reference)
        try:
            step.plan(rows, n, **plan)
        except ValueError:  # an output sharing memory with an input, which only validate=True checks in a call
            return
        remember(self._kept_steps, key, step, _MAX_KEPT_STEPS)

    def _check_int_tensor(self, name: str, tensor: torch.Tensor, *, check_device: bool) -> None:
        if check_device:  # the ops' check: 1-D, int32/int64, contiguous, on the device of req_to_token
            _check_vector(name, tensor, self.device, None)
            if backend.is_npu(self.device):
                _check_npu_dtypes({name: tensor})
            return
        _check_dense(name, tensor)  # (read back on the host: a sparse one has no values to read in place)
        if tensor.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {tensor.dtype}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")

    def _check_shared_memory(
        self, rows: torch.Tensor, written: dict[str, torch.Tensor | None], **read: torch.Tensor | None
    ) -> None:
        """No output (``written``) shares memory with another or with an input (the rows, ``read``; None: not
        given): what ``validate=True`` and DraftStepWrapper.plan() check (a few us), as the ops do with
        ``validate``."""
        read["req_pool_indices"] = rows
        _check_disjoint(
            {k: v for k, v in written.items() if v is not None}, {k: v for k, v in read.items() if v is not None}
        )

    def _owns_memory_of(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` reads memory of one of the allocator's own tensors (no output buffer may): compared as
        byte ranges, so a view made through numpy or DLPack, which has a storage object of its own, counts too.
        ``_branch_span`` must be that of the current ``branch_pages`` (:meth:`_check_buffer`, the caller, sees to
        it)."""
        start, end = _memory_span(tensor)
        if start == end:  # no memory, as an empty tensor's
            return False
        starts = self._own_starts  # (disjoint storages, sorted)
        i = bisect.bisect_right(starts, start) - 1
        if (i >= 0 and start < self._own_ends[i]) or (i + 1 < len(starts) and starts[i + 1] < end):
            return True
        _, branch_start, branch_end = self._branch_span
        return branch_start < end and start < branch_end

    def _check_buffer(self, name: str, out: torch.Tensor, length: int, *, exact: bool) -> None:
        """``out``: an output vector as the calls take it (:meth:`_check_int_tensor`), of ``length`` elements
        (``exact``) or at least that many, sharing no memory with the allocator's own tensors.

        What does not depend on ``length`` is kept for the buffers that passed it, by what it depends on: address,
        strides, shape, dtype and device give the same answers (dtype, layout, device, contiguity, and the bytes the
        buffer spans, which the allocator's own memory does not meet) for as long as that memory stays the same;
        ``branch_pages`` is the one own tensor that changes (widened by tree calls), and the kept answers go with it.
        An engine passes the same buffers every step: about 1 us of Python less a buffer on the development machine.
        """
        key = None  # (not a tensor, sparse, nested: the checks below word it)
        if isinstance(out, torch.Tensor):  # (an object that only looks like a kept buffer is no tensor)
            try:
                key = (out.data_ptr(), out.stride(), out.shape, out.dtype, out.device)
            except RuntimeError:
                pass
        if self._branch_span[0] is not self.branch_pages:  # (tree calls widen it: a new tensor, other memory)
            self._branch_span = (self.branch_pages, *_storage_span(self.branch_pages))
            self._checked_buffers.clear()
        known = key is not None and key in self._checked_buffers
        if not known:
            self._check_int_tensor(name, out, check_device=True)
        if (out.shape[0] != length) if exact else (out.shape[0] < length):
            expected = f"{length}" if exact else f"at least {length}"
            raise ValueError(f"{name} must have {expected} elements, got {out.shape[0]}")
        if known:
            return
        if self._owns_memory_of(out):
            raise ValueError(
                f"{name} must not share memory with the allocator's own tensors (req_to_token, seq_lens, free_pages, "
                "...): the call would write its results into the allocator's state"
            )
        if key is not None:
            remember(self._checked_buffers, key, None, _MAX_CHECKED_BUFFERS)


class DraftStepWrapper:
    """The hot draft/verify step of a :class:`DraftCacheAllocator` as plan/run, for an engine's eager loop
    (FlashInfer's wrappers are the model).

    :meth:`plan` takes the arguments of :meth:`~DraftCacheAllocator.alloc_draft` (and the ``accept_lens`` buffer of
    :meth:`~DraftCacheAllocator.commit`) once, makes the methods' checks (the same errors) and resolves the launches.
    Then each step is :meth:`alloc_draft` (or :meth:`reserve_draft`), verification, and :meth:`commit`, each doing
    exactly what the method does with those arguments, on the current values of the bound tensors: write each
    step's rows and accept lengths into them in place. Every guarantee of the methods holds: the host bound of the
    pool and the context (a sync only near capacity, then ``OutOfSlotsError``/``ContextLengthError`` with nothing
    changed), the release of branch pages when tree drafts may hold some, nothing changed when a launch raises.

    Tree drafts (EAGLE ``topk > 1``): a plan with ``topk`` and ``num_steps`` adds :meth:`alloc_branches`
    (:meth:`~DraftCacheAllocator.alloc_branches`), and a plan with ``accept_index`` makes :meth:`commit` the tree
    commit (:meth:`~DraftCacheAllocator.commit_tree`) of the ``N`` drafted nodes.

    Each call re-checks only that each bound tensor it reads is still where plan() saw it, with the same shape,
    dtype and strides (about 0.3 us a tensor; an output buffer that plan() made itself, as it does for each one not
    given, only by its address, about 0.07 us: the calls hand out views of such a buffer, never the buffer, so only
    its storage can change), and, for rows given as a list, that they are still rows in use once
    rows were added or freed since; otherwise it plans again with the same arguments, raising what plan() raises
    for them (a plan checks every argument it was given, so a call may raise about one that only another of the
    plan's calls reads). A plan() that raises changes nothing: the previous plan, if any, stays in force.

    Example::

        step = DraftStepWrapper(allocator)
        step.plan(rows, N, accept_lens=accept_lens, out_cache_loc=out_cache_loc, last_loc=last_loc)
        while decoding:
            out_cache_loc, last_loc = step.alloc_draft()
            ...  # draft, verify; write the accepted counts into accept_lens in place
            step.commit()

    A tree step (``N`` tree nodes; ``accept_index`` ``[bs, N]`` written in place after verification)::

        step.plan(rows, N, accept_lens=accept_lens, accept_index=accept_index, topk=topk, num_steps=num_steps)
        while decoding:
            branch_slots, copy_src, copy_dst = step.alloc_branches()
            ...  # kv[copy_dst] = kv[copy_src]; draft the branches
            out_cache_loc, last_loc = step.alloc_draft()
            ...  # verify the tree; write the accepted paths into accept_index and accept_lens in place
            kv_src, kv_dst = step.commit()  # then kv[kv_dst] = kv[kv_src]

    The same in two launches a step (:meth:`~DraftCacheAllocator.alloc_tree_draft`, and a tree commit that leaves the
    branch pages to the next draft)::

        step.plan(rows, N, accept_lens=accept_lens, accept_index=accept_index, keep_branches=True, topk=topk,
                  num_steps=num_steps)
        while decoding:
            out_cache_loc, last_loc, branch_slots, copy_src, copy_dst = step.alloc_tree_draft()
            ...  # kv[copy_dst] = kv[copy_src]; draft the branches; verify the tree
            kv_src, kv_dst = step.commit()

    And in one launch a step while the tree draft is one program
    (:meth:`~DraftCacheAllocator.commit_tree_and_draft`; the same plan, after a first :meth:`alloc_tree_draft`)::

        out_cache_loc, last_loc, branch_slots, copy_src, copy_dst = step.alloc_tree_draft()
        while decoding:
            ...  # kv[copy_dst] = kv[copy_src]; draft the branches; verify; write the paths in place
            kv_src, kv_dst, out_cache_loc, last_loc, branch_slots, copy_src, copy_dst = step.commit_tree_and_draft()
            ...  # kv[kv_dst] = kv[kv_src], before the next kv[copy_dst] = kv[copy_src]

    Args:
        allocator: the :class:`DraftCacheAllocator` whose step this is.
    """

    def __init__(self, allocator: DraftCacheAllocator) -> None:
        if not isinstance(allocator, DraftCacheAllocator):
            raise TypeError(f"allocator must be a DraftCacheAllocator, got {_type_name(allocator)}")
        self._allocator = allocator
        self._draft_bound = self._commit_bound = self._branches_bound = UNPLANNED
        self._commit_draft_bound = self._tree_draft_bound = self._tree_step_bound = UNPLANNED
        self._plan_args: dict = {}

    def plan(
        self,
        req_pool_indices: IntVector,
        num_draft_tokens: int,
        *,
        accept_lens: torch.Tensor | None = None,
        out_cache_loc: torch.Tensor | None = None,
        last_loc: torch.Tensor | None = None,
        emit: bool = True,
        accept_index: torch.Tensor | None = None,
        kv_src: torch.Tensor | None = None,
        kv_dst: torch.Tensor | None = None,
        keep_branches: bool = False,
        topk: int | None = None,
        num_steps: int | None = None,
        branch_slots: torch.Tensor | None = None,
        copy_src: torch.Tensor | None = None,
        copy_dst: torch.Tensor | None = None,
        validate: bool = False,
    ) -> None:
        """Check the step's arguments and resolve its launches.

        Args:
            req_pool_indices, num_draft_tokens, out_cache_loc, last_loc, validate: as for
                :meth:`~DraftCacheAllocator.alloc_draft` (rows as a list are copied to the device once).
            accept_lens: ``[bs]`` int32/int64 tensor on the allocator's device that :meth:`commit` reads; ``None``
                if this wrapper is not used to commit.
            emit: ``True``: :meth:`alloc_draft` returns the slots; ``False``: :meth:`reserve_draft` only reserves
                them (no ``out_cache_loc``/``last_loc``).
            accept_index: ``[bs, T]`` tensor that :meth:`commit` reads with ``accept_lens``: then it is
                :meth:`~DraftCacheAllocator.commit_tree` and returns ``(kv_src, kv_dst)``; ``kv_src``, ``kv_dst``:
                its optional buffers (as for the method); ``keep_branches``: as for the method.
            topk, num_steps: both or neither; with them, :meth:`alloc_branches` is
                :meth:`~DraftCacheAllocator.alloc_branches` ``(rows, topk, num_steps)``; ``branch_slots`` (the
                method's ``out``), ``copy_src``, ``copy_dst``: its optional buffers.
        """
        alloc = self._allocator
        _check_flag("emit", emit)
        _check_flag("keep_branches", keep_branches)
        rows, host_rows, n = alloc._check_draft(req_pool_indices, num_draft_tokens, validate)
        bs = rows.shape[0]
        if emit:
            out, last = alloc._draft_buffers(bs, n, out_cache_loc, last_loc)
        elif out_cache_loc is not None or last_loc is not None:
            raise ValueError("out_cache_loc and last_loc go with emit=True (reserve_draft returns no slots)")
        else:
            out = last = None
        accept = None
        if accept_lens is not None:
            if not isinstance(accept_lens, torch.Tensor):
                raise TypeError(f"accept_lens must be a torch.Tensor, got {_type_name(accept_lens)}")
            accept = alloc._check_commit(rows, accept_lens, validate)[2]
        # What each call reads, as (the caller's tensor or None, the tensor the launch reads): a call re-checks the
        # caller's tensors in full, and the buffers made here (never handed out: the calls return views of them) by
        # address only (_bind).
        commit_reads = [(accept_lens, accept)]
        tree_commit = tree_result = None
        if accept_index is not None:
            if accept is None:
                raise ValueError("accept_index goes with accept_lens (commit_tree reads both)")
            src, dst, tree_n = alloc._check_tree_commit(accept_index, bs, kv_src, kv_dst)
            tree_commit = (accept_index, src, dst)
            commit_reads += [(accept_index, accept_index), (kv_src, src), (kv_dst, dst)]
        elif kv_src is not None or kv_dst is not None or keep_branches:
            raise ValueError("kv_src, kv_dst and keep_branches go with accept_index (arguments of commit_tree)")
        branch_reads: list[tuple] = []
        branches = branch_result = None
        if topk is not None or num_steps is not None:
            if topk is None or num_steps is None:
                raise ValueError("topk and num_steps must be given together")
            slots, src, dst, topk, num_steps = alloc._check_branches(
                rows, topk, num_steps, branch_slots, copy_src, copy_dst, validate, "branch_slots"
            )[2:]
            copy_n = bs * topk * (alloc.page_size - 1)
            branches = (topk, num_steps, slots, src, dst)
            branch_reads = [(branch_slots, slots), (copy_src, src), (copy_dst, dst)]
        elif branch_slots is not None or copy_src is not None or copy_dst is not None:
            raise ValueError("branch_slots, copy_src and copy_dst go with topk and num_steps (alloc_branches)")
        # A tensor of rows is bound even where validate=True read it back: each call then reads it again (the method
        # checks its current values), and a tensor moved or resized plans again. Rows given as a list are the
        # plan's own, re-checked once rows were taken or freed (_check).
        listed = not isinstance(req_pool_indices, torch.Tensor)
        user = None if listed else req_pool_indices
        # No output shares memory with an input or another output (checked once here; the methods with validate).
        written = {"out_cache_loc": out, "last_loc": last}
        if tree_commit is not None:
            written.update(kv_src=tree_commit[1], kv_dst=tree_commit[2])
        if branches is not None:
            written.update(branch_slots=branches[2], copy_src=branches[3], copy_dst=branches[4])
        alloc._check_shared_memory(rows, written, accept_lens=accept, accept_index=accept_index)
        # Checked: now the plan. The buffers made here move into one allocation (each call then re-checks one address
        # for all of them), before any view of them is made.
        draft_reads = [(out_cache_loc, out), (last_loc, last)]
        arena = share_one_allocation([t for given, t in draft_reads + commit_reads + branch_reads if given is None])
        if tree_commit is not None:
            tree_result = (tree_commit[1][:tree_n], tree_commit[2][:tree_n])
        if branches is not None:
            slots, src, dst = branches[2:]
            branch_result = slots[: bs * topk * num_steps].view(bs, topk, num_steps), src[:copy_n], dst[:copy_n]
        # Each call re-checks only the tensors it reads.
        self._draft_bound = _bind(user, arena, *draft_reads)
        self._commit_bound = _bind(user, arena, *commit_reads)
        self._branches_bound = _bind(user, arena, *branch_reads)
        # The calls that read two of those sets check them as one.
        self._commit_draft_bound = _bind(user, arena, *draft_reads, *commit_reads)
        self._tree_draft_bound = _bind(user, arena, *draft_reads, *branch_reads)
        self._tree_step_bound = _bind(user, arena, *draft_reads, *commit_reads, *branch_reads)
        self._plan_args = dict(
            req_pool_indices=host_rows if listed else req_pool_indices,  # the plan's own copy of a list
            num_draft_tokens=num_draft_tokens,
            accept_lens=accept_lens,
            out_cache_loc=out_cache_loc,
            last_loc=last_loc,
            emit=emit,
            accept_index=accept_index,
            kv_src=kv_src,
            kv_dst=kv_dst,
            keep_branches=keep_branches,
            topk=topk,
            num_steps=num_steps,
            branch_slots=branch_slots,
            copy_src=copy_src,
            copy_dst=copy_dst,
            validate=validate,
        )
        self._rows, self._host_rows, self._n, self._bs = rows, host_rows, n, bs
        self._listed_rows = host_rows if listed else None
        self._opened = dict.fromkeys(host_rows, n) if listed else None  # the windows each draft opens (_open_windows)
        self._out, self._last, self._accept = out, last, accept
        self._tree_commit, self._tree_result = tree_commit, tree_result
        self._branches, self._branch_result = branches, branch_result
        self._emit, self._validate, self._keep_branches = emit, validate, keep_branches
        self._rows_version = alloc._rows_version
        self._launches: dict[str, tuple[backend.Launch, torch.Tensor]] = {}
        self._tree_step_choices: dict[bool, tuple[bool, bool]] = {}  # see _tree_step_in_one_launch
        # The given buffers as the methods return them; views of those made here (see above)
        if out is None:
            self._result = (None, None)
        else:
            exact = out_cache_loc is not None and out.shape[0] == bs * n
            self._result = (out if exact else out[: bs * n]), (last if last_loc is not None else last[:])
        # commit_tree_and_draft's tree argument and results, made once
        self._tree = None if tree_commit is None else (accept, *tree_commit)
        self._tree_step_result = (tree_result or ()) + self._result + (branch_result or ())

    def alloc_draft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`DraftCacheAllocator.alloc_draft` with the planned arguments; returns the same
        ``(out_cache_loc[:bs * N], last_loc)`` tensors every call."""
        self._check(self._draft_bound)
        if not self._emit:
            raise ValueError("this plan has emit=False: call reserve_draft()")
        if self._validate:  # (the method's checks; its results are those below: the plan's buffers never leave it)
            self._allocator.alloc_draft(
                self._plan_args["req_pool_indices"],
                self._n,
                out_cache_loc=self._out,
                last_loc=self._last,
                validate=True,
            )
        elif self._bs:
            self._run_draft(self._allocator)
        return self._result

    def reserve_draft(self) -> None:
        """:meth:`DraftCacheAllocator.reserve_draft` with the planned arguments (a plan with ``emit=False``)."""
        self._check(self._draft_bound)
        if self._emit:
            raise ValueError("this plan has emit=True: call alloc_draft()")
        if self._validate:
            self._allocator.reserve_draft(self._plan_args["req_pool_indices"], self._n, validate=True)
        elif self._bs:
            self._run_draft(self._allocator)

    def commit(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`DraftCacheAllocator.commit` of the planned rows with the current values of ``accept_lens``; with
        ``accept_index`` in the plan, :meth:`DraftCacheAllocator.commit_tree`, returning the same ``(kv_src[:bs *
        T], kv_dst[:bs * T])`` tensors every call."""
        self._check(self._commit_bound)
        if self._accept is None:
            raise ValueError("commit() needs a plan with accept_lens")
        tree = self._tree_commit
        if self._validate:
            rows = self._plan_args["req_pool_indices"]
            if tree is None:
                self._allocator.commit(rows, self._accept, validate=True)
            else:
                index, src, dst = tree
                self._allocator.commit_tree(
                    rows, index, self._accept, kv_src=src, kv_dst=dst, keep_branches=self._keep_branches, validate=True
                )
        elif self._bs:
            self._run_commit(self._allocator)
        return self._tree_result

    def commit_and_draft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`DraftCacheAllocator.commit_and_draft` of the planned rows with the current values of
        ``accept_lens``, then ``N`` draft tokens (a chain plan with ``emit=True``); returns the same
        ``(out_cache_loc[:bs * N], last_loc)`` tensors every call."""
        self._check(self._commit_draft_bound)
        if self._accept is None:
            raise ValueError("commit_and_draft() needs a plan with accept_lens")
        if self._tree_commit is not None:
            raise ValueError("this plan commits a tree (accept_index): call commit(), then alloc_draft()")
        if not self._emit:
            raise ValueError("this plan has emit=False: commit_and_draft() returns the slots")
        if self._validate:
            self._allocator.commit_and_draft(
                self._plan_args["req_pool_indices"],
                self._accept,
                self._n,
                out_cache_loc=self._out,
                last_loc=self._last,
                validate=True,
            )
        elif self._bs:
            self._run_commit_and_draft(self._allocator)
        return self._result

    def alloc_branches(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`DraftCacheAllocator.alloc_branches` with the planned arguments; returns the same
        ``(branch_slots, copy_src[:bs * topk * (page_size - 1)], copy_dst[:...])`` tensors every call (the
        method's ``return_copies=True``; the copy pairs are empty for ``page_size == 1``)."""
        self._check(self._branches_bound)
        if self._branches is None:
            raise ValueError("alloc_branches() needs a plan with topk and num_steps")
        topk, num_steps, slots, src, dst = self._branches
        if self._validate:
            rows = self._plan_args["req_pool_indices"]
            self._allocator.alloc_branches(rows, topk, num_steps, out=slots, copy_src=src, copy_dst=dst, validate=True)
        elif self._bs:
            self._run_branches(self._allocator)
        return self._branch_result

    def alloc_tree_draft(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`DraftCacheAllocator.alloc_tree_draft` with the planned arguments (a plan with ``topk`` and
        ``num_steps``); returns the same ``(out_cache_loc[:bs * N], last_loc, branch_slots, copy_src[:bs * topk *
        (page_size - 1)], copy_dst[:...])`` tensors every call."""
        self._check(self._tree_draft_bound)
        if self._branches is None:
            raise ValueError("alloc_tree_draft() needs a plan with topk and num_steps")
        if not self._emit:
            raise ValueError("this plan has emit=False: alloc_tree_draft() returns the slots")
        topk, num_steps, slots, src, dst = self._branches
        if self._validate:
            self._allocator.alloc_tree_draft(
                self._plan_args["req_pool_indices"],
                self._n,
                topk,
                num_steps,
                out_cache_loc=self._out,
                last_loc=self._last,
                branch_slots=slots,
                copy_src=src,
                copy_dst=dst,
                validate=True,
            )
        elif self._bs:
            self._allocator._draft(self._rows, self._host_rows, self._n, self._out, self._last, self, self._branches)
        return self._result + self._branch_result

    def commit_tree_and_draft(self) -> tuple[torch.Tensor, ...]:
        """:meth:`DraftCacheAllocator.commit_tree_and_draft` of the planned rows with the current values of
        ``accept_index`` and ``accept_lens``, then ``N`` tree nodes and the planned branches (a plan with
        ``accept_index``, ``topk`` and ``num_steps``); returns the same ``(kv_src[:bs * T], kv_dst[:...],
        out_cache_loc[:bs * N], last_loc, branch_slots, copy_src[:...], copy_dst[:...])`` tensors every call."""
        self._check(self._tree_step_bound)
        if self._tree_commit is None or self._branches is None:
            raise ValueError("commit_tree_and_draft() needs a plan with accept_index, topk and num_steps")
        if not self._emit:
            raise ValueError("this plan has emit=False: commit_tree_and_draft() returns the slots")
        if self._validate:
            index, kv_src, kv_dst = self._tree_commit
            topk, num_steps, slots, src, dst = self._branches
            self._allocator.commit_tree_and_draft(
                self._plan_args["req_pool_indices"],
                index,
                self._accept,
                self._n,
                topk,
                num_steps,
                kv_src=kv_src,
                kv_dst=kv_dst,
                out_cache_loc=self._out,
                last_loc=self._last,
                branch_slots=slots,
                copy_src=src,
                copy_dst=dst,
                validate=True,
            )
        elif self._bs:
            self._run_tree_step(self._allocator)
        return self._tree_step_result

    # Each call's step without its checks, on ``alloc``: the allocator (the plan's own reference to it may be a weak
    # proxy: DraftCacheAllocator._keep_step). The public calls above and the allocator's kept method calls
    # (DraftCacheAllocator._kept_step) run them.

    def _run_draft(self, alloc: DraftCacheAllocator) -> None:
        alloc._draft(self._rows, self._host_rows, self._n, self._out, self._last, self)

    def _run_commit_and_draft(self, alloc: DraftCacheAllocator) -> None:
        alloc._draft(self._rows, self._host_rows, self._n, self._out, self._last, self, accept=self._accept)

    def _run_commit(self, alloc: DraftCacheAllocator) -> None:
        alloc._commit(self._rows, self._host_rows, self._accept, self._tree_commit, self, self._keep_branches)

    def _run_branches(self, alloc: DraftCacheAllocator) -> None:
        topk, num_steps, slots, src, dst = self._branches
        alloc._branches(self._rows, self._host_rows, topk, num_steps, slots, src, dst, self)

    def _run_tree_step(self, alloc: DraftCacheAllocator) -> None:  # (_draft's tree path, called directly)
        alloc._tree_draft(self._rows, self._host_rows, self._n, self._out, self._last, self, self._branches, self._tree)

    # The methods' results, for a plan kept for their calls (DraftCacheAllocator._kept_step), which was given every
    # buffer: views made afresh, as the methods make them, of the buffers as the methods' checks take them.

    def _fresh_draft_result(self) -> tuple[torch.Tensor, torch.Tensor]:
        out, tokens = self._out, self._bs * self._n
        return (out if out.shape[0] == tokens else out[:tokens]), self._last

    def _fresh_tree_commit_result(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, kv_src, kv_dst = self._tree_commit
        pairs = self._tree_result[0].shape[0]
        return kv_src[:pairs], kv_dst[:pairs]

    def _fresh_branch_result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        topk, num_steps, slots, copy_src, copy_dst = self._branches
        bs = self._bs
        copies = bs * topk * (self._allocator.page_size - 1)
        return slots[: bs * topk * num_steps].view(bs, topk, num_steps), copy_src[:copies], copy_dst[:copies]

    def _fresh_tree_step_result(self) -> tuple:
        return (*self._fresh_tree_commit_result(), *self._fresh_draft_result(), *self._fresh_branch_result())

    def _tree_step_in_one_launch(self, release: bool) -> bool:
        """The allocator's ``_tree_step_in_one_launch`` for the planned step, its answers kept by the plan."""
        alloc = self._allocator
        choice = self._tree_step_choices.get(release)
        if choice is None:
            tree = self._tree[1].shape[1]
            choice = self._tree_step_choices[release] = alloc._tree_step_launch_choice(
                self._bs, self._n, release, self._branches, tree
            )
        # (_eager_or_not's own shortcut, without its call: this is every tree step of the plan)
        return choice[0] if choice[0] == choice[1] else alloc._eager_or_not(choice)

    def _check(self, bound: BoundTensors) -> None:
        """Plan again if a tensor of ``bound`` changed; check host rows again if rows were taken or freed since."""
        if bound.changed():
            self.plan(**self._plan_args)
        alloc = self._allocator
        if self._rows_version != alloc._rows_version:
            if self._listed_rows is not None:
                alloc._check_rows_in_use(self._listed_rows)
            self._rows_version = alloc._rows_version

    def _prepared(self, kind: str) -> backend.Launch:
        """The launch of ``kind`` ("draft", "commit draft", "tree draft", "commit tree", "commit tree draft", each
        also with "release " before it; "commit", "release commit", "branches"; "count commit draft" and "commit
        draft from counts", the two launches of a commit_and_draft past _COMMIT_DRAFT_MAX_BATCH; "commit tree count"
        and "tree draft from counts", with "release " or not, those of a commit_tree_and_draft past one launch),
        prepared on first use and again once alloc_branches has replaced the allocator's branch_pages (which the
        release and branch launches read)."""
        alloc = self._allocator
        entry = self._launches.get(kind)
        if entry is None or entry[1] is not alloc.branch_pages:
            rows = self._rows
            if kind == "commit":
                launch = alloc._launch_commit(rows, self._accept, prepare=True)
            elif kind == "release commit":  # the commit, and the branch pages released, in one launch (see _commit)
                launch = alloc._launch_alloc(rows, 0, None, None, None, None, None, True, True, accept=self._accept)
            elif kind.endswith("commit tree"):
                launch = alloc._launch_commit_tree(
                    rows, self._accept, *self._tree_commit, prepare=True, release=kind != "commit tree"
                )
            elif kind == "branches":
                launch = alloc._launch_branches(rows, *self._branches, prepare=True)
            elif kind == "count commit draft":
                launch = alloc._launch_count(rows, self._n, self._accept, prepare=True)
            elif kind.endswith("commit tree count"):
                tree = (self._accept, *self._tree_commit)
                release = kind.startswith("release")
                launch = alloc._launch_commit_tree_count(rows, self._n, release, self._branches, tree, prepare=True)
            elif kind.endswith("commit tree draft"):
                launch = alloc._launch_alloc(
                    rows,
                    self._n,
                    None,
                    None,
                    None,
                    self._out,
                    self._last,
                    kind.startswith("release"),
                    True,
                    self._branches,
                    tree=(self._accept, *self._tree_commit),
                )
            else:  # "draft", "commit draft", "tree draft", each with "release " or not; "... from counts"
                out, last = self._out, self._last
                release, tree = kind.startswith("release"), "tree draft" in kind
                accept = self._accept if "commit draft" in kind else None
                sums = kind.endswith("from counts")
                count_tile = alloc._tree_commit_config(self._tree_commit[0].shape[1])[0] if sums and tree else 0
                launch = alloc._launch_alloc(
                    rows,
                    self._n,
                    None,
                    None,
                    None,
                    out,
                    last,
                    release,
                    True,
                    self._branches if tree else None,
                    accept,
                    sums,
                    count_tile=count_tile,
                )
            entry = self._launches[kind] = (launch, alloc.branch_pages)
        return entry[0]


def _step_key(
    kind: str, rows: IntVector, ints: tuple, flags: tuple, *tensors: object
) -> tuple[tuple | None, tuple | None]:
    """``(key, tensors)``: the key under which a method call is kept (DraftCacheAllocator._kept_step), its kind,
    counts and flags and the identities of its rows and tensors, and those tensors. ``(None, None)`` where the call
    is not kept: rows or a tensor argument that is not a plain torch.Tensor (a list, None: a buffer the call makes),
    a count that is not an int or a flag not a bool (the key compares values: 1 == 1.0 == True)."""
    if type(rows) is not torch.Tensor:
        return None, None
    for value in ints:
        if type(value) is not int:
            return None, None
    for flag in flags:
        if type(flag) is not bool:
            return None, None
    for tensor in tensors:
        if type(tensor) is not torch.Tensor:
            return None, None
    return (kind, ints, flags, id(rows), *map(id, tensors)), (rows, *tensors)


def _bind(
    user: torch.Tensor | None,
    arena: torch.Tensor | None,
    *reads: tuple[torch.Tensor | None, torch.Tensor | None],
) -> BoundTensors:
    """What a plan's call reads: the tensor of rows (``user``, None for rows given as a list) and ``(given, made)``
    pairs, the caller's tensor or None, and the tensor the launch reads (None: nothing). The caller's tensors are
    re-checked in full; a buffer made by the plan (``given`` None) by its address only: nobody else holds it (the
    calls hand out views of it), so only its storage can change (resized or freed through such a view). Buffers
    that share one allocation (``arena``, see ``buffers.share_one_allocation``) are checked as that allocation."""
    given = tuple(t for t in (user, *(g for g, _ in reads)) if t is not None)
    owned = tuple(made for g, made in reads if g is None and made is not None)
    if arena is not None and owned:
        owned = (arena,)
    return BoundTensors(given, owned)
