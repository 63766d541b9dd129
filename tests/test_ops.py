"""Exact tests of get_last_loc, assign_extend_cache_locs and the fused op, on CPU (interpreter) and CUDA.

Each op is checked three ways: against ``specdec_ops.reference``, against the Python loop below, and
the fused op against the two components composed.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from unittest import mock

import pytest
import torch
from conftest import DEVICES, SENTINEL, device_index_dtype, examples, sentinel_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec_ops
from specdec_ops import backend, ops
from specdec_ops.reference import (
    assign_extend_cache_locs_torch,
    get_last_loc_and_assign_extend_cache_locs_torch,
    get_last_loc_torch,
)

# Output elements past the windows' total that must stay untouched.
TAIL = 5


@dataclasses.dataclass
class Batch:
    req_to_token: torch.Tensor
    req_pool_indices: torch.Tensor
    start_offset: torch.Tensor
    end_offset: torch.Tensor
    window_len: int | None  # set when every window has this length

    @property
    def num_tokens(self) -> int:
        return int((self.end_offset - self.start_offset).sum())


def make_batch(
    bs: int,
    lengths: str,
    n: int,
    *,
    seed: int = 0,
    device: str = "cpu",
    table_dtype: torch.dtype = torch.int32,
    index_dtype: torch.dtype = torch.int64,
    offset_dtype: torch.dtype = torch.int64,
    padded_rows: bool = False,
    num_rows: int = 37,
    large_slots: bool = False,
) -> Batch:
    """A random batch: ``lengths`` is "uniform" (all n), "ragged" (0..2n, zeros included) or "zero".

    A quarter of the requests start at position 0; index and offset tensors are int64 on an NPU
    (``device_index_dtype``). ``padded_rows`` makes the table a column slice of a
    wider one (row stride > max_context_len); ``large_slots`` puts the slot values past 2**32.
    """
    gen = torch.Generator().manual_seed(seed)
    index_dtype, offset_dtype = device_index_dtype(index_dtype, device), device_index_dtype(offset_dtype, device)
    if lengths == "uniform":
        lens = torch.full((bs,), n)
    elif lengths == "ragged":
        lens = torch.randint(0, 2 * n + 1, (bs,), generator=gen)
        lens[::5] = 0
    else:
        lens = torch.zeros(bs, dtype=torch.int64)
    max_len = int(lens.max()) if bs else 0
    max_context_len = max_len + 40
    starts = torch.randint(0, max_context_len - max_len + 1, (bs,), generator=gen)
    starts[::4] = 0
    slots = torch.randperm(num_rows * max_context_len, generator=gen).reshape(num_rows, max_context_len) + 1
    if large_slots:
        slots += 2**32
    if padded_rows:
        wide = torch.full((num_rows, max_context_len + 11), -99, dtype=torch.int64)
        wide[:, 3 : 3 + max_context_len] = slots
        table = wide.to(table_dtype).to(device)[:, 3 : 3 + max_context_len]
    else:
        table = slots.to(table_dtype).to(device)
    return Batch(
        req_to_token=table,
        req_pool_indices=torch.randint(0, num_rows, (bs,), generator=gen).to(index_dtype).to(device),
        start_offset=starts.to(offset_dtype).to(device),
        end_offset=(starts + lens).to(offset_dtype).to(device),
        window_len=n if lengths == "uniform" else (0 if lengths == "zero" else None),
    )


def loop_reference(batch: Batch) -> tuple[list[int], list[int]]:
    """(out_cache_loc, last_loc) by a plain Python loop over requests."""
    table = batch.req_to_token.cpu().tolist()
    out_cache_loc, last_loc = [], []
    for row, start, end in zip(batch.req_pool_indices.tolist(), batch.start_offset.tolist(), batch.end_offset.tolist()):
        last_loc.append(table[row][start - 1] if start > 0 else -1)
        out_cache_loc.extend(table[row][start:end])
    return out_cache_loc, last_loc


def as_list(t: torch.Tensor) -> list[int]:
    return t.cpu().tolist()


def run_fused(batch: Batch, *, out_dtype=torch.int64, last_dtype=None, use_window_len=True, **kwargs):
    """The fused op on sentinel-filled buffers with a TAIL; returns (full out buffer, last_loc, num_tokens)."""
    n = batch.num_tokens
    device = batch.req_to_token.device
    out = sentinel_like(n + TAIL, out_dtype, device)
    last = sentinel_like(batch.req_pool_indices.numel(), last_dtype or batch.start_offset.dtype, device)
    got_out, got_last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        batch.req_to_token,
        batch.req_pool_indices,
        batch.start_offset,
        batch.end_offset,
        out,
        last,
        num_tokens=n,
        window_len=batch.window_len if use_window_len else None,
        **kwargs,
    )
    assert got_out.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() and got_out.numel() == n
    assert got_last is last
    return out, last, n


WINDOWS = [
    ("uniform", 1),
    ("uniform", 4),
    ("uniform", 70),  # more columns than one gather block
    ("ragged", 8),
    ("ragged", 40),  # windows up to 80: several 16-column blocks
    ("zero", 0),
]
BATCH_SIZES = [1, 2, 7, 33, 130, 300]
DTYPE_MIXES = list(itertools.product([torch.int32, torch.int64], repeat=3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths,n", WINDOWS, ids=[f"{k}{n}" for k, n in WINDOWS])
@pytest.mark.parametrize("bs", BATCH_SIZES, ids=[f"bs{b}" for b in BATCH_SIZES])
def test_fused_matches_reference_loop_and_components(device, bs, lengths, n):
    case = BATCH_SIZES.index(bs) + len(BATCH_SIZES) * [w[0] for w in WINDOWS].index(lengths)
    table_dtype, index_dtype, offset_dtype = DTYPE_MIXES[case % len(DTYPE_MIXES)]
    batch = make_batch(
        bs,
        lengths,
        n,
        seed=case,
        device=device,
        table_dtype=table_dtype,
        index_dtype=index_dtype,
        offset_dtype=offset_dtype,
        padded_rows=case % 2 == 1,
    )
    loop_out, loop_last = loop_reference(batch)
    ref_out, ref_last = get_last_loc_and_assign_extend_cache_locs_torch(
        batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset
    )
    assert as_list(ref_out) == loop_out and as_list(ref_last) == loop_last

    for use_window_len in (True, False):
        out, last, n_tok = run_fused(batch, use_window_len=use_window_len)
        assert torch.equal(out[:n_tok], ref_out)
        assert as_list(out[n_tok:]) == [SENTINEL] * TAIL
        assert torch.equal(last, ref_last)

    comp_last = specdec_ops.get_last_loc(batch.req_to_token, batch.req_pool_indices, batch.start_offset)
    comp_out = sentinel_like(n_tok + TAIL, torch.int64, device)
    specdec_ops.assign_extend_cache_locs(
        batch.req_to_token,
        batch.req_pool_indices,
        batch.start_offset,
        batch.end_offset,
        comp_out,
        num_tokens=n_tok,
    )
    assert torch.equal(comp_out, out)
    assert torch.equal(comp_last, last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "table_dtype,index_dtype,offset_dtype", DTYPE_MIXES, ids=lambda d: str(d).replace("torch.", "")
)
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int64], ids=["out32", "out64"])
def test_dtype_mixes(device, table_dtype, index_dtype, offset_dtype, out_dtype):
    if device == "npu" and torch.int32 in (index_dtype, offset_dtype, out_dtype):
        pytest.skip("an NPU takes int64 index tensors only (checks.check_npu_dtypes; tested on the CPU)")
    large = table_dtype == torch.int64 and out_dtype == torch.int64
    batch = make_batch(
        45,
        "ragged",
        6,
        seed=3,
        device=device,
        table_dtype=table_dtype,
        index_dtype=index_dtype,
        offset_dtype=offset_dtype,
        large_slots=large,
    )
    loop_out, loop_last = loop_reference(batch)
    out, last, n_tok = run_fused(batch, out_dtype=out_dtype, last_dtype=out_dtype)
    assert out.dtype == out_dtype and last.dtype == out_dtype
    assert as_list(out[:n_tok]) == loop_out
    assert as_list(last) == loop_last
    comp = specdec_ops.get_last_loc(batch.req_to_token, batch.req_pool_indices, batch.start_offset)
    assert comp.dtype == offset_dtype
    assert torch.equal(comp, torch.tensor(loop_last, device=device).to(offset_dtype))


def test_sglang_argument_order_is_refused_and_keywords_work_in_either_order():
    """README, "Where SGLang differs": SGLang's ``assign_extend_cache_locs`` takes the rows before the table; that
    order raises here, naming the table, and keyword arguments (SGLang's names) give the same result either way."""
    table = torch.arange(4 * 16).reshape(4, 16)
    rows, start = torch.tensor([2, 0]), torch.tensor([5, 1])
    end = start + 3
    with pytest.raises(ValueError, match="req_to_token must be 2-D"):
        specdec_ops.assign_extend_cache_locs(rows, table, start, end, num_tokens=6)
    by_keyword = specdec_ops.assign_extend_cache_locs(
        req_pool_indices=rows, req_to_token=table, start_offset=start, end_offset=end, num_tokens=6
    )
    assert by_keyword.tolist() == specdec_ops.assign_extend_cache_locs(table, rows, start, end, num_tokens=6).tolist()
    assert by_keyword.tolist() == [37, 38, 39, 1, 2, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_default_outputs_and_num_tokens_from_offsets(device):
    batch = make_batch(19, "ragged", 5, seed=11, device=device, offset_dtype=torch.int32)
    loop_out, loop_last = loop_reference(batch)
    out, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset
    )
    assert out.dtype == torch.int64 and last.dtype == device_index_dtype(torch.int32, device)
    assert as_list(out) == loop_out and as_list(last) == loop_last
    out2 = specdec_ops.assign_extend_cache_locs(
        batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset
    )
    assert out2.dtype == torch.int64 and as_list(out2) == loop_out


@pytest.mark.parametrize("device", DEVICES)
def test_window_len_defaults_num_tokens(device):
    batch = make_batch(9, "uniform", 3, seed=5, device=device)
    loop_out, loop_last = loop_reference(batch)
    out, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset, window_len=3
    )
    assert out.numel() == 27 and as_list(out) == loop_out and as_list(last) == loop_last


