"""The host path: several threads at once on CPU, CPU kernel modules built beside GPU ones, Triton 3.6's interpreter."""

from __future__ import annotations

import gc
import os
import re
import threading
import weakref

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import specdec_ops
from specdec_ops import DraftCacheAllocator, backend
from specdec_ops import ops as ops_module
from specdec_ops import staging as staging_module
from specdec_ops.bounded import remember
from specdec_ops.reference import get_last_loc_and_assign_extend_cache_locs_torch, get_last_loc_torch
from specdec_ops.staging import HostStaging


def run_threads(target, count: int) -> None:
    """Run ``target(i)`` in ``count`` threads started together; re-raise the first exception of any of them."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_threads_calling_the_ops_get_exact_results():
    table = torch.arange(40 * 64, dtype=torch.int32).reshape(40, 64)
    results: dict[int, list[bool]] = {}

    def calls(i: int) -> None:
        gen = torch.Generator().manual_seed(i)
        ok = []
        for _ in range(25):
            bs = int(torch.randint(1, 40, (1,), generator=gen))
            rows = torch.randint(0, 40, (bs,), generator=gen)
            start = torch.randint(0, 60, (bs,), generator=gen)
            end = start + torch.randint(0, 5, (bs,), generator=gen)
            out, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
                table, rows, start, end, num_tokens=int((end - start).sum())
            )
            want_out, want_last = get_last_loc_and_assign_extend_cache_locs_torch(table, rows, start, end)
            ok.append(torch.equal(out, want_out) and torch.equal(last, want_last))
            window = specdec_ops.assign_extend_cache_locs(table, rows, start, start + 3, window_len=3)
            want_window, _ = get_last_loc_and_assign_extend_cache_locs_torch(table, rows, start, start + 3)
            ok.append(torch.equal(window, want_window))
            ok.append(torch.equal(specdec_ops.get_last_loc(table, rows, start), get_last_loc_torch(table, rows, start)))
        results[i] = ok

    run_threads(calls, 4)
    assert all(all(ok) for ok in results.values())


def drive(alloc: DraftCacheAllocator, seed: int) -> list:
    """A fixed sequence of allocator calls; returns every draft's outputs and the final table."""
    gen = torch.Generator().manual_seed(seed)
    outputs = []
    rows = alloc.add_requests(torch.randint(0, 20, (6,), generator=gen).tolist())
    for _ in range(6):
        out, last = alloc.alloc_draft(rows, 3)
        outputs.append((out.tolist(), last.tolist()))
        alloc.commit(rows, torch.randint(0, 4, (6,), generator=gen))
    alloc.free_requests(rows[:2])
    rows = torch.cat([rows[2:], alloc.add_requests([5, 9])])
    out, last = alloc.alloc_draft(rows, 2)
    outputs.append((out.tolist(), last.tolist()))
    outputs.append(alloc.req_to_token.tolist())
    outputs.append(alloc.num_free_slots())
    return outputs


@pytest.mark.parametrize("page_size", [1, 4])
def test_threads_driving_allocators_match_one_thread(page_size):
    def new_allocator() -> DraftCacheAllocator:
        return DraftCacheAllocator(page_size * 256, 8, 64, page_size=page_size, device="cpu")

    expected = [drive(new_allocator(), seed) for seed in range(3)]
    got: dict[int, list] = {}
    run_threads(lambda i: got.__setitem__(i, drive(new_allocator(), i)), 3)
    assert [got[i] for i in range(3)] == expected


def _probe(x):
    tl.store(x, 1)


