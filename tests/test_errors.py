"""Bad input: clear TypeError/ValueError that changes nothing, and no access outside any tensor otherwise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICES, SENTINEL, sentinel_like

import specdec_ops
from specdec_ops import DraftCacheAllocator, checks, ops


def good_args(device="cpu"):
    table = (torch.arange(6 * 10, dtype=torch.int32).reshape(6, 10) + 1).to(device)
    rows = torch.tensor([0, 5, 2, 2], device=device)
    start = torch.tensor([0, 3, 9, 4], device=device)
    end = torch.tensor([2, 6, 10, 4], device=device)
    return {"req_to_token": table, "req_pool_indices": rows, "start_offset": start, "end_offset": end}


def call_fused(**overrides):
    args = good_args()
    out = overrides.pop("out_cache_loc", sentinel_like(6, torch.int64, "cpu"))
    last = overrides.pop("last_loc", sentinel_like(4, torch.int64, "cpu"))
    kwargs = {"num_tokens": 6}
    for key in ("num_tokens", "window_len", "validate"):
        if key in overrides:
            kwargs[key] = overrides.pop(key)
    args.update(overrides)
    before = (out.clone(), last.clone())
    return (
        out,
        last,
        before,
        lambda: specdec_ops.get_last_loc_and_assign_extend_cache_locs(
            **args, out_cache_loc=out, last_loc=last, **kwargs
        ),
    )


def _quietly(make):
    """``make()`` without the UserWarnings torch gives for its beta and prototype layouts (sparse CSR, nested)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return make()


METADATA_ERRORS = [
    ("table-not-tensor", {"req_to_token": [[1, 2]]}, TypeError, "req_to_token must be a torch.Tensor, got list"),
    (
        "table-float",
        {"req_to_token": torch.zeros(6, 10)},
        TypeError,
        "req_to_token must be int32 or int64, got torch.float32",
    ),
    ("table-1d", {"req_to_token": torch.zeros(60, dtype=torch.int32)}, ValueError, "req_to_token must be 2-D"),
    (
        "table-transposed",
        {"req_to_token": torch.zeros(10, 6, dtype=torch.int32).t()},
        ValueError,
        "req_to_token must have unit stride along positions, got strides (1, 6)",
    ),
    ("rows-float", {"req_pool_indices": torch.zeros(4)}, TypeError, "req_pool_indices must be int32 or int64"),
    (
        "rows-2d",
        {"req_pool_indices": torch.zeros(2, 2, dtype=torch.int64)},
        ValueError,
        "req_pool_indices must be 1-D, got shape (2, 2)",
    ),
    (
        "rows-strided",
        {"req_pool_indices": torch.zeros(8, dtype=torch.int64)[::2]},
        ValueError,
        "req_pool_indices must have unit stride, got stride 2",
    ),
    (
        "start-length",
        {"start_offset": torch.zeros(3, dtype=torch.int64)},
        ValueError,
        "start_offset has 3 elements but req_pool_indices has 4",
    ),
    (
        "end-dtype",
        {"end_offset": torch.zeros(4, dtype=torch.int16)},
        TypeError,
        "end_offset must be int32 or int64, got torch.int16",
    ),
    (
        "end-device",
        {"end_offset": torch.zeros(4, dtype=torch.int64, device="meta")},
        ValueError,
        "end_offset must be on the device of req_to_token (cpu), got meta",
    ),
    (
        "out-small",
        {"out_cache_loc": torch.zeros(5, dtype=torch.int64)},
        ValueError,
        "out_cache_loc has 5 elements but the call needs at least 6",
    ),
    (
        "out-float",
        {"out_cache_loc": torch.zeros(6)},
        TypeError,
        "out_cache_loc must be int32 or int64, got torch.float32",
    ),
    (
        "last-length",
        {"last_loc": torch.zeros(3, dtype=torch.int64)},
        ValueError,
        "last_loc has 3 elements but req_pool_indices has 4",
    ),
    (
        "table-sparse",
        {"req_to_token": _quietly(lambda: torch.zeros(6, 10, dtype=torch.int32).to_sparse_csr())},
        ValueError,
        "req_to_token must be a dense (strided) tensor, got layout torch.sparse_csr",
    ),
    (
        "rows-sparse",
        {"req_pool_indices": torch.zeros(4, dtype=torch.int64).to_sparse()},
        ValueError,
        "req_pool_indices must be a dense (strided) tensor, got layout torch.sparse_coo",
    ),
    (
        "start-nested",
        {"start_offset": _quietly(lambda: torch.nested.nested_tensor([torch.zeros(2, dtype=torch.int64)] * 2))},
        ValueError,
        "start_offset must be a dense (strided) tensor, got a nested tensor",
    ),
    (  # 1-D and contiguous: it passed the fast check and failed in the launch, naming nothing (a review)
        "rows-nested-1d",
        {"req_pool_indices": _quietly(lambda: torch.nested.nested_tensor([torch.tensor(v) for v in (0, 5, 2, 2)]))},
        ValueError,
        "req_pool_indices must be a dense (strided) tensor, got a nested tensor",
    ),
    ("num-tokens-negative", {"num_tokens": -1}, ValueError, "num_tokens must be in [0, 2**31), got -1"),
    ("num-tokens-float", {"num_tokens": 6.0}, TypeError, "num_tokens must be an int or None, got float"),
    ("num-tokens-bool", {"num_tokens": True}, TypeError, "num_tokens must be an int or None, got bool"),
    ("window-negative", {"window_len": -2}, ValueError, "window_len must be in [0, 2**31), got -2"),
    ("persistent-str", {"persistent": "yes"}, TypeError, "persistent must be a bool or None, got str"),
    # validate is a flag: "no" used to turn it on, a tensor to raise torch's RuntimeError
    ("validate-str", {"validate": "no"}, TypeError, "validate must be a bool, got str"),
    (
        "validate-tensor",
        {"validate": torch.tensor([True, False])},
        TypeError,
        "validate must be a bool, got torch.Tensor",
    ),
    ("window-too-many", {"window_len": 2}, ValueError, "num_tokens must be at least bs * window_len = 8, got 6"),
]


