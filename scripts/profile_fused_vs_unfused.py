#!/usr/bin/env python
"""Profile the fused op against the two component ops back to back, the PyTorch reference and an empty kernel.

Sweeps batch sizes and window lengths N, with uniform and ragged windows, on the current device (cuda, npu, or
cpu through Triton's interpreter). Every variant's output is checked against the reference (exactly) before it is
timed, and again after a graph replay. Variants:

  fused    specdec_ops.get_last_loc_and_assign_extend_cache_locs: one launch
  unfused  specdec_ops.get_last_loc, then specdec_ops.assign_extend_cache_locs: two launches
  torch    specdec_ops.reference.get_last_loc_and_assign_extend_cache_locs_torch (num_tokens given: no sync)
  empty    an empty Triton kernel on one program: the floor under any launch

Uniform windows pass window_len=N (the ops' fast path); ragged windows (lengths uniform in [0, 2N], mean N) pass
only num_tokens. All outputs go to preallocated buffers. Calls rotate over --input-sets input sets (random rows of
one req_to_token table of 2 * max(batch sizes) rows, random starts).

Timing modes (a sample is --iters calls; figures are the median and the 20th/80th percentiles over --repeats
samples, after --warmup samples that are dropped):

  graph  device time per call (cuda; npu where torch_npu has graphs). --iters calls are captured in one graph;
         device events around each replay; the replay's time over --iters. Launch gaps inside the graph count;
         the host does not.
  eager  host wall-clock per call: synchronize, read the clock, --iters eager calls back to back, synchronize,
         read the clock; over --iters. This is the steady-state cost of a call made back to back: the larger of
         the host's time per call (Python wrapper, argument checks, Triton launcher, driver) and the device's,
         plus 1/--iters of one launch latency and one synchronize. On cpu it is the interpreter's wall-clock time.

Speedups are the other variant's median over the fused op's median, shown only where both outputs were checked,
and never on cpu: Triton's interpreter times NumPy, not a device, so its timings are labelled and not compared.

Files written to --out-dir:
  results.csv           one row per (mode, windows, N, batch size, variant): median/p20/p80 in us, samples,
                        the fused op's speedup over that variant, errors, and the environment
  summary.txt           the report printed at the end
  metadata.json         environment, options, cases run and skipped, launches per call seen in the trace,
                        target verdicts, errors
  latency_vs_batch.png  us per call against batch size, log-log, one panel per (mode, windows, N), one line per
                        variant (p20-p80 shaded), the empty kernel's floor dashed
  trace_cuda.json       (cuda; trace_cpu.json on cpu) torch.profiler Chrome trace of 10 fused calls, then 10
                        unfused calls (uniform windows, the largest swept batch size up to 1024, the smallest
                        N), each group under a named range: open it in ui.perfetto.dev or chrome://tracing to
                        see the launches; the device kernels per call are also counted in the report
  trace_npu/            (npu) torch_npu.profiler output of the same calls
  targets.csv           with --targets: each target and its verdict, with the device and the runtime (compiled
                        Triton's CUDA or torch_npu, or "Triton interpreter (CPU)", where no verdict is given)

Exit status: 0 when every output matched and every measurement ran (targets may miss), 1 otherwise.

Examples:
  python scripts/profile_fused_vs_unfused.py                          # default sweep on the current device
  python scripts/profile_fused_vs_unfused.py --targets --out-dir out/targets
  python scripts/profile_fused_vs_unfused.py --device cpu --batch-sizes 1,8 --window-lens 4 --no-plot
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # run from a checkout: the benchmarks' harness, and specdec_ops if not installed

from benchmarks import harness  # noqa: E402
from specdec_ops import backend  # noqa: E402

MODES = ("graph", "eager")
INDEX_DTYPES = {"int64": torch.int64, "int32": torch.int32}
DEFAULTS = {
    # cuda and npu
    "device": {
        "batch_sizes": [1, 16, 64, 256, 1024, 4096, 16384, 65536],
        "window_lens": [4, 8, 64],
        "iters": 100,
        "repeats": 30,
        "warmup": 3,
        "input_sets": 4,
        "context_len": 2048,
    },
    # cpu: Triton's interpreter takes milliseconds per call, and about a second per ragged call. Its timings say
    # nothing about device speed: the report labels them so and shows no speedups there.
    "cpu": {
        "batch_sizes": [1, 8, 32],
        "window_lens": [4],
        "iters": 2,
        "repeats": 5,
        "warmup": 1,
        "input_sets": 1,
        "context_len": 256,
    },
}
# Issue 2, point 8: the fused op's device time per call in CUDA-graph replay (us), and its eager time per call
# at most EAGER_TARGET_RATIO times an empty kernel's.
TARGETS = [(bs, 8, 2.0) for bs in (1, 16, 64, 256, 1024)] + [(4096, 8, 3.0), (16384, 4, 5.0), (65536, 4, 15.0)]
TARGETS += [(256, 64, 2.5)]
EAGER_TARGET_RATIO = 1.3
# The verdict of every target where Triton's interpreter ran the kernels: its timings say nothing about a device.
INTERPRETER_VERDICT = "n/a (interpreter)"
TRACE_CALLS = 10
MODE_TITLES = {
    "graph": "graph replay: device time per call (us), median [p20, p80]",
    "eager": "eager: host wall-clock per call of back-to-back calls (us), median [p20, p80]",
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [v for v in values if v not in allowed]
        if not values or unknown:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu, cpu = DEFAULTS["device"], DEFAULTS["cpu"]

    def both(key: str) -> str:
        show = (lambda v: ",".join(map(str, v))) if isinstance(gpu[key], list) else str
        return f"default: {show(gpu[key])} on cuda/npu, {show(cpu[key])} on cpu"

    parser = argparse.ArgumentParser(
        prog="profile_fused_vs_unfused.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device",
        help="where to run: cuda, cuda:1, npu, npu:0 or cpu (default: npu if present, else cuda, else cpu)",
    )
    parser.add_argument("--batch-sizes", type=_int_list, help=f"batch sizes to sweep ({both('batch_sizes')})")
    parser.add_argument(
        "--window-lens", type=_int_list, help=f"window lengths N to sweep, the mean when ragged ({both('window_lens')})"
    )
    parser.add_argument(
        "--windows",
        type=_choices(harness.WINDOWS),
        help="uniform (every window N long, window_len=N passed to the ops) and/or ragged (lengths uniform in "
        "[0, 2N], only num_tokens passed) (default: uniform,ragged; uniform with --targets)",
    )
    parser.add_argument(
        "--modes",
        type=_choices(MODES),
        help="timing modes, see 'Timing modes' below (default: graph,eager on cuda and on npu with graphs; eager "
        "otherwise)",
    )
    parser.add_argument(
        "--variants",
        type=_choices(harness.VARIANTS),
        default=list(harness.VARIANTS),
        help="variants to run; fused is always among them (default: fused,unfused,torch,empty)",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="run exactly the target rows of issue 2 (fused op, graph: bs<=1024 N=8 <= 2.0 us, bs 4096 N=8 <= 3 us, "
        "bs 16384 N=4 <= 5 us, bs 65536 N=4 <= 15 us, bs 256 N=64 <= 2.5 us; eager <= 1.3x the empty kernel's) "
        "instead of the sweep (--batch-sizes, --window-lens and --max-tokens are then ignored), and print PASS/FAIL "
        "for each (through Triton's interpreter, on cpu, no ratio and no verdict: its timings say nothing about a "
        "device)",
    )
    parser.add_argument(
        "--iters", type=int, help=f"calls per sample, captured in one graph in graph mode ({both('iters')})"
    )
    parser.add_argument("--repeats", type=int, help=f"samples per measurement ({both('repeats')})")
    parser.add_argument(
        "--warmup", type=int, help=f"samples run and dropped before the measured ones ({both('warmup')})"
    )
    parser.add_argument(
        "--input-sets",
        type=int,
        help=f"input sets the calls rotate over, each with its own outputs ({both('input_sets')})",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(INDEX_DTYPES),
        default="int64",
        help="dtype of req_pool_indices, start_offset and end_offset; req_to_token is int32 and out_cache_loc "
        "int64 (default: int64, as SGLang's seq_lens)",
    )
    parser.add_argument(
        "--context-len",
        type=int,
        help=f"columns of req_to_token, the largest start offset + 2N ({both('context_len')})",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=2**20,
        help="skip sweep sizes with batch size * N above this (default: 1048576)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("out/profile_fused_vs_unfused"),
        help="directory for the files listed below (default: out/profile_fused_vs_unfused)",
    )
    parser.add_argument("--no-trace", action="store_true", help="do not write the profiler trace")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG (no matplotlib needed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    harness.check_options(parser, args, {})
    _apply_defaults(parser, args)
    return args


def _apply_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    defaults = DEFAULTS["cpu" if args.device.type == "cpu" else "device"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.windows is None:
        args.windows = ["uniform"] if args.targets else list(harness.WINDOWS)
    graphs = harness.supports_graphs(args.device)
    if args.modes is None:
        args.modes = list(MODES) if graphs else ["eager"]
    if "graph" in args.modes and not graphs:
        parser.error(f"--modes graph needs graph capture, which {args.device} does not have here")
    if "fused" not in args.variants:
        args.variants.insert(0, "fused")
    args.variants = [v for v in harness.VARIANTS if v in args.variants]
    for key in ("iters", "repeats", "input_sets", "context_len"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.iters < args.input_sets:
        parser.error(f"--iters ({args.iters}) must be at least --input-sets ({args.input_sets}), so every set runs")
    if args.targets:
        args.batch_sizes = sorted({bs for bs, _, _ in TARGETS})
        args.window_lens = sorted({n for _, n, _ in TARGETS})
    longest = max(args.window_lens) * (2 if "ragged" in args.windows else 1)
    if args.context_len <= longest:
        parser.error(f"--context-len must exceed the longest window ({longest}), got {args.context_len}")


def build_cases(args: argparse.Namespace) -> tuple[list[harness.Case], list[harness.Case]]:
    """The cases to run, windows then N then batch size, and those skipped for --max-tokens."""
    if args.targets:
        return [harness.Case(w, bs, n) for w in args.windows for bs, n, _ in TARGETS], []
    cases, skipped = [], []
    for windows in args.windows:
        for n in args.window_lens:
            for bs in args.batch_sizes:
                (cases if bs * n <= args.max_tokens else skipped).append(harness.Case(windows, bs, n))
    return cases, skipped


# ------------------------------------------------------------------------------------------------------ measuring


@dataclass
class Row:
    mode: str
    windows: str
    window_len: int
    batch_size: int
    num_tokens: int
    variant: str
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    samples: int = 0
    calls_per_sample: int = 0
    fused_speedup: float | None = None
    error: str = ""

    def key(self) -> tuple[str, str, int, int]:
        return self.mode, self.windows, self.window_len, self.batch_size


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _time(mode: str, variant: str, calls, sets, args: argparse.Namespace) -> list[float]:
    if mode == "eager":
        return harness.eager_times(calls, args.device, args.repeats, args.warmup)
    graph, outputs = harness.capture_graph(calls, args.device)
    harness.check_graph(graph, outputs, [x.expected for x in sets], args.device, name=variant)
    return harness.graph_times(graph, len(calls), args.device, args.repeats, args.warmup)


def measure_case(case: harness.Case, seed: int, table: torch.Tensor, args: argparse.Namespace, progress) -> list[Row]:
    """Check, then time, every variant of one case in every mode; a failure becomes the row's error."""
    sets = harness.make_input_sets(table, case, INDEX_DTYPES[args.dtype], args.input_sets, seed=seed)
    num_tokens = round(sum(x.num_tokens for x in sets) / len(sets))
    rows = []
    for variant in args.variants:
        fn = harness.variant_fn(variant, args.device)
        try:
            harness.check_variant(variant, fn, sets)
            check_error = ""
        except Exception as error:  # recorded, reported and turned into exit status 1 at the end
            check_error = _error_text(error)
        calls = harness.rotating_calls(fn, sets, args.iters)
        for mode in args.modes:
            row = Row(mode, case.windows, case.window_len, case.batch_size, num_tokens, variant)
            row.calls_per_sample = args.iters
            row.error = check_error
            if not check_error:
                try:
                    summary = harness.summarize(_time(mode, variant, calls, sets, args))
                    row.median_us, row.p20_us, row.p80_us = summary.median_us, summary.p20_us, summary.p80_us
                    row.samples = summary.samples
                except Exception as error:  # as above
                    row.error = _error_text(error)
            rows.append(row)
            progress.update(1)
    return rows