def test_building_the_cpu_kernels_leaves_other_threads_jit_compiled(monkeypatch):
    """Building the interpreted CPU copy of a kernel module must not make a @triton.jit elsewhere interpreted."""
    if backend._INTERPRET_ALL:
        pytest.skip("TRITON_INTERPRET=1 is set: every kernel is interpreted on purpose")
    stop = threading.Event()
    made: list[object] = []

    def decorate() -> None:
        while not stop.is_set():
            made.append(triton.jit(_probe))

    thread = threading.Thread(target=decorate)
    thread.start()
    try:
        for _ in range(10):
            monkeypatch.setattr(backend, "_modules", {})
            monkeypatch.setattr(backend, "_modules_by_type", {})
            cpu = backend.kernels("cache_locs", torch.device("cpu"))
            compiled = backend._kernel_module("cache_locs", "compiled")
            assert isinstance(cpu._get_last_loc_and_assign_extend_cache_locs_kernel, InterpretedFunction)
            assert isinstance(cpu._cache_locs_program, InterpretedFunction)
            assert isinstance(compiled._get_last_loc_and_assign_extend_cache_locs_kernel, JITFunction)
            assert isinstance(compiled._cache_locs_program, JITFunction)
    finally:
        stop.set()
        thread.join()
    assert made
    assert all(type(fn) is JITFunction for fn in made)
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] != "1"


class _ScalarTensor:
    """What a scalar looks like inside Triton's interpreter: a tensor whose handle holds a 1-element array."""

    def __init__(self, value: int) -> None:
        self.handle = type("Handle", (), {"data": np.array([value], dtype=np.int32)})()


def test_cpu_kernels_take_loop_bounds_from_one_element_arrays():
    """Triton 3.6's interpreter calls int() on a 1-element array for `range(tensor)`, which NumPy >= 2.4 refuses.

    The CPU copy of every kernel module binds `range` to one that reads such bounds with `.item()`; CI runs the
    kernel tests under Triton 3.6 with the newest NumPy as well.
    """
    module = backend.kernels("cache_locs", torch.device("cpu"))
    bounded = module.range(_ScalarTensor(1), _ScalarTensor(10), _ScalarTensor(4))
    assert list(bounded) == [1, 5, 9]
    assert list(module.range(3)) == [0, 1, 2]


def small_call_args():
    table = torch.arange(6 * 10, dtype=torch.int32).reshape(6, 10)
    rows, start = torch.tensor([4, 0, 2]), torch.tensor([0, 3, 7])
    return table, rows, start


def test_window_len_and_num_tokens_accept_numpy_integers():
    table, rows, start = small_call_args()
    want = specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, start, start + 3, window_len=3)
    got = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        table, rows, start, start + 3, num_tokens=np.int32(9), window_len=np.int64(3)
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "window_len,message",
    [
        (3.0, "window_len must be an int or None, got float"),
        (np.float64(3), "window_len must be an int or None, got numpy.float64"),
        (torch.tensor(3), "window_len must be an int or None, got torch.Tensor"),
        (True, "window_len must be an int or None, got bool"),
    ],
    ids=["float", "numpy-float", "tensor", "bool"],
)
def test_window_len_of_another_type_names_the_python_type(window_len, message):
    table, rows, start = small_call_args()
    with pytest.raises(TypeError, match=re.escape(message)):
        specdec_ops.assign_extend_cache_locs(table, rows, start, start + 3, window_len=window_len)


@pytest.mark.parametrize("validate", [False, True])
def test_end_offset_may_be_none_with_window_len(validate):
    table, rows, start = small_call_args()
    want = specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, start, start + 3, window_len=3)
    got = specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        table, rows, start, None, window_len=3, validate=validate
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    out = specdec_ops.assign_extend_cache_locs(table, rows, start, None, window_len=3, validate=validate)
    assert torch.equal(out, want[0])


def test_end_offset_none_without_window_len_says_so():
    table, rows, start = small_call_args()
    with pytest.raises(TypeError, match=re.escape("end_offset must be a torch.Tensor (it may be None only with")):
        specdec_ops.assign_extend_cache_locs(table, rows, start, None, num_tokens=4)


def test_validate_with_window_len_and_no_end_offset_checks_the_context():
    table, rows, start = small_call_args()
    message = "start_offset[2] + window_len must be <= max_context_len = 10, got 11"  # (no end_offset was given)
    with pytest.raises(ValueError, match=re.escape(message)):
        specdec_ops.assign_extend_cache_locs(table, rows, start, None, window_len=4, validate=True)