class Forwarding:
    """An object that forwards every attribute to a tensor: no tensor (a probe of 2026-11-25 found it taken for one,
    written through, and an allocator changed before a later step raised)."""

    def __init__(self, tensor):
        self._tensor = tensor

    def __getattr__(self, name):
        return getattr(self._tensor, name)

    def __iter__(self):
        return iter(self._tensor.tolist())


@pytest.mark.parametrize(
    "make",
    [list, tuple, np.array, lambda values: Forwarding(torch.tensor(values))],
    ids=["list", "tuple", "ndarray", "forwarding"],
)
def test_an_output_that_is_no_tensor_raises_type_error_naming_it(make):
    """out_cache_loc as a list raised AttributeError (a new-user audit, 2026-11-25): the fused op, the gather alone and
    the wrapper's plan now name it and its Python type, as they do last_loc's."""
    out = make([SENTINEL] * 6)
    message = f"out_cache_loc must be a torch.Tensor, got {checks.type_name(out)}"
    args = good_args()
    calls = [
        lambda: specdec_ops.get_last_loc_and_assign_extend_cache_locs(**args, out_cache_loc=out, num_tokens=6),
        lambda: specdec_ops.assign_extend_cache_locs(**args, out_cache_loc=out, num_tokens=6),
        lambda: specdec_ops.CacheLocsWrapper(args["req_to_token"]).plan(
            *list(args.values())[1:], out_cache_loc=out, num_tokens=6
        ),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=re.escape(message)):
            call()
    assert list(out) == [SENTINEL] * 6
    checks.check_npu_dtypes({"out_cache_loc": out})  # (what is no tensor is left to the check that names its type)


@pytest.mark.parametrize("overrides,exc,message", [c[1:] for c in METADATA_ERRORS], ids=[c[0] for c in METADATA_ERRORS])
def test_metadata_errors_name_the_argument_and_change_nothing(overrides, exc, message):
    out, last, before, call = call_fused(**overrides)
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)
    assert torch.equal(out, before[0]) and torch.equal(last, before[1])


