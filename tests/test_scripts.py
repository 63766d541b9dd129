"""The measurement scripts and the benchmark harness's checks, on the CPU: what they refuse, what they print and what
their checks catch. The smoke runs use each script's smallest options (a few seconds each through the interpreter)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec_ops
from benchmarks import harness

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CPU = torch.device("cpu")


def load_script(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is no package), registered in ``sys.modules`` under a name of its
    own while it runs (its dataclasses look their module up there)."""
    module_name = f"_specdec_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eager_host_time():
    return load_script("eager_host_time")


@pytest.fixture(scope="module")
def profile_allocator():
    return load_script("profile_allocator")


@pytest.fixture(scope="module")
def profile_fused_vs_unfused():
    return load_script("profile_fused_vs_unfused")


@pytest.fixture(scope="module")
def draft_loop():
    return load_script("draft_loop")


def refused(capsys, parse, argv: list[str]) -> str:
    """What argparse printed when ``parse(argv)`` refused ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------- eager_host_time


@settings(deadline=None, max_examples=examples(300), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=1, max_size=7))
def test_eager_host_time_summary_stays_within_its_samples(eager_host_time, seconds):
    median, p20, p80 = eager_host_time.summarize(seconds)
    low, high = min(seconds) * 1e6, max(seconds) * 1e6
    slack = 1e-9 * max(1.0, high)
    assert low - slack <= p20 <= median + slack
    assert median - slack <= p80 <= high + slack


def test_eager_host_time_summary_of_three_samples_is_not_extrapolated(eager_host_time):
    # The audit's case: the default ("exclusive") quantiles put p20 below the smallest of three samples.
    median, p20, p80 = eager_host_time.summarize([1e-6, 50e-6, 60e-6])
    assert (median, round(p20, 9), round(p80, 9)) == (50.0, 20.6, 56.0)


def test_eager_host_time_samples_every_call_in_each_round(eager_host_time):
    """One sample of every call a round, the warm-up rounds first: a slow phase of the host falls on every call."""
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("empty launch", "a", "b")}
    samples = eager_host_time.round_samples(calls, torch.device("cpu"), iters=2, repeats=3, warmup=1)
    assert order == ["empty launch", "empty launch", "a", "a", "b", "b"] * 4
    assert {name: len(seconds) for name, seconds in samples.items()} == {"empty launch": 3, "a": 3, "b": 3}
    assert all(s > 0 for seconds in samples.values() for s in seconds)


def test_eager_host_time_ratio_pairs_each_sample_with_its_rounds_empty_launch(eager_host_time):
    # Rounds whose empty launch was slow (a slow phase of the host) give the same ratio as the others.
    assert eager_host_time.paired_ratio([2e-6, 4e-6, 9e-6], [1e-6, 4e-6, 3e-6]) == 2.0
    assert eager_host_time.paired_ratio([2e-6, 4e-6, 9e-6], [1e-6, 4e-6, 3e-6], launches=2) == 1.0
    with pytest.raises(ValueError):
        eager_host_time.paired_ratio([1e-6], [1e-6, 2e-6])


def test_eager_host_time_refuses_bad_counts(capsys, eager_host_time):
    assert "--repeats must be at least 1" in refused(capsys, eager_host_time.parse_args, ["--repeats", "0"])
    assert "--warmup must be at least 0" in refused(capsys, eager_host_time.parse_args, ["--warmup", "-1"])
    assert "--device" in refused(capsys, eager_host_time.parse_args, ["--device", "tpu"])


def test_eager_host_time_smoke(capsys, eager_host_time):
    assert eager_host_time.main(["--device", "cpu", "--batch-size", "1", "--iters", "1", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "Triton interpreter: timing the calls would time the interpreter" in out
    assert "PASS" not in out and "FAIL" not in out  # no verdicts from interpreter timings
    assert "capacity syncs of the allocators while timing the host Python (launch stubbed): 0" in out
    assert "(the pools had room for every call)" in out


# ---------------------------------------------------------------------------------------- profile_allocator


def test_profile_allocator_refuses_an_unknown_variant(capsys, profile_allocator):
    err = refused(capsys, profile_allocator.parse_args, ["--device", "cpu", "--variants", "fused,fuse"])
    assert "--variants" in err and "'fused,fuse'" in err and "unknown: fuse" in err
    assert "fused,unfused,commit-and-draft" in err  # the names it takes


@pytest.mark.parametrize("option", ["--calls", "--repeats"])
def test_profile_allocator_refuses_counts_below_one(capsys, profile_allocator, option):
    err = refused(capsys, profile_allocator.parse_args, ["--device", "cpu", option, "0"])
    assert f"{option} must be at least 1, got 0" in err


def test_profile_allocator_keeps_the_counts_given(profile_allocator):
    args = profile_allocator.parse_args(["--device", "cpu", "--calls", "1", "--repeats", "1", "--warmup", "0"])
    assert (args.calls, args.repeats, args.warmup, args.mode) == (1, 1, 0, "eager")
    args = profile_allocator.parse_args(["--device", "cpu"])
    assert (args.calls, args.repeats) == (2, 3)


def test_profile_allocator_smoke(capsys, tmp_path, profile_allocator):
    argv = ["--device", "cpu", "--batch-sizes", "2", "--page-sizes", "4", "--num-draft-tokens", "2"]
    argv += ["--calls", "1", "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path), "--no-plot"]
    assert profile_allocator.main(argv) == 0
    summary = (tmp_path / "allocator_summary.md").read_text()
    assert "mode: eager, host wall-clock, Triton interpreter" in summary
    assert "×" not in summary  # no ratios from interpreter timings, SGLang's least of all
    with open(tmp_path / "allocator_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["variant"] for r in rows) == sorted(harness.ALLOCATOR_VARIANTS)
    # each row says where it was measured (it did not: interpreter timings saved unlabelled; a scripts audit)
    assert {r["runtime"] for r in rows} == {"Triton interpreter (CPU)"} and {r["device"] for r in rows} == {"cpu"}


@pytest.mark.parametrize(
    "pages, ns, variants",
    [
        ([16], [1, 2, 4, 8, 16], "fused,unfused,commit-and-draft"),
        ([1, 16, 128], [1, 4, 8], "fused,unfused"),
        ([1], list(range(1, 13)), "fused"),
    ],
)
def test_profile_allocator_plot_keeps_its_text_inside_the_figure(tmp_path, profile_allocator, pages, ns, variants):
    """The legend, title and axis labels of the sweep's plot lie inside the figure and the legend below the axes'
    labels, however many N and page sizes (five N on one page size used to clip the legend, title and y label)."""
    plt = pytest.importorskip("matplotlib.pyplot")  # (the bench extra's)
    argv = ["--device", "cpu", "--page-sizes", ",".join(map(str, pages)), "--num-draft-tokens"]
    args = profile_allocator.parse_args(
        argv + [",".join(map(str, ns)), "--batch-sizes", "1,16,256", "--variants", variants]
    )
    rows = [
        dict(bs=bs, N=n, page_size=page, variant=variant, median_us=1.0 + bs / 100 + n)
        for page in pages
        for n in ns
        for bs in args.batch_sizes
        for variant in args.variants
    ]
    profile_allocator.plot(rows, args, harness.environment(args.device), tmp_path / "plot.png")
    fig = plt.gcf()
    try:
        assert (tmp_path / "plot.png").stat().st_size > 0
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        assert sorted(t.get_text() for t in legend.get_texts() if t.get_text()) == sorted(
            list(args.variants) + [f"N={n}" for n in ns]
        )
        axes = fig.axes
        texts = [legend, fig._suptitle, axes[0].yaxis.label] + [ax.xaxis.label for ax in axes]
        width, height = fig.bbox.width, fig.bbox.height
        for artist in texts:
            box = artist.get_window_extent(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, artist
        lowest_label = min(ax.xaxis.label.get_window_extent(renderer).y0 for ax in axes)
        assert legend.get_window_extent(renderer).y1 <= lowest_label
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------ profile_fused_vs_unfused


def test_profile_fused_vs_unfused_targets_on_the_interpreter_give_no_verdict(
    capsys, tmp_path, monkeypatch, profile_fused_vs_unfused
):
    monkeypatch.setattr(profile_fused_vs_unfused, "TARGETS", [(1, 2, 2.0), (2, 2, 2.0)])
    argv = ["--device", "cpu", "--targets", "--variants", "fused,empty", "--iters", "1", "--repeats", "1"]
    argv += ["--warmup", "0", "--no-plot", "--no-trace", "--no-progress", "--out-dir", str(tmp_path)]
    assert profile_fused_vs_unfused.main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS" not in out and "FAIL" not in out
    assert "TRITON INTERPRETER wall-clock (says nothing about device speed; no ratios, no verdicts)" in out
    with open(tmp_path / "targets.csv") as f:
        targets = list(csv.DictReader(f))
    assert len(targets) == 2
    for target in targets:
        assert target["runtime"] == "Triton interpreter (CPU)"
        assert target["graph_verdict"] == target["eager_verdict"] == "n/a (interpreter)"
        assert target["eager_ratio"] == ""


def test_profile_fused_vs_unfused_refuses_an_unknown_device(capsys, profile_fused_vs_unfused):
    assert "--device" in refused(capsys, profile_fused_vs_unfused.parse_args, ["--device", "tpu"])


# ----------------------------------------------------------------------------------------------- draft_loop


def test_draft_loop_refuses_zero_timing_reps(capsys, draft_loop):
    err = refused(capsys, draft_loop.parse_args, ["--timing-reps", "0"])
    assert "--timing-reps must be at least 1, got 0" in err


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_draft_loop_default_pool_holds_small_batches(draft_loop, batch_size):
    args = draft_loop.parse_args(["--batch-size", str(batch_size)])
    assert args.num_slots == args.max_context_len  # one request of max_context_len, whole pages of 16
    # From 4 requests on, the default is a quarter of batch_size * max_context_len, as before.
    assert draft_loop.parse_args(["--batch-size", "16"]).num_slots == 16 * 512 // 4


@pytest.mark.parametrize(
    "extra",
    [[], ["--topk", "2", "--num-steps", "2", "--page-size", "4"], ["--prefix-sharing", "--max-prompt-len", "1"]],
    ids=["chain", "tree", "prefix-one-token-prompts"],  # (the last crashed setting up its system prompts)
)
def test_draft_loop_smoke(capsys, draft_loop, extra):
    argv = ["--device", "cpu", "--batch-size", "1", "--steps", "4", "--check-every", "2", "--timing-reps", "1"]
    assert draft_loop.main(argv + ["--quiet", *extra]) == 0
    out = capsys.readouterr().out
    assert "invariants         ok" in out
    assert "per step that made any" in out


def test_draft_loop_hit_rate_counts_only_the_prompts_that_arrived(capsys, draft_loop):
    """A pool too small for any arrival: every prompt is refused, so the cache saw no prompt token (it counted the
    refused ones, which gave more tokens than the prompts that arrived could hold; a scripts audit)."""
    argv = ["--device", "cpu", "--batch-size", "4", "--steps", "6", "--check-every", "3", "--timing-reps", "1"]
    argv += ["--max-prompt-len", "8", "--max-context-len", "16", "--num-slots", "24", "--page-size", "4"]
    assert draft_loop.main(argv + ["--arrival-prob", "1", "--prefix-sharing", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "arrived 0," in out and "arrivals refused (pool full) 24" in out
    assert "hit rate 0.0% of prompt tokens (0 of 0)" in out


# ---------------------------------------------------------------------------------- harness and benchmarks


def test_allocator_step_refuses_an_unknown_variant():
    with pytest.raises(ValueError, match="variant must be one of .*got 'fuse'"):
        harness.AllocatorStep("fuse", 2, 2, 4, 4, CPU)


@pytest.mark.parametrize("variant", harness.ALLOCATOR_VARIANTS)
def test_allocator_step_check_steps_passes_and_catches(variant):
    step = harness.AllocatorStep(variant, 3, 2, 4, 12, CPU, prefix_pages=1)
    step.checked_call()
    step.check_steps(lambda: harness.run_calls([step] * 2), 2)
    # A run that leaves the window unwritten, one that makes a step too few, a pool that lost a page: all caught.
    with pytest.raises(harness.OutputMismatch, match="out_cache_loc"):
        step.check_steps(lambda: (step(), step.out.fill_(harness.SENTINEL)), 1)
    with pytest.raises(harness.OutputMismatch, match="committed"):
        step.check_steps(step, 2)
    harness.check_pool(step.alloc)
    step.alloc.req_to_token[1, 4:8] = step.alloc.req_to_token[0, 4:8]  # row 1's second page: row 0's
    with pytest.raises(harness.PoolMismatch, match="counted"):
        harness.check_pool(step.alloc)


def test_check_pool_catches_a_slot_outside_the_pool_and_a_split_page():
    step = harness.AllocatorStep("fused", 2, 2, 4, 8, CPU)
    step.alloc.req_to_token[0, 0] = step.alloc.total_slots
    with pytest.raises(harness.PoolMismatch, match="outside the pool"):
        harness.check_pool(step.alloc)
    step = harness.AllocatorStep("fused", 2, 2, 4, 8, CPU)
    step.alloc.req_to_token[0, 1] += 4  # the next page's slot at the same offset
    with pytest.raises(harness.PoolMismatch, match="split"):
        harness.check_pool(step.alloc)


def test_benchmark_groups_on_the_interpreter_say_so():
    assert harness.group_suffix(CPU) == " | interpreter (CPU), not device speed"


def test_record_device_time_times_nothing_when_disabled():
    class Disabled:
        disabled = True

    recorded = len(harness.DEVICE_TIMES)
    assert harness.record_device_time(Disabled(), None, 1, CPU) is None  # no graph is touched: None would raise
    assert len(harness.DEVICE_TIMES) == recorded


@pytest.mark.parametrize("variant", ["fused", "tree_draft", "one_call", "components"])
def test_tree_step_check_at_page_1_can_fail(variant):
    pytest.importorskip("pytest_benchmark")
    from benchmarks import bench_allocator

    step = bench_allocator.TreeStep(variant, 5, 1, 8)
    step.checked_call()
    step.check_steps(step, 1)
    seq_lens = step.seq_lens.clone()
    step()
    start = step.seq_lens.clone() if variant == "one_call" else seq_lens
    step.check_window("page 1", start)
    step.out[step.out.numel() - 1] += 1  # the last request's last node: never accepted (paths take at most 4)
    with pytest.raises(harness.OutputMismatch):
        step.check_window("page 1", start)


def _labelled_y_ticks(ax, low: float, high: float) -> list[float]:
    """The y ticks of ``ax`` that carry a label and lie in ``[low, high]``."""
    ax.figure.canvas.draw()
    return [t.get_loc() for t in ax.yaxis.get_major_ticks() if t.label1.get_text() and low <= t.get_loc() <= high]


@pytest.mark.parametrize("span", [(1.5, 3.4), (5.6, 9.4), (1.2, 80.0), (900.0, 8000.0)])
def test_the_plots_label_the_y_axis_however_narrow_its_range(
    tmp_path, monkeypatch, profile_allocator, profile_fused_vs_unfused, span
):
    """A log y axis labels powers of ten only: values within one decade (1.5-3.4 µs, as a GPU gives) showed no y
    label at all in profile_fused_vs_unfused's plot (a scripts audit, 2026-11-25). Both plots now label at least two
    ticks inside the data's range, and the allocator's title names only the variants that ran."""
    plt = pytest.importorskip("matplotlib.pyplot")  # (the bench extra's)
    low, high = span
    args = profile_fused_vs_unfused.parse_args(["--device", "cpu", "--batch-sizes", "64,256", "--window-lens", "4"])
    args.modes, args.variants = ["graph"], ["fused", "unfused"]
    row = profile_fused_vs_unfused.Row
    rows = [
        row("graph", "uniform", 4, bs, bs * 4, variant, value, value, value)
        for bs, variant, value in [(64, "fused", low), (256, "fused", (low + high) / 2), (256, "unfused", high)]
    ]
    env = harness.environment(CPU)
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # (the script closes its figure once saved)
    profile_fused_vs_unfused.plot(rows, env, args, tmp_path / "latency.png")
    monkeypatch.setattr(plt, "close", close)
    fig = plt.gcf()
    try:
        assert len(_labelled_y_ticks(fig.axes[0], low, high)) >= 2
    finally:
        plt.close(fig)
    argv = ["--device", "cpu", "--batch-sizes", "64,256", "--page-sizes", "16", "--num-draft-tokens", "4"]
    args = profile_allocator.parse_args(argv + ["--variants", "fused,commit-and-draft"])
    rows = [
        dict(bs=64, N=4, page_size=16, variant="fused", median_us=low),
        dict(bs=256, N=4, page_size=16, variant="commit-and-draft", median_us=high),
    ]
    profile_allocator.plot(rows, args, env, tmp_path / "sweep.png")
    fig = plt.gcf()
    try:
        assert len(_labelled_y_ticks(fig.axes[0], low, high)) >= 2
        title = fig._suptitle.get_text()
        assert "alloc_draft + commit (fused) vs commit_and_draft" in title and "unfused" not in title
    finally:
        plt.close(fig)


def test_a_compile_check_that_would_compile_nothing_fails():
    """``--only`` that matches no variant: both compile checks printed "0 passed, 0 failed" and exited 0."""
    launch_variants = load_script("launch_variants")
    fake = type("Fake", (), {"label": "_get_last_loc_kernel[i64]"})()
    assert launch_variants.select([fake], None) == [fake] and launch_variants.select([fake], "last_loc") == [fake]
    for launches, only in (([fake], "no_such_kernel"), ([], None)):  # (nothing recorded either)
        with pytest.raises(SystemExit) as exit_info:
            launch_variants.select(launches, only)
        assert exit_info.value.code == 1


def test_the_variant_workload_exercises_every_page_size_an_npu_takes():
    from specdec_ops.allocator import NPU_PAGE_SIZES

    launch_variants = load_script("launch_variants")
    assert set(NPU_PAGE_SIZES) <= set(launch_variants.PAGE_SIZES)


def test_npu_variants_leave_alignment_out_and_compile_from_the_npu_build():
    from specdec_ops import backend

    launch_variants = load_script("launch_variants")
    npu = {"is_npu": lambda device: True, "prefers_persistent_grid": lambda device: True, "num_cores": lambda d: 40}
    rec = launch_variants.Recorder(backend.launch, backend)
    table = torch.arange(40, dtype=torch.int32).reshape(4, 10)
    rows = torch.zeros(3, dtype=torch.int64)
    lens = torch.full((4,), 2, dtype=torch.int64)[1:]  # not 16-byte aligned
    with launch_variants.answering_as(rec, **npu):
        specdec_ops.get_last_loc(table, rows, lens)
    (launch,) = rec.launches.values()
    assert [aligned for _, aligned in launch.tensors] == [None] * len(launch.tensors)
    assert "~" not in launch.label
    fn, tensors = launch_variants.kernel_and_tensors(launch, npu=True)
    assert fn is backend.npu_kernels("cache_locs")._get_last_loc_kernel
    assert [str(t.dtype)[6:] for t in tensors] == [d for d, _ in launch.tensors]
    with launch_variants.answering_as(rec, is_npu=lambda device: False):
        specdec_ops.get_last_loc(table, rows, lens)
    cuda = [v for v in rec.launches.values() if v is not launch]
    assert len(cuda) == 1 and False in [aligned for _, aligned in cuda[0].tensors]


def _reference(tmp_path: Path, name: str, body: str) -> str:
    """A stand-in for the reference checker (``../shared/tools/ascend_compile_check.py``) whose compile_variant
    records its arguments in ``CALLS`` and runs ``body``."""
    path = tmp_path / f"{name}.py"
    path.write_text(f"CALLS = []\n\n\ndef compile_variant(*args):\n    CALLS.append(args)\n    {body}\n")
    return str(path)


def test_the_reference_checker_compiles_the_recorded_variants_under_this_checks_limit(tmp_path, monkeypatch):
    """``scripts/ascend_compile_check.py --reference``: each recorded variant goes to the reference checker's own
    compile_variant (the NPU build's kernel, its tensors and scalars, its constexprs); a pass above the UB limit, or
    without a UB estimate, fails; LLVM's crash banner is a crash, retried like this script's own."""
    from specdec_ops import backend

    monkeypatch.syspath_prepend(str(SCRIPTS))
    check = load_script("ascend_compile_check")
    rec = check.launch_variants.Recorder(backend.launch, backend)
    table = torch.arange(40, dtype=torch.int32).reshape(4, 10)
    with check.launch_variants.answering_as(rec, **check.NPU):
        specdec_ops.get_last_loc(table, torch.zeros(3, dtype=torch.int64), torch.full((3,), 2, dtype=torch.int64))
    (launch,) = rec.launches.values()
    limit = 144 * 1024

    passing = _reference(
        tmp_path, "passing", "return True, 'hivm', 'stopped at hivmc (CANN only) ub-peak~100.0KiB/192KiB'"
    )
    handed_off = "stopped at hivmc (CANN only) ub-peak~100.0KiB/192KiB"
    assert check.compile_by_reference(launch, limit, passing) == (True, "hivm", handed_off)
    ((fn, args, kwargs, arch, _, keep, label),) = check.reference_checker(passing).CALLS
    assert fn is backend.npu_kernels("cache_locs")._get_last_loc_kernel
    assert [str(t.dtype)[6:] for t in args[: len(launch.tensors)]] == [d for d, _ in launch.tensors]
    assert tuple(args[len(launch.tensors) :]) == launch.scalars
    assert kwargs == {**dict(launch.constexprs), "num_warps": launch.num_warps}
    assert (arch, keep, label) == (check.ARCH, None, launch.label)

    over = _reference(tmp_path, "over", "return True, 'hivm', 'stopped at hivmc (CANN only) ub-peak~150.0KiB/192KiB'")
    ok, stage, note = check.compile_by_reference(launch, limit, over)
    assert not ok and stage == "hivm" and note.endswith("above the limit of 144KiB")
    unplanned = _reference(tmp_path, "unplanned", "return True, 'hivm', 'stopped at hivmc (CANN only)'")
    assert not check.compile_by_reference(launch, limit, unplanned)[0]

    banner = (
        "PLEASE submit a bug report to https://github.com/llvm/llvm-project/issues/ and include the crash backtrace."
    )
    crashing = _reference(tmp_path, "crashing", f"return False, 'linalg', {banner!r}")
    ok, stage, note, crashes = check._compile_in_worker((launch, limit, crashing))
    assert not ok and stage == "linalg" and " crashed: " in note and crashes == check.CRASH_RETRIES
    assert len(check.reference_checker(crashing).CALLS) == 1 + check.CRASH_RETRIES

    empty = tmp_path / "empty.py"
    empty.write_text("")
    with pytest.raises(ValueError, match="has no compile_variant"):
        check.reference_checker(str(empty))