@pytest.mark.parametrize("wrapper", [False, True], ids=["function", "wrapper"])
def test_validate_checks_window_len_against_an_end_offset_that_is_the_start_tensor(wrapper):
    """end_offset given as the very tensor of start_offset (windows of 0) is checked against window_len like any
    other: only end_offset=None stands for start_offset + window_len."""
    table, rows, start = small_call_args()
    message = "end_offset[0] - start_offset[0] must equal window_len = 3, got 0"
    with pytest.raises(ValueError, match=re.escape(message)):
        if wrapper:
            specdec_ops.CacheLocsWrapper(table).plan(rows, start, start, window_len=3, validate=True)
        else:
            specdec_ops.get_last_loc_and_assign_extend_cache_locs(
                table, rows, start, start, window_len=3, validate=True
            )


def test_get_last_loc_gives_minus_one_for_negative_prefix_lens():
    table, rows, _ = small_call_args()
    prefix = torch.tensor([-2, 0, 5])
    assert specdec_ops.get_last_loc(table, rows, prefix).tolist() == [-1, -1, 24]


def test_a_bounded_cache_starts_over_at_its_limit():
    cache: dict = {}
    assert [remember(cache, key, key * 10, 3) for key in range(3)] == [0, 10, 20]
    assert cache == {0: 0, 1: 10, 2: 20}
    assert remember(cache, 1, 11, 3) == 11 and cache == {1: 11}, "a full cache is emptied before the new entry"
    remember(cache, 5, 50, 3)
    assert cache == {1: 11, 5: 50}


def test_a_kept_launcher_serves_its_own_kernel_and_specialisation_only(monkeypatch):
    """backend.launch's CUDA fast path keys its kept launchers by the kernel's id (a JITFunction hashes in Python):
    an entry that another kernel left under the key is not used, and dtypes and 16-byte alignment key apart. No GPU
    needed: the launches are stubbed."""
    device = torch.device("cuda", 0)
    monkeypatch.setattr(backend, "_fast_launch", True)
    monkeypatch.setitem(backend._fast_devices, device, True)
    firsts, runs = [], []
    monkeypatch.setattr(backend, "_first_launch", lambda key, kernel, *args: firsts.append(kernel))
    monkeypatch.setattr(backend, "_run_launcher", lambda launcher, grid, args: runs.append((launcher[0], args)) or 1)
    kernel, other = object(), object()
    t = torch.zeros(8, dtype=torch.int64)
    constexprs = (("TILE", 4),)
    key = backend._specialisation(kernel, device, (t,), [t.data_ptr()], constexprs, 4)
    monkeypatch.setitem(backend._launchers, key, (other, (4,), *[None] * 7))
    backend.launch(kernel, (1,), device, (t,), (3,), constexprs, 4)
    assert firsts == [kernel] and runs == []
    monkeypatch.setitem(backend._launchers, key, (kernel, (4,), *[None] * 7))
    backend.launch(kernel, (1,), device, (t,), (3,), constexprs, 4)
    assert firsts == [kernel] and runs == [(kernel, (t.data_ptr(), 3, 4))]
    shifted = torch.zeros(9, dtype=torch.int64)[1:]  # 8 bytes past an aligned address
    narrow = torch.zeros(8, dtype=torch.int32)
    pair = (t, narrow)
    keys = {
        backend._specialisation(kernel, device, tensors, [x.data_ptr() for x in tensors], constexprs, 4)
        for tensors in ((t,), (shifted,), (narrow,), pair, (narrow, t), (t, shifted[:4].view(torch.int32)))
    }
    assert len(keys) == 6
    assert backend._specialisation(other, device, (t,), [t.data_ptr()], constexprs, 4) != key


# ------------------------------------------------------------------------------ calls kept by their tensors


def kept_call_args(device="cpu"):
    """A fused call of 3 requests, windows of 3, into buffers of the caller's (out_cache_loc one element long)."""
    table = torch.arange(6 * 10, dtype=torch.int32, device=device).reshape(6, 10)
    rows = torch.tensor([4, 0, 2], device=device)
    start = torch.tensor([0, 3, 6], device=device)
    out = torch.full((10,), -7, dtype=torch.int64, device=device)
    last = torch.full((3,), -7, dtype=torch.int64, device=device)
    return table, rows, start, start + 3, out, last