@pytest.mark.parametrize("device", DEVICES)
def test_num_tokens_larger_than_total_leaves_the_rest_untouched(device):
    """num_tokens is a capacity (e.g. a graph-captured buffer); elements past the total stay as they were."""
    batch = make_batch(13, "ragged", 4, seed=2, device=device)
    n = batch.num_tokens
    out = sentinel_like(n + 9, torch.int64, device)
    got = specdec_ops.assign_extend_cache_locs(
        batch.req_to_token,
        batch.req_pool_indices,
        batch.start_offset,
        batch.end_offset,
        out,
        num_tokens=n + 4,
        validate=True,
    )
    assert got.numel() == n + 4
    assert as_list(out[:n]) == loop_reference(batch)[0]
    assert as_list(out[n:]) == [SENTINEL] * 9


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_returns_empty_results(device):
    batch = make_batch(0, "zero", 0, device=device)
    out, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset
    )
    assert out.shape == (0,) and last.shape == (0,) and last.dtype == batch.start_offset.dtype
    buf = sentinel_like(4, torch.int32, device)
    got = specdec_ops.assign_extend_cache_locs(
        batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset, buf, validate=True
    )
    assert got.numel() == 0 and as_list(buf) == [SENTINEL] * 4
    assert specdec_ops.get_last_loc(batch.req_to_token, batch.req_pool_indices, batch.start_offset).numel() == 0


