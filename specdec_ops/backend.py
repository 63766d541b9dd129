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
import operator
import os
import threading
from types import ModuleType

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_INTERPRET_ENV = "TRITON_INTERPRET"

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


def is_capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a graph (CUDA, or an NPU whose torch_npu can tell; False
    on cpu). Where torch cannot tell, True: a caller then takes what is fastest on the device."""
    if device.type == "cuda":
        return torch.cuda.is_current_stream_capturing()
    if device.type == "npu":
        capturing = getattr(torch.npu, "is_current_stream_capturing", None)
        return True if capturing is None else bool(capturing())
    return False


# Set before specdec_ops is imported: every kernel, whatever its device, runs through the interpreter.
_INTERPRET_ALL = os.environ.get(_INTERPRET_ENV, "0") == "1"
_DEVICE_TYPES = ("cpu", "cuda", "npu")


def is_interpreted(device: torch.device) -> bool:
    """Whether kernels for ``device`` run through Triton's interpreter."""
    return device.type == "cpu" or _INTERPRET_ALL


def is_npu(device: torch.device) -> bool:
    """Whether ``device`` is an Ascend NPU (launch configuration differs there)."""
    npu = _npu_devices.get(device)
    if npu is None:
        npu = _npu_devices[device] = device.type == "npu"
    return npu


# device -> is_npu(device): torch.device.type costs more than a dict lookup on the device.
_npu_devices: dict[torch.device, bool] = {}


def check_device(device: torch.device, name: str = "tensors") -> None:
    """Raise ``ValueError`` unless ``device`` is one the kernels run on (cpu, cuda, npu), naming ``name`` (what is
    on that device) in the message."""
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"{name} must be on cpu, cuda or npu, got device {device}")


def kernels(module_name: str, device: torch.device, on_device: str = "tensors") -> ModuleType:
    """The kernel module ``specdec_ops.kernels.<module_name>`` built for ``device``'s backend (``on_device``: what the
    error names where the kernels do not run on ``device``, see :func:`check_device`)."""
    module = _modules.get((module_name, device))
    if module is None:
        check_device(device, on_device)
        kind = "interpreted" if is_interpreted(device) else "npu" if is_npu(device) else "compiled"
        with _modules_lock:
            module = _modules[(module_name, device)] = _built_module(module_name, kind)
    return module


def npu_kernels(module_name: str) -> ModuleType:
    """The kernel module ``specdec_ops.kernels.<module_name>`` as an NPU runs it: each kernel a function of its
    tensors' dtypes and its constexprs only (``unspecialised_function``). The offline Ascend compile check compiles
    these very functions."""
    with _modules_lock:
        return _built_module(module_name, "npu")


def _built_module(module_name: str, kind: str) -> ModuleType:
    """``_kernel_module(module_name, kind)``, built once per process (the caller holds _modules_lock)."""
    module = _modules_by_type.get((module_name, kind))
    if module is None:
        module = _modules_by_type[(module_name, kind)] = _kernel_module(module_name, kind)
    return module


# Keyed by device as well as by its type: torch.device.type costs more than a dict lookup on the device.
_modules: dict[tuple[str, torch.device], ModuleType] = {}
_modules_by_type: dict[tuple[str, str], ModuleType] = {}  # by (module, kind of _kernel_module)
_modules_lock = threading.Lock()


def _kernel_module(module_name: str, kind: str) -> ModuleType:
    """``specdec_ops.kernels.<module_name>`` as ``kind`` runs it: "compiled" (the module itself), "interpreted" or
    "npu" (private copies)."""
    name = f"{__package__}.kernels.{module_name}"
    if kind == "compiled":
        return importlib.import_module(name)
    if kind not in ("interpreted", "npu"):
        raise ValueError(f"kind must be 'compiled', 'interpreted' or 'npu', got {kind!r}")
    # A private copy of the module: it is executed as usual, then each of its own jit functions is replaced by its
    # twin. Calls between them go through the copy's namespace, so nested kernel calls take the twins too. The
    # interpreted copy is built without setting TRITON_INTERPRET (a process-wide variable that Triton reads whenever
    # any function is decorated, in any thread).
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    namespace = vars(module)
    twin = interpreted_function if kind == "interpreted" else unspecialised_function
    for key, value in list(namespace.items()):
        if isinstance(value, JITFunction) and value.fn.__globals__ is namespace:
            namespace[key] = twin(value)
    if kind == "interpreted":
        # Triton 3.6's interpreter turns a loop bound into an int with int() of a 1-element array, which NumPy >= 2.4
        # refuses ("only 0-dimensional arrays can be converted to Python scalars"). The copy's `range` converts it.
        namespace["range"] = _interpreter_range
    return module