@pytest.fixture
def kept_call(monkeypatch):
    """The arguments of a fused call made twice (so kept), the ops' kept calls emptied first and restored after."""
    monkeypatch.setattr(ops_module, "_recent_calls", {})
    monkeypatch.setattr(ops_module, "_seen_calls", {})
    args = kept_call_args()
    fused(*args)
    fused(*args)
    assert len(ops_module._recent_calls) == 1
    return args


def fused(table, rows, start, end, out, last, **kwargs):
    kwargs = {"num_tokens": 9, "window_len": 3, **kwargs}
    return specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, start, end, out, last, **kwargs)


def expected(table, rows, start, end):
    return get_last_loc_and_assign_extend_cache_locs_torch(table, rows, start, end)


def test_a_kept_call_with_the_tensors_of_an_earlier_one_skips_the_checks_and_reads_the_current_values(
    kept_call, monkeypatch
):
    """The second call with the same tensors keeps its launch; a third with them, new values written in place,
    launches it without the checks (here made to raise) and gets the exact slots of those values. Another function
    given the same tensors is another call."""
    args = kept_call
    table, rows, start, end, out, last = args

    def no_checks(*a, **k):
        raise AssertionError("a kept call was checked again")

    monkeypatch.setattr(ops_module, "_prepare_windows", no_checks)
    for values in ([1, 5, 3], [5, 4, 0]):
        rows.copy_(torch.tensor(values))
        start.copy_(torch.tensor([2, 0, 7]))
        end.copy_(start + 3)
        out.fill_(-7)
        last.fill_(-7)
        got_out, got_last = fused(*args)
        want_out, want_last = expected(table, rows, start, end)
        assert torch.equal(got_out, want_out) and torch.equal(got_last, want_last)
        assert got_out._base is out and got_last is last
        assert out[9].item() == -7, "past num_tokens nothing is written"
    with pytest.raises(AssertionError, match="checked again"):  # (its first call)
        specdec_ops.assign_extend_cache_locs(table, rows, start, None, out, num_tokens=9, window_len=3)


def _rebind(tensor, other):
    tensor.data = other


@pytest.mark.parametrize(
    "position,change,error",
    [
        (1, lambda t: _rebind(t, t.to(torch.float32)), "req_pool_indices must be int32 or int64, got torch.float32"),
        (2, lambda t: t.resize_(2), "start_offset has 2 elements but req_pool_indices has 3"),
        (4, lambda t: t.resize_(8), "out_cache_loc has 8 elements but the call needs at least 9"),
        (5, lambda t: t.set_(torch.zeros(6, dtype=torch.int64)[::2]), "last_loc must have unit stride, got stride 2"),
        (4, lambda t: t.as_strided_((9,), (1,), 1), None),
        (4, lambda t: t.as_strided_((4,), (2,)), "out_cache_loc must have unit stride, got stride 2"),
        (0, lambda t: _rebind(t, t.reshape(60)), "req_to_token must be 2-D"),
    ],
    ids=["dtype", "resize", "short-out", "set-strided", "offset", "as-strided", "table-1d"],
)
def test_a_kept_call_whose_tensor_changed_is_checked_again(kept_call, monkeypatch, position, change, error):
    """A tensor of a kept call moved, resized, re-typed or re-strided in place (the same object) since: the call
    raises what it would raise had it never been kept, and launches nothing; or, where the change leaves valid
    arguments (``error`` None: out_cache_loc one element further on), writes where the tensor now is."""
    args = kept_call
    change(args[position])
    if error is None:
        args[4].fill_(-7)
        before = bytes(args[4].untyped_storage())
        got_out, _ = fused(*args)
        assert torch.equal(got_out, expected(*args[:4])[0])
        assert bytes(args[4].untyped_storage())[:8] == before[:8], "the element before the new start is not written"
        return
    launches = []
    monkeypatch.setattr(backend, "launch", lambda *a: launches.append(a))
    with pytest.raises((TypeError, ValueError), match=re.escape(error)) as kept:
        fused(*args)
    assert launches == []
    ops_module._recent_calls.clear()
    ops_module._seen_calls.clear()
    with pytest.raises(kept.type) as fresh:
        fused(*args)
    assert str(kept.value) == str(fresh.value)


