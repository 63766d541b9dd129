"""Argument checks shared by the ops and the allocator: metadata only (no device→host sync), clear errors.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (shape, stride, device, size, value) naming
the argument, what was expected and what came. The hot paths of ``ops`` test the same conditions in one expression
and call these only when that expression fails, to find the words of the error.
"""

from __future__ import annotations

import numbers
import operator

import torch

__all__ = [
    "INDEX_DTYPES",
    "INT32_LIMIT",
    "UNPLANNED",
    "BoundTensors",
    "check_count",
    "check_dense",
    "check_disjoint",
    "check_flag",
    "check_npu_dtypes",
    "check_optional_flag",
    "check_out",
    "check_table",
    "check_vector",
    "memory_span",
    "tensor_facts",
    "type_name",
]

INDEX_DTYPES = (torch.int32, torch.int64)
_data_ptr = torch.Tensor.data_ptr
_strides = torch.Tensor.stride
# Lengths, positions, offsets and table dimensions are int32 inside the kernels.
INT32_LIMIT = 2**31


def check_npu_dtypes(tensors: dict[str, torch.Tensor | None]) -> None:
    """On an NPU: every index tensor passed (``None``: not given) is int64, ``req_to_token`` (not passed here) aside.
    Kernel variants are their dtypes and constexprs there (``backend.npu_kernels``), and the offline Ascend compile
    check compiles int64 index tensors beside an int32 or int64 table: another dtype would launch a variant no check
    compiled. ``TypeError`` naming the first that is not int64; what is no tensor is left to the checks that name
    its type."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.dtype is not torch.int64:
            raise TypeError(
                f"on an NPU, {name} must be int64 (the dtype whose kernels the offline Ascend compile check compiles; "
                f"convert with .long()), got {tensor.dtype}"
            )


def check_table(req_to_token: torch.Tensor) -> None:
    """``req_to_token``: a 2-D int32/int64 tensor with unit stride along positions, dimensions below 2**31."""
    if not isinstance(req_to_token, torch.Tensor):
        raise TypeError(f"req_to_token must be a torch.Tensor, got {type_name(req_to_token)}")
    check_dense("req_to_token", req_to_token)
    if req_to_token.dtype not in INDEX_DTYPES:
        raise TypeError(f"req_to_token must be int32 or int64, got {req_to_token.dtype}")
    if req_to_token.dim() != 2:
        shape = tuple(req_to_token.shape)
        raise ValueError(f"req_to_token must be 2-D [max_requests, max_context_len], got shape {shape}")
    if req_to_token.stride()[1] != 1 and req_to_token.shape[1] > 1:
        raise ValueError(f"req_to_token must have unit stride along positions, got strides {req_to_token.stride()}")
    if max(req_to_token.shape) >= INT32_LIMIT or req_to_token.stride()[0] >= INT32_LIMIT:
        raise ValueError(
            f"req_to_token dimensions and row stride must be below 2**31, "
            f"got shape {tuple(req_to_token.shape)} and strides {req_to_token.stride()}"
        )


def check_vector(name: str, tensor: torch.Tensor, device: torch.device, length: int | None) -> None:
    """``tensor``: a 1-D int32/int64 tensor with unit stride on ``device``, of ``length`` elements when given."""
    try:
        ok = (
            isinstance(tensor, torch.Tensor)  # (an object that forwards a tensor's attributes is not one)
            and tensor.dtype in INDEX_DTYPES
            and tensor.dim() == 1
            and tensor.device == device
            and (length is None or tensor.shape[0] == length)
            and tensor.is_contiguous()
            and not tensor.is_nested  # (a nested tensor of 0-d components is 1-D and contiguous)
        )
    except (AttributeError, RuntimeError):  # (RuntimeError: a sparse or nested tensor, worded below)
        ok = False
    if not ok:  # On the hot path only the expression above runs; this finds the words for the error.
        _raise_vector_error(name, tensor, device, length)


def _raise_vector_error(name: str, tensor: torch.Tensor, device: torch.device, length: int | None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(tensor)}")
    check_dense(name, tensor)
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on the device of req_to_token ({device}), got {tensor.device}")
    if length is not None and tensor.shape[0] != length:
        raise ValueError(f"{name} has {tensor.shape[0]} elements but req_pool_indices has {length}")
    raise ValueError(f"{name} must have unit stride, got stride {tensor.stride()[0]}")


def check_dense(name: str, tensor: torch.Tensor) -> None:
    """``tensor``: a dense tensor (strided layout, not nested)."""
    if tensor.is_nested or tensor.layout != torch.strided:
        kind = "a nested tensor" if tensor.is_nested else f"layout {tensor.layout}"
        raise ValueError(f"{name} must be a dense (strided) tensor, got {kind}")


def check_disjoint(outputs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
    """No output shares memory with an input or with another output (``ValueError`` naming both). Kernels read
    inputs of other requests (the scan) while they write: an overlap would give wrong values without an error.
    ``outputs`` are unit-stride vectors, ``inputs`` such vectors or a table with unit stride along its rows (both
    checked before); empty tensors share nothing. Memory spans compared: a table's from its first element to its
    last, so an output in the gap between the columns of a sliced table counts as sharing."""
    spans = []
    for written, tensors in ((True, outputs), (False, inputs)):
        for name, tensor in tensors.items():
            start, end = memory_span(tensor)
            if start != end:
                spans.append((start, end, written, name))
    spans.sort()
    for i, (_, end, written, name) in enumerate(spans):
        for other_start, _, other_written, other in spans[i + 1 :]:
            if other_start >= end:
                break
            if written or other_written:
                first, second = (name, other) if written else (other, name)
                raise ValueError(
                    f"{first} must not share memory with {second} (outputs are written while inputs are read)"
                )


def memory_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that ``tensor``'s elements lie in (``(0, 0)`` for an empty tensor): whatever storage
    object holds them, so that a view made through numpy, DLPack or ``torch.frombuffer`` counts as the memory it
    reads."""
    n = tensor.numel()
    if n == 0:
        return 0, 0
    start = tensor.data_ptr()
    if tensor.is_contiguous():  # (every output buffer: checked before)
        return start, start + n * tensor.element_size()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (extent + 1) * tensor.element_size()


