#!/usr/bin/env python
"""Compile every kernel variant that specdec_ops launches on an Ascend NPU through triton-ascend's real pipeline.

Offline: no NPU, no CANN. Run it in a virtual environment of its own (triton-ascend replaces triton):

  python3 -m venv .venv-ascend
  .venv-ascend/bin/pip install torch==2.13.0 "numpy<2" pybind11 triton-ascend==3.2.0 ascendnpu-ir==1.2.0
  .venv-ascend/bin/pip install --no-deps -e .
  .venv-ascend/bin/python scripts/ascend_compile_check.py [--jobs 2] [--only SUBSTRING] [--ub-limit-kib 144]

Which variants: the launches themselves, not a list kept here. The script runs the public API on CPU tensors
while `backend` answers as an NPU would (`is_npu`, `prefers_persistent_grid`, `num_cores` = 40 vector cores) and
`backend.launch` is replaced by a recorder that keeps (kernel, tensor dtypes and 16-byte alignment, scalars,
constexprs, num_warps) and runs nothing. So the constexprs are those the launching code picks, and the check
cannot drift from it. Exercised:

  ops        get_last_loc, assign_extend_cache_locs, get_last_loc_and_assign_extend_cache_locs: every dtype
             profile of PROFILES, windows 0..64 uniform (window_len=) and ragged, aligned and misaligned tensors
  allocator  every method of ALLOCATOR_METHODS (the one table to extend) that DraftCacheAllocator has, over
             page sizes 1, 16, 64, 128, rows as int32/int64 tensors and lists, N in 1..64: prefill
             (add_requests), draft with read-back (alloc_draft: emit on, int64 and int32 buffers), draft
             without (reserve_draft: emit off), commit, commit_and_draft (in one launch, in the two it makes
             past its one-launch limit, and releasing branch pages),
             free_requests (with and without keep_lens),
             prefixes from a prefix cache (add_requests with prefix_slots), release_slots, and a tree step
             (alloc_branches, alloc_draft releasing them, commit_tree; alloc_tree_draft, commit_tree releasing
             them; commit_tree_and_draft in one launch and in two, with and without the draft's counts; release by
             commit, release_branches, free)

Each distinct variant (kernel, dtypes, alignment, constexprs) is compiled from the normal (not interpreted)
module `specdec_ops.kernels.<module>`, through these stages; the line printed per variant names the last one
reached:

  frontend  Python AST -> Triton IR, triton-ascend 3.2's own frontend
  ttir      triton-ascend's TTIR passes
  linalg    triton-adapter-opt (shipped in the triton-ascend wheel): TTIR -> Linalg + HIVM/HFusion
  hivm      bishengir-compile (PyPI ascendnpu-ir): HFusion/HIVM pipeline, on-chip buffer (UB) planning, sync
            insertion, with the options triton-ascend passes. It ends by handing the module to hivmc, which
            only CANN has: reaching that hand-off is a PASS.

A line is `PASS|FAIL label stage=... ub-peak=N.NKiB [scalar: ops] [error]`: the UB peak is the highest UB
address bishengir's planner used (read from its saved HIVM IR), above --ub-limit-kib a FAIL; `scalar:` lists
ops bishengir warns will run on the scalar unit. Exit status 0 when every variant passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
UB_BYTES = 192 * 1024  # Ascend 910B/A3 vector core unified buffer
NPU_VECTOR_CORES = 40  # Ascend 910B3
ARCH = "Ascend910B3"

# ------------------------------------------------------------------------------------------------ exercise

# Dtypes of the ops' tensors: (req_to_token, req_pool_indices, offsets, out_cache_loc, last_loc).
PROFILES = {
    "i32": ("int32", "int32", "int32", "int32", "int32"),
    "i64": ("int64", "int64", "int64", "int64", "int64"),
    "sglang": ("int32", "int64", "int64", "int64", "int64"),
    "mix": ("int64", "int32", "int64", "int32", "int64"),
}
WINDOWS = [None, *range(0, 65)]  # None: ragged
PAGE_SIZES = [1, 16, 64, 128]
DRAFT_LENS = range(1, 65)
ROW_KINDS = ("int64", "int32", "list")


@dataclass(frozen=True)
class Launch:
    module: str  # specdec_ops.kernels.<module>
    kernel: str
    tensors: tuple[tuple[str, bool], ...]  # (dtype, 16-byte aligned) per tensor argument
    scalars: tuple[int, ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int

    @property
    def key(self) -> tuple:
        return (self.module, self.kernel, self.tensors, self.constexprs, self.num_warps)

    @property
    def label(self) -> str:
        short = {"int32": "i32", "int64": "i64"}
        dtypes = "/".join(short.get(d, d) + ("" if aligned else "~") for d, aligned in self.tensors)
        cx = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{dtypes},{cx}]"


class _Recorder:
    """Stands in for backend.launch: records each launch and the public method that made it, runs nothing."""

    def __init__(self, real_launch):
        self.signature = inspect.signature(real_launch)
        self.launches: dict[tuple, Launch] = {}
        self.by_method: dict[str, int] = {}
        self.method = "?"

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        fn = getattr(a["kernel"], "fn", a["kernel"])
        launch = Launch(
            module=fn.__module__,
            kernel=fn.__name__,
            tensors=tuple((str(t.dtype).replace("torch.", ""), t.data_ptr() % 16 == 0) for t in a["tensors"]),
            scalars=tuple(int(s) for s in a["scalars"]),
            constexprs=tuple((k, v) for k, v in a["constexprs"]),
            num_warps=int(a.get("num_warps") or 0),
        )
        self.launches.setdefault(launch.key, launch)
        self.by_method[self.method] = self.by_method.get(self.method, 0) + 1

    @contextlib.contextmanager
    def calling(self, method: str):
        self.method = method
        try:
            yield
        finally:
            self.method = "?"


@contextlib.contextmanager
def npu_backend(recorder: _Recorder):
    """backend answers as an NPU would and records launches; every specdec_ops module that imported these
    names directly is patched too."""
    from specdec_ops import backend

    fakes = {
        "is_npu": lambda device: True,
        "prefers_persistent_grid": lambda device: True,
        "num_cores": lambda device: NPU_VECTOR_CORES,
        "launch": recorder,
    }
    originals = {name: getattr(backend, name) for name in fakes if hasattr(backend, name)}
    patched = []
    for mod in [m for name, m in list(sys.modules.items()) if name.startswith("specdec_ops") and m is not None]:
        for name, original in originals.items():
            if getattr(mod, name, None) is original:
                setattr(mod, name, fakes[name])
                patched.append((mod, name, original))
    try:
        yield
    finally:
        for mod, name, original in patched:
            setattr(mod, name, original)


def _tensor(values, dtype: str, misalign: bool = False) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=getattr(torch, dtype))
    if not misalign:
        return t
    buf = torch.zeros(t.numel() + 1, dtype=t.dtype)  # one element in: not 16-byte aligned
    buf[1:] = t.reshape(-1)
    return buf[1:].reshape(t.shape)


def exercise_ops(rec: _Recorder) -> None:
    import specdec_ops

    bs, rows_n, ctx = 70, 9, 200  # two ragged tiles, several uniform ones
    for pname, (tab, idx, off, out, last) in PROFILES.items():
        for misalign in (False, True) if pname == "sglang" else (False,):
            table = _tensor(torch.arange(rows_n * ctx).reshape(rows_n, ctx), tab, misalign)
            rows = _tensor(torch.arange(bs) % rows_n, idx, misalign)
            with rec.calling("get_last_loc"):
                specdec_ops.get_last_loc(
                    table, rows, _tensor([5] * bs, off, misalign), last_loc=_tensor([0] * bs, last, misalign)
                )
            for w in WINDOWS:
                n = 3 if w is None else w
                start = _tensor([7] * bs, off, misalign)
                end = _tensor([7 + n] * bs, off, misalign)
                buf = _tensor([0] * (bs * n), out, misalign)
                kw = {"num_tokens": bs * n, "window_len": w}
                with rec.calling("assign_extend_cache_locs"):
                    specdec_ops.assign_extend_cache_locs(table, rows, start, end, buf, **kw)
                with rec.calling("get_last_loc_and_assign_extend_cache_locs"):
                    specdec_ops.get_last_loc_and_assign_extend_cache_locs(
                        table, rows, start, end, buf, _tensor([0] * bs, last, misalign), **kw
                    )
                    specdec_ops.get_last_loc_and_assign_extend_cache_locs(table, rows, start, end, **kw)


def _int32(n: int, fill: int = 0) -> torch.Tensor:
    return torch.full((n,), fill, dtype=torch.int32)


# The allocator's public methods and how to call them: (name, call(alloc, rows, n)). Add new methods here; a name
# that DraftCacheAllocator does not have (yet) is skipped. `rows` are 3 live rows (a tensor or a list, ROW_KINDS),
# n the draft length.
def _cached_page(alloc, page: int) -> torch.Tensor:
    """Slots of ``page``, handed to the prefix cache on the host: while launches are recorded no kernel runs, so no
    finished request can have left a real page to the cache."""
    alloc._cache_pages.add(page)
    return torch.arange(page * alloc.page_size, (page + 1) * alloc.page_size)


def _free_keeping(alloc, n: int) -> None:
    """free_requests with keep_lens of two new requests. Their committed lengths are written on the host, as the
    prefill would write them: while launches are recorded no kernel runs, and a row not in use has seq_len -1."""
    rows = alloc.add_requests([n, 1])
    alloc.seq_lens[rows] = torch.tensor([n, 1])
    alloc.free_requests(rows, keep_lens=[0, 0])


def _add_with_prefix(alloc, n: int) -> None:
    p = alloc.page_size
    slots = _cached_page(alloc, 1).expand(2, p)
    alloc.free_requests(alloc.add_requests([p + n, p], prefix_slots=slots, prefix_lens=[p, p]))


def _in_two_launches(alloc, rows, n: int) -> None:
    """commit_and_draft as it runs past its one-launch limit (the tile counts, then the allocation), on 3 rows."""
    module = sys.modules[type(alloc).__module__]
    limit = module._COMMIT_DRAFT_MAX_BATCH
    module._COMMIT_DRAFT_MAX_BATCH = 1
    try:
        alloc.commit_and_draft(rows, _int32(3, n // 2), n)
    finally:
        module._COMMIT_DRAFT_MAX_BATCH = limit


def _tree_size(alloc, n: int) -> int:
    """The verified tree's node count for draft length ``n``, within what commit_tree takes on an NPU."""
    return min(n, 32 if alloc.page_size == 1 else 64)