def test_a_kept_call_whose_tensor_moved_launches_on_the_new_memory(kept_call):
    """``.data =`` with another valid tensor: the call is checked and resolved again, and writes the new buffer."""
    args = kept_call
    table, rows, start, end, out, last = args
    old_out, old_last = out.data, last.data
    out.data = torch.full((9,), -7, dtype=torch.int64)
    last.data = torch.full((3,), -7, dtype=torch.int32)  # another dtype, another specialisation
    old_out.fill_(-7)
    old_last.fill_(-7)
    got_out, got_last = fused(*args)
    want_out, want_last = expected(table, rows, start, end)
    assert got_out is out and got_last is last
    assert torch.equal(out, want_out) and torch.equal(last, want_last.int())
    assert (old_out == -7).all() and (old_last == -7).all(), "the old buffers are not written"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"validate": True},
        {"num_tokens": None, "window_len": None},
        {"num_tokens": np.int64(9)},
        {"window_len": np.int64(3)},
        {"persistent": True},
    ],
    ids=["validate", "sync", "numpy-num-tokens", "numpy-window", "persistent"],
)
def test_only_the_hot_paths_calls_are_kept(monkeypatch, kwargs):
    """Calls that sync, validate or take counts of other types than int are never kept (each is checked in full);
    persistent=True is kept under its own key."""
    monkeypatch.setattr(ops_module, "_recent_calls", {})
    monkeypatch.setattr(ops_module, "_seen_calls", {})
    args = kept_call_args()
    for _ in range(3):
        fused(*args, **kwargs)
    assert len(ops_module._recent_calls) == (1 if "persistent" in kwargs else 0)
    fused(*args[:4], None, args[5])
    fused(*args[:4], None, args[5])
    fused(*args[:4], args[4], None)
    fused(*args[:4], args[4], None)
    assert len(ops_module._recent_calls) == (1 if "persistent" in kwargs else 0), "calls that make buffers"


def test_calls_given_new_tensors_each_time_keep_nothing(monkeypatch):
    """A call not kept waits with its tensors held but the table: a new tensor cannot take one of their ids, so a call
    is kept only once the very same tensors come again. Calls given new tensors each time keep nothing, and hold
    the tensors of a few calls at most."""
    monkeypatch.setattr(ops_module, "_recent_calls", {})
    monkeypatch.setattr(ops_module, "_seen_calls", {})
    kept = []
    real = backend.launch_and_keep
    monkeypatch.setattr(backend, "launch_and_keep", lambda *a: kept.append(1) or real(*a))
    for _ in range(3 * ops_module._MAX_SEEN_CALLS):
        fused(*kept_call_args())  # (temporaries: freed once no longer held)
    assert kept == [] and not ops_module._recent_calls
    assert 0 < len(ops_module._seen_calls) <= ops_module._MAX_SEEN_CALLS
    args = kept_call_args()
    fused(*args)
    (waiting,) = [held for held in ops_module._seen_calls.values() if held[0] is args[1]]
    assert all(x is y for x, y in zip(waiting, args[1:])), "the call's tensors but the table, held"
    table = weakref.ref(args[0])
    args = (kept_call_args()[0], *args[1:])
    gc.collect()
    assert table() is None, "the table is not held"
    fused(*args)  # (another table: another key)
    fused(*args)
    assert kept == [1] and len(ops_module._recent_calls) == 1