def add_speedups(rows: list[Row]) -> None:
    fused = {row.key(): row for row in rows if row.variant == "fused" and row.median_us}
    for row in rows:
        base = fused.get(row.key())
        if base is not None and row.median_us:
            row.fused_speedup = row.median_us / base.median_us


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, disable: bool):
    if disable:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        print("(tqdm is not installed: no progress bar)", file=sys.stderr)
        return _NoProgress()
    return tqdm(total=total, unit="run", desc="profiling", mininterval=1.0, file=sys.stderr)


# -------------------------------------------------------------------------------------------------------- reports


def _fmt(us: float) -> str:
    return f"{us:.0f}" if us >= 1000 else f"{us:.1f}" if us >= 100 else f"{us:.2f}"


def _cell(row: Row | None) -> str:
    if row is None:
        return "-"
    if row.error:
        return "ERROR"
    return f"{_fmt(row.median_us)} [{_fmt(row.p20_us)}, {_fmt(row.p80_us)}]"


def format_tables(rows: list[Row], args: argparse.Namespace) -> list[str]:
    by_key = {(row.key(), row.variant): row for row in rows}
    keys = list(dict.fromkeys(row.key() for row in rows))
    interpreted = backend.is_interpreted(args.device)
    # Interpreter timings rank variants by how much NumPy they run, not by device speed: no speedups there.
    others = [] if interpreted else [v for v in ("unfused", "torch") if v in args.variants]
    width = 26
    lines = []
    for mode in args.modes:
        title = MODE_TITLES[mode] + f", {args.repeats} samples of {args.iters} calls"
        if interpreted:
            title = f"TRITON INTERPRETER wall-clock (says nothing about device speed; no speedups): {title}"
        lines += ["", title]
        head = f"{'windows':<8} {'N':>3} {'bs':>6} {'tokens':>8} " + "".join(f"{v:>{width}}" for v in args.variants)
        lines.append(head + "".join(f"{'x vs ' + v:>14}" for v in others))
        for key in (k for k in keys if k[0] == mode):
            first = next(by_key[(key, v)] for v in args.variants if (key, v) in by_key)
            line = f"{key[1]:<8} {key[2]:>3} {key[3]:>6} {first.num_tokens:>8} "
            line += "".join(f"{_cell(by_key.get((key, v))):>{width}}" for v in args.variants)
            for v in others:
                speedup = by_key[(key, v)].fused_speedup if (key, v) in by_key else None
                line += f"{(f'{speedup:.2f}x' if speedup else '-'):>14}"
            lines.append(line)
    return lines


