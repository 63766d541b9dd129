"""The kernel variants that specdec_ops launches, recorded from the launching code itself, for the offline compile
checks (scripts/ascend_compile_check.py, scripts/cuda_compile_check.py).

The public API runs on CPU tensors while `backend` answers as the target device would (`answering_as`) and
`backend.launch` is replaced by a `Recorder`, which keeps (kernel, tensor dtypes and 16-byte alignment, scalars,
constexprs, num_warps) and runs nothing. So the constexprs are those the code picks at launch time, and a check
cannot drift from it. No kernel runs: device state stays as the host wrote it (a row not in use keeps seq_len -1,
which `_free_keeping` accounts for).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Dtypes of the ops' tensors: (req_to_token, req_pool_indices, offsets, out_cache_loc, last_loc).
PROFILES = {
    "i32": ("int32", "int32", "int32", "int32", "int32"),
    "i64": ("int64", "int64", "int64", "int64", "int64"),
    "sglang": ("int32", "int64", "int64", "int64", "int64"),
    "mix": ("int64", "int32", "int64", "int32", "int64"),
}
WINDOWS = [None, *range(0, 65)]  # None: ragged
PAGE_SIZES = [1, 16, 64, 128]  # every size an NPU takes (allocator.NPU_PAGE_SIZES): tested against it
DRAFT_LENS = range(1, 65)
ROW_KINDS = ("int64", "int32", "list")  # (int32 not as an NPU, which refuses it: checks.check_npu_dtypes)
# Batches past one program, exercised again with int64 rows and these draft lengths where a target's launch
# configuration depends on the batch size (a GPU's: tiles, scan blocks, warps, one launch or two). Empty for Ascend,
# whose tiles and scan block do not depend on it (its warps past _LARGE_BATCH: _in_two_launches_past_a_large_batch).
LARGE_BATCHES: tuple[int, ...] = ()
LARGE_DRAFT_LENS = (1, 2, 4, 8, 16, 33, 64)


@dataclass(frozen=True)
class Launch:
    module: str  # specdec_ops.kernels.<module>
    kernel: str
    # (dtype, 16-byte aligned) per tensor argument; aligned is None where the kernel does not specialise on it (NPU)
    tensors: tuple[tuple[str, bool | None], ...]
    scalars: tuple[int, ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int

    @property
    def key(self) -> tuple:
        return (self.module, self.kernel, self.tensors, self.constexprs, self.num_warps)

    @property
    def label(self) -> str:
        short = {"int32": "i32", "int64": "i64"}
        dtypes = "/".join(short.get(d, d) + ("~" if aligned is False else "") for d, aligned in self.tensors)
        cx = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{dtypes},{cx}]"


class Recorder:
    """Stands in for backend.launch: records each launch and the public method that made it, runs nothing."""

    def __init__(self, real_launch, backend):
        self.backend = backend  # specdec_ops.backend, whose is_npu answers as the recording's target
        self.signature = inspect.signature(real_launch)
        self.launches: dict[tuple, Launch] = {}
        self.by_method: dict[str, int] = {}
        self.method = "?"

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        fn = getattr(a["kernel"], "fn", a["kernel"])
        # On an NPU the kernels do not specialise on alignment (backend.unspecialised_function): one variant.
        npu = self.backend.is_npu(a["device"])
        launch = Launch(
            module=fn.__module__,
            kernel=fn.__name__,
            tensors=tuple(
                (str(t.dtype).replace("torch.", ""), None if npu else t.data_ptr() % 16 == 0) for t in a["tensors"]
            ),
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


def _tensor(values, dtype: str, misalign: bool = False) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=getattr(torch, dtype))
    if not misalign:
        return t
    buf = torch.zeros(t.numel() + 1, dtype=t.dtype)  # one element in: not 16-byte aligned
    buf[1:] = t.reshape(-1)
    return buf[1:].reshape(t.shape)


def exercise_ops(rec: Recorder) -> None:
    import specdec_ops

    bs, rows_n, ctx = 70, 9, 200  # two ragged tiles, several uniform ones
    for pname, (tab, idx, off, out, last) in PROFILES.items():
        if _recording_npu() and "int32" in (idx, off, out, last):
            continue  # an NPU takes int64 index tensors only, beside an int32 or int64 table (check_npu_dtypes)
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


def _recording_npu() -> bool:
    """Whether the launches are recorded as an NPU makes them; the NPU-only entries of ALLOCATOR_METHODS run only
    then (CI's CUDA check has a time budget)."""
    from specdec_ops import backend

    return backend.is_npu(torch.device("cpu"))  # (answering_as makes it answer for the target)


def _caller_ints(n: int, fill: int = 0) -> torch.Tensor:
    """A caller's int32 tensor, or int64 when recording as an NPU, which takes int64 index tensors only
    (checks.check_npu_dtypes)."""
    return torch.full((n,), fill, dtype=torch.int64 if _recording_npu() else torch.int32)


# The allocator's public methods and how to call them: (name, call(alloc, rows, n)). Add new methods here; a name
# that DraftCacheAllocator does not have (yet) is skipped. `rows` are the live rows (3, as a tensor or a list,
# ROW_KINDS; or LARGE_BATCHES of them),
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
    """commit_and_draft as it runs past its one-launch limit (the tile counts, then the allocation)."""
    module = sys.modules[type(alloc).__module__]
    limit = module._COMMIT_DRAFT_MAX_BATCH
    module._COMMIT_DRAFT_MAX_BATCH = 1
    try:
        alloc.commit_and_draft(rows, _caller_ints(len(rows), n // 2), n)
    finally:
        module._COMMIT_DRAFT_MAX_BATCH = limit


def _in_two_launches_past_a_large_batch(alloc, rows, n: int) -> None:
    """commit_and_draft in two launches as past _LARGE_BATCH requests (more warps a program there); the allocator's
    cached launch configurations are dropped before and after, as they are keyed by what the call asks, not by the
    constants patched here."""
    module = sys.modules[type(alloc).__module__]
    saved = module._COMMIT_DRAFT_MAX_BATCH, module._LARGE_BATCH
    module._COMMIT_DRAFT_MAX_BATCH = module._LARGE_BATCH = 1
    alloc._launch_configs.clear()
    try:
        alloc.commit_and_draft(rows, _caller_ints(len(rows), n // 2), n)
    finally:
        module._COMMIT_DRAFT_MAX_BATCH, module._LARGE_BATCH = saved
        alloc._launch_configs.clear()


def _tree_size(alloc, n: int) -> int:
    """The verified tree's node count for draft length ``n``, within what commit_tree takes on an NPU."""
    return min(n, 32 if alloc.page_size == 1 else 64)


def _commit_tree(alloc, rows, n: int) -> None:
    t = _tree_size(alloc, n)
    index = torch.arange(t, dtype=torch.int64).expand(len(rows), t).contiguous()
    alloc.commit_tree(rows, index if isinstance(rows, list) else index.to(rows.dtype), [t // 2] * len(rows))


def _branches(alloc, rows, n: int) -> None:
    alloc.alloc_branches(rows, 4, n, return_copies=alloc.page_size > 1)


def _tree_draft(alloc, rows, n: int) -> None:
    alloc.alloc_tree_draft(rows, _tree_size(alloc, n), 4, n)


def _tree_step(
    alloc,
    rows,
    n: int,
    one_launch: bool = True,
    window: int | None = None,
    counts: bool = False,
    topk: int = 4,
    steps: int | None = None,
    tree: int | None = None,
) -> None:
    """commit_tree_and_draft of trees of ``_tree_size`` nodes, then windows of as many (or ``window``): one launch for
    3 rows (one program) where the target takes one, or as it runs past one program (two: the tree commit and the
    draft, or with ``counts`` as past one program of the draft, the tree commit with the draft's counts and the
    draft from them); ``topk`` branches of ``steps`` (default ``n``) steps; ``tree`` nodes (default ``_tree_size``)."""
    t = _tree_size(alloc, n) if tree is None else tree
    index = torch.arange(t, dtype=torch.int64).expand(len(rows), t).contiguous()
    cls = type(alloc)
    choice, with_counts = cls._tree_step_launch_choice, cls._tree_step_counts
    if not one_launch:
        cls._tree_step_launch_choice = lambda self, *args: (False, False)
        cls._tree_step_counts = lambda self, *args: counts
    try:
        w = t if window is None else window
        accept = _caller_ints(len(rows), t // 2)
        alloc.commit_tree_and_draft(rows, index, accept, w, topk, n if steps is None else steps)
    finally:
        cls._tree_step_launch_choice, cls._tree_step_counts = choice, with_counts


ALLOCATOR_METHODS = [
    ("add_requests", lambda alloc, rows, n: alloc.free_requests(alloc.add_requests([n, 0, 3 * n + 1]).tolist())),
    ("alloc_draft", lambda alloc, rows, n: alloc.alloc_draft(rows, n)),
    (
        "alloc_draft",
        lambda alloc, rows, n: alloc.alloc_draft(
            rows, n, out_cache_loc=_caller_ints(len(rows) * n), last_loc=_caller_ints(len(rows))
        ),
    ),
    ("reserve_draft", lambda alloc, rows, n: alloc.reserve_draft(rows, n)),
    ("commit_and_draft", lambda alloc, rows, n: alloc.commit_and_draft(rows, _caller_ints(len(rows), n // 2), n)),
    (
        "commit_and_draft",
        lambda alloc, rows, n: alloc.commit_and_draft(
            rows, [n // 2] * len(rows), n, out_cache_loc=_caller_ints(len(rows) * n), last_loc=_caller_ints(len(rows))
        ),
    ),
    ("commit_and_draft", _in_two_launches),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, [n // 2] * len(rows))),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, _caller_ints(len(rows), n // 2))),
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
    # One branch of one step (an audit found a kernel's on-chip buffer past budget there on an NPU, where the workload
    # above had not gone).
    (
        "alloc_tree_draft",
        lambda alloc, rows, n: _recording_npu() and alloc.alloc_tree_draft(rows, _tree_size(alloc, n), 1, 1),
    ),
    (
        "commit_tree_and_draft",
        lambda alloc, rows, n: _recording_npu() and _tree_step(alloc, rows, n, topk=1, steps=1),
    ),
    # Counted tree steps with a tree on the other side of the draft's 16-node sums limit from its window (SUMS 2 with
    # narrow windows, SUMS 1 with wide ones), and trees past it with windows past 32 (SUMS 2 with the widest), as an
    # NPU only (fuzzes of the public API found them missing).
    (
        "commit_tree_and_draft",
        lambda alloc, rows, n: (
            _recording_npu()
            and _tree_step(alloc, rows, n, one_launch=False, window=n, counts=True, tree=32 if n <= 16 else 16)
        ),
    ),
    (
        "commit_tree_and_draft",
        lambda alloc, rows, n: (
            _recording_npu() and n > 32 and _tree_step(alloc, rows, n, one_launch=False, window=n, counts=True, tree=32)
        ),
    ),
    ("commit_tree", _commit_tree),
    ("alloc_branches", _branches),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, [0] * len(rows))),
    # A tree draft of N nodes (above, at most as many as commit_tree takes), closed by a chain commit.
    ("alloc_tree_draft", lambda alloc, rows, n: _recording_npu() and alloc.alloc_tree_draft(rows, n, 4, 4)),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, [0] * len(rows))),
    # Drafts while branch pages are held: reserve_draft, and alloc_draft of the whole N (above, a tree's window).
    ("alloc_branches", lambda alloc, rows, n: _recording_npu() and _branches(alloc, rows, n)),
    ("reserve_draft", lambda alloc, rows, n: _recording_npu() and alloc.reserve_draft(rows, n)),
    ("alloc_branches", lambda alloc, rows, n: _recording_npu() and _branches(alloc, rows, n)),
    ("alloc_draft", lambda alloc, rows, n: _recording_npu() and alloc.alloc_draft(rows, n)),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, [0] * len(rows))),
    (
        "commit_and_draft",
        lambda alloc, rows, n: _recording_npu() and _in_two_launches_past_a_large_batch(alloc, rows, n),
    ),
    ("commit", lambda alloc, rows, n: alloc.commit(rows, [0] * len(rows))),
    ("alloc_branches", _branches),
    # commit_and_draft releasing them
    ("commit_and_draft", lambda alloc, rows, n: alloc.commit_and_draft(rows, _caller_ints(len(rows)), n)),
    ("alloc_branches", _branches),
    ("release_branches", lambda alloc, rows, n: alloc.release_branches(rows)),
    ("alloc_branches", _branches),
    # Frees while branch pages may be held (their release in the free's launch), with keep_lens and without; then,
    # every row freed, frees with keep_lens and (add_requests above, _add_with_prefix below) without, none held.
    ("free_requests", lambda alloc, rows, n: _free_keeping(alloc, n)),
    ("free_requests", lambda alloc, rows, n: alloc.free_requests(rows)),
    ("free_requests", lambda alloc, rows, n: _free_keeping(alloc, n)),
    ("add_requests", lambda alloc, rows, n: _add_with_prefix(alloc, n)),
    ("release_slots", lambda alloc, rows, n: alloc.release_slots(_cached_page(alloc, 2)[:1])),
]


def exercise_allocator(rec: Recorder) -> tuple[list[str], list[str]]:
    """Returns (methods of the table the allocator has, public methods it has that the table lacks)."""
    from specdec_ops import DraftCacheAllocator

    present = [(name, call) for name, call in ALLOCATOR_METHODS if hasattr(DraftCacheAllocator, name)]
    # Rows as tensors twice, the large batches below too: as they come (the host never learns that a tensor
    # released branch pages, so the calls after a release launch their release variants) and with refresh() after
    # each call (a sync: the host knows exactly which rows hold branch pages, so those calls take the variants
    # without a release, as they do where no branch page was ever taken). Lists are known exactly either way.
    kinds = [kind for kind in ROW_KINDS if kind != "int32" or not _recording_npu()]  # (NPU: int64 only)
    runs = [(kind, exact) for kind in kinds for exact in (False, True) if not exact or kind != "list"]
    for page_size in PAGE_SIZES:
        for kind, exact in runs:
            for n in DRAFT_LENS:
                alloc = DraftCacheAllocator(page_size * 4096, 8, 8192, page_size=page_size, device="cpu")
                with rec.calling("add_requests"):
                    rows = alloc.add_requests([5, 0, 17])
                rows = rows.tolist() if kind == "list" else rows.to(getattr(torch, kind))
                for name, call in present:
                    with rec.calling(name):
                        call(alloc, rows, n)
                    if exact:
                        alloc.refresh()
    for bs in LARGE_BATCHES:
        for page_size in PAGE_SIZES:
            for n, exact in [(n, exact) for n in LARGE_DRAFT_LENS for exact in (False, True)]:
                # Room for each request's context and its old and new branch pages (4 branches of up to n tokens).
                pages = 1024 // page_size + 8 * -(-(page_size - 1 + n) // page_size) + 8
                alloc = DraftCacheAllocator(page_size * bs * pages, bs + 8, 1024, page_size=page_size, device="cpu")
                with rec.calling("add_requests"):
                    rows = alloc.add_requests([(5, 0, 17)[i % 3] for i in range(bs)])
                for name, call in present:
                    with rec.calling(name):
                        call(alloc, rows, n)
                    if exact:
                        alloc.refresh()
    names = sorted({name for name, _ in present})
    public = {
        name for name, member in inspect.getmembers(DraftCacheAllocator, inspect.isfunction) if not name.startswith("_")
    }
    return names, sorted(public - {name for name, _ in ALLOCATOR_METHODS})


@contextlib.contextmanager
def answering_as(recorder: Recorder, **fakes):
    """``backend``'s functions named in ``fakes`` (``is_npu=lambda device: True``, ...) answer as given and
    ``backend.launch`` records, in every specdec_ops module that imported those names directly too."""
    from specdec_ops import backend

    fakes = {**fakes, "launch": recorder}
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


def record_launches(*backends: dict) -> tuple[list[Launch], Recorder, list[str], list[str]]:
    """Run the public API once per entry of ``backends`` (the fakes of ``answering_as``) and return the distinct
    variants, sorted by label; the recorder (launches by public method); the allocator methods exercised; and
    public allocator methods ALLOCATOR_METHODS lacks."""
    sys.path.insert(0, str(REPO))
    from specdec_ops import backend

    rec = Recorder(backend.launch, backend)
    for fakes in backends:
        with answering_as(rec, **fakes):
            exercise_ops(rec)
            allocator_methods, unlisted = exercise_allocator(rec)
    return sorted(rec.launches.values(), key=lambda v: v.label), rec, allocator_methods, unlisted


def select(launches: list[Launch], only: str | None) -> list[Launch]:
    """The launches whose label contains ``only`` (every launch for None). ``SystemExit`` (status 1, naming why)
    where none is left: a check that compiled nothing must not read as passed (a mistyped ``--only`` printed 0
    passed, 0 failed and exited 0)."""
    chosen = launches if only is None else [v for v in launches if only in v.label]
    if not chosen:
        why = "no launch was recorded" if not launches else f"no variant's label contains --only {only!r}"
        print(f"# FAIL: {why}", flush=True)
        raise SystemExit(1)
    return chosen


def init_worker(path: str) -> None:
    """A compile worker's start (spawned): the repository importable, kernels compiled, not interpreted."""
    sys.path.insert(0, path)
    os.environ.pop("TRITON_INTERPRET", None)


def kernel_and_tensors(launch: Launch, npu: bool = False):
    """The jitted kernel of ``launch``, from its normal (not interpreted) module or, with ``npu``, from the module as
    an NPU runs it (backend.npu_kernels), and CPU tensors of its dtypes and 16-byte alignment (64 elements each) to
    bind it with: what a compile check needs instead of the real tensors."""
    import importlib

    from specdec_ops import backend

    prefix = "specdec_ops.kernels."
    if npu:
        if not launch.module.startswith(prefix):
            raise ValueError(f"launch.module must be a module of {prefix}*, got {launch.module}")
        module = backend.npu_kernels(launch.module[len(prefix) :])
    else:
        module = importlib.import_module(launch.module)
    fn = getattr(module, launch.kernel)
    tensors = []
    for dtype, aligned in launch.tensors:
        buf = torch.zeros(80, dtype=getattr(torch, dtype))
        tensors.append(buf[1:65] if aligned is False else buf[:64])
    return fn, tensors


if __name__ == "__main__":  # a module of the compile checks, not a command: say so rather than exit 0 in silence
    sys.exit(
        "scripts/launch_variants.py is the compile checks' module; run scripts/cuda_compile_check.py or "
        "scripts/ascend_compile_check.py"
    )