def test_a_kept_call_holds_no_tensor(monkeypatch):
    monkeypatch.setattr(ops_module, "_recent_calls", {})
    monkeypatch.setattr(ops_module, "_seen_calls", {})
    args = list(kept_call_args())
    fused(*args)
    fused(*args)
    assert len(ops_module._recent_calls) == 1
    refs = [weakref.ref(t) for t in args]
    del args
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_a_kept_call_takes_no_object_but_a_tensor(kept_call):
    """The facts of a kept call are read through torch.Tensor's own methods: an object that forwards a tensor's
    attributes, under the identity key of a kept call, is not taken for it."""
    args = kept_call
    (key,) = ops_module._recent_calls

    class Forwarding:
        def __init__(self, tensor):
            self._tensor = tensor

        def __getattr__(self, name):
            return getattr(self._tensor, name)

    forged = (*args[:5], Forwarding(args[5]))
    assert ops_module._run_recent(key, forged) is None
    assert ops_module._run_recent(key, args) is not None


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("window_len", [3, None], ids=["uniform", "ragged"])
def test_gpu_kept_calls_get_exact_results_eagerly_and_in_a_graph(monkeypatch, window_len):
    """Calls kept by their tensors launch through the kept launcher (the CUDA fast path) on the tensors' current
    values; a buffer moved by ``.data =`` (another dtype too) is written where it now is; a kept call captured in a
    graph replays on the values written before each replay."""
    monkeypatch.setattr(ops_module, "_recent_calls", {})
    monkeypatch.setattr(ops_module, "_seen_calls", {})
    args = kept_call_args("cuda")
    table, rows, start, end, out, last = args
    gen = torch.Generator().manual_seed(7)

    def new_values():
        rows.copy_(torch.randperm(6, generator=gen)[:3])
        start.copy_(torch.randint(0, 7, (3,), generator=gen))
        end.copy_(start + (3 if window_len else torch.randint(0, 4, (3,), generator=gen).cuda()))
        out.fill_(-7)
        last.fill_(-7)

    def check(got_out, got_last):
        want_out, want_last = expected(table, rows, start, end)
        assert torch.equal(got_out[: want_out.numel()], want_out) and torch.equal(got_last.long(), want_last)
        assert (out[want_out.numel() :] == -7).all()

    for step in range(6):
        if step == 3:
            out.data = torch.empty(12, dtype=torch.int64, device="cuda")
            last.data = torch.empty(3, dtype=torch.int32, device="cuda")
        new_values()
        check(*fused(*args, window_len=window_len))
    (kept,) = ops_module._recent_calls.values()  # (one identity key: the moved buffers' call took its place)
    assert kept[0][4][0] == out.data_ptr() and kept[0][5][0] == last.data_ptr() and kept[1]._launcher is not None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fused(*args, window_len=window_len)
    for _ in range(3):
        new_values()
        graph.replay()
        check(*result)


@pytest.mark.gpu
def test_gpu_host_staging_never_overwrites_a_queued_copy():
    """Host lists reach the device through a ring of pinned slots: with every copy queued behind a long kernel, a
    slot is written again only after the copy that read it (40 calls wrap the 16-slot ring twice)."""
    staging = HostStaging(torch.device("cuda", 0), 8)
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # tens of ms on any GPU: the copies below wait behind it
    sent = [[1000 * i + j for j in range(1 + i % 8)] for i in range(40)]
    got = [staging.to_device(values) for values in sent]
    torch.cuda.synchronize()
    assert [t.tolist() for t in got] == sent
    assert all(t.device.type == "cuda" and t.dtype == torch.int64 for t in got)


@pytest.mark.gpu
def test_gpu_host_staging_keeps_its_formats_and_views_bounded():
    """Lengths without end must not grow the ring's caches of packing formats and slot views without end."""
    staging = HostStaging(torch.device("cuda", 0), 2 * staging_module._MAX_VIEWS)
    for n in range(1, 2 * staging_module._MAX_VIEWS):
        assert staging.to_device(list(range(n))).tolist() == list(range(n))
    assert len(staging._formats) <= staging_module._MAX_VIEWS and len(staging._views) <= staging_module._MAX_VIEWS


@pytest.mark.gpu
def test_gpu_host_staging_asks_the_driver_whether_the_device_reads_pinned_memory_in_place():
    pinned = torch.zeros(8, dtype=torch.int64).pin_memory()
    assert staging_module._device_reads_in_place(pinned.data_ptr())  # every 64-bit CUDA platform maps it there
    assert not staging_module._device_reads_in_place(torch.zeros(8, dtype=torch.int64).data_ptr())  # pageable