VALUE_ERRORS = [
    (
        "row-negative",
        {"req_pool_indices": torch.tensor([0, -1, 2, 2])},
        "req_pool_indices[1] must be in [0, 6) (rows of req_to_token), got -1",
    ),
    (
        "row-too-big",
        {"req_pool_indices": torch.tensor([0, 5, 6, 2])},
        "req_pool_indices[2] must be in [0, 6) (rows of req_to_token), got 6",
    ),
    ("start-negative", {"start_offset": torch.tensor([0, 3, 9, -1])}, "start_offset[3] must be >= 0, got -1"),
    (
        "end-before-start",
        {"end_offset": torch.tensor([2, 2, 10, 4])},
        "end_offset[1] must be >= start_offset[1] = 3, got 2",
    ),
    (
        "end-past-table",
        {"end_offset": torch.tensor([2, 6, 11, 4])},
        "end_offset[2] must be <= max_context_len = 10, got 11",
    ),
    (
        "total-too-big",
        {"num_tokens": 5, "out_cache_loc": sentinel_like(6, torch.int64, "cpu")},
        "the windows must hold at most num_tokens = 5 tokens, got 6",
    ),
    (
        "window-promise",
        {"window_len": 1, "num_tokens": 6},
        "end_offset[0] - start_offset[0] must equal window_len = 1, got 2",
    ),
    (  # num_tokens defaults to bs * window_len: the broken promise is named, not that default
        "window-promise-no-num_tokens",
        {"window_len": 1, "num_tokens": None},
        "end_offset[0] - start_offset[0] must equal window_len = 1, got 2",
    ),
]


@pytest.mark.parametrize("overrides,message", [c[1:] for c in VALUE_ERRORS], ids=[c[0] for c in VALUE_ERRORS])
def test_validate_reports_the_first_bad_value_and_changes_nothing(overrides, message):
    out, last, before, call = call_fused(validate=True, **overrides)
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
    assert torch.equal(out, before[0]) and torch.equal(last, before[1])


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("sized", [False, True], ids=["no-num_tokens", "num_tokens"])
def test_tensors_on_a_device_that_holds_no_data_raise_value_error(validate, sized):
    """meta tensors pass the metadata checks but hold no values: a ValueError before anything reads them (the
    size sync, validate) or launches."""
    args = {key: value.to("meta") for key, value in good_args().items()}
    kwargs = {"num_tokens": 6} if sized else {}
    message = re.escape("req_to_token (and every tensor of the call) must be on cpu, cuda or npu, got device meta")
    with pytest.raises(ValueError, match=message):
        specdec_ops.get_last_loc_and_assign_extend_cache_locs(**args, validate=validate, **kwargs)
    with pytest.raises(ValueError, match=message):
        specdec_ops.get_last_loc(
            args["req_to_token"], args["req_pool_indices"], args["start_offset"], validate=validate
        )


def _overlap(case: str, args: dict) -> tuple[dict, str | None]:
    """Output buffers for ``args`` (good_args) that share memory with an input or with each other, and the words
    of the error (None: they share nothing)."""
    shared = sentinel_like(10, torch.int64, "cpu")
    wide = torch.zeros(6, 20, dtype=torch.int32)
    wide[:, :10] = args["req_to_token"]
    return {
        "last-is-start": ({"last_loc": args["start_offset"]}, "last_loc must not share memory with start_offset"),
        "out-and-last": ({"out_cache_loc": shared[:6], "last_loc": shared[4:8]}, "must not share memory with"),
        "out-copied": ({"out_cache_loc": torch.cat([args["end_offset"], args["end_offset"]])[:6]}, None),
        "out-in-table": (
            {"req_to_token": wide[:, :10], "out_cache_loc": wide.view(-1)[30:36]},
            "out_cache_loc must not share memory with req_to_token",
        ),
        "last-in-rows": ({"last_loc": args["req_pool_indices"][:4]}, "last_loc must not share memory with req_pool"),
    }[case]


