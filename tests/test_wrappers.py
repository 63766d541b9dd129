"""Plan/run wrappers: CacheLocsWrapper against the functions, DraftStepWrapper against the allocator's methods.

Every run reads the bound tensors' current values, so the tests rewrite them in place between runs; and every
change of a bound tensor itself (resize_, set_, .data =) must give what the function or method gives.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ACCELERATORS, DEVICES, SENTINEL, device_index_dtype, sentinel_like
from test_allocator import assert_unchanged, check_layout, snapshot
from test_tree import random_paths

from specdec_ops import (
    CacheLocsWrapper,
    DraftCacheAllocator,
    DraftStepWrapper,
    assign_extend_cache_locs,
    backend,
    get_last_loc_and_assign_extend_cache_locs,
)
from specdec_ops import allocator as allocator_module
from specdec_ops.allocator import AllocationError

# ------------------------------------------------------------------------------------------ CacheLocsWrapper


def _function(with_last_loc: bool):
    return get_last_loc_and_assign_extend_cache_locs if with_last_loc else assign_extend_cache_locs


def _step_values(gen: torch.Generator, bs: int, rows: int, context: int, window_len: int | None):
    """Rows, starts and ends of one step (windows of window_len, or ragged ones of 0 to 9 tokens)."""
    req = torch.randint(0, rows, (bs,), generator=gen)
    start = torch.randint(0, context - 10, (bs,), generator=gen)
    start[0] = 0  # last_loc -1
    lens = torch.full((bs,), window_len) if window_len is not None else torch.randint(0, 10, (bs,), generator=gen)
    return req, start, start + lens


@pytest.mark.parametrize("with_last_loc", [True, False], ids=["fused", "assign"])
@pytest.mark.parametrize("window_len", [3, None], ids=["uniform", "ragged"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("bs", [1, 7, 33])
def test_run_equals_the_function_step_after_step(bs, dtype, window_len, with_last_loc):
    gen = torch.Generator().manual_seed(bs)
    rows, context = 40, 50
    table = torch.randint(0, 2**20, (rows, context + 3), generator=gen).to(dtype)[:, :context]  # padded rows
    capacity = bs * 9
    req, start, end = (t.to(dtype) for t in _step_values(gen, bs, rows, context, window_len))
    out = sentinel_like(capacity + 5, dtype, "cpu")
    last = sentinel_like(bs, dtype, "cpu") if with_last_loc else None
    wrapper = CacheLocsWrapper(table, with_last_loc=with_last_loc)
    wrapper.plan(req, start, end, out, last, num_tokens=capacity, window_len=window_len)
    for _ in range(4):
        values = _step_values(gen, bs, rows, context, window_len)
        for bound, value in zip((req, start, end), values):
            bound.copy_(value)  # in place: what an engine does between steps
        out.fill_(SENTINEL)
        if last is not None:
            last.fill_(SENTINEL)
        got = wrapper.run()
        expected_out = sentinel_like(capacity + 5, dtype, "cpu")
        expected_last = sentinel_like(bs, dtype, "cpu") if with_last_loc else None
        args = (expected_out, expected_last) if with_last_loc else (expected_out,)
        expected = _function(with_last_loc)(table, req, start, end, *args, num_tokens=capacity, window_len=window_len)
        if with_last_loc:
            assert got[0].data_ptr() == out.data_ptr() and got[1] is last
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        else:
            assert torch.equal(got, expected)
        assert torch.equal(out, expected_out), "elements past num_tokens must stay untouched"


def test_run_without_num_tokens_sizes_the_output_each_run_like_the_function():
    table = torch.arange(8 * 16).reshape(8, 16)
    req, start, end = torch.tensor([3, 1]), torch.tensor([2, 0]), torch.tensor([5, 1])
    wrapper = CacheLocsWrapper(table)
    wrapper.plan(req, start, end)
    assert wrapper.run()[0].tolist() == [50, 51, 52, 16]
    end.copy_(torch.tensor([4, 4]))
    out, last = wrapper.run()
    assert out.tolist() == [50, 51, 16, 17, 18, 19] and last.tolist() == [49, -1]


def test_validate_checks_the_values_at_every_run():
    table = torch.arange(8 * 16).reshape(8, 16)
    req, start, end = torch.tensor([3, 1]), torch.tensor([2, 0]), torch.tensor([5, 1])
    wrapper = CacheLocsWrapper(table)
    wrapper.plan(req, start, end, num_tokens=8, validate=True)
    wrapper.run()
    end[1] = 17
    with pytest.raises(ValueError, match=r"end_offset\[1\] must be <= max_context_len = 16, got 17"):
        wrapper.run()


def _same_error(call, expected_call):
    """``call`` raises what ``expected_call`` raises, word for word."""
    with pytest.raises((TypeError, ValueError)) as expected:
        expected_call()
    with pytest.raises(type(expected.value)) as got:
        call()
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "ragged"])
def test_a_bound_tensor_changed_in_place_plans_again(uniform):
    table = torch.arange(8 * 16).reshape(8, 16)
    req, start = torch.tensor([3, 1, 6]), torch.tensor([2, 0, 9])
    end = start + 2
    window_len = 2 if uniform else None
    out = sentinel_like(16, torch.int64, "cpu")
    wrapper = CacheLocsWrapper(table)
    wrapper.plan(req, start, end, out, num_tokens=8, window_len=window_len)

    def function():
        return get_last_loc_and_assign_extend_cache_locs(
            table, req, start, end, out, num_tokens=8, window_len=window_len
        )

    req.resize_(2)  # same address, fewer elements
    _same_error(wrapper.run, function)
    req.set_(torch.tensor([5, 4]))  # another tensor, of two rows: valid once the offsets follow
    _same_error(wrapper.run, function)
    start.set_(torch.tensor([1, 3]))
    end.set_(start + 2)
    got = wrapper.run()
    expected = function()
    assert [t.tolist() for t in got] == [t.tolist() for t in expected] == [[81, 82, 67, 68] + [SENTINEL] * 4, [80, 66]]
    start.data = start.data.double()  # another dtype
    _same_error(wrapper.run, function)
    start.data = start.data.int()  # int32 is fine
    assert [t.tolist() for t in wrapper.run()] == [[81, 82, 67, 68] + [SENTINEL] * 4, [80, 66]]
    out.resize_(3)  # the output buffer too
    _same_error(wrapper.run, function)


@pytest.mark.parametrize("start_dtype", [torch.int64, torch.int32])
def test_the_outputs_a_plan_makes_leave_it_only_as_views(start_dtype):
    """Outputs that plan() makes share one allocation, re-checked by address only (the run hands out views of them):
    a view's metadata changed by the caller never reaches the launch; its storage moved through a view plans again.
    ``last_loc`` takes the dtype of the start offsets, ``out_cache_loc`` int64: one allocation holds both."""
    table = torch.arange(8 * 16).reshape(8, 16)
    req, start = torch.tensor([3, 1, 6]), torch.tensor([2, 0, 9], dtype=start_dtype)
    wrapper = CacheLocsWrapper(table)
    wrapper.plan(req, start, start + 2, num_tokens=6, window_len=2)
    owned = wrapper._bound.owned
    assert len(owned) == 1 and len(wrapper._bound.tensors) == 4  # table, rows, starts, ends; out and last owned
    out, last = wrapper.run()
    expected = ([50, 51, 16, 17, 105, 106], [49, -1, 104])
    assert (out.tolist(), last.tolist()) == expected and (out.dtype, last.dtype) == (torch.int64, start_dtype)
    plan_out, plan_last = out._base, last._base
    assert plan_out is not None and plan_last is not None and plan_out.data_ptr() != plan_last.data_ptr()
    for buffer in (plan_out, plan_last):
        assert buffer.untyped_storage().data_ptr() == owned[0].data_ptr() and buffer.data_ptr() % 16 == 0
    out.set_(torch.zeros(2, dtype=torch.int64))
    last.data = torch.zeros(3, dtype=torch.float64)
    assert wrapper.run()[0] is out and not wrapper._bound.changed()  # the same views; the plan's buffers as made
    assert (plan_out.tolist(), plan_last.tolist()) == expected
    plan_last.fill_(SENTINEL)
    wrapper.run()
    assert plan_last.tolist() == expected[1]
    owned[0].untyped_storage().resize_(0)  # as a view can
    assert wrapper._bound.changed()
    out2, last2 = wrapper.run()  # planned again, with new buffers
    assert (out2.tolist(), last2.tolist()) == expected and out2._base is not plan_out
    assert wrapper._bound.owned[0] is not owned[0]
    # A plan whose every run plans again (validate=True) makes new buffers each run, as the function: none shared.
    wrapper.plan(req, start, start + 2, num_tokens=6, window_len=2, validate=True)
    out3, last3 = wrapper.run()
    assert (out3.tolist(), last3.tolist()) == expected
    assert out3.untyped_storage().data_ptr() != last3.untyped_storage().data_ptr()


def test_wrapper_misuse_is_an_error():
    table = torch.zeros(4, 8, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"call plan\(\) before running the wrapper"):
        CacheLocsWrapper(table).run()
    with pytest.raises(ValueError, match=r"last_loc is given but the wrapper was made with with_last_loc=False"):
        CacheLocsWrapper(table, with_last_loc=False).plan(
            torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), last_loc=torch.zeros(1), window_len=1
        )


def test_a_prepared_launch_launches_only_when_called(monkeypatch):
    calls = []
    monkeypatch.setattr(backend, "launch", lambda *args: calls.append(args))
    table = torch.zeros(4, 8, dtype=torch.int32)
    wrapper = CacheLocsWrapper(table)
    wrapper.plan(torch.tensor([1, 2]), torch.tensor([0, 3]), num_tokens=4, window_len=2)
    assert not calls
    wrapper.run()
    wrapper.run()
    assert len(calls) == 2 and calls[0][3][0] is table


# ------------------------------------------------------------------------------------------ DraftStepWrapper


def _host_state(alloc: DraftCacheAllocator) -> tuple:
    return (
        alloc._pages_bound,
        list(alloc._seq_base),
        alloc._seq_base_max,
        alloc._used_at_sync,
        alloc._net_pages_since_sync,
        alloc._drafted_since_sync,
        dict(alloc._known_windows),
        alloc._unknown_window_bound,
        list(alloc._min_pages),
        dict(alloc._branch_rows),
        alloc._branch_batch_pages,
        alloc.num_syncs,
    )


def _assert_same(a: DraftCacheAllocator, b: DraftCacheAllocator) -> None:
    assert_unchanged(a, snapshot(b))
    assert a.free_page_list() == b.free_page_list()
    assert torch.equal(a.branch_pages, b.branch_pages) and torch.equal(a.num_branch_pages, b.num_branch_pages)
    assert _host_state(a) == _host_state(b)


def _fail_then_succeed(a: DraftCacheAllocator, step: DraftStepWrapper, call: str, monkeypatch) -> None:
    """``step.<call>()`` with a launch that raises changes nothing, device or host; then the same call goes through."""
    before = snapshot(a)
    host = _host_state(a)
    monkeypatch.setattr(backend, "launch", _failing_launch)
    with pytest.raises(LaunchFailed):
        getattr(step, call)()
    monkeypatch.undo()
    assert_unchanged(a, before)
    assert _host_state(a) == host
    getattr(step, call)()


def _call(fn, *args, **kwargs):
    """(result, None) or (None, the AllocationError/ValueError raised)."""
    try:
        return fn(*args, **kwargs), None
    except (AllocationError, ValueError) as error:
        return None, error


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("emit", [True, False], ids=["alloc", "reserve"])
@pytest.mark.parametrize("host_rows", [False, True], ids=["tensor-rows", "list-rows"])
@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_the_wrapper_drives_the_step_like_the_methods(page_size, host_rows, emit, tree):
    """Two allocators, one stepped by the wrapper, one by the methods, into the capacity: the same outputs, the
    same errors, the same state (device and host) after every call."""
    rng = random.Random(page_size * 8 + host_rows * 4 + emit * 2 + tree)
    n = 3
    a, b = (DraftCacheAllocator(36 * page_size, 4, 40, page_size=page_size, device="cpu") for _ in range(2))
    rows_a, rows_b = a.add_requests([5, 2, 7]), b.add_requests([5, 2, 7])
    accept = torch.zeros(3, dtype=torch.int64)
    out = sentinel_like(3 * n, torch.int64, "cpu")
    last = sentinel_like(3, torch.int64, "cpu")
    step = DraftStepWrapper(a)
    rows = rows_a.tolist() if host_rows else rows_a
    rows_b = rows_b.tolist() if host_rows else rows_b  # the same kind of rows: lists make the host know windows
    buffers = dict(out_cache_loc=out, last_loc=last) if emit else {}
    step.plan(rows, n, accept_lens=accept, emit=emit, **buffers)
    errors = 0
    for i in range(40):
        if tree and i % 2:  # branches exist at the draft (released by it) or at the commit (released before it)
            topk = 1 + i // 12  # wider trees replace branch_pages: the prepared release launches must follow
            got = _call(a.alloc_branches, rows, topk, 2)
            expected = _call(b.alloc_branches, rows_b, topk, 2)
            assert repr(got[1]) == repr(expected[1])
            _assert_same(a, b)
        expected_out, expected_last = sentinel_like(3 * n, torch.int64, "cpu"), sentinel_like(3, torch.int64, "cpu")
        out.fill_(SENTINEL)
        last.fill_(SENTINEL)
        if emit:
            got = _call(step.alloc_draft)
            expected = _call(b.alloc_draft, rows_b, n, out_cache_loc=expected_out, last_loc=expected_last)
        else:
            got = _call(step.reserve_draft)
            expected = _call(b.reserve_draft, rows_b, n)
        assert repr(got[1]) == repr(expected[1])
        errors += got[1] is not None
        if emit and got[1] is None:
            assert torch.equal(got[0][0], expected[0][0]) and torch.equal(got[0][1], expected[0][1])
        assert torch.equal(out, expected_out) and torch.equal(last, expected_last)
        _assert_same(a, b)
        accept.copy_(torch.tensor([rng.randint(0, n) for _ in range(3)]))  # in place, like an engine
        step.commit()
        b.commit(rows_b, accept.clone())
        _assert_same(a, b)
    assert errors, "the loop must reach the capacity"
    check_layout(a)


@pytest.mark.parametrize("launches", ["one", "two"])
@pytest.mark.parametrize("branches", [False, True], ids=["chain", "branches"])
@pytest.mark.parametrize("host_rows", [False, True], ids=["tensor-rows", "list-rows"])
@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_the_wrapper_commits_and_drafts_like_the_method(page_size, host_rows, branches, launches, monkeypatch):
    """step.commit_and_draft() against DraftCacheAllocator.commit_and_draft, into the capacity: the same outputs,
    errors and state after every call (``branches``: rows that hold branch pages, released in the same launch;
    ``launches="two"``: past the one-launch limit, the tile counts then the allocation)."""
    if launches == "two":
        monkeypatch.setattr(allocator_module, "_COMMIT_DRAFT_MAX_BATCH", 2)
    rng = random.Random(page_size * 4 + host_rows * 2 + branches)
    n = 3
    a, b = (DraftCacheAllocator(36 * page_size, 4, 40, page_size=page_size, device="cpu") for _ in range(2))
    rows_a, rows_b = a.add_requests([5, 2, 7]), b.add_requests([5, 2, 7])
    rows = rows_a.tolist() if host_rows else rows_a
    rows_b = rows_b.tolist() if host_rows else rows_b
    accept = torch.zeros(3, dtype=torch.int64)
    out, last = sentinel_like(3 * n, torch.int64, "cpu"), sentinel_like(3, torch.int64, "cpu")
    step = DraftStepWrapper(a)
    step.plan(rows, n, accept_lens=accept, out_cache_loc=out, last_loc=last)
    errors = 0
    for i in range(30):
        if branches and i % 3 == 1:
            assert repr(_call(a.alloc_branches, rows, 2, 2)[1]) == repr(_call(b.alloc_branches, rows_b, 2, 2)[1])
        accept.copy_(torch.tensor([rng.randint(0, n + 1) for _ in range(3)]))  # in place; n + 1 is clamped
        expected_out, expected_last = sentinel_like(3 * n, torch.int64, "cpu"), sentinel_like(3, torch.int64, "cpu")
        out.fill_(SENTINEL)
        last.fill_(SENTINEL)
        got = _call(step.commit_and_draft)
        expected = _call(
            b.commit_and_draft, rows_b, accept.clone(), n, out_cache_loc=expected_out, last_loc=expected_last
        )
        assert repr(got[1]) == repr(expected[1])
        errors += got[1] is not None
        assert torch.equal(out, expected_out) and torch.equal(last, expected_last)
        _assert_same(a, b)
    assert errors, "the loop must reach the capacity"
    check_layout(a)


def test_listed_rows_windows_are_those_the_last_draft_opened():
    """The host's books of open windows, which check accept lengths given as a list: after each draft of listed rows,
    each row's window is the draft's N, whether the draft came alone, after a commit in the same call (whose closed
    windows the new ones replace) or from a plan (which hands the allocator the ``{row: N}`` it made once). A row not
    listed keeps its window; a listed commit then refuses more than the window, and closes the windows."""
    for tree in (False, True):
        alloc = DraftCacheAllocator(256, 4, 64, page_size=4, device="cpu")
        rows = alloc.add_requests([5, 2, 7, 3]).tolist()
        listed, other = rows[:3], rows[3]
        alloc.alloc_draft([other], 5)
        alloc.alloc_draft(listed, 2)
        assert alloc._known_windows == {other: 5, **dict.fromkeys(listed, 2)}
        accept = torch.tensor([1, 0, 2])
        if tree:
            index = torch.zeros(3, 3, dtype=torch.int64)
            alloc.commit_tree_and_draft(listed, index, accept, 3, 2, 2)
            assert alloc._known_windows == {other: 5, **dict.fromkeys(listed, 3)}
            step = DraftStepWrapper(alloc)
            step.plan(listed, 3, accept_lens=accept, accept_index=index, keep_branches=True, topk=2, num_steps=2)
            step.commit_tree_and_draft()
            n = 3
        else:
            alloc.commit_and_draft(listed, accept, 3)
            assert alloc._known_windows == {other: 5, **dict.fromkeys(listed, 3)}
            step = DraftStepWrapper(alloc)
            step.plan(listed, 4, accept_lens=accept)
            step.commit_and_draft()
            n = 4
        assert alloc._known_windows == {other: 5, **dict.fromkeys(listed, n)}
        with pytest.raises(ValueError, match=rf"accept_lens\[2\] must be in \[0, {n}\]"):
            alloc.commit(listed, [0, 0, n + 1])
        alloc.commit(listed + [other], [0, 0, n, 5])
        assert alloc._known_windows == {}
        check_layout(alloc)


def test_rows_freed_after_a_host_list_plan_raise_like_the_method():
    a, b = (DraftCacheAllocator(64, 3, 32, page_size=4, device="cpu") for _ in range(2))
    a.add_requests([3, 6])
    b.add_requests([3, 6])
    accept = torch.tensor([1, 1])
    step = DraftStepWrapper(a)
    step.plan([0, 1], 2, accept_lens=accept, topk=2, num_steps=2)
    step.alloc_draft()
    b.alloc_draft([0, 1], 2)
    a.free_requests([1])
    b.free_requests([1])
    before = snapshot(a)
    for call, expected_call in (
        (step.alloc_draft, lambda: b.alloc_draft([0, 1], 2)),
        (step.alloc_branches, lambda: b.alloc_branches([0, 1], 2, 2)),
        (step.commit, None),
    ):
        with pytest.raises(ValueError, match=r"req_pool_indices\[1\] = 1 is not a row in use") as got:
            call()
        if expected_call is not None:
            with pytest.raises(ValueError) as expected:
                expected_call()
            assert str(got.value) == str(expected.value)
    assert_unchanged(a, before)
    a.add_requests([4])  # row 1 in use again: the plan holds
    b.add_requests([4])
    step.alloc_draft()
    b.alloc_draft([0, 1], 2)
    step.commit()
    b.commit([0, 1], accept)
    _assert_same(a, b)


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "ragged"])
def test_a_bound_tensor_restrided_in_place_plans_again(uniform):
    """``set_`` to other strides at the same address, shape and dtype: run() raises what the function raises (a
    vector of stride 2), or reads the table in its new layout, never plan()'s. Before the strides were re-checked
    the run wrote out_cache_loc's old elements (buf[1], buf[3], ... of the storage, no longer the tensor's)."""
    wide = torch.arange(4 * 32).reshape(4, 32)
    table = wide[:, :16]  # row stride 32
    req, start = torch.tensor([0, 1, 2]), torch.tensor([1, 5, 3])
    end = start + 2
    window_len = 2 if uniform else None
    buf = sentinel_like(16, torch.int64, "cpu")
    out = buf[:6]
    wrapper = CacheLocsWrapper(table, with_last_loc=False)
    wrapper.plan(req, start, end, out, num_tokens=6, window_len=window_len)

    def function():
        return assign_extend_cache_locs(table, req, start, end, out, num_tokens=6, window_len=window_len)

    assert wrapper.run().tolist() == function().tolist() == [1, 2, 37, 38, 67, 68]
    out.set_(buf.untyped_storage(), 0, (6,), (2,))  # same address, shape and dtype; stride 2
    buf.fill_(SENTINEL)
    _same_error(wrapper.run, function)
    assert buf.tolist() == [SENTINEL] * 16
    out.set_(buf.untyped_storage(), 0, (6,), (1,))
    table.set_(wide.untyped_storage(), 0, (4, 16), (16, 1))  # row stride 16 now
    assert wrapper.run().tolist() == function().tolist() == [1, 2, 21, 22, 35, 36]


def test_bound_tensors_changed_in_place_plan_again_like_the_methods():
    a = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([3, 6, 2])
    accept = torch.tensor([1, 0, 2])
    out, last = torch.empty(9, dtype=torch.int64), torch.empty(3, dtype=torch.int64)
    step = DraftStepWrapper(a)
    step.plan(rows, 3, accept_lens=accept, out_cache_loc=out, last_loc=last)

    def alloc_draft():
        return a.alloc_draft(rows, 3, out_cache_loc=out, last_loc=last)

    out.resize_(5)
    _same_error(step.alloc_draft, alloc_draft)
    out.resize_(9)
    rows.resize_(2)  # 2 rows now: last_loc has 3
    _same_error(step.alloc_draft, alloc_draft)
    last.set_(torch.empty(2, dtype=torch.int64))
    _same_error(step.alloc_draft, lambda: a.commit(rows, accept))  # a plan checks every argument it was given
    accept.resize_(2)
    got = step.alloc_draft()
    assert got[1] is last and got[0].size(0) == 6 and a.window_lens[:3].tolist() == [3, 3, 0]
    accept.data = accept.data.float()
    _same_error(step.commit, lambda: a.commit(rows, accept))
    accept.data = torch.tensor([3, 0])
    step.commit()
    assert a.seq_lens[:3].tolist() == [6, 6, 2] and not a.window_lens.any()


def test_validate_runs_the_methods_checks_every_call():
    a = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([3, 6])
    accept = torch.tensor([1, 0])
    step = DraftStepWrapper(a)
    step.plan(rows, 2, accept_lens=accept, validate=True)
    step.alloc_draft()
    accept[1] = 3
    before = snapshot(a)
    with pytest.raises(ValueError, match=r"accept_lens\[1\] must be in \[0, 2\] \(the draft window of row 1\), got 3"):
        step.commit()
    assert_unchanged(a, before)


@pytest.mark.parametrize("validate", [False, True])
def test_rows_planned_as_a_list_are_the_plans_own(validate):
    """The caller's list reused for its next batch after plan() changes nothing: every call drafts the planned rows,
    with or without validate, before and after a re-plan (validate=True and re-plans read the caller's list itself
    until an audit found it, 2026-11-24)."""
    alloc = DraftCacheAllocator(64, 4, 32, page_size=1, device="cpu")
    alloc.add_requests([3, 5, 2, 6])
    batch = [0, 1]
    accept = torch.zeros(2, dtype=torch.int64)
    step = DraftStepWrapper(alloc)
    step.plan(batch, 2, accept_lens=accept, validate=validate)
    batch[:] = [2, 3]  # the engine's next batch, in the same list
    opened = lambda: [row for row, n in enumerate(alloc.window_lens.tolist()) if n]  # noqa: E731
    step.alloc_draft()
    assert opened() == [0, 1]
    step.commit()
    accept.data = torch.zeros(2, dtype=torch.int64)  # moved: the next call that reads it plans again
    step.commit()
    step.alloc_draft()
    assert opened() == [0, 1]
    check_layout(alloc)


def test_plan_refuses_outputs_that_share_memory_with_inputs_or_the_allocator():
    """As CacheLocsWrapper.plan(): no output shares memory with an input or another output (found by an audit,
    2026-11-24: the kernels wrote the slots into the rows they read), nor with the allocator's own tensors."""
    alloc = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    rows = alloc.add_requests([5, 6])
    accept = torch.zeros(2, dtype=torch.int64)
    buf = torch.zeros(8, dtype=torch.int64)
    step = DraftStepWrapper(alloc)
    cases = [
        (dict(last_loc=rows), "last_loc must not share memory with req_pool_indices"),
        (dict(accept_lens=buf[:2], out_cache_loc=buf[1:5]), "out_cache_loc must not share memory with accept_lens"),
        (dict(out_cache_loc=buf[:4], last_loc=buf[3:5]), "must not share memory with"),
        (dict(last_loc=alloc.alloc_lens[:2]), "last_loc must not share memory with the allocator's own tensors"),
    ]
    for kwargs, message in cases:
        before = snapshot(alloc)
        with pytest.raises(ValueError, match=message):
            step.plan(rows, 2, **kwargs)
        assert_unchanged(alloc, before)
    step.plan(rows, 2, accept_lens=accept, out_cache_loc=buf[:4], last_loc=buf[4:6])  # disjoint views: fine
    step.alloc_draft()
    check_layout(alloc)


