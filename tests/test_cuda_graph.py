"""CUDA-only behaviour: no host sync on the hot path, and CUDA-graph capture replayed with new inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
from conftest import SENTINEL, sentinel_like
from test_ops import loop_reference, make_batch

import specdec_ops
from specdec_ops import backend

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("window_len", [None, 4], ids=["ragged", "uniform4"])
def test_hot_path_never_syncs(window_len):
    batch = make_batch(300, "uniform" if window_len else "ragged", 4, seed=1, device="cuda")
    n = 300 * 4 if window_len else 2000
    out = torch.empty(n, dtype=torch.int64, device="cuda")
    last = torch.empty(300, dtype=torch.int64, device="cuda")
    args = (batch.req_to_token, batch.req_pool_indices, batch.start_offset, batch.end_offset)
    specdec_ops.get_last_loc_and_assign_extend_cache_locs(*args, out, last, num_tokens=n, window_len=window_len)
    torch.cuda.synchronize()  # compiled and warm: a first launch may sync inside Triton's loader
    torch.cuda.set_sync_debug_mode("error")
    try:
        specdec_ops.get_last_loc_and_assign_extend_cache_locs(*args, out, last, num_tokens=n, window_len=window_len)
        specdec_ops.assign_extend_cache_locs(*args, out, num_tokens=n, window_len=window_len)
        specdec_ops.get_last_loc(batch.req_to_token, batch.req_pool_indices, batch.start_offset)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("window_len", [None, 4], ids=["ragged", "uniform4"])
def test_graph_replay_with_new_inputs_in_the_captured_buffers(window_len):
    bs, capacity = 130, 130 * 8
    first = make_batch(bs, "uniform" if window_len else "ragged", 4, seed=0, device="cuda")
    table = first.req_to_token
    rows = first.req_pool_indices.clone()
    start = first.start_offset.clone()
    end = first.end_offset.clone()
    out = sentinel_like(capacity, torch.int64, "cuda")
    last = sentinel_like(bs, torch.int64, "cuda")

    def step():
        specdec_ops.get_last_loc_and_assign_extend_cache_locs(
            table, rows, start, end, out, last, num_tokens=capacity, window_len=window_len
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for seed in range(1, 6):
        new = make_batch(bs, "uniform" if window_len else "ragged", 4, seed=seed, device="cuda")
        # Same table (its max_context_len must match): take the new windows modulo the table width.
        width = table.size(1) - 8
        new.req_to_token = table
        new.start_offset = new.start_offset % width
        new.end_offset = new.start_offset + (first.end_offset - first.start_offset).roll(seed)
        rows.copy_(new.req_pool_indices)
        start.copy_(new.start_offset)
        end.copy_(new.end_offset)
        out.fill_(SENTINEL)
        last.fill_(SENTINEL)
        graph.replay()
        torch.cuda.synchronize()
        loop_out, loop_last = loop_reference(new)
        n = len(loop_out)
        assert out[:n].tolist() == loop_out
        assert out[n:].tolist() == [SENTINEL] * (capacity - n)
        assert last.tolist() == loop_last


@pytest.mark.parametrize("window_len", [None, 4], ids=["ragged", "uniform4"])
def test_fast_launch_respects_alignment_and_dtypes(window_len):
    """Launches after the first skip Triton's binding: alternate 16-byte-aligned and misaligned views and dtypes,
    so a kernel compiled for aligned pointers is never reused for misaligned ones."""
    for step, (shift, out_dtype) in enumerate(itertools.product([0, 1, 0, 3], [torch.int64, torch.int32])):
        batch = make_batch(70, "uniform" if window_len else "ragged", 4, seed=step, device="cuda")
        n = batch.num_tokens
        big_start = torch.zeros(70 + shift, dtype=batch.start_offset.dtype, device="cuda")
        big_start[shift:] = batch.start_offset
        batch.start_offset = big_start[shift:]
        out_buf = sentinel_like(n + 8, out_dtype, "cuda")
        out = out_buf[shift : shift + n]
        last = sentinel_like(70 + shift, torch.int64, "cuda")[shift:]
        specdec_ops.get_last_loc_and_assign_extend_cache_locs(
            batch.req_to_token,
            batch.req_pool_indices,
            batch.start_offset,
            batch.end_offset,
            out,
            last,
            num_tokens=n,
            window_len=window_len,
        )
        loop_out, loop_last = loop_reference(batch)
        assert out.tolist() == loop_out and last.tolist() == loop_last
        assert out_buf[:shift].tolist() == [SENTINEL] * shift
        assert out_buf[shift + n :].tolist() == [SENTINEL] * (8 - shift)
    assert backend._fast_launch, "the fast launch path fell back to Triton's launcher"
    kernels = [kernel.fn.__name__ for kernel, _ in backend._compiled.values()]
    assert "_get_last_loc_and_assign_extend_cache_locs_kernel" in kernels
    if triton.__version__.startswith("3.6."):  # the stock stack of torch 2.11: the C launch function is called
        assert all(launcher[-1] is not None for launcher in backend._launchers.values())


@pytest.mark.parametrize("wrapped", [False, True], ids=["function", "wrapper"])
def test_large_ragged_batches_take_two_launches_in_a_graph_and_one_eagerly(wrapped, monkeypatch):
    """Past _RAGGED_ONE_LAUNCH_MAX_BATCH requests, ragged windows: an eager call makes one launch, a captured one two
    (the tile sums, then the gather); both exact, and replays read new values written into the captured buffers."""
    bs = specdec_ops.ops._RAGGED_ONE_LAUNCH_MAX_BATCH + 905
    batches = [make_batch(bs, "ragged", 4, seed=seed, device="cuda", num_rows=600) for seed in (0, 1)]
    first, second = batches
    rows, start, end = first.req_pool_indices.clone(), first.start_offset.clone(), first.end_offset.clone()
    capacity = bs * 8
    out = sentinel_like(capacity, torch.int64, "cuda")
    last = sentinel_like(bs, torch.int64, "cuda")
    table = first.req_to_token
    second.req_to_token = table
    wrapper = specdec_ops.CacheLocsWrapper(table)
    wrapper.plan(rows, start, end, out, last, num_tokens=capacity)
    made = []
    launch = backend.launch

    def record(kernel, *args):
        made.append(kernel.__name__)
        return launch(kernel, *args)

    monkeypatch.setattr(backend, "launch", record)

    def step():
        if wrapped:
            wrapper.run()
        else:
            specdec_ops.get_last_loc_and_assign_extend_cache_locs(
                table, rows, start, end, out, last, num_tokens=capacity
            )

    def check(batch):
        loop_out, loop_last = loop_reference(batch)
        assert out[: len(loop_out)].tolist() == loop_out and last.tolist() == loop_last
        assert set(out[len(loop_out) :].tolist()) == {SENTINEL}

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # eager: compile, warm up
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    one = ["_get_last_loc_and_assign_extend_cache_locs_kernel"]
    assert made == one or wrapped  # (a wrapper's prepared launch goes through backend.launch once only)
    check(first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    assert made[-2:] == ["_window_tile_sums_kernel", "_get_last_loc_and_assign_extend_cache_locs_from_sums_kernel"]
    for batch in (second, first):
        rows.copy_(batch.req_pool_indices)
        start.copy_(batch.start_offset)
        end.copy_(batch.end_offset)
        out.fill_(SENTINEL)
        last.fill_(SENTINEL)
        graph.replay()
        torch.cuda.synchronize()
        check(batch)