@pytest.mark.parametrize("wrapper", [False, True], ids=["validate", "plan"])
@pytest.mark.parametrize("case", ["last-is-start", "out-and-last", "out-copied", "out-in-table", "last-in-rows"])
def test_output_buffers_that_share_memory_with_inputs_are_refused(case, wrapper):
    """The kernel reads other requests' offsets while it writes: an output sharing memory with an input (or the
    other output) would give wrong values, so validate=True and CacheLocsWrapper.plan raise, naming both."""
    args = good_args()
    given, message = _overlap(case, args)
    args.update(given)
    table, rows, start, end = (args[k] for k in ("req_to_token", "req_pool_indices", "start_offset", "end_offset"))
    out, last = args.get("out_cache_loc"), args.get("last_loc")
    before = [t.clone() for t in (table, rows, start, end)]
    if wrapper:
        call = lambda: specdec_ops.CacheLocsWrapper(table).plan(rows, start, end, out, last, num_tokens=6)  # noqa: E731
    else:
        call = lambda: specdec_ops.get_last_loc_and_assign_extend_cache_locs(  # noqa: E731
            table, rows, start, end, out, last, num_tokens=6, validate=True
        )
    if message is None:
        call()
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
    assert all(torch.equal(a, b) for a, b in zip((table, rows, start, end), before))


def test_validate_passes_good_input():
    out, last, _, call = call_fused(validate=True)
    call()
    assert out.tolist() == [1, 2, 54, 55, 56, 30] and last.tolist() == [-1, 53, 29, 24]


def test_flags_must_be_bools():
    """``validate`` of get_last_loc and ``with_last_loc`` of CacheLocsWrapper are flags (found by an audit: a string
    was taken for its truth, a tensor raised torch's RuntimeError)."""
    table = torch.zeros(4, 8, dtype=torch.int32)
    rows = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="validate must be a bool, got numpy.ndarray"):
        specdec_ops.get_last_loc(table, rows, rows, validate=np.array([1, 2]))
    with pytest.raises(TypeError, match="with_last_loc must be a bool, got str"):
        specdec_ops.CacheLocsWrapper(table, with_last_loc="no")


@pytest.mark.parametrize("bs", [0, 2])
def test_persistent_is_checked_whatever_the_batch(bs):
    """``persistent`` is None or a bool for every op and the wrapper, also for a batch of no requests, which launches
    nothing (it used to be checked only where the grid was made: ``persistent="x"`` passed with an empty batch)."""
    table = torch.zeros(4, 8, dtype=torch.int32)
    rows = torch.arange(bs)
    start, end = torch.ones(bs, dtype=torch.int64), torch.full((bs,), 3, dtype=torch.int64)
    out = torch.full((2 * bs,), SENTINEL, dtype=torch.int64)
    calls = {
        "get_last_loc": lambda p: specdec_ops.get_last_loc(table, rows, start, persistent=p),
        "assign_extend_cache_locs": lambda p: specdec_ops.assign_extend_cache_locs(
            table, rows, start, end, out, num_tokens=2 * bs, persistent=p
        ),
        "fused": lambda p: specdec_ops.get_last_loc_and_assign_extend_cache_locs(
            table, rows, start, end, out, num_tokens=2 * bs, persistent=p
        ),
        "CacheLocsWrapper.plan": lambda p: specdec_ops.CacheLocsWrapper(table).plan(
            rows, start, end, out, num_tokens=2 * bs, persistent=p
        ),
    }
    for name, call in calls.items():
        out.fill_(SENTINEL)
        with pytest.raises(TypeError, match="persistent must be a bool or None, got str"):
            call("x")
        assert (out == SENTINEL).all(), name
        for good in (None, False, True):
            call(good)


def test_get_last_loc_errors():
    args = good_args()
    with pytest.raises(ValueError, match=r"prefix_lens has 2 elements but req_pool_indices has 4"):
        specdec_ops.get_last_loc(args["req_to_token"], args["req_pool_indices"], torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"prefix_lens must be int32 or int64, got torch.float64"):
        specdec_ops.get_last_loc(args["req_to_token"], args["req_pool_indices"], torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"prefix_lens\[2\] must be in \[0, 10\] \(max_context_len\), got 11"):
        specdec_ops.get_last_loc(
            args["req_to_token"], args["req_pool_indices"], torch.tensor([1, 2, 11, 0]), validate=True
        )
    with pytest.raises(ValueError, match=r"req_pool_indices\[0\] must be in \[0, 6\)"):
        specdec_ops.get_last_loc(
            args["req_to_token"], torch.tensor([7, 0, 0, 0]), torch.ones(4, dtype=torch.int64), validate=True
        )