@pytest.fixture
def scan_block(monkeypatch):
    """``scan_block(n)``: the window kernels sum earlier requests n at a time, for this test only."""

    def set_scan_block(value: int) -> None:
        monkeypatch.setattr(ops, "_SCAN_BLOCK", value)
        ops._window_constexprs.cache_clear()

    yield set_scan_block
    monkeypatch.undo()
    ops._window_constexprs.cache_clear()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths,n", [("uniform", 4), ("ragged", 6)], ids=["uniform4", "ragged6"])
@pytest.mark.parametrize("cores", [1, 3], ids=["cores1", "cores3"])
@pytest.mark.parametrize("bs", [300, 1100], ids=["bs300", "bs1100"])  # ragged: read during the sums, or after
def test_persistent_grid_loops_over_tiles(device, lengths, n, cores, bs, monkeypatch, scan_block):
    """Fewer programs than tiles: each program carries its prefix from one of its tiles to the next."""
    monkeypatch.setattr(backend, "num_cores", lambda _device: cores)
    scan_block(64)  # several scan steps per earlier stretch
    assert dict(ops._window_constexprs(None, device == "npu", ops._ragged_shape(bs, 1)[0]))["SCAN_BLOCK"] == 64
    batch = make_batch(bs, lengths, n, seed=7, device=device)  # 5+ gather tiles, 1-2 last_loc tiles
    loop_out, loop_last = loop_reference(batch)
    out, last, n_tok = run_fused(batch, persistent=True)
    assert as_list(out[:n_tok]) == loop_out and as_list(last) == loop_last
    assert as_list(out[n_tok:]) == [SENTINEL] * TAIL
    comp = specdec_ops.get_last_loc(batch.req_to_token, batch.req_pool_indices, batch.start_offset, persistent=True)
    assert as_list(comp) == loop_last


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths,n", [("uniform", 4), ("uniform", 70), ("ragged", 8)], ids=["u4", "u70", "ragged8"])
@pytest.mark.parametrize("scan", [None, 64], ids=["npu_scan", "scan64"])
def test_ascend_launch_configs_give_the_same_slots(device, lengths, n, scan, monkeypatch, scan_block):
    """The launch configurations an NPU gets (its tiles, column blocks and scan block, a grid of one program per
    core looping over tiles, the sums of earlier windows all in the loop: no EARLY_SUM) run here through the
    interpreter, and on a GPU through Triton's compiler, and give the reference's slots: the compile check proves
    they compile for Ascend, this that they compute the same. With a scan block of 64 the sums take several steps."""
    monkeypatch.setattr(backend, "is_npu", lambda device: True)
    monkeypatch.setattr(backend, "num_cores", lambda device: 3)
    ops._window_constexprs.cache_clear()
    if scan is not None:
        scan_block(scan * ops._NPU_SHRINK)
    assert not dict(ops._window_constexprs(None, True))["EARLY_SUM"]
    try:
        batch = make_batch(700, lengths, n, seed=11, device=device)  # several NPU tiles per program
        loop_out, loop_last = loop_reference(batch)
        out, last, n_tok = run_fused(batch)
        assert as_list(out[:n_tok]) == loop_out and as_list(last) == loop_last
        assert as_list(out[n_tok:]) == [SENTINEL] * TAIL
        last_only = specdec_ops.get_last_loc(batch.req_to_token, batch.req_pool_indices, batch.start_offset)
        assert as_list(last_only) == loop_last
    finally:
        ops._window_constexprs.cache_clear()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("persistent", [None, False], ids=["default", "grid"])