def unspecialised_function(fn: JITFunction) -> JITFunction:
    """The twin of the jit function ``fn`` that specialises on no argument's value: neither a tensor's 16-byte
    alignment nor a scalar's divisibility by 16 or equality to 1. What it compiles to is then a function of its
    tensors' dtypes and its constexprs alone, so a compile check that covers those covers every launch. Used on
    NPUs, where the 16-byte alignment only ever changed an argument attribute of the compiled module (the
    HIVM module bishengir plans was otherwise the same: docs/design.md, "Ascend")."""
    names = [p.name for p in fn.params if not p.is_constexpr]
    options = ("version", "debug", "noinline", "launch_metadata", "bishengir_option")  # the last: triton-ascend's
    kwargs = {name: getattr(fn, name) for name in options if hasattr(fn, name)}
    return JITFunction(
        fn.fn, do_not_specialize=names, do_not_specialize_on_alignment=names, repr=getattr(fn, "_repr", None), **kwargs
    )


def interpreted_function(fn: JITFunction) -> InterpretedFunction:
    """The interpreted twin of the jit function ``fn`` (the function Triton would have built under
    ``TRITON_INTERPRET=1``), made without touching the environment."""
    if isinstance(fn, InterpretedFunction):
        return fn
    options = ("version", "do_not_specialize", "do_not_specialize_on_alignment", "debug", "noinline", "launch_metadata")
    kwargs = {name: getattr(fn, name) for name in options if hasattr(fn, name)}
    return InterpretedFunction(fn.fn, repr=getattr(fn, "_repr", None), **kwargs)


def _interpreter_index(value) -> int:
    handle = getattr(value, "handle", None)
    return operator.index(value) if handle is None else int(handle.data.item())


def _interpreter_range(*bounds) -> range:
    return range(*[_interpreter_index(bound) for bound in bounds])


@functools.cache
def num_cores(device: torch.device) -> int:
    """Programs that run at once on ``device``: vector cores on Ascend, SMs on CUDA, 1 on cpu."""
    if device.type == "npu":
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        return int(props["num_vectorcore"])
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# SPECDEC_OPS_PDL=0 turns programmatic dependent launches off (see supports_pdl).
_pdl = os.environ.get("SPECDEC_OPS_PDL", "1") != "0"