@pytest.mark.parametrize("case", ["in-prefix-lens", "in-table", "in-rows", "apart"])
def test_get_last_loc_validate_refuses_a_last_loc_that_shares_memory_with_an_input(case):
    """As the window ops: with validate=True a last_loc sharing memory with an input raises before anything is
    written (the kernel's programs read prefix lengths that another program would be overwriting)."""
    args = good_args()
    table = args["req_to_token"].clone()
    lens = torch.arange(1, 11, dtype=torch.int64)  # two of them the batch's, the rest room for a last_loc
    rows = args["req_pool_indices"].clone()
    last, name = {
        "in-prefix-lens": (lens[1:5], "prefix_lens"),
        "in-table": (table.view(-1)[20:24], "req_to_token"),
        "in-rows": (rows, "req_pool_indices"),
        "apart": (sentinel_like(4, torch.int32, "cpu"), None),
    }[case]
    before = [t.clone() for t in (table, lens, rows, last)]
    call = lambda: specdec_ops.get_last_loc(table, rows, lens[:4], last_loc=last, validate=True)  # noqa: E731
    if name is None:
        assert call().tolist() == [int(table[r, p - 1]) for r, p in zip(rows.tolist(), lens[:4].tolist())]
        return
    with pytest.raises(ValueError, match=re.escape(f"last_loc must not share memory with {name}")):
        call()
    assert all(torch.equal(a, b) for a, b in zip((table, lens, rows, last), before))


def test_assign_extend_cache_locs_errors():
    args = good_args()
    with pytest.raises(ValueError, match=r"out_cache_loc has 2 elements but the call needs at least 6"):
        specdec_ops.assign_extend_cache_locs(**args, out_cache_loc=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"end_offset\[2\] must be <= max_context_len = 10, got 12"):
        specdec_ops.assign_extend_cache_locs(**{**args, "end_offset": torch.tensor([2, 6, 12, 4])}, validate=True)


MARKER = 987654321
GUARD = 8