def test_scan_over_many_earlier_tiles(device, persistent, scan_block):
    """The last tiles sum the windows of thousands of earlier requests in several scan blocks."""
    scan_block(256)
    batch = make_batch(2600, "ragged", 3, seed=13, device=device, num_rows=400)
    loop_out, loop_last = loop_reference(batch)
    out, last, n_tok = run_fused(batch, persistent=persistent)
    assert as_list(out[:n_tok]) == loop_out and as_list(last) == loop_last


def test_ragged_launch_shape_follows_the_batch(monkeypatch):
    """Off Ascend, one program per tile: each class of _RAGGED_CLASSES holds the batch sizes up to its bound, and the
    column block is the one of the class's blocks nearest its span of mean windows (the narrowest below them); the
    classes up to 4096 requests read the first block of earlier windows early."""
    launches = []
    monkeypatch.setattr(
        backend,
        "launch",
        lambda _kernel, grid, _device, _t, _s, constexprs, *_: launches.append((grid[0], dict(constexprs))),
    )
    monkeypatch.setattr(ops, "_ragged_in_two_launches", lambda *_: False)  # (as an eager call on a device)
    bounds = [c.max_batch for c in ops._RAGGED_CLASSES if c.max_batch is not None]
    sizes = [1, *bounds, *[bound + 1 for bound in bounds]]
    for bs in sizes:
        batch = make_batch(bs, "uniform", 2)
        specdec_ops.get_last_loc_and_assign_extend_cache_locs(
            batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset, num_tokens=bs * 2
        )
    for bs, (grid, constexprs) in zip(sizes, launches):
        launch = next(c for c in ops._RAGGED_CLASSES if c.max_batch is None or bs <= c.max_batch)
        got = (grid, constexprs["TILE"], constexprs["SCAN_BLOCK"], constexprs["PREFETCH"], constexprs["EARLY_SUM"])
        tile = launch.tiles[0]
        assert got == (-(-bs // tile), tile, launch.scan_block, launch.prefetch, launch.early_sum), bs
        assert constexprs["BLOCK_N"] == launch.blocks[0] and not constexprs["UNIFORM"]
        assert launch.early_sum == (bs <= 4096), bs
    # Windows uniform in [0, 2N] take 2N columns whether their mean is a little above N or a little below; past 4096
    # requests, N columns.
    means = (0, 1, 3.9, 4.1, 7.9, 8.1, 15.9, 16.1, 31.9, 40, 10**5)
    picks = {
        10: [8, 8, 8, 8, 16, 16, 32, 32, 64, 64, 64],
        3000: [16, 16, 16, 16, 16, 16, 16, 16, 64, 64, 64],  # no 32-column block in this class
        5000: [8, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16],
    }
    for bs, expected in picks.items():
        assert [ops._ragged_shape(bs, round(mean * bs))[1] for mean in means] == expected, bs
    # Each block of a class has its tile: up to 256 requests, 8 requests for 64 columns, else 16.
    shapes = [ops._ragged_shape(200, 200 * mean) for mean in (4, 8, 16, 32)]
    assert [dict(ops._window_constexprs(None, False, *shape))["TILE"] for shape in shapes] == [16, 16, 16, 8]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 20, 40], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("bs", [5, 300, 1100], ids=lambda bs: f"bs{bs}")
def test_ragged_column_blocks_are_exact(device, n, bs):
    """Every ragged column block (8 to 64 columns, from the mean window), read during the sum of earlier windows
    (bs 5, 300) or after it (bs 1100), gives exact slots, also for windows longer than the block."""
    batch = make_batch(bs, "ragged", n, seed=n, device=device, num_rows=1200)
    loop_out, loop_last = loop_reference(batch)
    out, last, n_tok = run_fused(batch, persistent=None)
    assert as_list(out[:n_tok]) == loop_out and as_list(last) == loop_last
    assert as_list(out[n_tok:]) == [SENTINEL] * TAIL


@pytest.mark.parametrize("device", DEVICES)
def test_large_ragged_batches_are_exact(device):
    """Past the last bounded class the ragged kernel takes 256-request tiles: still exact, tail untouched."""
    batch = make_batch(ops._RAGGED_CLASSES[-2].max_batch + 77, "ragged", 2, seed=5, device=device, num_rows=300)
    loop_out, loop_last = loop_reference(batch)
    out, last, n_tok = run_fused(batch, persistent=None)
    assert as_list(out[:n_tok]) == loop_out and as_list(last) == loop_last
    assert as_list(out[n_tok:]) == [SENTINEL] * TAIL


@pytest.mark.parametrize("device", DEVICES)
def test_get_last_loc_semantics(device):
    table = (torch.arange(4 * 6, dtype=torch.int32).reshape(4, 6) + 100).to(device)
    rows = torch.tensor([0, 3, 3, 1, 2], device=device)
    prefix = torch.tensor([0, 1, 6, 3, 0], dtype=device_index_dtype(torch.int32, device), device=device)
    last = specdec_ops.get_last_loc(table, rows, prefix, validate=True)
    assert last.dtype == prefix.dtype
    assert as_list(last) == [-1, 118, 123, 108, -1]
    assert torch.equal(last, get_last_loc_torch(table, rows, prefix))


settings.register_profile("specdec", deadline=None, suppress_health_check=[HealthCheck.too_slow])


def record_launches(monkeypatch) -> list[tuple[str, tuple[int], dict]]:
    """(kernel name, grid, constexprs) of every launch through ``backend.launch`` from here on."""
    made = []
    launch = backend.launch

    def record(kernel, grid, device, tensors, scalars, constexprs, num_warps):
        made.append((kernel.__name__, grid, dict(constexprs)))
        return launch(kernel, grid, device, tensors, scalars, constexprs, num_warps)

    monkeypatch.setattr(backend, "launch", record)
    return made


TWO_LAUNCHES = ["_window_tile_sums_kernel", "_get_last_loc_and_assign_extend_cache_locs_from_sums_kernel"]


@pytest.mark.parametrize("n", [1, 3, 20], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("bs", [41, 300, 1100], ids=lambda bs: f"bs{bs}")
@pytest.mark.parametrize("persistent", [None, True], ids=["grid", "persistent"])
def test_ragged_in_two_launches_is_exact(n, bs, persistent, monkeypatch):
    """Past _RAGGED_ONE_LAUNCH_MAX_BATCH requests (40 here) ragged windows take two launches on the interpreter (as
    in a graph on a GPU): each tile's windows summed, then the gather adding the sums of the tiles before its own.
    Exact against the loop, the tail untouched, for the fused op, the gather alone and the plan/run wrapper; with a
    persistent grid of 3 programs each carries the sums from one of its tiles to the next."""
    monkeypatch.setattr(ops, "_RAGGED_ONE_LAUNCH_MAX_BATCH", 40)
    monkeypatch.setattr(backend, "num_cores", lambda _device: 3)
    made = record_launches(monkeypatch)
    batch = make_batch(bs, "ragged", n, seed=bs + n, num_rows=300)
    loop_out, loop_last = loop_reference(batch)
    out, last, n_tok = run_fused(batch, persistent=persistent)
    assert as_list(out[:n_tok]) == loop_out and as_list(last) == loop_last
    assert as_list(out[n_tok:]) == [SENTINEL] * TAIL
    assert [name for name, _, _ in made] == TWO_LAUNCHES
    (_, grid, first), (_, grid2, second) = made
    tile = second["TILE"]
    num_tiles = -(-bs // tile)
    assert grid == grid2 == ((min(num_tiles, 3),) if persistent else (num_tiles,)) and first["TILE"] == tile
    assert tile in ops._RAGGED_SUMS_CLASS.tiles and second["SCAN_BLOCK"] == ops._RAGGED_SUMS_CLASS.scan_block
    made.clear()
    gathered = sentinel_like(n_tok + TAIL, torch.int32, "cpu")
    specdec_ops.assign_extend_cache_locs(
        batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset, gathered, num_tokens=n_tok
    )
    assert as_list(gathered[:n_tok]) == loop_out and as_list(gathered[n_tok:]) == [SENTINEL] * TAIL
    assert [name for name, _, _ in made] == ["_window_tile_sums_kernel", "_assign_extend_cache_locs_from_sums_kernel"]
    wrapper = specdec_ops.CacheLocsWrapper(batch.req_to_token)
    planned = sentinel_like(n_tok, torch.int64, "cpu")
    wrapper.plan(batch.req_pool_indices, batch.start_offset, batch.end_offset, planned, num_tokens=n_tok)
    made.clear()
    for step in range(2):  # new values in place, as an engine writes them
        got_out, got_last = wrapper.run()
        assert as_list(got_out) == loop_out and as_list(got_last) == loop_last, step
        batch.start_offset.copy_(batch.start_offset.flip(0))
        batch.end_offset.copy_(batch.end_offset.flip(0))
        batch.req_pool_indices.copy_(batch.req_pool_indices.flip(0))
        loop_out, loop_last = loop_reference(batch)
    assert [name for name, _, _ in made] == TWO_LAUNCHES * 2


def test_ragged_takes_two_launches_only_in_graphs_past_one_launchs_batches(monkeypatch):
    """The rule: ragged windows of more than _RAGGED_ONE_LAUNCH_MAX_BATCH requests, off Ascend, in a graph or through
    the interpreter; an eager call on a device keeps one launch, as do uniform windows and every NPU call."""
    cuda = torch.device("cuda", 0)
    big = ops._RAGGED_ONE_LAUNCH_MAX_BATCH + 1
    assert ops._RAGGED_ONE_LAUNCH_MAX_BATCH == ops._RAGGED_CLASSES[-2].max_batch
    assert ops._ragged_in_two_launches(big, None, torch.device("cpu"))
    assert not ops._ragged_in_two_launches(big - 1, None, torch.device("cpu"))
    assert not ops._ragged_in_two_launches(big, 4, torch.device("cpu"))
    monkeypatch.setattr(backend, "is_interpreted", lambda device: device.type == "cpu")
    for capturing in (False, True):
        monkeypatch.setattr(backend, "is_capturing", lambda device, c=capturing: c)
        assert ops._ragged_in_two_launches(big, None, cuda) == capturing
        assert not ops._ragged_in_two_launches(big - 1, None, cuda)
        monkeypatch.setattr(backend, "is_npu", lambda device: True)
        assert not ops._ragged_in_two_launches(big, None, cuda)
        monkeypatch.undo()
        monkeypatch.setattr(backend, "is_interpreted", lambda device: device.type == "cpu")
    # The second launch's column block covers one mean window, as past 4096 requests in one launch.
    means = (0, 3.9, 8.1, 15.9, 16.1, 40)
    assert [ops._ragged_shape(5000, round(m * 5000), sums=True)[1] for m in means] == [8, 8, 8, 16, 16, 16]


@st.composite
def batches(draw):
    bs = draw(st.integers(0, 70))
    num_rows = draw(st.integers(1, 9))
    max_context_len = draw(st.integers(1, 48))
    rows = draw(st.lists(st.integers(0, num_rows - 1), min_size=bs, max_size=bs))
    windows = []
    for _ in range(bs):
        start = draw(st.integers(0, max_context_len))
        end = draw(st.integers(start, max_context_len))
        windows.append((start, end))
    dtypes = draw(st.tuples(*[st.sampled_from([torch.int32, torch.int64])] * 4))
    pad = draw(st.integers(0, 3))
    wide = torch.randperm(num_rows * (max_context_len + pad)).reshape(num_rows, max_context_len + pad)
    return Batch(
        req_to_token=wide.to(dtypes[0])[:, pad:],
        req_pool_indices=torch.tensor(rows, dtype=dtypes[1]),
        start_offset=torch.tensor([s for s, _ in windows], dtype=dtypes[2]),
        end_offset=torch.tensor([e for _, e in windows], dtype=dtypes[2]),
        window_len=None,
    ), dtypes[3]


@settings(settings.get_profile("specdec"), max_examples=examples(40))
@given(batches(), st.sampled_from([None, 0, 3]))
def test_property_random_batches(case, one_launch_max):
    """Random batches, ragged windows in one launch or (``one_launch_max``: past that many requests) in two."""
    batch, out_dtype = case
    loop_out, loop_last = loop_reference(batch)
    limit = ops._RAGGED_ONE_LAUNCH_MAX_BATCH if one_launch_max is None else one_launch_max
    with mock.patch.object(ops, "_RAGGED_ONE_LAUNCH_MAX_BATCH", limit):
        out, last, n_tok = run_fused(batch, out_dtype=out_dtype, validate=True)
    assert as_list(out[:n_tok]) == loop_out
    assert as_list(last) == loop_last
    assert as_list(out[n_tok:]) == [SENTINEL] * TAIL
    ref = assign_extend_cache_locs_torch(
        batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset, out_dtype=out_dtype
    )
    assert torch.equal(out[:n_tok], ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
def test_garbage_window_lengths_do_not_make_the_gather_long(device, persistent):
    """validate=False with end_offset 2**30: the column loop stops at what can be read or written.

    Unbounded, the loop would walk 2**30 columns (hours through the interpreter). Requests before the bad one
    stay exact, the bad window's readable slots too; the rest of out_cache_loc holds -1 or is untouched.
    """
    table = (torch.arange(3 * 16, dtype=torch.int32).reshape(3, 16) + 100).to(device)
    rows = torch.tensor([1, 2, 0], device=device)
    start = torch.tensor([2, 3, 0], device=device)
    end = torch.tensor([6, 2**30, 4], device=device)
    num_tokens = 30
    out = sentinel_like(num_tokens + TAIL, torch.int64, device)
    last = sentinel_like(3, torch.int64, device)
    began = time.perf_counter()
    specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        table, rows, start, end, out, last, num_tokens=num_tokens, persistent=persistent
    )
    got = as_list(out)
    assert time.perf_counter() - began < 30
    assert got[:4] == list(range(118, 122))  # row 1, positions 2..5
    assert got[4:17] == list(range(135, 148))  # row 2, positions 3..15: the readable part of the bad window
    assert set(got[17:num_tokens]) <= {-1, SENTINEL}
    assert got[num_tokens:] == [SENTINEL] * TAIL
    assert as_list(last) == [117, 134, -1]


def test_garbage_window_lengths_of_every_request_cost_what_one_long_window_costs():
    """validate=False, every one of 256 windows 4096 long into a 4096-token output: a tile loops no further than
    the output left after its first window, so the tiles past the output do not loop at all. Before, every tile of
    the batch walked min(max_context_len, num_tokens) columns: 14 times the time of one such window."""
    bs, width = 256, 4096
    table = torch.arange(4 * width, dtype=torch.int32).reshape(4, width)
    rows = torch.zeros(bs, dtype=torch.int64)

    def gather(ends: torch.Tensor) -> float:
        out = sentinel_like(width + TAIL, torch.int64, "cpu")
        began = time.perf_counter()
        specdec_ops.assign_extend_cache_locs(table, rows, torch.zeros_like(rows), ends, out, num_tokens=width)
        took = time.perf_counter() - began
        assert as_list(out[:width]) == list(range(width)) and as_list(out[width:]) == [SENTINEL] * TAIL
        return took

    one = torch.zeros_like(rows)
    one[0] = width
    gather(one)  # (the interpreter's first call builds the kernel module)
    valid = min(gather(one) for _ in range(2))
    assert gather(torch.full_like(rows, width)) < 4 * valid + 1


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_window_longer_than_the_table_is_gathered_only_where_readable(device):
    """window_len = 2**20 over a table of 16 positions: 16 columns are gathered, not 2**20."""
    table = (torch.arange(2 * 16, dtype=torch.int32).reshape(2, 16) + 100).to(device)
    rows = torch.tensor([1, 0], device=device)
    start = torch.tensor([5, 0], device=device)
    window = 2**20
    out = sentinel_like(2 * window, torch.int32, device)
    began = time.perf_counter()
    specdec_ops.assign_extend_cache_locs(table, rows, start, start + window, out, window_len=window)
    got = out.view(2, window)
    assert time.perf_counter() - began < 30
    assert as_list(got[0, :11]) == list(range(121, 132)) and as_list(got[1, :16]) == list(range(100, 116))
    assert set(got[0, 11:].unique().tolist()) <= {-1, SENTINEL} and set(got[1, 16:].unique().tolist()) <= {-1, SENTINEL}