@functools.cache
def supports_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched as programmatic dependents (CUDA, compute capability 9.0 and up;
    ``SPECDEC_OPS_PDL=0`` turns it off): such a kernel may start before the previous kernel of the stream has ended,
    once every program of that one has signalled (``gdc_launch_dependents``) or exited, and waits for it to end
    (``gdc_wait``) before it reads or writes anything that one may have written. Every kernel of the library takes
    the constexpr ``PDL`` (a level: :func:`pdl_level`) and is launched so where this is true (:func:`launch` then
    passes ``launch_pdl=True``): its launch overlaps the end of the kernel before it, whatever that kernel is
    (docs/design.md)."""
    if not _pdl or device.type != "cuda" or is_interpreted(device):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_level(device: torch.device, next_early: bool = True) -> int:
    """The constexpr ``PDL`` of a launch on ``device``: 0 where kernels are not programmatic dependents
    (:func:`supports_pdl`); else 2, a kernel that waits for the kernel before it and then lets the next one start
    (``gdc_launch_dependents``), which waits in turn; or 1 with ``next_early=False``, a kernel that only waits (the next
    one starts once it has ended). A first launch of two lets the second start at either level."""
    if not supports_pdl(device):
        return 0
    return 2 if next_early else 1


def _options(constexprs: tuple[tuple[str, object], ...]) -> dict[str, object]:
    """Triton's keyword arguments for these constexprs: ``launch_pdl=True`` too when the constexpr ``PDL`` is true
    (a compile option of Triton's, so compiling ahead of a launch must pass it as well)."""
    options = dict(constexprs)
    if options.get("PDL"):
        options["launch_pdl"] = True
    return options


def _run_triton(kernel, grid, tensors, scalars, constexprs, num_warps):
    """``kernel[grid](...)`` through Triton, as a programmatic dependent launch when the constexpr ``PDL`` is
    true."""
    return kernel[grid](*tensors, *scalars, **_options(constexprs), num_warps=num_warps)


def prefers_persistent_grid(device: torch.device) -> bool:
    """Ascend binds programs to cores: a grid of one program per core, looping over tiles, runs best."""
    return is_npu(device)


# Triton's interpreter keeps the grid index of the running program in one process-wide builder and patches
# triton.language for the length of a launch: two interpreted launches at once (two threads) corrupt each other,
# and a compilation meanwhile would trace the patched language. So interpreted launches, and launches that may
# compile, hold this lock. The fast path below (a compiled kernel, launched directly) never takes it.
_launch_lock = threading.Lock()

# CUDA launches skip Triton's per-call argument binding once a specialisation is compiled (see launch()).
# SPECDEC_OPS_FAST_LAUNCH=0 turns this off.
_fast_launch = os.environ.get("SPECDEC_OPS_FAST_LAUNCH", "1") != "0"
# Specialisation key (_specialisation) -> (kernel, the compiled kernel) (see launch()).
_compiled: dict[tuple, tuple] = {}
# Specialisation key -> (kernel, the constexprs' values, launcher, function, packed metadata, compiled kernel,
# current-stream getter, device index, the launcher's flags when it is Triton 3.6's C launch function, called
# directly: see _direct_launch).
_launchers: dict[tuple, tuple] = {}
# device -> whether launch() may take the CUDA fast path there (torch.device.type costs more than this lookup).
_fast_devices: dict[torch.device, bool] = {}


def launch(
    kernel,
    grid: tuple[int],
    device: torch.device,
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple[int, ...],
    constexprs: tuple[tuple[str, object], ...],
    num_warps: int,
) -> None:
    """``kernel[grid](*tensors, *scalars, **dict(constexprs), num_warps=num_warps)`` (with ``launch_pdl=True`` when
    the constexpr ``PDL`` is true), cheaper on the host.

    The kernel's parameters must be the tensors, then the scalars, then the constexprs, in that order,
    and every scalar must be ``do_not_specialize`` and below 2**31 (Triton then specialises only on the
    tensors' dtypes and 16-byte alignment, and the constexprs; on an NPU not on alignment either, ``npu_kernels``).
    On CUDA the first launch of each such specialisation goes through Triton, which compiles it; later ones call
    the compiled kernel's launcher directly, skipping Triton's argument binding and cache lookup (about 6 us of
    Python per launch on an H200 host). Other backends always go through Triton. Safe to call from several threads.
    """
    fast = _fast_devices.get(device)
    if fast is None:
        fast = _fast_devices[device] = device.type == "cuda" and not is_interpreted(device)
    if not (fast and _fast_launch):
        with _launch_lock:
            _run_triton(kernel, grid, tensors, scalars, constexprs, num_warps)
        return
    pointers = [t.data_ptr() for t in tensors]
    key = _specialisation(kernel, device, tensors, pointers, constexprs, num_warps)
    launcher = _launchers.get(key)
    if launcher is None or launcher[0] is not kernel:
        _first_launch(key, kernel, grid, device, tensors, scalars, constexprs, num_warps)
        return
    # The launcher takes a pointer as an int as well as a tensor; ints save it a data_ptr() call each.
    if not _run_launcher(launcher, grid, (*pointers, *scalars, *launcher[1])):
        launch(kernel, grid, device, tensors, scalars, constexprs, num_warps)


def _specialisation(kernel, device, tensors, pointers, constexprs, num_warps) -> tuple:
    """The key of a compiled kernel in _compiled and _launchers: what Triton specialises on (dtypes, 16-byte
    alignment).

    The kernel goes in by ``id``: a JITFunction hashes its cache key in Python (about 0.3 us on the development
    machine), so both dicts keep the kernel with what they hold, and a hit counts only for that kernel. Where every
    pointer is 16-byte aligned, the usual case, one flag stands for their alignment.
    """
    dtypes = [t.dtype for t in tensors]
    if functools.reduce(operator.or_, pointers, 0) & 15:
        return (id(kernel), device, constexprs, num_warps, False, *dtypes, *[p & 15 == 0 for p in pointers])
    return (id(kernel), device, constexprs, num_warps, True, *dtypes)


def _run_launcher(launcher: tuple, grid: tuple[int], args: tuple) -> bool:
    """Launch through a kept launcher (see launch()); False, with the fast path turned off, if it refused."""
    _, _, run, function, packed_metadata, compiled, get_stream, index, flags = launcher
    stream = get_stream(index)
    hooks = triton.knobs.runtime
    enter_hook = hooks.launch_enter_hook
    metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, *args)
    try:
        if flags is None:
            run(grid[0], 1, 1, stream, function, packed_metadata, metadata, enter_hook, hooks.launch_exit_hook, *args)
        else:  # the C launch function itself (see _direct_launch)
            cooperative, pdl = flags
            run(
                grid[0],
                1,
                1,
                stream,
                function,
                cooperative,
                pdl,
                None,
                None,
                packed_metadata,
                metadata,
                enter_hook,
                hooks.launch_exit_hook,
                *args,
            )
    except TypeError:  # A Triton whose launcher takes other arguments: raised before anything runs.
        _disable_fast_launch()
        return False
    return True