def guarded(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a view of n elements with GUARD sentinel elements on both sides in buffer."""
    buf = sentinel_like(n + 2 * GUARD, dtype, device)
    return buf, buf[GUARD : GUARD + n]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window_len,two", [(None, False), (None, True), (3, False)], ids=["ragged", "ragged2", "u3"])
def test_adversarial_values_never_touch_memory_outside_the_tensors(device, window_len, two, monkeypatch):
    """validate=False with nonsense values: wrong numbers are allowed, out-of-bounds access is not.

    The table is a view inside a larger tensor filled with MARKER: a read outside the view would bring
    MARKER into an output. The outputs are views with sentinel guards around them. ``two``: ragged windows in two
    launches (the tile sums, then the gather), as past _RAGGED_ONE_LAUNCH_MAX_BATCH requests in a graph.
    """
    if two:
        monkeypatch.setattr(ops, "_RAGGED_ONE_LAUNCH_MAX_BATCH", 3)
        monkeypatch.setattr(ops, "_ragged_in_two_launches", lambda bs, window_len, device: window_len is None)
    num_rows, max_context_len = 5, 12
    big = torch.full((num_rows + 4, max_context_len + 6), MARKER, dtype=torch.int64)
    big[2 : 2 + num_rows, 3 : 3 + max_context_len] = torch.arange(num_rows * max_context_len).reshape(
        num_rows, max_context_len
    )
    table = big.to(device)[2 : 2 + num_rows, 3 : 3 + max_context_len]
    huge = 2**40
    rows = torch.tensor([-1, 5, 4, huge, -huge, 0, 2**31, 3, 1, 4], device=device)
    start = torch.tensor([0, 3, -5, 2, 11, 12, 13, -huge, huge, 2**31 - 2], device=device)
    end = torch.tensor([4, 1, 20, 2**33, 15, 12, -3, 5, huge + 3, 2**31 + 5], device=device)
    num_tokens = 30
    out_buf, out = guarded(num_tokens, torch.int64, device)
    last_buf, last = guarded(rows.numel(), torch.int64, device)
    specdec_ops.get_last_loc_and_assign_extend_cache_locs(
        table, rows, start, end, out, last, num_tokens=num_tokens, window_len=window_len
    )
    comp_buf, comp = guarded(num_tokens, torch.int32, device)
    specdec_ops.assign_extend_cache_locs(table, rows, start, end, comp, num_tokens=num_tokens, window_len=window_len)
    lone = specdec_ops.get_last_loc(table, rows, start)
    if device == "cuda":
        torch.cuda.synchronize()
    for buf, n in ((out_buf, num_tokens), (last_buf, rows.numel()), (comp_buf, num_tokens)):
        assert buf[:GUARD].tolist() == [SENTINEL] * GUARD
        assert buf[GUARD + n :].tolist() == [SENTINEL] * GUARD
    for t in (out, last, comp, lone):
        assert MARKER not in t.tolist()
        assert ((t >= -1) & (t < num_rows * max_context_len) | (t == SENTINEL)).all()
    assert last[0].item() == -1  # start 0
    assert lone.tolist() == last.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="needs compute-sanitizer")
def test_memcheck_finds_no_error_with_adversarial_values():
    """Run the adversarial test on CUDA under compute-sanitizer's memcheck: any bad access fails it."""
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    cmd = [
        "compute-sanitizer",
        "--tool",
        "memcheck",
        "--error-exitcode",
        "86",
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        os.path.abspath(__file__),
        "-k",
        "adversarial and cuda",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "ERROR SUMMARY: 0 errors" in output
    assert "4 passed" in output


@pytest.mark.parametrize("device", DEVICES)
def test_adversarial_allocator_steps_past_capacity_stay_inside_the_tensors(device):
    """What graph replays past capacity do: the step's kernels without the host checks, 20 steps into a pool
    and contexts that hold 4. Wrong slots are allowed then; memory outside the allocator's tensors is not."""
    page_size = 16 if device == "npu" else 4  # (an NPU takes page sizes 1, 16, 64, 128)
    alloc = DraftCacheAllocator(8 * page_size, 3, 24, page_size=page_size, device=device)
    rows = alloc.add_requests([2, 5, 1])
    out_buf, out = guarded(3 * 4, torch.int64, device)
    last_buf, last = guarded(3, torch.int64, device)
    accept = torch.full((3,), 4, dtype=torch.int64, device=device)
    for _ in range(20):
        alloc._launch_alloc(rows, 4, None, None, None, out, last)
        alloc.commit(rows, accept)
    if device == "cuda":
        torch.cuda.synchronize()
    for buf, n in ((out_buf, 12), (last_buf, 3)):
        assert buf[:GUARD].tolist() == [SENTINEL] * GUARD
        assert buf[GUARD + n :].tolist() == [SENTINEL] * GUARD
    total = alloc.total_slots
    assert ((out >= -1) & (out < total)).all() and ((last >= -1) & (last < total)).all()
    assert ((alloc.req_to_token >= 0) & (alloc.req_to_token < total)).all()


def test_validate_names_the_window_end_past_the_table_not_a_wrapped_one():
    """int32 start offsets near 2**31 with window_len and no end_offset: the end is computed in int64 for the check,
    so the message names the real end past max_context_len, not the int32 value it wraps to."""
    table = torch.zeros(2, 8, dtype=torch.int32)
    start = torch.tensor([2**31 - 3], dtype=torch.int32)
    with pytest.raises(ValueError) as caught:
        specdec_ops.assign_extend_cache_locs(
            table, torch.tensor([0]), start, None, num_tokens=5, window_len=5, validate=True
        )
    assert str(caught.value) == "start_offset[0] + window_len must be <= max_context_len = 8, got 2147483650"


def _npu_error(name: str, dtype: torch.dtype = torch.int32) -> str:
    return rf"^on an NPU, {name} must be int64 \(.*offline Ascend compile check.*\), got {dtype}$"


def _i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _i64(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _check_npu_ops(table: torch.Tensor) -> None:
    rows, start, end = _i64(1, 0), _i64(2, 0), _i64(4, 3)
    assert specdec_ops.get_last_loc(table, rows, start).tolist() == [11, -1]
    out, last = specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, start, end)
    assert out.tolist() == [12, 13, 0, 1, 2] and last.tolist() == [11, -1]
    cases = [
        ("req_pool_indices", lambda: specdec_ops.get_last_loc(table, _i32(1, 0), start)),
        ("prefix_lens", lambda: specdec_ops.get_last_loc(table, rows, _i32(2, 0))),
        ("last_loc", lambda: specdec_ops.get_last_loc(table, rows, start, last_loc=_i32(0, 0))),
        ("start_offset", lambda: specdec_ops.assign_extend_cache_locs(table, rows, _i32(2, 0), end)),
        ("end_offset", lambda: specdec_ops.assign_extend_cache_locs(table, rows, start, _i32(4, 3))),
        ("out_cache_loc", lambda: specdec_ops.assign_extend_cache_locs(table, rows, start, end, _i32(*[7] * 5))),
        (
            "last_loc",
            lambda: specdec_ops.get_last_loc_and_assign_extend_cache_locs(
                table, rows, start, end, _i64(*[7] * 5), _i32(7, 7)
            ),
        ),
        ("start_offset", lambda: specdec_ops.CacheLocsWrapper(table).plan(rows, _i32(2, 0), window_len=2)),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=_npu_error(name)):
            call()


def test_an_npu_takes_int64_index_tensors_beside_an_int32_or_int64_table(monkeypatch):
    """Its kernels are their dtypes and constexprs (backend.npu_kernels) and the Ascend check compiles int64 index
    tensors: another dtype is refused before anything runs, naming the tensor."""
    from specdec_ops import backend

    monkeypatch.setattr(backend, "is_npu", lambda device: True)
    i32 = _i32
    for table in (torch.arange(20, dtype=torch.int32).reshape(2, 10), torch.arange(20).reshape(2, 10)):
        _check_npu_ops(table)

    alloc = DraftCacheAllocator(128, 4, 32, page_size=16)
    rows = alloc.add_requests([3, 17])
    before = alloc.num_free_slots()
    state = [t.clone() for t in (alloc.req_to_token, alloc.seq_lens, alloc.alloc_lens)]
    cases = [
        ("req_pool_indices", lambda: alloc.alloc_draft(rows.int(), 2)),
        ("out_cache_loc", lambda: alloc.alloc_draft(rows, 2, out_cache_loc=i32(*[0] * 4))),
        ("last_loc", lambda: alloc.alloc_draft(rows, 2, last_loc=i32(0, 0))),
        ("accept_lens", lambda: alloc.commit(rows, i32(1, 1))),
        ("accept_index", lambda: alloc.commit_tree(rows, torch.zeros(2, 2, dtype=torch.int32), [1, 1])),
        ("req_pool_indices", lambda: alloc.commit_and_draft(rows.int(), [1, 1], 2)),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=_npu_error(name)):
            call()
    assert alloc.num_free_slots() == before
    assert all(torch.equal(a, b) for a, b in zip(state, (alloc.req_to_token, alloc.seq_lens, alloc.alloc_lens)))
    out, last = alloc.alloc_draft(rows.tolist(), 2)  # lists and int64 tensors run
    assert out.dtype == last.dtype == torch.int64 and last.tolist() == alloc.req_to_token[rows, [2, 16]].tolist()
    alloc.commit(rows, [1, 2])
    # Tensors read on the host may be int32: free_requests' rows, and prefix_slots (copied to the device as int64).
    kept = alloc.free_requests(rows.int(), keep_lens=[0, 16])
    (row,) = alloc.add_requests([20], prefix_slots=kept.int().view(1, 16), prefix_lens=[16]).tolist()
    assert alloc.req_to_token[row, :16].tolist() == kept.tolist()