def _commit_tree(alloc, rows, n: int) -> None:
    t = _tree_size(alloc, n)
    index = torch.arange(t, dtype=torch.int64).expand(3, t).contiguous()
    alloc.commit_tree(rows, index if isinstance(rows, list) else index.to(rows.dtype), [t // 2] * 3)


def _branches(alloc, rows, n: int) -> None:
    alloc.alloc_branches(rows, 4, n, return_copies=alloc.page_size > 1)


def _tree_draft(alloc, rows, n: int) -> None:
    alloc.alloc_tree_draft(rows, _tree_size(alloc, n), 4, n)


def _tree_step(alloc, rows, n: int, one_launch: bool = True, window: int | None = None, counts: bool = False) -> None:
    """commit_tree_and_draft of trees of ``_tree_size`` nodes, then windows of as many (or ``window``): one launch for
    the 3 rows (one program) where the NPU takes one, or as it runs past one program (two: the tree commit and the
    draft, or with ``counts`` as past one program of the draft, the tree commit with the draft's counts and the
    draft from them)."""
    t = _tree_size(alloc, n)
    index = torch.arange(t, dtype=torch.int64).expand(3, t).contiguous()
    cls = type(alloc)
    in_one, with_counts = cls._tree_step_in_one_launch, cls._tree_step_counts
    if not one_launch:
        cls._tree_step_in_one_launch = lambda self, *args: False
        cls._tree_step_counts = lambda self, *args: counts
    try:
        alloc.commit_tree_and_draft(rows, index, _int32(3, t // 2), t if window is None else window, 4, n)
    finally:
        cls._tree_step_in_one_launch, cls._tree_step_counts = in_one, with_counts


ALLOCATOR_METHODS = [
    ("add_requests", lambda alloc, rows, n: alloc.free_requests(alloc.add_requests([n, 0, 3 * n + 1]).tolist())),
    ("alloc_draft", lambda alloc, rows, n: alloc.alloc_draft(rows, n)),
    ("alloc_draft", lambda alloc, rows, n: alloc.alloc_draft(rows, n, out_cache_loc=_int32(3 * n), last_loc=_int32(3))),
    ("reserve_draft", lambda alloc, rows, n: alloc.reserve_draft(rows, n)),
    ("commit_and_draft", lambda alloc, rows, n: alloc.commit_and_draft(rows, _int32(3, n // 2), n)),
    (
        "commit_and_draft",
        lambda alloc, rows, n: alloc.commit_and_draft(
            rows, [n // 2] * 3, n, out_cache_loc=_int32(3 * n), last_loc=_int32(3)
        ),
    ),
    ("commit_and_draft", _in_two_launches),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, [n // 2] * 3)),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, _int32(3, n // 2))),
    # A tree step: branches, the verify window (which releases them in its own launch), the tree commit; then
    # branches released by commit, by release_branches, and by free_requests below.
    ("alloc_branches", _branches),
    ("alloc_draft", lambda alloc, rows, n: alloc.alloc_draft(rows, _tree_size(alloc, n))),
    ("commit_tree", _commit_tree),
    # A tree step in two launches: the window with the branches, then the tree commit that releases them; and one
    # that first releases the branches of an alloc_branches.
    ("alloc_tree_draft", _tree_draft),
    ("commit_tree", _commit_tree),
    ("alloc_branches", _branches),
    ("alloc_tree_draft", _tree_draft),
    ("commit_tree", _commit_tree),
    # A tree step in one call: the commit and the next tree (keeping the branch pages), in one launch or two.
    ("alloc_tree_draft", _tree_draft),
    ("commit_tree_and_draft", _tree_step),
    ("commit_tree_and_draft", lambda alloc, rows, n: _tree_step(alloc, rows, n, window=1)),  # a small window
    ("commit_tree_and_draft", lambda alloc, rows, n: _tree_step(alloc, rows, n, one_launch=False)),
    ("commit_tree_and_draft", lambda alloc, rows, n: _tree_step(alloc, rows, n, one_launch=False, counts=True)),
    ("commit_tree", _commit_tree),
    ("alloc_branches", _branches),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, [0] * 3)),
    ("alloc_branches", _branches),
    ("commit_and_draft", lambda alloc, rows, n: alloc.commit_and_draft(rows, _int32(3), n)),  # releases them
    ("alloc_branches", _branches),
    ("release_branches", lambda alloc, rows, n: alloc.release_branches(rows)),
    ("alloc_branches", _branches),
    ("free_requests", lambda alloc, rows, n: alloc.free_requests(rows)),
    ("free_requests", lambda alloc, rows, n: _free_keeping(alloc, n)),
    ("add_requests", lambda alloc, rows, n: _add_with_prefix(alloc, n)),
    ("release_slots", lambda alloc, rows, n: alloc.release_slots(_cached_page(alloc, 2)[:1])),
]


def exercise_allocator(rec: _Recorder) -> tuple[list[str], list[str]]:
    """Returns (methods of the table the allocator has, public methods it has that the table lacks)."""
    from specdec_ops import DraftCacheAllocator

    present = [(name, call) for name, call in ALLOCATOR_METHODS if hasattr(DraftCacheAllocator, name)]
    for page_size in PAGE_SIZES:
        for kind in ROW_KINDS:
            for n in DRAFT_LENS:
                alloc = DraftCacheAllocator(page_size * 4096, 8, 8192, page_size=page_size, device="cpu")
                with rec.calling("add_requests"):
                    rows = alloc.add_requests([5, 0, 17])
                rows = rows.tolist() if kind == "list" else rows.to(getattr(torch, kind))
                for name, call in present:
                    with rec.calling(name):
                        call(alloc, rows, n)
    names = sorted({name for name, _ in present})
    public = {
        name for name, member in inspect.getmembers(DraftCacheAllocator, inspect.isfunction) if not name.startswith("_")
    }
    return names, sorted(public - {name for name, _ in ALLOCATOR_METHODS})


def record_launches() -> tuple[list[Launch], _Recorder, list[str], list[str]]:
    sys.path.insert(0, str(REPO))
    from specdec_ops import backend

    rec = _Recorder(backend.launch)
    with npu_backend(rec):
        exercise_ops(rec)
        allocator_methods, unlisted = exercise_allocator(rec)
    return sorted(rec.launches.values(), key=lambda v: v.label), rec, allocator_methods, unlisted


# ----------------------------------------------------------------------------------------------- compile


def find_bishengir() -> str | None:
    env = os.environ.get("BISHENGIR_COMPILE")
    if env and os.access(env, os.X_OK):
        return env
    try:
        import ascendnpuir

        path = Path(ascendnpuir.__file__).parent / "bin" / "bishengir-compile"
        if os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    return shutil.which("bishengir-compile")


def _text(x) -> str:
    if x is None:
        return ""
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


def first_error(text: str, returncode: int = 1) -> str:
    """The most telling line: a tool's assertion or crash, else the first 'error:' line, without loc() prefixes.

    A crash (an assertion, a signal, LLVM's "Stack dump:") is worded ``TOOL crashed: ...``: the only failures that
    are retried (see CRASH_RETRIES)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        m = re.match(r"([\w.-]+): (\S+?):(\d+): .*(Assertion `.*' failed\.)", ln)
        if m:
            return f"{m.group(1)} crashed: {m.group(4)} ({os.path.basename(m.group(2))}:{m.group(3)})"
    if returncode < 0 or "Stack dump:" in text:
        tool = next((os.path.basename(m.group(1)) for m in re.finditer(r"Program arguments: (\S+)", text)), "a tool")
        signal = f"signal {-returncode}" if returncode < 0 else "stack dump, no assertion message"
        return f"{tool} crashed: {signal}"
    errs = sorted((ln for ln in lines if "error:" in ln and "hivmc" not in ln), key=lambda ln: "Failed to run" in ln)
    pick = errs[0] if errs else (lines[-1] if lines else "(no message)")
    return re.sub(r'(loc\("[^"]*":\d+:\d+\):\s*)+', "", pick)[:300]


def ub_peak(hivm_text: str) -> int | None:
    """Highest UB byte address that bishengir's memory planner gave a buffer (hivm.hir.pointer_cast)."""
    widths = {"i1": 0.125, "i8": 1, "i16": 2, "f16": 2, "bf16": 2, "i32": 4, "f32": 4, "i64": 8, "f64": 8}
    consts = dict(re.findall(r"(%c[\w]+) = arith\.constant (\d+) : i64", hivm_text))
    peak = None
    pattern = r"hivm\.hir\.pointer_cast\(([^)]*)\)[^:]*: memref<([\dx]+)x(\w+)[^>]*#hivm\.address_space<ub>>"
    for m in re.finditer(pattern, hivm_text):
        size = 1
        for d in m.group(2).split("x"):
            size *= int(d) if d else 1
        size = int(size * widths.get(m.group(3), 4) + 0.999)  # i1 masks are bit-packed
        for tok in m.group(1).split(","):
            tok = tok.strip()
            lit = re.fullmatch(r"%c(\d+)_i64", tok)
            offset = int(lit.group(1)) if lit else (int(consts[tok]) if tok in consts else None)
            if offset is not None:
                peak = max(peak or 0, offset + size)
    return peak


class _Subprocess:
    """Stands in for `subprocess` inside triton-ascend's compiler: the same calls, results kept, and
    bishengir-compile told to save its temporaries (the HIVM IR with the UB plan)."""

    def __init__(self, temps: str):
        self.temps = temps
        self.results: list[tuple[list[str], subprocess.CompletedProcess]] = []

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, check=False, **kwargs):
        cmd = list(cmd)
        if os.path.basename(cmd[0]) == "bishengir-compile" and "--help" not in cmd:
            cmd.append(f"--save-temps={self.temps}")
        res = subprocess.run(cmd, *args, **kwargs)
        self.results.append((cmd, res))
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)
        return res


def compile_variant(launch: Launch, ub_limit: int) -> tuple[bool, str, str]:
    """(passed, last stage reached, note)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    tensors = []
    for dtype, aligned in launch.tensors:
        buf = torch.zeros(80, dtype=getattr(torch, dtype))
        tensors.append(buf[:64] if aligned else buf[1:65])
    target = GPUTarget("npu", ARCH, 0)
    backend = make_backend(target)
    kwargs = {**dict(launch.constexprs), "num_warps": launch.num_warps, "debug": False}
    # What JITFunction.run does before it compiles (triton-ascend 3.2's runtime/jit.py), without a driver.
    fn.create_binder(backend)
    bound_args, sig_and_spec, _, _, _ = fn.binder(*tensors, *launch.scalars, **kwargs)
    options = backend.parse_options(kwargs)
    bound_vals = tuple(bound_args.values())
    sigkeys = [fn.params[i].name for i in fn.non_constexpr_indices]
    signature = {k: ("*i8" if v == "none" else v) for k, v in zip(sigkeys, sig_and_spec[: len(sigkeys)])}
    attrs = backend.get_attrs_descriptor(fn.params, bound_vals)
    constant_params = attrs.get_constants()
    constants = {
        p.name: v for v, p in zip(bound_vals, fn.params) if p.is_constexpr or p.num in constant_params or v is None
    }
    src = ASTSource(fn, signature, constants, attrs)
    metadata = {"hash": src.hash(), "target": target, **options.__dict__}
    stages: dict = {}
    backend.add_stages(stages, options)

    work = tempfile.mkdtemp(prefix="specdec-ascend-cc-")
    runner = _Subprocess(os.path.join(work, "temps"))
    # triton-ascend's compiler module is loaded under its own module object: patch its globals. NPUUtils
    # builds a CANN extension only to name the chip.
    g = type(backend).add_stages.__globals__

    class _Utils:
        def get_arch(self):
            return ARCH

    saved = g["subprocess"], g["NPUUtils"]
    g["subprocess"], g["NPUUtils"] = runner, _Utils
    try:
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        try:
            mod = src.make_ir(options, backend.get_codegen_implementation(), backend.get_module_map(), context)
        except Exception as e:  # noqa: BLE001
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            return False, "frontend", (f"{lines[0]} {lines[-1].strip()}" if lines else type(e).__name__)[:300]
        try:
            mod = stages["ttir"](mod, metadata)
        except Exception as e:  # noqa: BLE001
            return False, "ttir", first_error(str(e))
        try:
            linalg = stages["ttadapter"](mod, metadata)
        except subprocess.CalledProcessError as e:
            return False, "linalg", first_error(_text(e.stderr) or str(e), e.returncode)
        except Exception as e:  # noqa: BLE001
            return False, "linalg", first_error(str(e))
        runner.results.clear()
        try:
            stages["npubin"](linalg, metadata)
            return True, "binary", "a hivmc was on PATH: compiled to a binary (no UB figure)"
        except subprocess.CalledProcessError as e:
            err = _text(e.stderr) + _text(e.stdout)
        except Exception as e:  # noqa: BLE001
            err = "".join(traceback.format_exception_only(type(e), e))
        runs = [res for cmd, res in runner.results if os.path.basename(cmd[0]) == "bishengir-compile"]
        if runs:
            err = _text(runs[-1].stderr) + "\n" + _text(runs[-1].stdout) + "\n" + err
        handed_off = "External hivmc run fails" in err or "Cannot find hivmc" in err
        if not handed_off or any("error:" in ln and "hivmc" not in ln for ln in err.splitlines()):
            return False, "hivm", first_error(err)
        hivm_file = Path(work, "temps", "module.hivm.opt.mlir")
        peak = ub_peak(hivm_file.read_text()) if hivm_file.exists() else None
        scalar = sorted({m.replace("hivm.hir.", "") for m in re.findall(r"Op '([\w.]+)' will execute by scalar", err)})
        note = f"ub-peak={peak / 1024:.1f}KiB" if peak is not None else "ub-peak=?"
        if scalar:
            note += f" scalar: {','.join(scalar)}"
        if peak is None:
            return False, "hivm", note + " (no UB plan found in bishengir's temporaries)"
        if peak > ub_limit:
            return False, "hivm", note + f" above the limit of {ub_limit / 1024:.0f}KiB"
        return True, "hivm", note
    finally:
        g["subprocess"], g["NPUUtils"] = saved
        shutil.rmtree(work, ignore_errors=True)


# triton-adapter-opt 3.2.0 sometimes crashes (an assertion, e.g. "Malformed type storage object") on an input it
# compiles on every other run: the same TTIR and command passed 100 times in a row here. A crash, and only a crash
# (never a compile error), is retried this many times; every crash is printed and counted, so a kernel that crashes
# the tool for real still fails, and flakiness stays visible.
CRASH_RETRIES = 2


def _compile_in_worker(args: tuple[Launch, int]) -> tuple[bool, str, str, int]:
    """(passed, stage, note, crashes of a tool before the final answer)."""
    launch, ub_limit = args
    crashes = []
    while True:
        try:
            ok, stage, note = compile_variant(launch, ub_limit)
        except Exception as e:  # noqa: BLE001
            ok, stage, note = False, "setup", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if ok or " crashed: " not in note or len(crashes) == CRASH_RETRIES:
            if crashes and ok:
                note += f" [passed after {len(crashes)} crash(es): {crashes[0]}]"
            return ok, stage, note, len(crashes)
        crashes.append(note)


def _init_worker(path: str) -> None:
    sys.path.insert(0, path)
    os.environ.pop("TRITON_INTERPRET", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", metavar="SUBSTRING", help="only variants whose label contains SUBSTRING")
    parser.add_argument("--jobs", type=int, default=1, help="variants compiled in parallel processes (default 1)")
    parser.add_argument(
        "--ub-limit-kib", type=float, default=144, help="UB peak above which a variant fails (default 144 KiB)"
    )
    parser.add_argument("--list", action="store_true", help="print the recorded variants, compile nothing")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="specdec-ascend-cc-cache-"))
    try:
        from importlib.metadata import version

        triton_ascend = version("triton-ascend")
    except Exception:  # noqa: BLE001
        print("FAIL setup: triton-ascend is not installed in this Python")
        return 1
    bishengir = find_bishengir()
    if bishengir is None and not args.list:
        print("FAIL setup: bishengir-compile not found (pip install ascendnpu-ir==1.2.0, or set BISHENGIR_COMPILE)")
        return 1
    if bishengir:
        os.environ["PATH"] = os.path.dirname(bishengir) + os.pathsep + os.environ.get("PATH", "")
        out = subprocess.run([bishengir, "--version"], capture_output=True, text=True)
        bishengir_version = ((out.stdout or out.stderr).splitlines() or ["?"])[0].strip()
    else:
        bishengir_version = "not found"
    print(f"# triton-ascend {triton_ascend}; {bishengir_version}; target {ARCH}, {NPU_VECTOR_CORES} vector cores")

    launches, rec, allocator_methods, unlisted = record_launches()
    print(
        f"# {sum(rec.by_method.values())} launches recorded in {time.monotonic() - t0:.1f} s, "
        f"{len(launches)} distinct variants"
    )
    print("# launches by public method: " + ", ".join(f"{m} {n}" for m, n in sorted(rec.by_method.items())))
    print(f"# DraftCacheAllocator methods exercised: {', '.join(allocator_methods)}")
    if unlisted:
        print(f"# DraftCacheAllocator public methods not in ALLOCATOR_METHODS (not exercised): {', '.join(unlisted)}")
    if args.only:
        launches = [v for v in launches if args.only in v.label]
    if args.list:
        for v in launches:
            print(v.label)
        return 0
    sys.stdout.flush()

    ub_limit = int(args.ub_limit_kib * 1024)
    jobs = [(v, ub_limit) for v in launches]
    failed = flaky = 0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx, initializer=_init_worker, initargs=(str(REPO),)) as ex:
        for v, (ok, stage, note, crashes) in zip(launches, ex.map(_compile_in_worker, jobs)):
            failed += not ok
            flaky += ok and crashes > 0
            print(f"{'PASS' if ok else 'FAIL'} {v.label} stage={stage} {note}", flush=True)
    print(
        f"# {len(launches) - failed} passed, {failed} failed, {time.monotonic() - t0:.0f} s "
        f"(UB limit {args.ub_limit_kib:g} KiB of {UB_BYTES // 1024} KiB); "
        f"{flaky} passed only after a tool crash (retried up to {CRASH_RETRIES} times)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