def _direct_launch(run) -> tuple | None:
    """``(launch, (cooperative, pdl))`` when ``run``, a compiled kernel's launcher, is Triton 3.6's ``CudaLauncher``
    for a kernel without scratch memory: its ``__call__`` only allocates scratch (none here) and passes its flags on
    to the C function ``launch``, which is then called directly (0.7-1.4 us less a launch on an H200 host). None
    otherwise (other Triton versions lay these arguments out differently): the launcher is called as Triton calls
    it."""
    if not triton.__version__.startswith("3.6.") or type(run).__name__ != "CudaLauncher":
        return None
    try:
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        return run.launch, (run.launch_cooperative_grid, run.launch_pdl)
    except AttributeError:
        return None


class _Relaunch:
    """What a launch keeps to be made again: :func:`launch`'s arguments but the tensors and, once it has run on
    CUDA, the kept launcher with the tensors' addresses (:func:`_kept_launcher`). ``_launch(tensors)`` goes through
    :func:`launch` (which compiles if need be) and keeps the launcher after the first time."""

    __slots__ = ("_kernel", "_grid", "_device", "_scalars", "_constexprs", "_num_warps", "_launcher", "_args")

    def __init__(self, kernel, grid, device, scalars, constexprs, num_warps) -> None:
        self._kernel, self._grid, self._device = kernel, grid, device
        self._scalars, self._constexprs, self._num_warps = scalars, constexprs, num_warps
        self._launcher = self._args = None

    def _launch(self, tensors: tuple[torch.Tensor, ...]) -> None:
        arguments = (self._kernel, self._device, tensors, self._scalars, self._constexprs, self._num_warps)
        launch(self._kernel, self._grid, *arguments[1:])
        if self._launcher is None:
            self._launcher, self._args = _kept_launcher(*arguments)
        elif not _fast_launch:
            self._launcher = None


class Launch(_Relaunch):
    """A launch resolved once (:func:`prepare`); each call launches it again on the tensors' current values.

    The first call goes through :func:`launch` (which compiles if need be). After it, on CUDA, a call is only the
    kept launcher with the arguments resolved then: the tensors' addresses as ints, the scalars and constexprs,
    the grid; no argument binding, no specialisation key, no dict lookup. Other backends go through
    :func:`launch` every time. The launch holds its tensors and their storages, so the memory it was resolved
    for stays allocated while it lives; whoever calls it checks that the tensors still are what it was
    prepared for (their addresses and shapes), as a launch cannot see that.
    """

    __slots__ = ("_tensors", "_storages")

    def __init__(self, kernel, grid, device, tensors, scalars, constexprs, num_warps) -> None:
        super().__init__(kernel, grid, device, scalars, constexprs, num_warps)
        self._tensors = tensors
        self._storages = tuple(t.untyped_storage() for t in tensors)

    def __call__(self) -> None:
        launcher = self._launcher
        if launcher is None or not _run_launcher(launcher, self._grid, self._args):
            self._launch(self._tensors)

    def compile(self) -> None:
        """:func:`ensure_compiled` for this launch: nothing once it has run."""
        if self._launcher is None:
            ensure_compiled(
                self._kernel, self._grid, self._device, self._tensors, self._scalars, self._constexprs, self._num_warps
            )


