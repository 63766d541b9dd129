"""The one place that knows the three backends: NPU (triton-ascend), CUDA (Triton) and CPU (Triton's interpreter).

A kernel runs on the backend of its tensors' device:

- ``cuda`` tensors run the compiled Triton kernels;
- ``npu`` tensors (``torch_npu`` imported) run the same kernels compiled by triton-ascend;
- ``cpu`` tensors run the same kernels through Triton's interpreter. The interpreter is chosen here,
  per device, so the user sets no ``TRITON_INTERPRET`` and CPU and GPU tensors can be mixed in one process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import threading
from types import ModuleType

import torch
import triton

_INTERPRET_ENV = "TRITON_INTERPRET"
_env_lock = threading.Lock()

try:  # An Ascend install: registers the "npu" device with torch.
    import torch_npu  # noqa: F401
except ImportError:
    pass


def default_device() -> torch.device:
    """The device a new tensor goes to when the caller names none: npu, then cuda, then cpu."""
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return torch.device("npu", npu.current_device())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on cpu)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


# Set before specdec_ops is imported: every kernel, whatever its device, runs through the interpreter.
_INTERPRET_ALL = os.environ.get(_INTERPRET_ENV, "0") == "1"
_DEVICE_TYPES = ("cpu", "cuda", "npu")


def is_npu(device: torch.device) -> bool:
    """Whether ``device`` is an Ascend NPU (kernels compiled by triton-ascend)."""
    return device.type == "npu"


def is_interpreted(device: torch.device) -> bool:
    """Whether kernels for ``device`` run through Triton's interpreter."""
    return device.type == "cpu" or _INTERPRET_ALL


def kernels(module_name: str, device: torch.device) -> ModuleType:
    """The kernel module ``specdec_ops.kernels.<module_name>`` built for ``device``'s backend."""
    module = _modules.get((module_name, device.type))
    if module is None:
        if device.type not in _DEVICE_TYPES:
            raise ValueError(f"tensors must be on cpu, cuda or npu, got device {device}")
        module = _modules[(module_name, device.type)] = _kernel_module(module_name, is_interpreted(device))
    return module


_modules: dict[tuple[str, str], ModuleType] = {}


def _kernel_module(module_name: str, interpreted: bool) -> ModuleType:
    name = f"{__package__}.kernels.{module_name}"
    if not interpreted or _INTERPRET_ALL:
        return importlib.import_module(name)
    # A private copy of the module whose @triton.jit functions were created in interpreter mode:
    # Triton reads TRITON_INTERPRET when a function is decorated, so nested kernel calls interpret too.
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    with _env_lock:
        previous = os.environ.get(_INTERPRET_ENV)
        os.environ[_INTERPRET_ENV] = "1"
        try:
            spec.loader.exec_module(module)
        finally:
            if previous is None:
                del os.environ[_INTERPRET_ENV]
            else:
                os.environ[_INTERPRET_ENV] = previous
    return module


@functools.cache
def num_cores(device: torch.device) -> int:
    """Programs that run at once on ``device``: vector cores on Ascend, SMs on CUDA, 1 on cpu."""
    if device.type == "npu":
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        return int(props["num_vectorcore"])
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def prefers_persistent_grid(device: torch.device) -> bool:
    """Ascend binds programs to cores: a grid of one program per core, looping over tiles, runs best."""
    return device.type == "npu"


# CUDA launches skip Triton's per-call argument binding once a specialisation is compiled (see launch()).
# SPECDEC_OPS_FAST_LAUNCH=0 turns this off.
_fast_launch = os.environ.get("SPECDEC_OPS_FAST_LAUNCH", "1") != "0"
_compiled: dict[tuple, object] = {}


def launch(
    kernel,
    grid: tuple[int],
    device: torch.device,
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple[int, ...],
    constexprs: tuple[tuple[str, object], ...],
    num_warps: int,
) -> None:
    """``kernel[grid](*tensors, *scalars, **dict(constexprs), num_warps=num_warps)``, cheaper on the host.

    The kernel's parameters must be the tensors, then the scalars, then the constexprs, in that order,
    and every scalar must be ``do_not_specialize`` and below 2**31 (Triton then specialises only on the
    tensors' dtypes and 16-byte alignment, and the constexprs). On CUDA the first launch of each such
    specialisation goes through Triton, which compiles it; later ones call the compiled kernel's
    launcher directly, skipping Triton's argument binding and cache lookup (about 6 us of Python per
    launch on an H200 host). Other backends always go through Triton.
    """
    global _fast_launch
    if device.type != "cuda" or not _fast_launch:
        kernel[grid](*tensors, *scalars, **dict(constexprs), num_warps=num_warps)
        return
    pointers = [t.data_ptr() for t in tensors]
    key = (kernel, device.index, constexprs, num_warps, *[t.dtype for t in tensors], *[p % 16 == 0 for p in pointers])
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*tensors, *scalars, **dict(constexprs), num_warps=num_warps)
        return
    # The launcher takes a pointer as an int as well as a tensor; ints save it a data_ptr() call each.
    args = (*pointers, *scalars, *[value for _, value in constexprs])
    try:
        _launch_compiled(compiled, grid, device, args)
    except (TypeError, AttributeError):  # A Triton whose launcher differs: raised before anything runs.
        _fast_launch = False
        kernel[grid](*tensors, *scalars, **dict(constexprs), num_warps=num_warps)


def _launch_compiled(compiled, grid: tuple[int], device: torch.device, args: tuple) -> None:
    stream = triton.runtime.driver.active.get_current_stream(device.index)
    hooks = triton.knobs.runtime
    compiled.run(
        grid[0],
        1,
        1,
        stream,
        compiled.function,
        compiled.packed_metadata,
        compiled.launch_metadata(grid, stream, *args),
        hooks.launch_enter_hook,
        hooks.launch_exit_hook,
        *args,
    )
