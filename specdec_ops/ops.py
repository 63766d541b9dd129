"""Host wrappers: check the inputs (metadata only, no sync), pick the launch configuration, launch.

Names and semantics follow SGLang's ``get_last_loc`` and ``assign_extend_cache_locs``; the fused op
``get_last_loc_and_assign_extend_cache_locs`` returns both from a single kernel launch.

On an NPU every index tensor but ``req_to_token`` (int32 or int64) must be int64, buffers included
(``checks.check_npu_dtypes``: the dtypes whose kernels the offline Ascend compile check compiles).

A call of ``assign_extend_cache_locs`` or the fused op given the very tensors of an earlier call (values rewritten in
place, every buffer given, ``validate=False``, counts as ``int``) launches the launch kept for them without the
checks while no tensor has moved, been resized, re-typed or re-strided (``_recent_calls``; docs/design.md, "Calls
given the tensors of an earlier call"). The kept launch holds no tensor; a call not kept holds its tensors but the
table until the next call under its key, or until a few others have come.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from . import backend, tiles
from .bounded import remember
from .buffers import share_one_allocation
from .checks import (
    INDEX_DTYPES,
    INT32_LIMIT,
    UNPLANNED,
    BoundTensors,
    check_count,
    check_disjoint,
    check_flag,
    check_npu_dtypes,
    check_optional_flag,
    check_out,
    check_table,
    check_vector,
    tensor_facts,
)

__all__ = [
    "CacheLocsWrapper",
    "assign_extend_cache_locs",
    "get_last_loc",
    "get_last_loc_and_assign_extend_cache_locs",
]

# What check_device names: every tensor of a call is on the device of req_to_token.
_ON_DEVICE = "req_to_token (and every tensor of the call)"
# Requests per program of get_last_loc.
_LAST_LOC_TILE = 1024
# Uniform windows: a [TILE, BLOCK_N] gather tile of _GATHER_ELEMENTS slots, BLOCK_N covering the window.
_GATHER_ELEMENTS = 512


class _RaggedClass(NamedTuple):
    """One launch class of ragged windows off Ascend (``_RAGGED_CLASSES``)."""

    max_batch: int | None  # the largest batch of the class (None: any)
    blocks: tuple[int, ...]  # the column blocks it may take
    tiles: tuple[int, ...]  # requests per program, for each of those blocks
    scan_block: int  # earlier requests summed per step
    prefetch: bool  # the first column block read while the earlier windows are summed
    early_sum: bool  # the first block of earlier windows read with the tile's own offsets
    span: int  # mean windows a column block should cover (_ragged_shape)


# Ragged windows: a [TILE, BLOCK_N] gather tile, looped over the longest window of the tile. Every program also sums
# the windows of all earlier requests (about bs**2 / (2 * TILE) reads in all), SCAN_BLOCK of them per step. Off
# Ascend the batch size picks one of a few fixed classes: small tiles and a scan block no wider than the batch cost
# least up to a few thousand requests (8-request tiles for 64-column blocks and from 257 requests: 0.05-0.3 us less
# than 16, H200); reading the first column block while the earlier windows and the tile's own are summed (prefetch)
# pays up to 1024 requests; past 4096 the sum dominates and 256-request tiles halve it (H100 graph replay). Reading
# the first block of earlier windows with the tile's own offsets (early_sum) took 0.1-0.7 us off 64-4096 requests,
# and added 0.1-0.5 past them (H200). The column block is the one of the class's blocks nearest `span` mean
# windows: 1025-4096 requests skip 32 columns (3.6-3.9 us at 2049-4096 against 3.2-3.4 for 16 or 64), and past 4096 a
# block of one mean window beats two (N 8, 65536 requests: 17.5 against 23.8 us). docs/performance.md has the
# measurements. A new batch size compiles nothing new once its class and block exist. Ascend keeps one class (one
# program per core).
_RAGGED_CLASSES = (
    _RaggedClass(256, (8, 16, 32, 64), (16, 16, 16, 8), 256, True, True, 2),
    _RaggedClass(1024, (8, 16, 32, 64), (8, 8, 8, 8), 1024, True, True, 2),
    _RaggedClass(4096, (16, 64), (32, 32), 4096, False, True, 2),
    _RaggedClass(None, (8, 16), (256, 256), 4096, False, False, 1),
)
# Ragged windows of more than _RAGGED_ONE_LAUNCH_MAX_BATCH requests, off Ascend, in a graph or through the
# interpreter: two launches. The first sums each tile's windows (_window_tile_sums_kernel), the second gathers
# reading those sums instead of every earlier request's lengths (about bs**2 / (2 * TILE) reads in one launch). H200
# graph replay: N 4 at 16384 / 65536 requests 4.7 / 15.7 -> 3.7 / 7.9 us, N 64 at 8192 / 16384 10.1 / 15.4 -> 7.1 /
# 12.4 (docs/performance.md); at 256-4096 requests two launches were slower or at most 0.6 us faster. An eager call
# keeps one launch: the host's second launch costs more than the device saves. Ascend keeps one launch (not measured
# there).
_RAGGED_ONE_LAUNCH_MAX_BATCH = 4096
_RAGGED_SUMS_CLASS = _RaggedClass(None, (8, 16), (128, 64), 1024, False, False, 1)
# CUDA warps of the first launch.
_TILE_SUMS_NUM_WARPS = 4
_NPU_RAGGED_TILE = 64
# Ragged gather columns per step on Ascend (off Ascend, the blocks of _RAGGED_CLASSES).
_NPU_RAGGED_BLOCK_N = 16
# Requests summed per step when a program adds up the windows of all earlier tiles (at most).
_SCAN_BLOCK = 4096
# Ascend: a quarter of the scan block, to keep the live tiles well inside the 192 KB on-chip buffer.
_NPU_SHRINK = 4
# Ascend: uniform gather tiles at least 8 columns wide. UB pads the rows of a 2-D tile to 32 bytes, so a [256, 2]
# tile takes as much of the 192 KB on-chip buffer as a [256, 8] one (scripts/ascend_compile_check.py prints peaks).
_NPU_MIN_BLOCK_N = 8
# CUDA warps per program (ignored by triton-ascend and the interpreter).
_NUM_WARPS = 8
# With PDL (backend.pdl_level) a kernel of a call of at most this many requests lets the next kernel of the stream
# start once it has waited for the one before it. H200 graph replay, in-process A/B: 0.14-0.48 us a call less up to
# 4096 requests (fused, and get_last_loc + assign_extend_cache_locs); past it mixed, ragged windows at 16384
# requests 0.33 us slower and the unfused pair of uniform windows at 65536 requests, N 8, 9.3 -> 16.7 us
# (docs/performance.md).
_NEXT_EARLY_MAX_BATCH = 4096
# Calls of the window ops kept for calls with the same tensors (an engine's persistent buffers): the identity key of
# a call (_recent_key) -> (what the call's checks and launch read of its tensors, tensor_facts; its launch, kept; the
# elements of out_cache_loc it returns, -1: all). A call whose key is kept and whose tensors still have those facts
# skips the checks, whose outcome the facts and the key decide, and launches the kept launch; it holds no tensor.
# A call not kept waits in _seen_calls with its tensors but the table, held (so their ids stay theirs), and is kept
# at its next call under its key: the same tensors. A few wait at once (their buffers stay allocated meanwhile).
_recent_calls: dict[tuple, tuple] = {}
_seen_calls: dict[tuple, tuple] = {}
_MAX_RECENT_CALLS = 64
_MAX_SEEN_CALLS = 8
# The names under which the project's reference Ascend checker (../shared/tools/ascend_compile_check.py) reads the
# block-size rule; the rule itself lives in specdec_ops.tiles.
_block_n = tiles.block_n


def _batch_size(req_pool_indices: torch.Tensor) -> int:
    bs = req_pool_indices.shape[0]
    if bs >= INT32_LIMIT:
        raise ValueError(f"req_pool_indices must have fewer than 2**31 elements, got {bs}")
    return bs


_UNIT_STRIDE = (1,)


def _table_ok(req_to_token: torch.Tensor) -> bool:
    """The conditions of ``check_table``, for the hot path (may raise AttributeError/ValueError on odd input)."""
    num_rows, max_context_len = req_to_token.shape
    row_stride, col_stride = req_to_token.stride()
    return (
        req_to_token.dtype in INDEX_DTYPES
        and col_stride == 1
        and num_rows < INT32_LIMIT
        and max_context_len < INT32_LIMIT
        and row_stride < INT32_LIMIT
    )


def _vector_ok(tensor: torch.Tensor, device: torch.device, length: int) -> bool:
    """The conditions of ``check_vector(name, tensor, device, length)``, for the hot path (may raise
    AttributeError on a non-tensor). False for a few tensors that check_vector accepts (a 1-element one with
    another stride): those take the full check."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dtype in INDEX_DTYPES
        and tensor.stride() == _UNIT_STRIDE
        and tensor.numel() == length
        and tensor.device == device
    )


