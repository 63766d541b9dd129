#!/usr/bin/env python
"""Compile the kernel variants that specdec_ops launches on an Ascend NPU for a workload, through triton-ascend's real
pipeline (not every mix of callers' dtypes: docs/design.md, "Ascend").

Offline: no NPU, no CANN. Run it in a virtual environment of its own (triton-ascend replaces triton):

  python3 -m venv .venv-ascend
  .venv-ascend/bin/pip install torch==2.13.0 "numpy<2" pybind11 triton-ascend==3.2.0 ascendnpu-ir==1.2.0
  .venv-ascend/bin/pip install --no-deps -e .
  .venv-ascend/bin/python scripts/ascend_compile_check.py [--jobs 2] [--only SUBSTRING] [--ub-limit-kib 144]
      [--reference ../shared/tools/ascend_compile_check.py]

Which variants: the launches themselves, not a list kept here (scripts/launch_variants.py). The public API runs on
CPU tensors while `backend` answers as an NPU would (`is_npu`, `prefers_persistent_grid`, `num_cores` = 40 vector
cores) and `backend.launch` is replaced by a recorder that keeps (kernel, tensor dtypes, scalars, constexprs,
num_warps) and runs nothing. On an NPU the kernels specialise on no argument's value (`backend.npu_kernels`: no
16-byte alignment, no scalar == 1 or divisible by 16), so a variant is its kernel, dtypes and constexprs, whatever
the alignment or the scalars: the check compiles those very functions, and fails a variant whose compiled module
still carries a value's attribute (`tt.divisibility`). So the constexprs are those the launching code picks, and the
check cannot drift from it. Exercised:

  ops        get_last_loc, assign_extend_cache_locs, get_last_loc_and_assign_extend_cache_locs: the dtype
             profiles of PROFILES an NPU takes (int32 and int64 tables beside int64 index tensors: an NPU refuses
             other index dtypes, checks.check_npu_dtypes), windows 0..64 uniform (window_len=) and ragged
  allocator  every method of ALLOCATOR_METHODS (the one table to extend) that DraftCacheAllocator has, over
             page sizes 1, 16, 64, 128 (every size an NPU takes), rows as int64 tensors and lists, N in 1..64:
             prefill (add_requests), draft with read-back (alloc_draft: emit on, given and new buffers), draft
             without (reserve_draft: emit off), commit, commit_and_draft (in one launch, in the two it makes
             past its one-launch limit, and releasing branch pages),
             free_requests (with and without keep_lens),
             prefixes from a prefix cache (add_requests with prefix_slots), release_slots, and a tree step
             (alloc_branches, alloc_draft releasing them, commit_tree; alloc_tree_draft, commit_tree releasing
             them; commit_tree_and_draft in one launch and in two, with and without the draft's counts; release by
             commit, release_branches, free), and, as an NPU only, the calls fuzzes of the public API found
             reaching other constexpr combinations (docs/design.md, "Ascend")

Each distinct variant (kernel, dtypes, constexprs) is compiled from the module as an NPU runs it
(`backend.npu_kernels`), through these stages; the line printed per variant names the last one
reached:

  frontend  Python AST -> Triton IR, triton-ascend 3.2's own frontend
  ttir      triton-ascend's TTIR passes
  linalg    triton-adapter-opt (shipped in the triton-ascend wheel): TTIR -> Linalg + HIVM/HFusion
  hivm      bishengir-compile (PyPI ascendnpu-ir): HFusion/HIVM pipeline, on-chip buffer (UB) planning, sync
            insertion, with the options triton-ascend passes. It ends by handing the module to hivmc, which
            only CANN has: reaching that hand-off is a PASS.

With --reference the same variants go to the reference checker's own compile_variant instead (its stages, its rule
for a pass, its UB estimate, printed as its note), under this script's UB limit: the reference checker's own lists of
variants predate the kernels' present arguments (docs/design.md, "Ascend").

A line is `PASS|FAIL label stage=... ub-peak=N.NKiB [scalar: ops] [error]`: the UB peak is the highest UB
address bishengir's planner used (read from its saved HIVM IR), above --ub-limit-kib a FAIL; `scalar:` lists
ops bishengir warns will run on the scalar unit. Exit status 0 when every variant passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
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
from pathlib import Path

import launch_variants
from launch_variants import Launch, Recorder

REPO = Path(__file__).resolve().parents[1]
UB_BYTES = 192 * 1024  # Ascend 910B/A3 vector core unified buffer
NPU_VECTOR_CORES = 40  # Ascend 910B3
ARCH = "Ascend910B3"

# ------------------------------------------------------------------------------------------------ exercise

NPU = {
    "is_npu": lambda device: True,
    "prefers_persistent_grid": lambda device: True,
    "num_cores": lambda device: NPU_VECTOR_CORES,
}


def record_launches() -> tuple[list[Launch], Recorder, list[str], list[str]]:
    """The variants launched on an NPU (launch_variants.record_launches with NPU's answers)."""
    return launch_variants.record_launches(NPU)


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

    fn, tensors = launch_variants.kernel_and_tensors(launch, npu=True)
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
            # The location, then the reason, which ends the last line (after the source it quotes).
            reason = f"{lines[0][:100]} ... {lines[-1].strip()[-200:]}" if lines else type(e).__name__
            return False, "frontend", reason
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
        hivm_text = hivm_file.read_text() if hivm_file.exists() else ""
        if "tt.divisibility" in hivm_text:
            # The variant's key leaves alignment out (backend.unspecialised_function): it must not reach the code.
            return False, "hivm", "specialised on an argument's value (tt.divisibility): the key would not cover it"
        peak = ub_peak(hivm_text) if hivm_text else None
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


_references: dict[str, object] = {}


def reference_checker(path: str):
    """The reference checker at ``path`` (``../shared/tools/ascend_compile_check.py``) as a module, loaded once a
    process: what ``--reference`` compiles through (its ``compile_variant``)."""
    module = _references.get(path)
    if module is None:
        spec = importlib.util.spec_from_file_location("ascend_reference_checker", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"--reference must name a Python file, got {path!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "compile_variant", None)):
            raise ValueError(f"the reference checker {path} has no compile_variant() to compile a variant with")
        _references[path] = module
    return module


def compile_by_reference(launch: Launch, ub_limit: int, reference: str) -> tuple[bool, str, str]:
    """(passed, last stage reached, note) of ``launch`` compiled by the reference checker's own
    ``compile_variant(fn, args, kwargs, arch, bishengir, keep_dir, label)``: its stages, its rule for a pass (the
    hand-off to hivmc) and its UB estimate, on this script's variant (the launch as recorded, from the NPU build of
    its module), and this script's UB limit. A crash its note shows (a tool's assertion, or LLVM's crash banner) is
    worded as this script's, so that it is retried; one its one-line note does not show is a plain failure."""
    fn, tensors = launch_variants.kernel_and_tensors(launch, npu=True)
    kwargs = {**dict(launch.constexprs), "num_warps": launch.num_warps}
    ok, stage, note = reference_checker(reference).compile_variant(
        fn, (*tensors, *launch.scalars), kwargs, ARCH, find_bishengir(), None, launch.label
    )
    if not ok and " crashed: " not in note and ("PLEASE submit a bug report" in note or "Stack dump" in note):
        note = f"a tool crashed: {note}"  # LLVM's crash banner, without an assertion to name
    if ok and stage == "hivm":
        peak = re.search(r"ub-peak~([\d.]+)KiB", note)
        if peak is None:
            return False, stage, note + " (the reference checker gave no UB estimate)"
        if float(peak.group(1)) * 1024 > ub_limit:
            return False, stage, note + f" above the limit of {ub_limit / 1024:.0f}KiB"
    return ok, stage, note


# triton-adapter-opt 3.2.0 sometimes crashes (an assertion, e.g. "Malformed type storage object") on an input it
# compiles on every other run: the same TTIR and command passed 100 times in a row here. A crash, and only a crash
# (never a compile error), is retried this many times; every crash is printed and counted, so a kernel that crashes
# the tool for real still fails, and flakiness stays visible. A variant still crashing after them is tried once more
# in a fresh process: a worker that has compiled many variants can crash the tool on one variant again and again
# (CI, 2026-11-25: `_commit_tree_count_kernel` at page 128, BLOCK_T 64, three crashes in one worker, then three
# passes out of three, each in a process of its own).
CRASH_RETRIES = 2


def _compile_in_worker(args: tuple[Launch, int, str | None]) -> tuple[bool, str, str, int]:
    """(passed, stage, note, crashes of a tool before the final answer); by the reference checker at ``args[2]``
    where it names one."""
    launch, ub_limit, reference = args
    crashes = []
    while True:
        try:
            if reference is None:
                ok, stage, note = compile_variant(launch, ub_limit)
            else:
                ok, stage, note = compile_by_reference(launch, ub_limit, reference)
        except Exception as e:  # noqa: BLE001
            ok, stage, note = False, "setup", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if ok or " crashed: " not in note or len(crashes) == CRASH_RETRIES:
            if crashes and ok:
                note += f" [passed after {len(crashes)} crash(es): {crashes[0]}]"
            return ok, stage, note, len(crashes)
        crashes.append(note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", metavar="SUBSTRING", help="only variants whose label contains SUBSTRING")
    parser.add_argument("--jobs", type=int, default=1, help="variants compiled in parallel processes (default 1)")
    parser.add_argument(
        "--ub-limit-kib", type=float, default=144, help="UB peak above which a variant fails (default 144 KiB)"
    )
    parser.add_argument("--list", action="store_true", help="print the recorded variants, compile nothing")
    parser.add_argument(
        "--reference",
        metavar="CHECKER",
        help="compile each variant through the reference checker at CHECKER (e.g. ../shared/tools/"
        "ascend_compile_check.py: its compile_variant(), its stages, pass rule and UB estimate) instead of this "
        "script's pipeline; the variants and the UB limit stay this script's",
    )
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
    if args.reference is not None:
        try:
            reference_checker(args.reference)
        except (OSError, ValueError) as e:
            print(f"FAIL setup: {e}")
            return 1
        print(f"# compiled by the reference checker {args.reference} (its compile_variant)")

    launches, rec, allocator_methods, unlisted = record_launches()
    print(
        f"# {sum(rec.by_method.values())} launches recorded in {time.monotonic() - t0:.1f} s, "
        f"{len(launches)} distinct variants"
    )
    print("# launches by public method: " + ", ".join(f"{m} {n}" for m, n in sorted(rec.by_method.items())))
    print(f"# DraftCacheAllocator methods exercised: {', '.join(allocator_methods)}")
    if unlisted:
        print(f"# DraftCacheAllocator public methods not in ALLOCATOR_METHODS (not exercised): {', '.join(unlisted)}")
    launches = launch_variants.select(launches, args.only)
    if args.list:
        for v in launches:
            print(v.label)
        return 0
    sys.stdout.flush()

    ub_limit = int(args.ub_limit_kib * 1024)
    jobs = [(v, ub_limit, args.reference) for v in launches]
    failed = flaky = 0
    ctx = multiprocessing.get_context("spawn")
    start = launch_variants.init_worker
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx, initializer=start, initargs=(str(REPO),)) as ex:
        for v, job, (ok, stage, note, crashes) in zip(launches, jobs, ex.map(_compile_in_worker, jobs)):
            if not ok and " crashed: " in note:  # the last try: a process of its own (see CRASH_RETRIES)
                with ProcessPoolExecutor(1, mp_context=ctx, initializer=start, initargs=(str(REPO),)) as fresh:
                    ok, stage, fresh_note, more = fresh.submit(_compile_in_worker, job).result()
                crashes += 1 + more
                note = fresh_note + (f" [in a fresh process after {crashes} crash(es): {note}]" if ok else "")
            failed += not ok
            flaky += ok and crashes > 0
            print(f"{'PASS' if ok else 'FAIL'} {v.label} stage={stage} {note}", flush=True)
    print(
        f"# {len(launches) - failed} passed, {failed} failed, {time.monotonic() - t0:.0f} s "
        f"(UB limit {args.ub_limit_kib:g} KiB of {UB_BYTES // 1024} KiB); "
        f"{flaky} passed only after a tool crash (retried up to {CRASH_RETRIES} times, then in a fresh process)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