def test_wrapper_misuse_is_an_error_too():
    a = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([3, 6])
    step = DraftStepWrapper(a)
    with pytest.raises(RuntimeError, match=r"call plan\(\) before running the wrapper"):
        step.alloc_draft()
    with pytest.raises(TypeError, match=r"accept_lens must be a torch.Tensor, got list"):
        step.plan(rows, 2, accept_lens=[1, 1])
    with pytest.raises(ValueError, match=r"out_cache_loc and last_loc go with emit=True"):
        step.plan(rows, 2, emit=False, last_loc=torch.empty(2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"emit must be a bool, got str"):  # (a string would be taken as True)
        step.plan(rows, 2, emit="no")
    with pytest.raises(TypeError, match=r"keep_branches must be a bool, got int"):
        step.plan(rows, 2, keep_branches=1)
    step.plan(rows, 2)
    with pytest.raises(ValueError, match=r"this plan has emit=True: call alloc_draft\(\)"):
        step.reserve_draft()
    with pytest.raises(ValueError, match=r"commit\(\) needs a plan with accept_lens"):
        step.commit()
    with pytest.raises(ValueError, match=r"commit_and_draft\(\) needs a plan with accept_lens"):
        step.commit_and_draft()
    step.plan(rows, 2, accept_lens=torch.tensor([1, 1]), emit=False)
    with pytest.raises(ValueError, match=r"this plan has emit=False: commit_and_draft\(\) returns the slots"):
        step.commit_and_draft()
    step.plan(rows, 2, accept_lens=torch.tensor([1, 1]), accept_index=torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"this plan commits a tree \(accept_index\)"):
        step.commit_and_draft()


class LaunchFailed(RuntimeError):
    pass


def _failing_launch(*args, **kwargs):
    raise LaunchFailed("launch failed")


def test_the_step_wrapper_takes_an_allocator():
    with pytest.raises(TypeError, match="allocator must be a DraftCacheAllocator, got NoneType"):
        DraftStepWrapper(None)


@pytest.mark.parametrize("device", ACCELERATORS)
def test_an_empty_bound_tensor_moved_to_another_device_plans_again(device):
    """An empty tensor has address 0 on every device, so a run compares the device of the tensors that were empty at
    plan() too: moved to the CPU (``.data =``) and still empty, a bound tensor makes the run plan again and raise what
    the function or method raises (found by an audit of the wrappers)."""
    alloc = DraftCacheAllocator(64, 4, 32, page_size=4, device=device)
    rows = torch.empty(0, dtype=torch.int64, device=device)
    step = DraftStepWrapper(alloc)
    step.plan(rows, 2, accept_lens=torch.empty(0, dtype=torch.int64, device=device))
    step.alloc_draft()
    rows.data = torch.empty(0, dtype=torch.int64)
    with pytest.raises(ValueError, match="req_pool_indices") as wrapper_error:
        step.alloc_draft()
    with pytest.raises(ValueError, match="req_pool_indices") as method_error:
        alloc.alloc_draft(rows, 2)
    assert str(wrapper_error.value) == str(method_error.value)
    table = torch.zeros(2, 2, dtype=torch.int32, device=device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    starts = empty.clone()
    locs = CacheLocsWrapper(table)
    locs.plan(empty, starts, empty, num_tokens=0)
    locs.run()
    starts.data = torch.empty(0, dtype=torch.int64)
    with pytest.raises(ValueError, match="start_offset") as wrapper_error:
        locs.run()
    with pytest.raises(ValueError, match="start_offset") as function_error:
        get_last_loc_and_assign_extend_cache_locs(table, empty, starts, empty, num_tokens=0)
    assert str(wrapper_error.value) == str(function_error.value)


@pytest.mark.parametrize("via", ["method", "wrapper"])
def test_a_launch_that_raises_keeps_the_bound_of_committed_lengths(via, monkeypatch):
    """A draft looks again at the longest committed length once freed rows may have left its bound high (here the
    row of 30 tokens went, and 30 + 12 drafted passes max_context_len 40): where its launch then raises, the bound
    stays as it was, with every other host bound (found by an audit: it used to keep the tighter one)."""
    a = DraftCacheAllocator(64, 4, 40, page_size=1, device="cpu")
    a.add_requests([30, 5])
    a.free_requests([0])  # a row stays in use: no sync, the bound stays at 30
    assert a._seq_base_max == 30
    step = DraftStepWrapper(a)
    step.plan([1], 12)
    draft = (lambda: a.alloc_draft([1], 12)) if via == "method" else step.alloc_draft
    before, host = snapshot(a), _host_state(a)
    monkeypatch.setattr(backend, "launch", _failing_launch)
    with pytest.raises(LaunchFailed):
        draft()
    monkeypatch.undo()
    assert_unchanged(a, before)
    assert _host_state(a) == host
    draft()
    assert a._seq_base_max == 5 and a.num_syncs == 0  # looked at again, kept once the launch went through
    check_layout(a)


@pytest.mark.parametrize("branches", [False, True], ids=["chain", "branches"])
@pytest.mark.parametrize("call", ["alloc_draft", "reserve_draft", "commit", "commit_and_draft", "commit_and_draft-two"])
def test_a_launch_that_raises_in_a_run_changes_nothing(call, branches, monkeypatch):
    if call == "commit_and_draft-two":  # past the one-launch limit: the tile counts, then the allocation
        monkeypatch.setattr(allocator_module, "_COMMIT_DRAFT_MAX_BATCH", 1)
        call = "commit_and_draft"
    a = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([5, 6])
    step = DraftStepWrapper(a)
    step.plan(rows.tolist(), 2, accept_lens=torch.tensor([1, 2]), emit=call != "reserve_draft")
    if call.startswith("commit"):
        step.alloc_draft()
    if branches:
        a.alloc_branches(rows.tolist(), 2, 2)  # the rows the plan names: the host sees them released
    _fail_then_succeed(a, step, call, monkeypatch)
    assert not a._branches_may_exist()
    check_layout(a)


# ------------------------------------------------------------------------------- DraftStepWrapper: tree steps


def _tree_buffers(bs: int, topk: int, steps: int, tree: int, page_size: int) -> dict[str, torch.Tensor]:
    """Sentinel buffers of a tree step, two elements longer than a call writes (kv_src [bs, T], viewed as 1-D)."""
    copies = bs * topk * (page_size - 1)
    return dict(
        branch_slots=sentinel_like(bs * topk * steps + 2, torch.int64, "cpu"),
        copy_src=sentinel_like(copies + 2, torch.int64, "cpu"),
        copy_dst=sentinel_like(copies + 2, torch.int32, "cpu"),
        kv_src=sentinel_like(bs * tree, torch.int64, "cpu").view(bs, tree),
        kv_dst=sentinel_like(bs * tree + 2, torch.int32, "cpu"),
    )


def _same_results(got, expected) -> None:
    assert repr(got[1]) == repr(expected[1])
    if got[1] is None:
        assert len(got[0]) == len(expected[0])
        for a, b in zip(got[0], expected[0]):
            assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("buffers", [True, False], ids=["buffers", "no-buffers"])
@pytest.mark.parametrize("mode", ["alloc", "reserve", "tree-draft"])
@pytest.mark.parametrize("host_rows", [False, True], ids=["tensor-rows", "list-rows"])
@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_the_wrapper_drives_the_tree_step_like_the_methods(page_size, host_rows, mode, buffers):
    """alloc_branches, the draft of the tree and commit_tree (or alloc_tree_draft and commit_tree), through one
    wrapper on one allocator and through the methods on another, into the capacity: the same outputs, the same
    errors, the same state (device and host) after every call. Every fourth step a second wrapper takes wider
    branches first: that replaces branch_pages, and the first wrapper's prepared launches must follow."""
    emit = mode != "reserve"
    rng = random.Random(page_size * 8 + host_rows * 4 + ["alloc", "reserve", "tree-draft"].index(mode) * 2 + buffers)
    bs, topk, steps, tree = 3, 2, 2, 3
    keep = mode == "tree-draft" and not buffers  # the two-launch step that leaves the branches to the next draft
    # Kept branch pages stay put from step to step (no release, no new pages): a smaller pool to reach its capacity.
    num_slots = (80 if keep else 104) if page_size == 1 else (26 if keep else 32) * page_size
    a, b = (DraftCacheAllocator(num_slots, 4, 40, page_size=page_size, device="cpu") for _ in range(2))
    rows_a, rows_b = a.add_requests([5, 2, 7]), b.add_requests([5, 2, 7])
    rows = rows_a.tolist() if host_rows else rows_a
    rows_b = rows_b.tolist() if host_rows else rows_b
    accept = torch.zeros(bs, dtype=torch.int64)
    index = torch.zeros(bs, tree, dtype=torch.int32)
    mine, theirs = (_tree_buffers(bs, topk, steps, tree, page_size) if buffers else {} for _ in range(2))
    step = DraftStepWrapper(a)
    step.plan(
        rows,
        tree,
        accept_lens=accept,
        emit=emit,
        accept_index=index,
        keep_branches=keep,
        topk=topk,
        num_steps=steps,
        **mine,
    )
    wide = DraftStepWrapper(a)
    wide.plan(rows, tree, topk=topk + 1, num_steps=steps)
    branch_buffers = {key: theirs[key] for key in ("copy_src", "copy_dst") if key in theirs}
    errors = []
    for i in range(36):
        if i % 12 == 11:  # the shortest request finishes and a new one takes its row: the plan's rows stay valid
            row = int(a.seq_lens[:3].argmin())
            for alloc in (a, b):
                alloc.free_requests([row])
                assert alloc.add_requests([3]).tolist() == [row]
        for t in mine.values():
            t.fill_(SENTINEL)
        for t in theirs.values():
            t.fill_(SENTINEL)
        if i % 4 == 3:
            got = _call(wide.alloc_branches)
            expected = _call(b.alloc_branches, rows_b, topk + 1, steps, return_copies=True)
            _same_results(got, expected)
            _assert_same(a, b)
        if mode == "tree-draft":
            got = _call(step.alloc_tree_draft)
            expected = _call(
                b.alloc_tree_draft, rows_b, tree, topk, steps, branch_slots=theirs.get("branch_slots"), **branch_buffers
            )
            _same_results(got, expected)
            errors.append(type(got[1]).__name__)
            _assert_same(a, b)
        else:
            got = _call(step.alloc_branches)
            expected = _call(
                b.alloc_branches,
                rows_b,
                topk,
                steps,
                out=theirs.get("branch_slots"),
                return_copies=True,
                **branch_buffers,
            )
            _same_results(got, expected)
            errors.append(type(got[1]).__name__)
            _assert_same(a, b)
        if mode == "tree-draft":
            pass
        elif emit:
            got = _call(step.alloc_draft)
            expected = _call(b.alloc_draft, rows_b, tree)
            _same_results(got, expected)
        else:
            got = _call(step.reserve_draft)
            assert repr(got[1]) == repr(_call(b.reserve_draft, rows_b, tree)[1])
        errors.append(type(got[1]).__name__)
        _assert_same(a, b)
        paths, lens = random_paths(rng, bs, tree)
        index.copy_(paths)  # in place, like an engine
        accept.copy_(torch.tensor(lens))
        got = _call(step.commit)
        kv = {key: theirs[key] for key in ("kv_src", "kv_dst") if key in theirs}
        expected = _call(b.commit_tree, rows_b, index.clone(), accept.clone(), keep_branches=keep, **kv)
        _same_results(got, expected)
        _assert_same(a, b)
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), f"{key}: the same elements written, and only those"
    # (The tree draft's branches take the pool before the context fills up.)
    reached = {"OutOfSlotsError"} if mode == "tree-draft" else {"OutOfSlotsError", "ContextLengthError"}
    assert reached <= set(errors), "the loop must reach the capacity"
    check_layout(a)


@pytest.mark.parametrize("launches", ["one", "two"])
@pytest.mark.parametrize("host_rows", [False, True], ids=["tensor-rows", "list-rows"])
@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
def test_the_wrapper_commits_the_tree_and_drafts_like_the_method(page_size, host_rows, launches, monkeypatch):
    """step.commit_tree_and_draft() against DraftCacheAllocator.commit_tree_and_draft, into the capacity: the same
    outputs (into the plan's buffers), errors and state after every call; after a failure both commit with
    commit_tree and the loop goes on (``launches="two"``: the tree commit's launch, then the draft's)."""
    if launches == "two":
        monkeypatch.setattr(DraftCacheAllocator, "_tree_step_launch_choice", lambda self, *args: (False, False))
    rng = random.Random(page_size * 4 + host_rows * 2 + (launches == "two"))
    bs, topk, steps, tree = 3, 2, 2, 3
    num_slots = 50 if page_size == 1 else 24 * page_size
    a, b = (DraftCacheAllocator(num_slots, 4, 40, page_size=page_size, device="cpu") for _ in range(2))
    rows_a, rows_b = a.add_requests([5, 2, 7]), b.add_requests([5, 2, 7])
    rows = rows_a.tolist() if host_rows else rows_a
    rows_b = rows_b.tolist() if host_rows else rows_b
    accept = torch.zeros(bs, dtype=torch.int64)
    index = torch.zeros(bs, tree, dtype=torch.int64)
    mine, theirs = (_tree_buffers(bs, topk, steps, tree, page_size) for _ in range(2))
    step = DraftStepWrapper(a)
    step.plan(
        rows, tree, accept_lens=accept, accept_index=index, keep_branches=True, topk=topk, num_steps=steps, **mine
    )
    _same_results(_call(step.alloc_tree_draft), _call(b.alloc_tree_draft, rows_b, tree, topk, steps))
    errors = []
    for i in range(30):
        if i % 10 == 9:  # the longest request finishes and a new one takes its row: the plan's rows stay valid
            row = int(a.seq_lens[:3].argmax())
            for alloc in (a, b):
                alloc.free_requests([row])
                assert alloc.add_requests([3]).tolist() == [row]
        for t in (*mine.values(), *theirs.values()):
            t.fill_(SENTINEL)
        paths, lens = random_paths(rng, bs, tree)
        index.copy_(paths)  # in place, like an engine
        accept.copy_(torch.tensor(lens))
        got = _call(step.commit_tree_and_draft)
        expected = _call(b.commit_tree_and_draft, rows_b, index.clone(), accept.clone(), tree, topk, steps, **theirs)
        _same_results(got, expected)
        errors.append(type(got[1]).__name__)
        _assert_same(a, b)
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), f"{key}: the same elements written, and only those"
        if got[1] is not None:
            expected = _call(b.commit_tree, rows_b, index.clone(), accept.clone(), keep_branches=True)
            _same_results(_call(step.commit), expected)
            _assert_same(a, b)
    assert {"NoneType", "OutOfSlotsError"} <= set(errors), "the loop must step and reach the capacity"
    check_layout(a)