def check_out(name: str, out: torch.Tensor, device: torch.device, min_len: int) -> None:
    """``out``: a vector as for :func:`check_vector`, of at least ``min_len`` elements."""
    check_vector(name, out, device, None)
    if out.shape[0] < min_len:
        raise ValueError(f"{name} has {out.shape[0]} elements but the call needs at least {min_len}")


def check_flag(name: str, value: bool) -> None:
    """``value``: a bool (``TypeError`` naming ``name`` and the type given: a tensor, an array or a string is no
    flag, whatever its truth)."""
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")


def check_optional_flag(name: str, value: bool | None) -> None:
    """``value``: ``None`` or a bool (``TypeError`` naming ``name`` and the type given), as ``check_flag``."""
    if value is not None and type(value) is not bool:
        raise TypeError(f"{name} must be a bool or None, got {type_name(value)}")


def check_count(name: str, value: int | None) -> int | None:
    """``value``: ``None`` or an integer (any ``numbers.Integral``, e.g. ``numpy.int64``, but not ``bool``) in
    ``[0, 2**31)``; returned as a Python ``int``."""
    if value is None or type(value) is int and 0 <= value < INT32_LIMIT:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type_name(value)}")
    value = operator.index(value)
    if not 0 <= value < INT32_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**31), got {value}")
    return value


def type_name(value: object) -> str:
    """The Python type of ``value`` as an error message names it: ``int``, ``float``, but ``numpy.int64``, which a
    bare ``int64`` would let a reader take for ``torch.int64``."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def tensor_facts(tensors: tuple[torch.Tensor, ...]) -> list[tuple]:
    """What a launch and its checks read of each tensor but its values: address, strides, shape and dtype (the
    device follows from the address for a tensor with elements: CUDA's unified addressing gives no two devices one
    address). Raises TypeError for anything but a tensor (the unbound methods check), RuntimeError for one without
    strides (sparse, nested)."""
    return [(_data_ptr(t), _strides(t), t.shape, t.dtype) for t in tensors]


class BoundTensors:
    """The tensors a plan was made for, and what the plan saw of them: address, strides, shape and dtype.

    ``changed()`` is the cheap re-check of a plan's run: True once any tensor has moved (``set_``, ``.data =``, a
    ``resize_`` that reallocated), been resized, re-typed or re-strided (``set_`` or ``as_strided_`` in place) since,
    so the caller plans again. Values written in place (the point of binding) change nothing here. A tensor that was
    empty (address 0 on every device) also has its device compared: moved to another device and still empty, it
    keeps address, shape, dtype and strides.

    ``owned``: tensors that only the plan holds (buffers it made, handed out only as views): their shape, dtype and
    strides cannot change, so only their address is compared (a view can still resize or free their storage).

    Each check is one list comprehension of the four facts of each tensor (``tensor_facts``; about 0.3 us a tensor
    less than a pass over the tensors for each fact, on the development machine).
    """

    __slots__ = ("tensors", "owned", "_keys", "_empty", "_empty_devices", "_owned_pointers")

    def __init__(self, tensors: tuple[torch.Tensor, ...], owned: tuple[torch.Tensor, ...] = ()) -> None:
        self.tensors = tensors
        self.owned = owned
        self._keys = tensor_facts(tensors)
        self._empty = tuple(t for t in tensors if t.numel() == 0)
        self._empty_devices = [t.device for t in self._empty]
        self._owned_pointers = [t.data_ptr() for t in owned]

    def changed(self) -> bool:
        return (
            tensor_facts(self.tensors) != self._keys
            or (bool(self._empty) and [t.device for t in self._empty] != self._empty_devices)
            or [t.data_ptr() for t in self.owned] != self._owned_pointers
        )


class _Unplanned:
    """The bound tensors of a wrapper before its first plan()."""

    def changed(self) -> bool:
        raise RuntimeError("call plan() before running the wrapper")


UNPLANNED = _Unplanned()