def _out_ok(tensor: torch.Tensor, device: torch.device, min_len: int) -> bool:
    """The conditions of ``check_out``, for the hot path."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dtype in INDEX_DTYPES
        and tensor.stride() == _UNIT_STRIDE
        and tensor.numel() >= min_len
        and tensor.device == device
    )


def _launch_grid(num_tiles: int, device: torch.device, persistent: bool | None) -> tuple[int]:
    if persistent is None:  # (a bool otherwise: the public calls check it first, whatever the batch)
        persistent = backend.prefers_persistent_grid(device)
    if persistent:
        return (max(1, min(num_tiles, backend.num_cores(device))),)
    return (num_tiles,)


@functools.cache
def _window_constexprs(
    window_len: int | None,
    npu: bool = False,
    ragged_class: int = 0,
    block_n: int = 0,
    pdl: int = 0,
    sums: bool = False,
) -> tuple[tuple[str, object], ...]:
    """Constexprs of the window kernels: requests per program, window columns per gather step, earlier requests
    (``sums``: earlier tiles' sums) summed per step, uniform or not, first column block read during the sum or not,
    first block of earlier windows read with the tile's own offsets or not (never on Ascend, where it took the ragged
    kernels' on-chip buffer from 100.5 to 140.5 KiB; not measured there). Ragged windows off Ascend: ``ragged_class``
    indexes _RAGGED_CLASSES (``sums``: the second of two launches, _RAGGED_SUMS_CLASS) and ``block_n`` is one of its
    blocks, by the mean window (``_ragged_shape``; 0: the narrowest)."""
    scan_block = _SCAN_BLOCK // _NPU_SHRINK if npu else _SCAN_BLOCK
    prefetch = early_sum = False
    if window_len is None:
        if npu:
            tile = _NPU_RAGGED_TILE
            block_n = _NPU_RAGGED_BLOCK_N
        else:
            launch = _RAGGED_SUMS_CLASS if sums else _RAGGED_CLASSES[ragged_class]
            prefetch, early_sum = launch.prefetch, launch.early_sum
            scan_block = min(launch.scan_block, scan_block)
            block_n = block_n or launch.blocks[0]
            tile = launch.tiles[launch.blocks.index(block_n)]
    else:
        block_n = max(tiles.block_n(window_len), _NPU_MIN_BLOCK_N) if npu else tiles.block_n(window_len)
        tile = max(_GATHER_ELEMENTS // block_n, 16)
    return (
        ("TILE", tile),
        ("BLOCK_N", block_n),
        ("SCAN_BLOCK", scan_block),
        ("UNIFORM", window_len is not None),
        ("PREFETCH", prefetch),
        ("EARLY_SUM", early_sum),
        ("PDL", pdl),
    )


def _ragged_shape(bs: int, num_tokens: int, sums: bool = False) -> tuple[int, int]:
    """(class, column block) of a ragged launch off Ascend: the first of _RAGGED_CLASSES that holds ``bs``, and the
    widest of its blocks up to sqrt(2) times ``span`` mean windows (the narrowest if none is): ``span`` mean windows
    rounded to the nearest power of two. With a span of 2, windows drawn from ``[0, 2N]`` then take a block of 2N
    columns whether their mean comes out a little above N or a little below: rounding up to the next power of two
    took 0.1-0.6 us more at 1024-4096 requests, and a block of N columns a second gather step (H200,
    docs/performance.md). ``sums``: the block of _RAGGED_SUMS_CLASS (the class index is then unused)."""
    ragged_class = 0
    while _RAGGED_CLASSES[ragged_class].max_batch is not None and bs > _RAGGED_CLASSES[ragged_class].max_batch:
        ragged_class += 1
    launch = _RAGGED_SUMS_CLASS if sums else _RAGGED_CLASSES[ragged_class]
    block = launch.blocks[0]
    for wider in launch.blocks[1:]:
        if (wider * bs) ** 2 <= 2 * (launch.span * num_tokens) ** 2:  # wider <= sqrt(2) * span * num_tokens / bs
            block = wider
    return ragged_class, block


def _table_dims(req_to_token: torch.Tensor) -> tuple[int, int, int]:
    """(num_rows, max_context_len, row_stride) as the kernels take them."""
    num_rows, max_context_len = req_to_token.shape
    return num_rows, max_context_len, req_to_token.stride()[0]


def _raise_first_violation(checks: list[tuple[torch.Tensor, Callable[[int], str]]]) -> None:
    """Raise ValueError for the first check that has a violation; one device→host copy when all pass.

    Each check is ``(bad, describe)``: ``bad`` a boolean tensor (per request, or 0-d), ``describe(i)`` the
    message for the first bad request ``i``.
    """
    flags = torch.stack([bad.any() for bad, _ in checks]).tolist()
    for flagged, (bad, describe) in zip(flags, checks):
        if flagged:
            raise ValueError(describe(int(bad.reshape(-1).nonzero()[0, 0])))


def _row_check(req_pool_indices: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, Callable[[int], str]]:
    def describe(i: int) -> str:
        row = int(req_pool_indices[i])
        return f"req_pool_indices[{i}] must be in [0, {num_rows}) (rows of req_to_token), got {row}"

    return (req_pool_indices < 0) | (req_pool_indices >= num_rows), describe


def _validate_windows(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    num_tokens: int,
    window_len: int | None,
    end_name: Callable[[int], str] = lambda i: f"end_offset[{i}]",
) -> None:
    """Raise ValueError for the first bad value; ``end_name(i)`` names the end of window ``i`` in the message (the
    caller's ``start_offset[i] + window_len`` where it passed no ``end_offset``)."""
    max_context_len = req_to_token.shape[1]
    lengths = end_offset.long() - start_offset.long()
    checks = [
        _row_check(req_pool_indices, req_to_token.shape[0]),
        (start_offset < 0, lambda i: f"start_offset[{i}] must be >= 0, got {int(start_offset[i])}"),
        (
            lengths < 0,
            lambda i: f"{end_name(i)} must be >= start_offset[{i}] = {int(start_offset[i])}, got {int(end_offset[i])}",
        ),
        (
            end_offset > max_context_len,
            lambda i: f"{end_name(i)} must be <= max_context_len = {max_context_len}, got {int(end_offset[i])}",
        ),
    ]
    if window_len is not None:  # (before the total: with window_len, num_tokens may be its default, bs * window_len)
        checks.append(
            (
                lengths != window_len,
                lambda i: (
                    f"{end_name(i)} - start_offset[{i}] must equal window_len = {window_len}, got {int(lengths[i])}"
                ),
            )
        )
    checks.append(
        (
            lengths.clamp(min=0).sum() > num_tokens,
            lambda _: (
                f"the windows must hold at most num_tokens = {num_tokens} tokens, got {int(lengths.clamp(min=0).sum())}"
            ),
        )
    )
    _raise_first_violation(checks)


def get_last_loc(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    last_loc: torch.Tensor | None = None,
    validate: bool = False,
    persistent: bool | None = None,
) -> torch.Tensor:
    """Slot of each request's last committed token: ``req_to_token[req_pool_indices, prefix_lens - 1]``.

    Args:
        req_to_token: ``[max_requests, max_context_len]`` int32/int64, unit stride along positions.
        req_pool_indices: ``[bs]`` int32/int64, the table row of each request.
        prefix_lens: ``[bs]`` int32/int64, committed tokens of each request.
        last_loc: optional ``[bs]`` int32/int64 output buffer.
        validate: also check values (rows in range, ``0 <= prefix_lens <= max_context_len``) and that a given
            ``last_loc`` shares no memory with the inputs; costs one device→host sync.
        persistent: one program per core looping over tiles (default: only on Ascend).

    Returns:
        ``last_loc`` (``prefix_lens.dtype`` unless given): the slot, or -1 where ``prefix_lens <= 0``.
    """
    if validate is not False and validate is not True:
        check_flag("validate", validate)
    if persistent is not None:
        check_optional_flag("persistent", persistent)
    try:  # Hot path: every metadata condition in one expression.
        device = req_to_token.device
        bs = req_pool_indices.numel()
        ok = (
            _table_ok(req_to_token)
            and bs < INT32_LIMIT
            and _vector_ok(req_pool_indices, device, bs)
            and _vector_ok(prefix_lens, device, bs)
            and (last_loc is None or _vector_ok(last_loc, device, bs))
        )
    except (AttributeError, TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:  # The same checks one by one: raise with the words of the first that fails.
        check_table(req_to_token)
        device = req_to_token.device
        check_vector("req_pool_indices", req_pool_indices, device, None)
        bs = _batch_size(req_pool_indices)
        check_vector("prefix_lens", prefix_lens, device, bs)
        if last_loc is not None:
            check_vector("last_loc", last_loc, device, bs)
    if backend.is_npu(device):
        check_npu_dtypes({"req_pool_indices": req_pool_indices, "prefix_lens": prefix_lens, "last_loc": last_loc})
    if last_loc is None:
        last_loc = torch.empty(bs, dtype=prefix_lens.dtype, device=device)
    elif validate:  # (as the window ops check their buffers)
        inputs = {"req_to_token": req_to_token, "req_pool_indices": req_pool_indices, "prefix_lens": prefix_lens}
        check_disjoint({"last_loc": last_loc}, inputs)
    if validate and bs:
        backend.check_device(device, _ON_DEVICE)  # (the checks read values: not on a device that holds none, meta)
        max_context_len = req_to_token.shape[1]
        _raise_first_violation(
            [
                _row_check(req_pool_indices, req_to_token.shape[0]),
                (
                    (prefix_lens < 0) | (prefix_lens > max_context_len),
                    lambda i: (
                        f"prefix_lens[{i}] must be in [0, {max_context_len}] (max_context_len), "
                        f"got {int(prefix_lens[i])}"
                    ),
                ),
            ]
        )
    if bs == 0:
        return last_loc
    num_tiles = (bs + _LAST_LOC_TILE - 1) // _LAST_LOC_TILE
    backend.launch(
        backend.kernels("cache_locs", device, _ON_DEVICE)._get_last_loc_kernel,
        _launch_grid(num_tiles, device, persistent),
        device,
        (req_to_token, req_pool_indices, prefix_lens, last_loc),
        (bs, *_table_dims(req_to_token)),
        (("TILE", _LAST_LOC_TILE), ("PDL", backend.pdl_level(device, bs <= _NEXT_EARLY_MAX_BATCH))),
        _NUM_WARPS,
    )
    return last_loc


def _prepare_windows(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor | None,
    out_cache_loc: torch.Tensor | None,
    last_loc: torch.Tensor | None,
    num_tokens: int | None,
    window_len: int | None,
    validate: bool,
    check_buffers: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int, int | None, int, torch.device]:
    """Check the window arguments; syncs only when it must. Given output buffers are checked to share no memory
    with the inputs or each other with ``validate`` or ``check_buffers`` (a few us: CacheLocsWrapper.plan's, not a
    plain call's).

    Returns ``(out_cache_loc, end_offset, num_tokens, window_len, bs, device)``, the counts as Python ints;
    ``end_offset`` is ``start_offset`` when the caller passed ``None`` with ``window_len`` (the uniform kernels
    never read it).
    """
    if validate is not False and validate is not True:
        check_flag("validate", validate)
    no_end = end_offset is None
    buffers = out_cache_loc is not None or last_loc is not None
    if no_end and window_len is not None:
        end_offset = start_offset
    try:  # Hot path: every metadata condition in one expression.
        device = req_to_token.device
        bs = req_pool_indices.numel()
        ok = (
            _table_ok(req_to_token)
            and bs < INT32_LIMIT
            and _vector_ok(req_pool_indices, device, bs)
            and _vector_ok(start_offset, device, bs)
            and _vector_ok(end_offset, device, bs)
            and (last_loc is None or _vector_ok(last_loc, device, bs))
        )
    except (AttributeError, TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:  # The same checks one by one: raise with the words of the first that fails.
        check_table(req_to_token)
        device = req_to_token.device
        check_vector("req_pool_indices", req_pool_indices, device, None)
        bs = _batch_size(req_pool_indices)
        check_vector("start_offset", start_offset, device, bs)
        if end_offset is None:
            raise TypeError("end_offset must be a torch.Tensor (it may be None only with window_len), got NoneType")
        check_vector("end_offset", end_offset, device, bs)
        if last_loc is not None:
            check_vector("last_loc", last_loc, device, bs)
    if backend.is_npu(device):
        given = {"req_pool_indices": req_pool_indices, "start_offset": start_offset, "end_offset": end_offset}
        check_npu_dtypes({**given, "out_cache_loc": out_cache_loc, "last_loc": last_loc})
    num_tokens = check_count("num_tokens", num_tokens)
    window_len = check_count("window_len", window_len)
    if window_len is not None:
        if bs * window_len >= INT32_LIMIT:
            raise ValueError(f"bs * window_len must be below 2**31, got {bs} * {window_len}")
        if num_tokens is None:
            num_tokens = bs * window_len
        elif num_tokens < bs * window_len:
            raise ValueError(f"num_tokens must be at least bs * window_len = {bs * window_len}, got {num_tokens}")
    if num_tokens is None or validate:  # (reads values: not on a device that holds none, such as meta)
        backend.check_device(device, _ON_DEVICE)
    if num_tokens is None:
        # The one device→host sync of a call without num_tokens: the output's size.
        num_tokens = int((end_offset.long() - start_offset.long()).clamp_(min=0).sum()) if bs else 0
        check_count("num_tokens (sum of end_offset - start_offset)", num_tokens)
    if out_cache_loc is None:
        out_cache_loc = torch.empty(num_tokens, dtype=torch.int64, device=device)
    else:
        try:
            ok = _out_ok(out_cache_loc, device, num_tokens)
        except (AttributeError, TypeError, ValueError, RuntimeError):  # not a tensor: check_out names it
            ok = False
        if not ok:
            check_out("out_cache_loc", out_cache_loc, device, num_tokens)
    if buffers and (validate or check_buffers):
        outputs = {"out_cache_loc": out_cache_loc}
        if last_loc is not None:
            outputs["last_loc"] = last_loc
        inputs = {"req_to_token": req_to_token, "req_pool_indices": req_pool_indices, "start_offset": start_offset}
        if not no_end:
            inputs["end_offset"] = end_offset
        check_disjoint(outputs, inputs)
    if validate and bs:
        if no_end:
            ends, end_name = start_offset.long() + window_len, lambda i: f"start_offset[{i}] + window_len"
            _validate_windows(req_to_token, req_pool_indices, start_offset, ends, num_tokens, window_len, end_name)
        else:  # (a given end_offset is checked, even the start tensor itself)
            _validate_windows(req_to_token, req_pool_indices, start_offset, end_offset, num_tokens, window_len)
    return out_cache_loc, end_offset, num_tokens, window_len, bs, device


def _ragged_may_take_two_launches(bs: int, window_len: int | None, device: torch.device) -> bool:
    """Whether ragged windows of this batch take two launches where a call is captured or interpreted: past
    ``_RAGGED_ONE_LAUNCH_MAX_BATCH`` requests, off Ascend."""
    return window_len is None and bs > _RAGGED_ONE_LAUNCH_MAX_BATCH and not backend.is_npu(device)


def _ragged_in_two_launches(bs: int, window_len: int | None, device: torch.device) -> bool:
    """Whether this call takes two launches: ``_ragged_may_take_two_launches``, and in a graph or through the
    interpreter (where there is no device time to weigh against the host's second launch)."""
    if not _ragged_may_take_two_launches(bs, window_len, device):
        return False
    return backend.is_interpreted(device) or backend.is_capturing(device)


class _TwoLaunches:
    """The two prepared launches of ragged windows in two (the tile sums, then the gather), called as one."""

    __slots__ = ("first", "second")

    def __init__(self, first: backend.Launch, second: backend.Launch) -> None:
        self.first, self.second = first, second

    def __call__(self) -> None:
        self.first()
        self.second()


def _launch_windows(
    with_last_loc: bool,
    device: torch.device,
    tensors: tuple[torch.Tensor, ...],
    req_to_token: torch.Tensor,
    bs: int,
    num_tokens: int,
    window_len: int | None,
    persistent: bool | None,
    prepare: bool = False,
    tile_sums: torch.Tensor | None = None,
    keep: bool = False,
) -> backend.Launch | backend.KeptLaunch | _TwoLaunches | None:
    """Launch the window kernel (``with_last_loc``: the fused one); with ``tile_sums`` (int32, at least one element a
    tile of _RAGGED_SUMS_CLASS), ragged windows in two launches, the first writing those sums. ``prepare=True``:
    return the launch(es), made by calling it (``backend.prepare``); ``keep=True`` (one launch): launch, and return
    the launch kept (``backend.launch_and_keep``)."""
    npu = backend.is_npu(device)
    pdl = backend.pdl_level(device, bs <= _NEXT_EARLY_MAX_BATCH)
    kernels = backend.kernels("cache_locs", device, _ON_DEVICE)
    run = backend.prepare if prepare else backend.launch_and_keep if keep else backend.launch
    scalars = (bs, *_table_dims(req_to_token), num_tokens, window_len or 0)
    if tile_sums is not None:
        constexprs = _window_constexprs(None, False, *_ragged_shape(bs, num_tokens, sums=True), pdl, True)
        tile = constexprs[0][1]
        grid = _launch_grid((bs + tile - 1) // tile, device, persistent)
        first = run(
            kernels._window_tile_sums_kernel,
            grid,
            device,
            (tensors[2], tensors[3], tile_sums),
            (bs,),
            (("TILE", tile), ("PDL", pdl)),
            _TILE_SUMS_NUM_WARPS,
        )
        kernel = (
            kernels._get_last_loc_and_assign_extend_cache_locs_from_sums_kernel
            if with_last_loc
            else kernels._assign_extend_cache_locs_from_sums_kernel
        )
        second = run(kernel, grid, device, (*tensors, tile_sums), scalars, constexprs, _NUM_WARPS)
        return _TwoLaunches(first, second) if prepare else None
    if window_len is None and not npu:
        constexprs = _window_constexprs(None, False, *_ragged_shape(bs, num_tokens), pdl)
    else:
        constexprs = _window_constexprs(window_len, npu, pdl=pdl)
    tile = constexprs[0][1]
    kernel = (
        kernels._get_last_loc_and_assign_extend_cache_locs_kernel
        if with_last_loc
        else kernels._assign_extend_cache_locs_kernel
    )
    return run(
        kernel,
        _launch_grid((bs + tile - 1) // tile, device, persistent),
        device,
        tensors,
        scalars,
        constexprs,
        _NUM_WARPS,
    )


def _recent_key(
    with_last_loc: bool,
    tensors: tuple[torch.Tensor | None, ...],
    num_tokens: int | None,
    window_len: int | None,
    validate: bool,
    persistent: bool | None,
) -> tuple | None:
    """The key under which a call of a window op is kept (``_recent_calls``): the identities of its ``tensors``
    (table, rows, start and end offsets, output buffers, as the kernel takes them: the start tensor in place of an
    end_offset of None with ``window_len``) and its other arguments. None for calls that are not kept: all but the
    hot path's (``validate=False``, every tensor and buffer given, the counts as ints, and ``num_tokens`` or
    ``window_len``: no sync)."""
    if (
        validate is False
        and tensors[3] is not None
        and tensors[4] is not None
        and tensors[-1] is not None
        and (type(num_tokens) is int or (num_tokens is None and type(window_len) is int))
        and (window_len is None or type(window_len) is int)
        and (persistent is None or persistent is True or persistent is False)
    ):
        return (with_last_loc, num_tokens, window_len, persistent, *map(id, tensors))
    return None


def _remember_call(key: tuple, tensors: tuple[torch.Tensor, ...], launch: backend.KeptLaunch, count: int) -> None:
    """Keep the launch of a call under ``key``, with its tensors' facts and the elements of ``out_cache_loc`` it
    returns (``count``, -1: all)."""
    remember(_recent_calls, key, (tensor_facts(tensors), launch, count), _MAX_RECENT_CALLS)


def _run_recent(key: tuple | None, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """Launch the call kept under ``key`` (``_recent_key``) if ``tensors`` have the facts its tensors had; returns
    the ``out_cache_loc`` the call returns, or None (no key, not kept, or not those facts: the caller checks)."""
    if key is None:
        return None
    kept = _recent_calls.get(key)
    if kept is None:
        return None
    try:
        facts = tensor_facts(tensors)
    except (TypeError, RuntimeError):
        return None
    if facts != kept[0]:
        _recent_calls.pop(key, None)  # (then this key is kept again only from two calls with the same tensors)
        return None
    kept[1](tensors)
    out, count = tensors[4], kept[2]
    return out if count < 0 else out[:count]


def _keep_call(
    key: tuple | None, tensors: tuple[torch.Tensor, ...], bs: int, window_len: int | None, device: torch.device
) -> bool:
    """Whether a call whose checks passed keeps its launch under ``key`` (``_recent_calls``): when a call under
    ``key`` waits in ``_seen_calls``, which holds its tensors but the table, so that these are the very same (new
    tensors each call take the ids of the last call's once those are freed: a key alone would keep at every other
    call), with one launch whatever the stream (not ``_ragged_may_take_two_launches``) and no empty tensor
    (``tensor_facts``). Otherwise the call waits there: calls given new tensors each time pay for their key and that."""
    if key is None or not bs or _ragged_may_take_two_launches(bs, window_len, device):
        return False
    if _seen_calls.pop(key, None) is None:
        remember(_seen_calls, key, tensors[1:], _MAX_SEEN_CALLS)
        return False
    return all(t.numel() for t in tensors)


def _new_tile_sums(bs: int, device: torch.device) -> torch.Tensor:
    """Scratch for the tile sums of ragged windows in two launches (its first launch writes every element it reads)."""
    return torch.empty(-(-bs // min(_RAGGED_SUMS_CLASS.tiles)), dtype=torch.int32, device=device)


def assign_extend_cache_locs(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor | None = None,
    *,
    num_tokens: int | None = None,
    window_len: int | None = None,
    validate: bool = False,
    persistent: bool | None = None,
) -> torch.Tensor:
    """Pack the slots of every request's window ``[start_offset, end_offset)`` into one vector.

    ``out_cache_loc[excl_i + j] = req_to_token[req_pool_indices[i], start_offset[i] + j]`` for
    ``0 <= j < end_offset[i] - start_offset[i]``, where ``excl_i`` is the exclusive prefix sum of the window
    lengths in batch order. The prefix sum is exact integer arithmetic done on the device, in one launch.

    Args:
        req_to_token: ``[max_requests, max_context_len]`` int32/int64, unit stride along positions
            (any row stride, e.g. a column slice of a wider table).
        req_pool_indices: ``[bs]`` int32/int64 table rows; duplicates allowed.
        start_offset: ``[bs]`` int32/int64, first position of each window.
        end_offset: ``[bs]`` int32/int64, one past the last position of each window; may be ``None`` with
            ``window_len`` (it is not read then).
        out_cache_loc: optional int32/int64 buffer of at least ``num_tokens`` elements; elements past
            ``num_tokens``, and past the windows' total, are left untouched (so, without a buffer, the elements
            of the result past the windows' total are uninitialised memory). Output buffers must not share memory
            with the inputs or with each other (the kernel reads other requests' offsets while it writes):
            ``validate=True`` and :meth:`CacheLocsWrapper.plan` check it (a few us a call, so not on the hot path).
        num_tokens: elements of ``out_cache_loc`` the call may write, at least the windows' total.
            ``None`` sizes the output from the offsets, which costs one device→host sync (and so
            cannot be captured in a CUDA graph); pass it on the hot path.
        window_len: promise that every window has this length: offsets are ``i * window_len``, no scan,
            ``end_offset`` is not read, and ``num_tokens`` defaults to ``bs * window_len`` (no sync).
            ``num_tokens`` and ``window_len`` may be any ``numbers.Integral`` (e.g. ``numpy.int64``).
        validate: also check values (rows in range, ``0 <= start <= end <= max_context_len``, total
            within ``num_tokens``, the ``window_len`` promise) and that the output buffers share no memory with
            the inputs; costs one device→host sync.
        persistent: one program per core looping over tiles (default: on Ascend only).

    Returns:
        ``out_cache_loc[:num_tokens]``: int64 unless the caller passed ``out_cache_loc``.
    """
    if persistent is not None:
        check_optional_flag("persistent", persistent)
    end = start_offset if end_offset is None and window_len is not None else end_offset
    tensors = (req_to_token, req_pool_indices, start_offset, end, out_cache_loc)
    key = _recent_key(False, tensors, num_tokens, window_len, validate, persistent)
    kept = _run_recent(key, tensors)
    if kept is not None:
        return kept
    out_cache_loc, end_offset, num_tokens, window_len, bs, device = _prepare_windows(
        req_to_token, req_pool_indices, start_offset, end_offset, out_cache_loc, None, num_tokens, window_len, validate
    )
    whole = out_cache_loc.numel() == num_tokens
    if bs:
        keep = _keep_call(key, tensors, bs, window_len, device)
        launch = _launch_windows(
            False,
            device,
            (req_to_token, req_pool_indices, start_offset, end_offset, out_cache_loc),
            req_to_token,
            bs,
            num_tokens,
            window_len,
            persistent,
            tile_sums=_new_tile_sums(bs, device) if _ragged_in_two_launches(bs, window_len, device) else None,
            keep=keep,
        )
        if keep:
            _remember_call(key, tensors, launch, -1 if whole else num_tokens)
    return out_cache_loc if whole else out_cache_loc[:num_tokens]


def get_last_loc_and_assign_extend_cache_locs(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor | None = None,
    last_loc: torch.Tensor | None = None,
    *,
    num_tokens: int | None = None,
    window_len: int | None = None,
    validate: bool = False,
    persistent: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``assign_extend_cache_locs`` and ``get_last_loc(..., start_offset)`` in one kernel launch.

    Arguments are those of :func:`assign_extend_cache_locs`, plus ``last_loc``: an optional ``[bs]``
    int32/int64 buffer. ``last_loc[i] = req_to_token[req_pool_indices[i], start_offset[i] - 1]``, or -1
    where ``start_offset[i] == 0`` (a paged allocator continues that slot's page).

    Returns:
        ``(out_cache_loc[:num_tokens], last_loc)``; ``last_loc`` has ``start_offset.dtype`` unless given.
    """
    if persistent is not None:
        check_optional_flag("persistent", persistent)
    end = start_offset if end_offset is None and window_len is not None else end_offset
    tensors = (req_to_token, req_pool_indices, start_offset, end, out_cache_loc, last_loc)
    key = _recent_key(True, tensors, num_tokens, window_len, validate, persistent)
    kept = _run_recent(key, tensors)
    if kept is not None:
        return kept, last_loc
    out_cache_loc, end_offset, num_tokens, window_len, bs, device = _prepare_windows(
        req_to_token,
        req_pool_indices,
        start_offset,
        end_offset,
        out_cache_loc,
        last_loc,
        num_tokens,
        window_len,
        validate,
    )
    if last_loc is None:
        last_loc = torch.empty(bs, dtype=start_offset.dtype, device=device)
    whole = out_cache_loc.numel() == num_tokens
    if bs:
        keep = _keep_call(key, tensors, bs, window_len, device)
        launch = _launch_windows(
            True,
            device,
            (req_to_token, req_pool_indices, start_offset, end_offset, out_cache_loc, last_loc),
            req_to_token,
            bs,
            num_tokens,
            window_len,
            persistent,
            tile_sums=_new_tile_sums(bs, device) if _ragged_in_two_launches(bs, window_len, device) else None,
            keep=keep,
        )
        if keep:
            _remember_call(key, tensors, launch, -1 if whole else num_tokens)
    return (out_cache_loc if whole else out_cache_loc[:num_tokens]), last_loc


class CacheLocsWrapper:
    """:func:`get_last_loc_and_assign_extend_cache_locs` (or, ``with_last_loc=False``, :func:`assign_extend_cache_locs`)
    as plan/run, for an engine's eager loop (FlashInfer's wrappers are the model).

    :meth:`plan` takes the function's arguments once, makes every check the function makes (the same errors),
    allocates the outputs it is not given and resolves the launch. :meth:`run` then launches on the current values
    of the tensors it was given, like replaying a CUDA graph: write each step's rows and offsets into them in place.
    ``run`` re-checks only that each tensor (the table included) is still where plan() saw it, with the same
    shape, dtype and strides (about 0.3 us a tensor); if one moved (``set_``, ``.data =``, a reallocating ``resize_``)
    or changed shape, dtype or strides, it plans again with the same arguments, which raises what the function would
    raise or goes on with the new tensors. Values are read on the device as by the function (``validate=False``: bad
    values give wrong slots, never an access outside the tensors). A plan() that raises changes nothing: the previous
    plan, if any, stays in force.

    Example::

        wrapper = CacheLocsWrapper(req_to_token)
        wrapper.plan(req_pool_indices, start_offset, out_cache_loc=out, last_loc=last, window_len=N)
        for step in steps:
            req_pool_indices.copy_(step.rows); start_offset.copy_(step.seq_lens)  # in place
            out_cache_loc, last_loc = wrapper.run()

    Args:
        req_to_token: ``[max_requests, max_context_len]`` int32/int64 table (checked by :meth:`plan`).
        with_last_loc: ``True``: run returns ``(out_cache_loc, last_loc)`` from the fused kernel; ``False``: only
            ``out_cache_loc``, as :func:`assign_extend_cache_locs` (plan then takes no ``last_loc``).
    """

    def __init__(self, req_to_token: torch.Tensor, *, with_last_loc: bool = True) -> None:
        check_flag("with_last_loc", with_last_loc)
        self._req_to_token = req_to_token
        self._with_last_loc = with_last_loc
        self._bound = UNPLANNED
        self._plan_args: dict = {}
        self._replan_each_run = False
        self._launch: backend.Launch | None = None
        self._two_launches: _TwoLaunches | None = None
        self._bs, self._device = 0, None
        self._result = None

    def plan(
        self,
        req_pool_indices: torch.Tensor,
        start_offset: torch.Tensor,
        end_offset: torch.Tensor | None = None,
        out_cache_loc: torch.Tensor | None = None,
        last_loc: torch.Tensor | None = None,
        *,
        num_tokens: int | None = None,
        window_len: int | None = None,
        validate: bool = False,
        persistent: bool | None = None,
    ) -> None:
        """Check the arguments and resolve the launch; arguments as for
        :func:`get_last_loc_and_assign_extend_cache_locs` (``end_offset`` may be ``None`` with ``window_len``).

        Without ``num_tokens`` and ``window_len``, and with ``validate=True``, every :meth:`run` plans again (the
        function's one sync, to size the output or check the values): pass ``num_tokens`` on the hot path.
        """
        if last_loc is not None and not self._with_last_loc:
            raise ValueError("last_loc is given but the wrapper was made with with_last_loc=False")
        if persistent is not None:
            check_optional_flag("persistent", persistent)
        req_to_token = self._req_to_token
        out, end, count, window, bs, device = _prepare_windows(
            req_to_token,
            req_pool_indices,
            start_offset,
            end_offset,
            out_cache_loc,
            last_loc,
            num_tokens,
            window_len,
            validate,
            check_buffers=True,
        )
        made_out = out_cache_loc is None
        last = None
        if self._with_last_loc:
            last = torch.empty(bs, dtype=start_offset.dtype, device=device) if last_loc is None else last_loc
        # The buffers made here move into one allocation before anything views them or launches on them (not where
        # every run plans again and makes new ones: no run re-checks them).
        replan_each_run = validate or (num_tokens is None and window_len is None)
        arena = None
        if not replan_each_run:
            arena = share_one_allocation([out if made_out else None, last if last_loc is None else None])
        tensors = (req_to_token, req_pool_indices, start_offset, end, out)
        if self._with_last_loc:
            tensors += (last,)
        launch = two_launches = None
        if bs:
            args = (self._with_last_loc, device, tensors, req_to_token, bs, count, window, persistent, True)
            launch = _launch_windows(*args)
            # Ragged windows past one launch's batches: both forms, run() picks by whether it is captured (a graph
            # may capture a wrapper planned eagerly). The scratch stays the plan's.
            if _ragged_may_take_two_launches(bs, window, device):
                two_launches = _launch_windows(*args, tile_sums=_new_tile_sums(bs, device))
        # The buffers plan() makes are its own: handed out as views only, so only their address is re-checked (a
        # view can move or free their storage, nothing else of them: see DraftStepWrapper), one address for both.
        result = out if out.numel() == count and not made_out else out[:count]
        # Checked: now the plan. end_offset None (uniform windows) is the start tensor, bound once.
        given = tensors[:3] + ((end,) if end is not start_offset else ()) + (() if made_out else (out,))
        owned = () if not made_out else (out,)
        if self._with_last_loc:
            given, owned = (given, owned + (last,)) if last_loc is None else (given + (last,), owned)
            last = last if last_loc is not None else last[:]
        self._bound = BoundTensors(given, owned if arena is None else (arena,))
        self._plan_args = dict(
            req_pool_indices=req_pool_indices,
            start_offset=start_offset,
            end_offset=end_offset,
            out_cache_loc=out_cache_loc,
            last_loc=last_loc,
            num_tokens=num_tokens,
            window_len=window_len,
            validate=validate,
            persistent=persistent,
        )
        self._replan_each_run = replan_each_run
        self._launch = launch
        self._two_launches = two_launches
        self._bs, self._device = bs, device
        self._result = (result, last) if self._with_last_loc else result

    def run(self) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Launch on the bound tensors' current values.

        Returns:
            What the function returns: ``(out_cache_loc[:num_tokens], last_loc)``, or ``out_cache_loc[:num_tokens]``
            with ``with_last_loc=False``; the same tensors every run (the buffers plan() was given, or views of those
            it made: change their values, not what they are, as a ``set_`` reaches only the view), except
            where every run plans again (``validate=True``, or neither ``num_tokens`` nor ``window_len``) and
            plan() made the buffers: then each run makes new ones, as the function does.
        """
        if self._bound.changed() or self._replan_each_run:
            self.plan(**self._plan_args)
        launch = self._launch
        if self._two_launches is not None and _ragged_in_two_launches(self._bs, None, self._device):
            launch = self._two_launches
        if launch is not None:
            launch()
        return self._result