def test_the_wrapper_keeps_the_tree_steps_launch_choice_per_release(monkeypatch):
    """A plan asks the allocator's rule (``_tree_step_launch_choice``) once for each value of ``release`` and then
    answers as the allocator would; a new plan asks again (its rows, windows or trees may differ)."""
    asked = []

    def choice(self, bs, n, release, branches, tree):
        asked.append((bs, n, release, branches[:2], tree))
        return (release, not release)  # eager on a device would differ: the CPU interpreter takes the first

    monkeypatch.setattr(DraftCacheAllocator, "_tree_step_launch_choice", choice)
    alloc = DraftCacheAllocator(64, 4, 40, device="cpu")
    rows = alloc.add_requests([5, 2, 7])
    accept, index = torch.zeros(3, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64)
    step = DraftStepWrapper(alloc)
    step.plan(rows, 3, accept_lens=accept, accept_index=index, topk=2, num_steps=2)
    for _ in range(3):
        assert [step._tree_step_in_one_launch(r) for r in (True, False)] == [True, False]
    assert asked == [(3, 3, True, (2, 2), 4), (3, 3, False, (2, 2), 4)]
    assert [alloc._tree_step_in_one_launch(3, 3, r, (2, 2), 4) for r in (True, False)] == [True, False]
    asked.clear()
    step.plan(rows[:2], 2, accept_lens=accept[:2], accept_index=index[:2, :3], topk=2, num_steps=1)
    assert step._tree_step_in_one_launch(False) is False
    assert asked == [(2, 2, False, (2, 1), 3)]