class KeptLaunch(_Relaunch):
    """A launch made again on tensors given at each call, without holding them (:func:`launch_and_keep`).

    Calling it with tensors launches the kernel on them as :func:`launch` would with the arguments it was made
    with. On CUDA, once it has run, that is only the kept launcher with the addresses, scalars and constexprs of its
    first launch: the caller must make sure that the tensors it passes are at those addresses, with those dtypes
    (and so alive), as the launch cannot see them. Elsewhere it goes through :func:`launch` with the tensors passed.
    """

    __slots__ = ()

    def __call__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        launcher = self._launcher
        if launcher is None or not _run_launcher(launcher, self._grid, self._args):
            self._launch(tensors)


def launch_and_keep(kernel, grid, device, tensors, scalars, constexprs, num_warps) -> KeptLaunch:
    """:func:`launch` (same arguments), and the launch kept (:class:`KeptLaunch`)."""
    kept = KeptLaunch(kernel, grid, device, scalars, constexprs, num_warps)
    kept(tensors)
    return kept


def _kept_launcher(kernel, device, tensors, scalars, constexprs, num_warps) -> tuple[tuple | None, tuple | None]:
    """``(launcher, its arguments)`` for the launch of these arguments, which has run: the launcher :func:`launch`
    keeps for its specialisation, and the tensors' addresses as ints, the scalars and the constexprs' values; or
    ``(None, None)`` where launches do not take the fast path."""
    if not (_fast_launch and _fast_devices.get(device)):
        return None, None
    pointers = [t.data_ptr() for t in tensors]
    launcher = _launchers.get(_specialisation(kernel, device, tensors, pointers, constexprs, num_warps))
    if launcher is None or launcher[0] is not kernel:
        return None, None
    return launcher, (*pointers, *scalars, *launcher[1])


def ensure_compiled(
    kernel,
    grid: tuple[int],
    device: torch.device,
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple[int, ...],
    constexprs: tuple[tuple[str, object], ...],
    num_warps: int,
) -> None:
    """Compile what :func:`launch` would launch with these arguments, without launching it: after it, that launch no
    longer compiles (so a caller can make sure of that before an earlier launch changes state). Nothing to do once
    the specialisation has run, or on interpreted devices."""
    if is_interpreted(device):
        return
    pointers = [t.data_ptr() for t in tensors]
    kept = _compiled.get(_specialisation(kernel, device, tensors, pointers, constexprs, num_warps))
    if kept is not None and kept[0] is kernel:
        return
    with _launch_lock:
        kernel.warmup(*tensors, *scalars, grid=grid, **_options(constexprs), num_warps=num_warps)


def prepare(
    kernel,
    grid: tuple[int],
    device: torch.device,
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple[int, ...],
    constexprs: tuple[tuple[str, object], ...],
    num_warps: int,
) -> Launch:
    """:func:`launch`'s arguments resolved once: calling the result launches (see :class:`Launch`).

    Nothing is launched here: the first call launches (and compiles if need be).
    """
    return Launch(kernel, grid, device, tensors, scalars, constexprs, num_warps)


def _disable_fast_launch() -> None:
    global _fast_launch
    _fast_launch = False


def _first_launch(key: tuple, kernel, grid, device, tensors, scalars, constexprs, num_warps) -> None:
    """Launch through Triton (compiling if need be) and keep the compiled kernel's launcher for ``key``."""
    with _launch_lock:
        compiled = _run_triton(kernel, grid, tensors, scalars, constexprs, num_warps)
    _compiled[key] = (kernel, compiled)
    try:
        get_stream = triton.runtime.driver.active.get_current_stream
        direct = _direct_launch(compiled.run)
        _launchers[key] = (
            kernel,
            tuple(value for _, value in constexprs),
            compiled.run if direct is None else direct[0],
            compiled.function,
            compiled.packed_metadata,
            compiled,
            get_stream,
            device.index,
            None if direct is None else direct[1],
        )
    except AttributeError:  # A Triton whose compiled kernels look different: keep to Triton's own launch.
        _disable_fast_launch()
