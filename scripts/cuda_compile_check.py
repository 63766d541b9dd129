#!/usr/bin/env python
"""Compile every kernel variant that specdec_ops launches on a Hopper GPU through this Python's Triton, offline.

No GPU is needed: Triton compiles for a target named here (default sm_90, an H100/H200) with the ptxas its wheel
ships. Run it in an environment whose Triton is the one to check, e.g. Triton 3.6, the Triton of torch 2.11+cu130:

  python scripts/cuda_compile_check.py [--quick] [--jobs 2] [--only SUBSTRING] [--arch 90]

Which variants: the launches themselves (scripts/launch_variants.py). The public API runs on CPU tensors while
`backend` answers as a Hopper GPU would: programmatic dependent launches on, one program per tile, and once as in
graph capture and once eagerly, since some calls pick other kernels in a graph. Each distinct variant (kernel,
dtypes, 16-byte alignment, constexprs, num_warps) is compiled from the normal (not interpreted) module through
Triton's CUDA stages (TTIR, TTGIR, LLVM IR, PTX, cubin). A line per variant, `PASS|FAIL label [error]`; exit status
0 when every variant compiles, 1 otherwise.

Why: Triton's compiler rejects some constructs that its interpreter runs. Triton 3.6 failed
`PassManager::run failed` in `make_ttgir` on allocation kernels whose mask joined a loaded length to the batch
mask (docs/design.md, "Stale rows are skipped on the device"); the CPU tests, which run the interpreter, passed.
The allocator is exercised with a batch of 3 requests and again with batches of 600 to 17000 (int64 rows, seven draft
lengths), whose launches take other tiles, scan blocks and warps on a GPU (`backend.num_cores` answers 132 SMs):
16- to 128-request tiles of a chain draft that looks back, the two launches of `commit_and_draft`, and the wider
scan blocks of large batches.
`--quick` (CI) records fewer allocator shapes (page sizes 1 and 16, ten draft lengths, rows as int64 tensors and as
lists), which cover every kernel and every constexpr branch the full set does, at about a third of the variants.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import launch_variants
from launch_variants import REPO, Launch

# How backend answers on a Hopper GPU, in a graph and eagerly. No kernel runs while launches are recorded, and
# ensure_compiled (which compiles a second launch before a first changes state) would need a driver.
HOPPER = {
    "is_npu": lambda device: False,
    "num_cores": lambda device: 132,  # SMs of an H100 or H200 (the tiles of a chain draft that looks back)
    "prefers_persistent_grid": lambda device: False,
    "supports_pdl": lambda device: True,
    "is_interpreted": lambda device: False,
    "ensure_compiled": lambda *args, **kwargs: None,
}
BACKENDS = ({**HOPPER, "is_capturing": lambda device: True}, {**HOPPER, "is_capturing": lambda device: False})


def compile_variant(launch: Launch, arch: int) -> tuple[bool, str]:
    """(passed, note): ``launch`` compiled for ``sm_<arch>`` by the installed Triton, as JITFunction.run would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, tensors = launch_variants.kernel_and_tensors(launch)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**dict(launch.constexprs), "num_warps": launch.num_warps or 4}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*tensors, *launch.scalars, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001
        lines = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        return False, (lines[-1] if lines else type(e).__name__)[:300]
    return True, f"cubin {len(kernel.asm.get('cubin', b''))} B"


def _compile_in_worker(args: tuple[Launch, int]) -> tuple[bool, str]:
    launch, arch = args
    try:
        return compile_variant(launch, arch)
    except Exception as e:  # noqa: BLE001 (a variant the binder refuses is a failure too)
        return False, f"setup: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer allocator shapes, every kernel and branch (CI)")
    parser.add_argument("--only", metavar="SUBSTRING", help="only variants whose label contains SUBSTRING")
    parser.add_argument("--jobs", type=int, default=1, help="variants compiled in parallel processes (default 1)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="specdec-cuda-cc-cache-"))
    import triton

    # Batches that take each class of tiles on a 132-SM GPU: 16-request tiles looking back, two launches of
    # commit_and_draft, 32-request tiles (and wider scan blocks), then 64- and 128-request ones.
    launch_variants.LARGE_BATCHES = (600, 3000, 5000, 9000, 17000)
    if args.quick:
        launch_variants.LARGE_BATCHES = (600, 5000, 17000)
        launch_variants.LARGE_DRAFT_LENS = (1, 4, 33)
        launch_variants.PAGE_SIZES = [1, 16]
        launch_variants.DRAFT_LENS = [1, 2, 3, 4, 5, 8, 9, 17, 33, 64]
        launch_variants.ROW_KINDS = ("int64", "list")
    print(f"# triton {triton.__version__}; target sm_{args.arch}{' (quick)' if args.quick else ''}")
    launches, rec, _, _ = launch_variants.record_launches(*BACKENDS)
    print(
        f"# {sum(rec.by_method.values())} launches recorded in {time.monotonic() - t0:.1f} s, "
        f"{len(launches)} distinct variants",
        flush=True,
    )
    launches = launch_variants.select(launches, args.only)
    failed = 0
    ctx = multiprocessing.get_context("spawn")
    jobs = [(v, args.arch) for v in launches]
    start = launch_variants.init_worker
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx, initializer=start, initargs=(str(REPO),)) as ex:
        for v, (ok, note) in zip(launches, ex.map(_compile_in_worker, jobs)):
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {v.label}" + ("" if ok else f" {note}"), flush=True)
    print(f"# {len(launches) - failed} passed, {failed} failed, {time.monotonic() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