@pytest.mark.gpu
def test_gpu_free_requests_reads_host_rows_in_place(monkeypatch):
    """Rows freed as a host list reach the free kernel in a slot of the pinned ring, read in place (no device tensor,
    no copy): with 40 adds and frees queued behind a long kernel (the ring wraps more than twice), the state is that
    of a twin allocator given every freed list as a device tensor, call for call."""
    twins = [DraftCacheAllocator(4 * 2048, 64, 128, page_size=4, device="cuda") for _ in range(2)]
    staged = []
    stage = HostStaging.stage

    def spy(self, values):
        view = stage(self, values)
        staged.append(view)
        return view

    monkeypatch.setattr(HostStaging, "stage", spy)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 100, size=int(rng.integers(1, 6))).tolist() for _ in range(40)]
    for k, alloc in enumerate(twins):
        alloc.add_requests([7])  # in use throughout: no free empties the allocator (which would sync)
        torch.cuda.synchronize()
        if k == 0:
            torch.cuda._sleep(100_000_000)  # tens of ms on any GPU: every launch below waits behind it
        for i, lens in enumerate(prompts):
            gone = alloc.rows_in_use()[1 + i % 3 :: 4][:3]
            if gone:
                alloc.free_requests(gone if k == 0 else torch.tensor(gone, device="cuda"))
            alloc.add_requests(lens)
        torch.cuda.synchronize()
    assert len(staged) > 16
    assert all(view is not None and view.device.type == "cpu" and view.is_pinned() for view in staged)
    for name in ("req_to_token", "seq_lens", "alloc_lens", "prefix_lens", "free_pages", "free_head", "num_free_pages"):
        assert torch.equal(getattr(twins[0], name), getattr(twins[1], name)), name
    assert twins[0].rows_in_use() == twins[1].rows_in_use()


@pytest.mark.gpu
def test_gpu_host_staging_leaves_what_it_cannot_take_to_the_caller():
    staging = HostStaging(torch.device("cuda", 0), 4)
    assert staging.to_device([1] * 5) is None  # more than a slot holds
    assert staging.to_device([2**63]) is None  # not an int64
    assert staging.to_device([-(2**63), 2**63 - 1]).tolist() == [-(2**63), 2**63 - 1]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        assert staging.to_device([1, 2]) is None  # a capture would keep the slot's address
        assert staging.stage([1, 2]) is None
    assert staging.stage([1] * 5) is None
    assert staging.stage([2**63]) is None


@pytest.mark.parametrize("module_name", ["cache_locs", "allocator"])
def test_npu_kernels_specialise_on_no_argument_value(module_name):
    # What an NPU compiles is then a function of dtypes and constexprs alone, the key of the offline Ascend check.
    npu = backend.npu_kernels(module_name)
    compiled = backend._kernel_module(module_name, "compiled")
    assert backend.npu_kernels(module_name) is npu
    kernels = [
        name
        for name, value in vars(npu).items()
        if isinstance(value, JITFunction) and value.fn.__globals__ is vars(npu) and name.endswith("_kernel")
    ]
    assert len(kernels) >= 3
    for name in kernels:
        fn, original = getattr(npu, name), getattr(compiled, name)
        assert fn is not original and fn.src == original.src
        values = [p for p in fn.params if not p.is_constexpr]
        assert values, name
        assert all(p.do_not_specialize and p.do_not_specialize_on_alignment for p in values), name
        # The CUDA module keeps its specialisation on 16-byte alignment.
        assert not all(p.do_not_specialize_on_alignment for p in original.params if not p.is_constexpr), name
    # Helpers called from a kernel are the copy's own, so nested calls stay in the NPU build.
    helpers = [v for k, v in vars(npu).items() if isinstance(v, JITFunction) and not k.endswith("_kernel")]
    assert any(v.fn.__globals__ is vars(npu) for v in helpers)


def test_an_npu_device_gets_the_npu_kernels(monkeypatch):
    monkeypatch.setattr(backend, "_modules", {})
    monkeypatch.setattr(backend, "_modules_by_type", {})
    monkeypatch.setattr(backend, "is_npu", lambda device: device.type == "meta")
    monkeypatch.setattr(backend, "_DEVICE_TYPES", (*backend._DEVICE_TYPES, "meta"))
    npu = backend.kernels("cache_locs", torch.device("meta"))
    assert npu is backend.npu_kernels("cache_locs")
    kernel = npu._get_last_loc_kernel
    assert all(p.do_not_specialize_on_alignment for p in kernel.params if not p.is_constexpr)
    assert backend.kernels("cache_locs", torch.device("cpu")) is not npu