def evaluate_targets(rows: list[Row], args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    """One dict per target row: the figures, the limits and the verdicts. Through Triton's interpreter there are no
    ratios and no verdicts (its timings say nothing about a device): verdicts read ``n/a (interpreter)``."""
    found = {(row.key(), row.variant): row for row in rows if row.median_us is not None}
    interpreted = backend.is_interpreted(args.device)
    results = []
    for windows in args.windows:
        for bs, n, limit in TARGETS:
            graph = found.get((("graph", windows, n, bs), "fused"))
            eager = found.get((("eager", windows, n, bs), "fused"))
            empty = found.get((("eager", windows, n, bs), "empty"))
            ratio = eager.median_us / empty.median_us if eager and empty and not interpreted else None
            graph_verdict = "n/a" if graph is None else "PASS" if graph.median_us <= limit else "FAIL"
            eager_verdict = "n/a" if ratio is None else "PASS" if ratio <= EAGER_TARGET_RATIO else "FAIL"
            if interpreted:
                graph_verdict = eager_verdict = INTERPRETER_VERDICT
            results.append(
                {
                    "device": env["device_name"],
                    "runtime": env["runtime"],
                    "windows": windows,
                    "window_len": n,
                    "batch_size": bs,
                    "graph_us": graph.median_us if graph else None,
                    "graph_limit_us": limit,
                    "graph_verdict": graph_verdict,
                    "eager_us": eager.median_us if eager else None,
                    "eager_empty_us": empty.median_us if empty else None,
                    "eager_ratio": ratio,
                    "eager_limit_ratio": EAGER_TARGET_RATIO,
                    "eager_verdict": eager_verdict,
                }
            )
    return results


def format_targets(targets: list[dict], interpreted: bool) -> list[str]:
    def num(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    title = (
        "targets of the fused op: graph = device us per call in graph replay; eager = fused over empty kernel, "
        "both eager us per call"
    )
    if interpreted:
        title = "TRITON INTERPRETER wall-clock (says nothing about device speed; no ratios, no verdicts): " + title
    lines = [
        "",
        title,
        f"{'windows':<8} {'N':>3} {'bs':>6} {'graph us':>9} {'limit':>6} {'verdict':>8}   "
        f"{'eager us':>9} {'empty us':>9} {'ratio':>6} {'limit':>6} {'verdict':>8}",
    ]
    for t in targets:
        lines.append(
            f"{t['windows']:<8} {t['window_len']:>3} {t['batch_size']:>6} {num(t['graph_us']):>9} "
            f"{t['graph_limit_us']:>6.1f} {t['graph_verdict']:>8}   {num(t['eager_us']):>9} "
            f"{num(t['eager_empty_us']):>9} {num(t['eager_ratio']):>6} {t['eager_limit_ratio']:>6.2f} "
            f"{t['eager_verdict']:>8}"
        )
    return lines


def write_csv(rows: list[Row], env: dict[str, str], args: argparse.Namespace, path: Path) -> None:
    context = {**env, "index_dtype": args.dtype}
    names = [f.name for f in fields(Row)] + list(context)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({**asdict(row), **context})


def plot(rows: list[Row], env: dict[str, str], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    interpreted = backend.is_interpreted(args.device)
    panels = list(dict.fromkeys((row.windows, row.window_len) for row in rows))
    batch_sizes = sorted({row.batch_size for row in rows})
    styles = {
        "fused": {"color": "tab:blue", "marker": "o"},
        "unfused": {"color": "tab:orange", "marker": "s"},
        "torch": {"color": "tab:green", "marker": "^"},
        "empty": {"color": "grey", "linestyle": "--", "marker": ""},
    }
    labels = {"empty": "empty kernel (floor)"}
    fig, axes = plt.subplots(
        len(args.modes), len(panels), figsize=(3.6 * len(panels) + 0.6, 3.0 * len(args.modes) + 0.7), squeeze=False
    )
    legend = {}
    for i, mode in enumerate(args.modes):
        for j, (windows, n) in enumerate(panels):
            ax = axes[i][j]
            plotted = []
            for variant in args.variants:
                points = sorted(
                    (row.batch_size, row.median_us, row.p20_us, row.p80_us)
                    for row in rows
                    if row.key()[:3] == (mode, windows, n) and row.variant == variant and row.median_us is not None
                )
                if not points:
                    continue
                bs, median, p20, p80 = zip(*points)
                plotted += [*median, *p20, *p80]
                (line,) = ax.plot(bs, median, label=labels.get(variant, variant), markersize=4, **styles[variant])
                if variant != "empty":
                    ax.fill_between(bs, p20, p80, color=styles[variant]["color"], alpha=0.2, linewidth=0)
                legend.setdefault(line.get_label(), line)
            ax.set_xscale("log")
            ax.set_yscale("log")
            # A tick at each measured batch size, no minor labels (on a small range they overlap); labelled y ticks
            # however narrow the range.
            ax.set_xticks(batch_sizes, [str(bs) for bs in batch_sizes])
            ax.xaxis.set_minor_formatter(NullFormatter())
            harness.log_y_ticks(ax, plotted)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{mode}: {windows}, N={n}", fontsize=9)
            ax.set_xlabel("batch size", fontsize=8)
            ax.set_ylabel("device us per call" if mode == "graph" else "eager us per call", fontsize=8)
            ax.tick_params(labelsize=7)
    height = fig.get_figheight()
    where = "Triton interpreter: timings say nothing about device speed" if interpreted else "compiled Triton"
    fig.suptitle(
        f"{env['device_name']} | {where}\ndriver {env['driver']} | torch {env['torch']} | triton {env['triton']} | "
        f"{env['date']}",
        fontsize=8,
        y=1 - 0.05 / height,
    )
    ncol = min(len(legend), 2 * len(panels))
    legend_rows = -(-len(legend) // ncol)
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=ncol,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.2 * legend_rows / height, 1, 1), h_pad=0.4)  # leaves room for the suptitle
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- trace


def _kernels_per_call(trace_path: Path, ranges: dict[str, str]) -> dict[str, float]:
    """Device kernels that ran inside each named range of a Chrome trace, per call.

    Each range ends with a synchronize, so every kernel its calls launched also ran inside it.
    """
    events = json.loads(trace_path.read_text())["traceEvents"]
    spans = {
        e["name"]: (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("cat") == "user_annotation" and e.get("name") in ranges
    }
    kernels = [float(e["ts"]) for e in events if e.get("cat") == "kernel"]
    return {
        ranges[name]: sum(start <= ts <= end for ts in kernels) / TRACE_CALLS for name, (start, end) in spans.items()
    }


def write_trace(table: torch.Tensor, args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    """Profile TRACE_CALLS fused calls, then TRACE_CALLS unfused calls; returns (path, kernels per call)."""
    small = [bs for bs in args.batch_sizes if bs <= 1024]
    case = harness.Case("uniform", max(small) if small else min(args.batch_sizes), min(args.window_lens))
    (inputs,) = harness.make_input_sets(table, case, INDEX_DTYPES[args.dtype], 1, seed=args.seed + 10_000)
    fns = {name: harness.variant_fn(name, args.device) for name in ("fused", "unfused")}
    for name, fn in fns.items():
        harness.check_variant(name, fn, [inputs])
    ranges = {f"{name} x{TRACE_CALLS} ({case})": name for name in fns}

    def run() -> None:
        for label, name in ranges.items():
            with torch.profiler.record_function(label):
                for _ in range(TRACE_CALLS):
                    fns[name](inputs)
                backend.synchronize(args.device)

    if args.device.type == "npu":
        import torch_npu

        path = args.out_dir / "trace_npu"
        activities = [torch_npu.profiler.ProfilerActivity.CPU, torch_npu.profiler.ProfilerActivity.NPU]
        handler = torch_npu.profiler.tensorboard_trace_handler(str(path))
        with torch_npu.profiler.profile(activities=activities, on_trace_ready=handler):
            run()
        return str(path), {}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    path = args.out_dir / f"trace_{args.device.type}.json"
    # One warm-up step the profiler discards (its start-up stays out of the trace), then the recorded step.
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle")  # one cycle here
        with torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=lambda p: p.export_chrome_trace(str(path))
        ) as profiler:
            for _ in range(2):
                run()
                profiler.step()
    if not path.exists():
        raise RuntimeError(f"the profiler wrote no trace to {path}")
    return str(path), _kernels_per_call(path, ranges) if args.device.type == "cuda" else {}


# ----------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401 - fail before the sweep, not after it
        except ImportError:
            sys.exit("matplotlib is needed for the plot: pip install matplotlib, or pass --no-plot")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = harness.environment(args.device)
    cases, skipped = build_cases(args)
    max_requests = 2 * max(case.batch_size for case in cases)
    header = ["profile_fused_vs_unfused", *harness.format_environment(env)]
    header.append(
        f"req_to_token int32 [{max_requests}, {args.context_len}]; indices {args.dtype}; out_cache_loc int64; "
        f"{args.input_sets} input sets; samples of {args.iters} calls, {args.repeats} kept after {args.warmup}"
    )
    if args.device.type != "cpu" and backend.is_interpreted(args.device):
        header.append("WARNING: TRITON_INTERPRET=1 is set, the kernels run in Triton's interpreter")
    if skipped:
        header.append(f"skipped (batch size * N > --max-tokens {args.max_tokens}): " + ", ".join(map(str, skipped)))
    print("\n".join(header), flush=True)

    table = harness.make_table(max_requests, args.context_len, args.device, seed=args.seed)
    progress = _progress(len(cases) * len(args.variants) * len(args.modes), args.no_progress)
    rows: list[Row] = []
    for index, case in enumerate(cases):
        rows += measure_case(case, args.seed + 1 + index, table, args, progress)
    progress.close()
    if not backend.is_interpreted(args.device):  # interpreter timings rank nothing: no speedups
        add_speedups(rows)

    errors = [
        f"{row.mode} {row.windows} bs={row.batch_size} N={row.window_len} {row.variant}: {row.error}"
        for row in rows
        if row.error
    ]
    files = {"csv": args.out_dir / "results.csv"}
    write_csv(rows, env, args, files["csv"])
    if not args.no_plot:
        files["plot"] = args.out_dir / "latency_vs_batch.png"
        try:
            plot(rows, env, args, files["plot"])
        except Exception as error:  # the numbers are already on disk; report the failure and exit 1
            errors.append(f"plot: {_error_text(error)}")
    launches: dict[str, float] = {}
    if not args.no_trace:
        try:
            files["trace"], launches = write_trace(table, args)
        except Exception as error:  # as above
            errors.append(f"trace: {_error_text(error)}")

    report = header + format_tables(rows, args)
    targets = evaluate_targets(rows, args, env) if args.targets else []
    if targets:
        report += format_targets(targets, backend.is_interpreted(args.device))
        files["targets"] = args.out_dir / "targets.csv"
        with files["targets"].open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(targets[0]))
            writer.writeheader()
            writer.writerows(targets)
    if "trace" in files:
        seen = ", ".join(f"{name} {count:g}" for name, count in launches.items()) or "not counted on this device"
        report += ["", f"trace: {files['trace']}; device kernels per call: {seen}"]
    if errors:
        report += ["", f"ERRORS ({len(errors)}):", *errors]
    report += ["", f"done in {time.perf_counter() - began:.0f} s; files in {args.out_dir}"]
    files["summary"] = args.out_dir / "summary.txt"
    files["summary"].write_text("\n".join(report) + "\n")
    metadata = {
        "environment": env,
        "options": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
        "cases": [str(case) for case in cases],
        "skipped_cases": [str(case) for case in skipped],
        "kernels_per_call_in_trace": launches,
        "targets": targets,
        "errors": errors,
        "files": {k: str(v) for k, v in files.items()},
    }
    (args.out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print("\n".join(report[len(header) :]), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