def test_tree_bound_tensors_changed_in_place_plan_again_like_the_methods():
    a = DraftCacheAllocator(4 * 64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([3, 6, 2])
    accept, index = torch.tensor([1, 0, 2]), torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1, 0]])
    buffers = _tree_buffers(3, 2, 2, 3, 4)
    step = DraftStepWrapper(a)
    step.plan(rows, 3, accept_lens=accept, accept_index=index, topk=2, num_steps=2, **buffers)
    slots, copy_src, copy_dst, kv_src, kv_dst = (
        buffers[k] for k in ("branch_slots", "copy_src", "copy_dst", "kv_src", "kv_dst")
    )

    def alloc_branches():
        return a.alloc_branches(rows, 2, 2, out=slots, copy_src=copy_src, copy_dst=copy_dst)

    def commit_tree():
        return a.commit_tree(rows, index, accept, kv_src=kv_src, kv_dst=kv_dst)

    # One change at a time, each seen by the call that reads the tensor.
    copy_dst.resize_(7)
    _same_error(step.alloc_branches, alloc_branches)
    copy_dst.resize_(20)
    copy_src.data = copy_src.data.float()
    _same_error(step.alloc_branches, alloc_branches)
    copy_src.data = copy_src.data.long()
    step.alloc_branches()  # planned again with the new copy_src
    slots.resize_(11)
    with pytest.raises(ValueError) as expected:
        alloc_branches()
    with pytest.raises(ValueError) as got:
        step.alloc_branches()  # the method's error, naming the plan's argument
    assert str(got.value) == str(expected.value).replace("out", "branch_slots", 1)
    slots.resize_(14)
    kv_src.resize_(5)  # [3, 3] -> [5]: the caller's tensor, not the view the launch writes
    _same_error(step.commit, commit_tree)
    kv_src.resize_(3, 3)
    index.resize_(3, 2, 1)
    _same_error(step.commit, commit_tree)
    index.set_(torch.tensor([[0, 1], [0, 0], [1, 0]]))  # T = 2 now: valid
    kv_src.set_(torch.full((7,), SENTINEL))
    kv_dst.data = torch.full((6,), SENTINEL)
    got = step.alloc_branches()
    assert got[0].data_ptr() == slots.data_ptr() and got[0].shape == (3, 2, 2)
    step.alloc_draft()
    src, dst = step.commit()
    assert src.data_ptr() == kv_src.data_ptr() and dst.data_ptr() == kv_dst.data_ptr() and kv_src[6] == SENTINEL
    assert a.seq_lens[:3].tolist() == [4, 6, 3] and not a.window_lens.any() and not a.num_branch_pages.any()
    assert dst.tolist() == a.req_to_token[[0, 0, 1, 1, 2, 2], [3, 4, 6, 7, 2, 3]].tolist()
    kv_dst.resize_(5)
    _same_error(step.commit, commit_tree)
    check_layout(a)


@pytest.mark.parametrize("validate", [False, True])
def test_the_plans_own_buffers_leave_it_only_as_views(validate):
    """Output buffers that plan() makes (none given) are re-checked by address only: the calls return views of them,
    never the buffers, so a caller's changes to what a call returned (set_, .data =, as_strided_, resize_) reach
    only those views (which every call returns again, as documented) and never the launches, and a view that moves
    or frees the buffers' storage makes the next call plan again with new buffers."""
    a = DraftCacheAllocator(4 * 64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([3, 6, 2])
    accept, index = torch.zeros(3, dtype=torch.int64), torch.zeros(3, 3, dtype=torch.int64)
    step = DraftStepWrapper(a)
    step.plan(rows, 3, accept_lens=accept, accept_index=index, topk=2, num_steps=2, validate=validate)
    assert not step._tree_step_bound.changed()
    owned = step._tree_step_bound.owned
    # out, last, kv_src/dst, slots and the copy pairs share one allocation: one address to re-check
    assert len(owned) == 1 and owned[0]._base is None and len(step._draft_bound.owned) == 1
    slots, src, dst = step.alloc_branches()
    out, last = step.alloc_draft()
    kv_src, kv_dst = step.commit()
    arena = owned[0].untyped_storage()
    for got in (slots, src, dst, out, last, kv_src, kv_dst):
        assert got._base is not None and got.untyped_storage().data_ptr() == arena.data_ptr()
        assert got.data_ptr() % 16 == 0, "each buffer 16-byte aligned, as one of its own"
    made = (step._out, step._last, *step._tree_commit[1:], *step._branches[2:])
    assert len({t.data_ptr() for t in made}) == 7 and not any(got is t for got in (out, last) for t in made)

    def expected_draft():
        seqs = a.seq_lens[rows]
        return a.req_to_token[rows.repeat_interleave(3), seqs.repeat_interleave(3) + torch.arange(3).repeat(3)]

    # Metadata changes of the views stay with the views: the calls run on the plan's buffers as they are.
    out.set_(torch.full((2,), SENTINEL))
    last.data = torch.zeros(3, dtype=torch.float64)
    kv_src.as_strided_((1,), (1,))
    slots.resize_(1)  # smaller: the storage is kept
    step.alloc_branches()
    assert step.alloc_draft()[0] is out  # the same view, as changed by the caller
    plan_out, plan_last = step._out, step._last
    assert plan_out.tolist() == expected_draft().tolist() and plan_out.dtype == torch.int64
    assert plan_last.tolist() == a.req_to_token[rows, a.seq_lens[rows] - 1].tolist()
    step.commit()
    assert not step._tree_step_bound.changed() and step._tree_step_bound.owned == owned
    # A view that reallocates the buffers' storage (a resize past it), or frees it: the next call plans again.
    step.alloc_branches()
    step.alloc_draft()
    kv_dst.resize_(10_000)
    assert step._tree_step_bound.changed() and step._commit_bound.changed() and step._draft_bound.changed()  # shared
    kv_src2, kv_dst2 = step.commit()  # planned again: new buffers, the window committed as before
    assert not step._tree_step_bound.changed() and step._out is not plan_out and kv_dst2 is not kv_dst
    assert kv_src2.shape == kv_dst2.shape == (9,) and not a.window_lens.any()
    out2, last2 = step.alloc_draft()
    assert out2.tolist() == expected_draft().tolist() and last2.dtype == torch.int64
    step.commit()
    step.alloc_branches()[0].untyped_storage().resize_(0)
    assert step._branches_bound.changed()
    assert step.alloc_branches()[0].shape == (3, 2, 2) and step._branches_bound.owned[0].data_ptr() != 0
    check_layout(a)


def test_tree_plan_misuse_raises_what_the_methods_raise():
    a = DraftCacheAllocator(4 * 64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([3, 6])
    accept = torch.tensor([1, 0])
    index = torch.zeros(2, 4, dtype=torch.int64)
    a.alloc_draft(rows, 4)
    before = snapshot(a)
    step = DraftStepWrapper(a)
    with pytest.raises(RuntimeError, match=r"call plan\(\) before running the wrapper"):
        step.alloc_branches()

    def same(plan_kwargs, method):
        _same_error(lambda: step.plan(rows, 4, accept_lens=accept, **plan_kwargs), method)

    for bad in (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 4), torch.zeros(2, 8, dtype=torch.int64)[:, ::2]):
        same(dict(accept_index=bad), lambda bad=bad: a.commit_tree(rows, bad, accept))
    same(dict(accept_index=[[0, 1], [0, 1]]), lambda: a.commit_tree(rows, [[0, 1], [0, 1]], accept))
    same(
        dict(accept_index=torch.zeros(2, 300, dtype=torch.int64)),
        lambda: a.commit_tree(rows, torch.zeros(2, 300, dtype=torch.int64), accept),
    )
    short = torch.empty(7, dtype=torch.int64)
    same(dict(accept_index=index, kv_dst=short), lambda: a.commit_tree(rows, index, accept, kv_dst=short))
    same(
        dict(accept_index=index, kv_src=short.float()), lambda: a.commit_tree(rows, index, accept, kv_src=short.float())
    )
    for topk, steps in ((0, 2), (2, 0), (True, 2), (2, 2.0), (2**31, 1)):
        same(dict(topk=topk, num_steps=steps), lambda topk=topk, steps=steps: a.alloc_branches(rows, topk, steps))
    same(dict(topk=2, num_steps=2, copy_src=short), lambda: a.alloc_branches(rows, 2, 2, copy_src=short))
    same(dict(topk=2, num_steps=3, copy_dst=short[:2]), lambda: a.alloc_branches(rows, 2, 3, copy_dst=short[:2]))
    with pytest.raises(ValueError, match=r"accept_index goes with accept_lens \(commit_tree reads both\)"):
        step.plan(rows, 4, accept_index=index)
    for extra in (dict(kv_dst=short), dict(keep_branches=True)):
        with pytest.raises(ValueError, match=r"kv_src, kv_dst and keep_branches go with accept_index"):
            step.plan(rows, 4, accept_lens=accept, **extra)
    with pytest.raises(ValueError, match=r"topk and num_steps must be given together"):
        step.plan(rows, 4, topk=2)
    with pytest.raises(ValueError, match=r"branch_slots, copy_src and copy_dst go with topk and num_steps"):
        step.plan(rows, 4, copy_src=short)
    assert_unchanged(a, before)
    step.plan(rows, 4, accept_lens=accept)
    with pytest.raises(ValueError, match=r"alloc_branches\(\) needs a plan with topk and num_steps"):
        step.alloc_branches()
    assert step.commit() is None, "a plan without accept_index commits a chain"
    assert a.seq_lens[:2].tolist() == [4, 6]


def test_tree_validate_runs_the_methods_checks_every_call():
    a = DraftCacheAllocator(4 * 64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([3, 6])
    accept, index = torch.tensor([2, 1]), torch.tensor([[0, 1, 0], [0, 0, 0]])
    step = DraftStepWrapper(a)
    step.plan(rows, 3, accept_lens=accept, accept_index=index, topk=2, num_steps=2, validate=True)
    slots, copy_src, copy_dst = step.alloc_branches()
    assert slots.shape == (2, 2, 2) and copy_src.shape == copy_dst.shape == (12,)
    step.alloc_draft()
    index[0, 1] = 0
    before = snapshot(a)
    with pytest.raises(ValueError, match=r"accept_index\[0, 1\] = 0 must be greater than accept_index\[0, 0\] = 0"):
        step.commit()
    assert_unchanged(a, before)
    index[0, 1] = 2
    src, dst = step.commit()
    assert src.shape == dst.shape == (6,) and a.seq_lens[:2].tolist() == [5, 7]
    check_layout(a)


@pytest.mark.parametrize("branches", [False, True], ids=["no-branches", "branches"])
@pytest.mark.parametrize("call", ["alloc_branches", "alloc_tree_draft", "commit"])
def test_a_launch_that_raises_in_a_tree_run_changes_nothing(call, branches, monkeypatch):
    a = DraftCacheAllocator(4 * 64, 4, 32, page_size=4, device="cpu")  # room: no sync tightens the host bounds
    rows = a.add_requests([5, 6])
    step = DraftStepWrapper(a)
    step.plan(
        rows.tolist(),
        2,
        accept_lens=torch.tensor([2, 1]),
        accept_index=torch.tensor([[0, 1], [1, 0]]),
        topk=2,
        num_steps=3,
    )
    step.alloc_draft()
    if branches:
        a.alloc_branches(rows.tolist(), 1, 2)  # narrower: the failing alloc_branches would widen branch_pages
    _fail_then_succeed(a, step, call, monkeypatch)
    assert a._branches_may_exist() == (call != "commit")
    check_layout(a)


def test_an_empty_tree_batch_launches_nothing(monkeypatch):
    a = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    a.add_requests([5])
    rows = torch.zeros(0, dtype=torch.int64)
    step = DraftStepWrapper(a)
    step.plan(rows, 3, accept_lens=rows.clone(), accept_index=torch.zeros(0, 3, dtype=torch.int64), topk=2, num_steps=2)
    monkeypatch.setattr(backend, "launch", _failing_launch)
    assert [t.shape for t in step.alloc_branches()] == [(0, 2, 2), (0,), (0,)]
    assert [t.shape for t in step.alloc_draft()] == [(0,), (0,)]
    assert [t.shape for t in step.commit()] == [(0,), (0,)]


@pytest.mark.parametrize("validate", [False, True])
def test_a_tensor_of_rows_is_read_at_each_call_even_with_validate(validate):
    """A plan with validate=True reads a tensor of rows back to check it, but each call works on the tensor's current
    values as the method would: rows rewritten in place are checked as they are now (not as plan() saw them), and a
    resized tensor plans again. (Found by a review that fuzzed the wrappers: the plan kept the rows it read.)"""
    for change in ("rewrite", "resize"):
        wrapped = DraftCacheAllocator(256, 4, 32, device="cpu")
        twin = DraftCacheAllocator(256, 4, 32, device="cpu")
        for alloc in (wrapped, twin):
            alloc.add_requests([3, 4, 5])
        rows = torch.tensor([0, 1])
        step = DraftStepWrapper(wrapped)
        step.plan(rows, 2, validate=validate)
        if change == "rewrite":
            rows.copy_(torch.tensor([2, 1]))  # the next batch, in place: rows 2 and 1
            for alloc in (wrapped, twin):
                alloc.free_requests([0])  # row 0, no longer in the batch, finishes
        else:
            rows.resize_(1)  # the batch is now row 0 alone
        out, last = step.alloc_draft()
        expected = twin.alloc_draft(rows, 2, validate=validate)
        assert torch.equal(out, expected[0]) and torch.equal(last, expected[1]), change
        assert_unchanged(wrapped, snapshot(twin))


# ------------------------------------------------------------------ method calls given the tensors of an earlier call


def _counting_kept_steps(alloc: DraftCacheAllocator, monkeypatch) -> list:
    """The plans ``alloc``'s method calls find kept (DraftCacheAllocator._kept_step), one entry a call."""
    found = []
    kept_step = alloc._kept_step
    monkeypatch.setattr(alloc, "_kept_step", lambda key: found.append(kept_step(key)) or found[-1])
    return found


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 4], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("flow", ["chain", "tree"])
def test_method_calls_given_the_same_tensors_drive_the_allocator_like_calls_given_new_ones(
    flow, page_size, device, monkeypatch
):
    """Two allocators into their capacity: one given the same tensors every call (values rewritten in place, as an
    engine does: from the third call on its calls take the plan kept for them), one given new tensors every call
    (each checked in full). The same results, the same errors, the same state (device and host) after every call."""
    rng = random.Random(page_size + (flow == "tree"))
    bs, n, topk, steps = 3, 3, 2, 2
    num_slots = 60 if page_size == 1 else 18 * page_size
    a, b = (DraftCacheAllocator(num_slots, 4, 40, page_size=page_size, device=device) for _ in range(2))
    rows, rows_b = a.add_requests([5, 2, 7]), b.add_requests([5, 2, 7])
    found = _counting_kept_steps(a, monkeypatch)
    accept = torch.zeros(bs, dtype=torch.int64, device=device)
    accept_index = torch.zeros(bs, n, dtype=torch.int64, device=device)
    draft = dict(
        out_cache_loc=sentinel_like(bs * n + 2, torch.int64, device), last_loc=sentinel_like(bs, torch.int32, device)
    )
    tree = {
        name: t.to(device, device_index_dtype(t.dtype, device))
        for name, t in _tree_buffers(bs, topk, steps, n, page_size).items()
    }
    branches = {k: tree[k] for k in ("copy_src", "copy_dst")}
    tree_commit = {k: tree[k] for k in ("kv_src", "kv_dst")}

    def fresh(buffers: dict) -> dict:
        return {name: sentinel_like(t.numel(), t.dtype, device).view(t.shape) for name, t in buffers.items()}

    def both(name: str, *args, **buffers):
        """The call on a with the kept tensors (buffers reset to the sentinel) and on b with new ones."""
        for t in buffers.values():
            t.fill_(SENTINEL)
        copies = fresh(buffers)
        args_b = [x.clone() if isinstance(x, torch.Tensor) else x for x in args]
        got = _call(getattr(a, name), rows, *args, **buffers)
        expected = _call(getattr(b, name), rows_b.clone(), *args_b, **copies)
        assert repr(got[1]) == repr(expected[1])
        if got[0] is not None:
            results = got[0] if isinstance(got[0], tuple) else (got[0],)
            results_b = expected[0] if isinstance(expected[0], tuple) else (expected[0],)
            for x, y in zip(results, results_b):
                assert x.shape == y.shape and torch.equal(x, y)
        for t, u in zip(buffers.values(), copies.values()):
            assert torch.equal(t, u)
        _assert_same(a, b)
        return got[1] is not None

    errors = 0
    for i in range(24):
        if flow == "chain":
            accept.copy_(torch.tensor([rng.randint(0, n) for _ in range(bs)]))
            if i % 3 == 2:
                errors += both("alloc_draft", n, **draft)
                both("commit", accept)
            else:
                errors += both("commit_and_draft", accept, n, **draft)
        else:
            index, lens = random_paths(rng, bs, n)
            accept_index.copy_(index)
            accept.copy_(torch.tensor(lens))
            if i % 2:
                errors += both("alloc_branches", topk, steps, out=tree["branch_slots"], **branches)
                errors += both("alloc_draft", n, **draft)
                both("commit_tree", accept_index, accept, **tree_commit)
            else:
                errors += both("commit_tree_and_draft", accept_index, accept, n, topk, steps, **draft, **tree)
    assert errors, "the loop must reach the capacity"
    assert sum(step is not None for step in found) >= 10, "calls took the kept plans"
    check_layout(a)


def test_a_kept_method_call_whose_tensor_changed_is_checked_again(monkeypatch):
    """A tensor of a kept call moved, resized or re-typed in place since: the call raises what a call given new
    tensors raises, and changes nothing; a valid move is checked and followed (the call writes the new memory)."""
    a = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([5, 6])
    found = _counting_kept_steps(a, monkeypatch)
    out, last = torch.empty(8, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    for _ in range(3):
        a.alloc_draft(rows, 2, out_cache_loc=out, last_loc=last)
        a.commit(rows, torch.zeros(2, dtype=torch.int64))
    assert found[-1] is not None
    last.resize_(3)
    before = snapshot(a)
    with pytest.raises(ValueError, match="last_loc must have 2 elements, got 3"):
        a.alloc_draft(rows, 2, out_cache_loc=out, last_loc=last)
    assert_unchanged(a, before)
    last.resize_(2)
    rows.data = rows.data.float()
    with pytest.raises(TypeError, match="req_pool_indices must be int32 or int64, got torch.float32"):
        a.alloc_draft(rows, 2, out_cache_loc=out, last_loc=last)
    assert_unchanged(a, before)
    rows.data = rows.data.long()
    old = out.data
    out.data = torch.full((4,), SENTINEL, dtype=torch.int64)
    old.fill_(SENTINEL)
    got, _ = a.alloc_draft(rows, 2, out_cache_loc=out, last_loc=last)
    assert got is out and (out != SENTINEL).all() and (old == SENTINEL).all()


def test_a_method_call_whose_outputs_share_memory_with_its_inputs_is_not_kept():
    """validate=False does not check that outputs share no memory with inputs (a plan does): such calls run as
    before, checked in full each time, and are never kept."""
    a = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([5, 6])
    buffer = torch.zeros(6, dtype=torch.int64)
    accept = buffer[4:]
    for _ in range(3):
        a.commit_and_draft(rows, accept, 2, out_cache_loc=buffer[:4], last_loc=buffer[4:])
    assert not a._kept_steps
    fresh = buffer[:4]
    for _ in range(3):
        a.commit_and_draft(rows, accept, 2, out_cache_loc=fresh, last_loc=buffer[4:])
    assert not a._kept_steps


def test_an_allocator_with_kept_plans_is_freed_with_its_last_reference():
    """The plans an allocator keeps for its method calls reach it through a weak proxy: dropping the last reference
    frees it (and its device memory) at once, without Python's cyclic collector."""
    import gc
    import weakref

    a = DraftCacheAllocator(64, 4, 32, page_size=4, device="cpu")
    rows = a.add_requests([5, 6])
    out, last = torch.empty(8, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    for _ in range(3):
        a.alloc_draft(rows, 2, out_cache_loc=out, last_loc=last)
        a.commit(rows, torch.zeros(2, dtype=torch.int64))
    assert a._kept_steps
    ref = weakref.ref(a)
    gc.disable()
    try:
        del a
        assert ref() is None
    finally:
        gc.enable()


def test_method_calls_given_new_tensors_each_time_keep_no_plan(monkeypatch):
    """A method call not kept waits with its tensors held: a new tensor cannot take one of their ids, so a plan is
    kept only once the very same tensors come again. Calls given new tensors each time plan nothing, and hold the
    tensors of a few calls at most."""
    a = DraftCacheAllocator(1024, 4, 512, page_size=4, device="cpu")
    rows = a.add_requests([5, 6])
    plans = []
    real_plan = DraftStepWrapper.plan
    monkeypatch.setattr(DraftStepWrapper, "plan", lambda self, *x, **k: plans.append(1) or real_plan(self, *x, **k))
    for _ in range(3 * allocator_module._MAX_SEEN_STEPS):
        a.alloc_draft(  # (temporaries: freed once no longer held)
            rows.clone(), 2, out_cache_loc=torch.empty(4, dtype=torch.int64), last_loc=torch.empty(2, dtype=torch.int64)
        )
        a.commit(rows, torch.zeros(2, dtype=torch.int64))
    assert plans == [] and not a._kept_steps
    assert 0 < len(a._seen_steps) <= allocator_module._MAX_SEEN_STEPS
    out, last = torch.empty(4, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    a.alloc_draft(rows, 2, out_cache_loc=out, last_loc=last)
    held = [entry for entry in a._seen_steps.values() if entry[0] is rows and entry[1] is out and entry[2] is last]
    assert len(held) == 1, "the call's tensors, held"
    for _ in range(2):
        a.commit(rows, torch.zeros(2, dtype=torch.int64))
        a.alloc_draft(rows, 2, out_cache_loc=out, last_loc=last)
    assert plans == [1] and len(a._kept_steps) == 1
