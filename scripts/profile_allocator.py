#!/usr/bin/env python
"""Sweep a whole draft/verify step of ``DraftCacheAllocator``: fused (``alloc_draft`` + ``commit``, 2 launches)
against the same step from the components (``reserve_draft``, ``seq_lens + N``, ``get_last_loc``,
``assign_extend_cache_locs``, ``commit``: 5 launches), over batch sizes, page sizes and draft lengths.
``commit-and-draft``: the same step as ``commit_and_draft`` (the commit of the previous window and the next
window: one launch up to 256 requests, two past them; on a GPU with programmatic dependent launches, compute
capability 9.0 and up, two past 128 with windows of 3 tokens or more).

Each variant is checked first: three steps from poisoned buffers, each against the PyTorch reference read of the
table and against the other variant. Then ``--calls`` steps are captured in one CUDA (or NPU) graph and replayed;
device events around each replay give the device time per step (median, p20, p80 over ``--repeats`` replays after
``--warmup``). After the timed replays, outside the timing, the graph is replayed once more from poisoned buffers
and what that replay wrote is checked (``AllocatorStep.check_steps``): the committed lengths the accept lengths
predict, the last step's window against the reference read of the table at the start the host predicts, each row's
allocated length, and the pool's accounting (every page free, a row's, or the cache's, exactly once); then one eager
step is checked. Every replay takes new pages from the pool (requests accept ``i % (N + 1)`` tokens a step), so the
allocation itself is timed, not a no-op. Where a device has no graphs (eager mode) the same check runs ``--calls``
eager steps, and the timed steps must not have synced.

SGLang's figures, quoted (graph replays on an H200), are shown and compared only in graph mode.

``--prefix-pages K`` starts every request from ``K`` pages of a prefix cache (one shared system prompt).

Rows of ``req_to_token`` are as long as the run needs (the prompt, the prefix and every step's window: about
``64 + 1000 N`` positions at the GPU defaults, fewer with fewer --calls and --repeats) unless ``--context-len``
asks for longer ones, as an engine's ``max_context_len`` would: the same step costs more on longer rows (up to
0.6 µs a step at 256-1024 requests on an H200, docs/performance.md). The pool stays sized for the run.

On a CPU there are no graphs: the script then times eager steps through Triton's interpreter, labels them as such
and prints no speedups (interpreter timings say nothing about a device).

Writes ``allocator_sweep.csv``, ``allocator_summary.md`` and ``allocator_sweep.png`` under ``--out-dir``.

Examples:
  python scripts/profile_allocator.py                                     # the sweep of docs/performance.md
  python scripts/profile_allocator.py --batch-sizes 256 --page-sizes 64 --num-draft-tokens 4 --prefix-pages 4
  python scripts/profile_allocator.py --batch-sizes 256,1024 --context-len 131072            # rows of 128K positions
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # run from a checkout: the benchmarks' harness, and specdec_ops if not installed

from benchmarks import harness  # noqa: E402
from specdec_ops import backend  # noqa: E402

# SGLang's paged EAGLE draft step on an H200 (get_last_loc + alloc_extend_kernel + assign_req_to_token_pool +
# seq_lens + N + assign_extend_cache_locs, 8 device operations), graph replay, quoted from the issue that asked for
# this sweep; not re-run here. (bs, N, page) -> microseconds.
SGLANG_QUOTED_US = {
    (64, 4, 16): 8.89,
    (256, 4, 16): 9.92,
    (1024, 4, 16): 13.5,
    (1024, 8, 64): 13.4,
    (4096, 4, 16): 54.7,
}
CHECK_STEPS = 3


def _cell(us: float | None) -> str:
    """A table cell: the median in µs, or "—" for a variant this run did not time."""
    return "—" if us is None else f"{us:.2f}"


def _mode_text(args: argparse.Namespace) -> str:
    """What the run's figures are: the timing mode, then the backend where it is Triton's interpreter."""
    mode = "graph replay, device time" if args.mode == "graph" else "eager, host wall-clock"
    return mode + (", Triton interpreter" if args.interpreted else "")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _variants(text: str) -> list[str]:
    values = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [v for v in values if v not in harness.ALLOCATOR_VARIANTS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(harness.ALLOCATOR_VARIANTS)}, got {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda, cuda:1, npu, npu:0 or cpu (default: npu, then cuda, then cpu)")
    parser.add_argument("--batch-sizes", type=_int_list, help="default 1,16,64,256,1024,4096,16384 (cpu: 1,16,64)")
    parser.add_argument("--page-sizes", type=_int_list, default=[1, 16, 128], help="default 1,16,128")
    parser.add_argument("--num-draft-tokens", type=_int_list, default=[1, 4, 8], help="N; default 1,4,8")
    parser.add_argument(
        "--variants",
        type=_variants,
        default=list(harness.ALLOCATOR_VARIANTS),
        help="fused, unfused and/or commit-and-draft (default: all three)",
    )
    parser.add_argument("--prefix-pages", type=int, default=0, help="pages of a shared cached prefix (default 0)")
    parser.add_argument(
        "--context-len",
        type=_positive_int,
        help="rows of req_to_token at least this long, as an engine's max_context_len (default: what the run needs, "
        "about 64 + N * 1000 positions at the GPU defaults); the pool stays sized for the run",
    )
    parser.add_argument("--calls", type=int, help="steps per graph (eager: per sample) (default 20; cpu 2)")
    parser.add_argument("--repeats", type=int, help="samples (default 20; cpu 3)")
    parser.add_argument("--warmup", type=int, default=3, help="samples dropped first (default 3)")
    parser.add_argument("--out-dir", type=Path, default=Path("out/allocator"), help="default out/allocator")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)
    harness.check_options(parser, args, {"calls": 1, "repeats": 1, "warmup": 0, "prefix_pages": 0})
    interpreted = backend.is_interpreted(args.device)
    args.mode = "graph" if harness.supports_graphs(args.device) and not interpreted else "eager"
    args.batch_sizes = args.batch_sizes or ([1, 16, 64] if interpreted else [1, 16, 64, 256, 1024, 4096, 16384])
    if args.calls is None:
        args.calls = 2 if interpreted else 20
    if args.repeats is None:
        args.repeats = 3 if interpreted else 20
    args.interpreted = interpreted
    return args


def measure(variant: str, bs: int, n: int, page_size: int, args: argparse.Namespace) -> tuple[harness.Summary, int]:
    """Device time per step of ``variant`` (graph replay), or wall-clock per eager step on the interpreter; and the
    length of the allocator's rows."""
    samples = args.repeats + args.warmup
    steps = 2 * (CHECK_STEPS + args.calls * (2 + samples) + 1)
    step = harness.AllocatorStep(variant, bs, n, page_size, steps, args.device, args.prefix_pages, args.context_len)
    other = harness.AllocatorStep(
        "unfused" if variant == "fused" else "fused", bs, n, page_size, CHECK_STEPS, args.device, args.prefix_pages
    )
    for _ in range(CHECK_STEPS):
        harness.check_outputs(f"allocator step {variant} vs the other", step.checked_call(), other.checked_call())
    del other
    step.alloc.refresh()
    syncs = step.alloc.num_syncs
    calls = [step] * args.calls
    if args.mode == "graph":
        graph, _ = harness.capture_graph(calls, args.device)
        seconds = harness.graph_times(graph, args.calls, args.device, args.repeats, args.warmup)
        run = graph.replay
    else:
        seconds = harness.eager_times(calls, args.device, args.repeats, args.warmup)
        if step.alloc.num_syncs != syncs:
            raise RuntimeError(f"a timed eager step of {variant} synced with the host: its times carry the sync")
        run = functools.partial(harness.run_calls, calls)
    # Untimed: one more replay (eager: --calls more steps) from poisoned buffers, its lengths, last window and the
    # pool's accounting checked against what the host predicts; then re-read the usage (replays ran no host code)
    # and check one eager step.
    step.check_steps(run, args.calls)
    step.alloc.refresh()
    step.checked_call()
    return harness.summarize(seconds), step.alloc.max_context_len


def plot(rows: list[dict], args: argparse.Namespace, env: dict[str, str], path: Path) -> None:
    env_line = harness.format_environment(env)[1].removeprefix("device: ")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pages = args.page_sizes
    ns = args.num_draft_tokens
    styles = {"fused": "-o", "unfused": "--s", "commit-and-draft": ":^"}
    variants = [v for v in styles if v in args.variants]
    # The legend: a column of the variants (their line styles, in grey), then the N (their colours), so that it stays a
    # few rows below the axes however many N and page sizes the run has.
    width = max(5.0 * len(pages), 8.0)
    legend_rows = max(len(variants), -(-len(ns) // max(1, int(width // 1.9) - 1)))
    height = 4.4 + 0.25 * legend_rows
    fig, axes = plt.subplots(1, len(pages), figsize=(width, height), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, page in zip(axes[0], pages):
        for i, n in enumerate(ns):
            for variant in variants:
                pts = [
                    (r["bs"], r["median_us"])
                    for r in rows
                    if r["page_size"] == page and r["N"] == n and r["variant"] == variant
                ]
                if pts:
                    ax.plot(*zip(*pts), styles[variant], color=colors[i % len(colors)], markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
        ax.minorticks_off()
        harness.log_y_ticks(ax, [r["median_us"] for r in rows])  # (one y axis for all pages: sharey)
        ax.set_title(f"page size {page}")
        ax.set_xlabel("batch size")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(f"µs per step\n({_mode_text(args)})")
    blank = legend_rows - len(variants)  # (the variants' column filled up, so that the N start a column)
    handles = [Line2D([], [], linestyle=styles[v][:-1], marker=styles[v][-1], color="0.35") for v in variants]
    handles += [Line2D([], [], linestyle="none")] * blank
    handles += [Line2D([], [], color=colors[i % len(colors)], linewidth=3) for i in range(len(ns))]
    labels = variants + [""] * blank + [f"N={n}" for n in ns]
    ncol = 1 + -(-len(ns) // legend_rows)
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, frameon=False)
    what = "Triton interpreter on CPU: says nothing about device speed" if args.interpreted else env_line
    names = {
        "fused": "alloc_draft + commit (fused)",
        "unfused": "5 launches (unfused)",
        "commit-and-draft": "commit_and_draft",
    }
    steps = " vs ".join(names[v] for v in variants)  # (only the variants run)
    fig.suptitle(f"DraftCacheAllocator step: {steps}\n{what}", fontsize=10 if width < 10 else 12)
    fig.tight_layout(rect=(0, (0.25 * legend_rows + 0.05) / height, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = harness.environment(args.device)
    print("\n".join(harness.format_environment(env)))
    if args.interpreted:
        print(
            "Triton interpreter on CPU: eager wall-clock per step, which says nothing about device speed; no speedups."
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for page in args.page_sizes:
        for n in args.num_draft_tokens:
            for bs in args.batch_sizes:
                for variant in args.variants:
                    s, context_len = measure(variant, bs, n, page, args)
                    rows.append(
                        dict(
                            bs=bs,
                            N=n,
                            page_size=page,
                            variant=variant,
                            mode=args.mode,
                            prefix_pages=args.prefix_pages,
                            context_len=context_len,
                            median_us=s.median_us,
                            p20_us=s.p20_us,
                            p80_us=s.p80_us,
                            samples=s.samples,
                        )
                    )
                    spread = f"(p20 {s.p20_us:.2f}, p80 {s.p80_us:.2f})"
                    print(f"page {page:4d} N {n} bs {bs:6d} {variant:8s} {s.median_us:9.2f} us  {spread}", flush=True)
    with open(args.out_dir / "allocator_sweep.csv", "w", newline="") as f:
        # Each row carries the environment (device, driver, runtime: "Triton interpreter" on CPU), as results.csv of
        # profile_fused_vs_unfused does: a row read alone still says where it was measured.
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(env))
        writer.writeheader()
        writer.writerows({**row, **env} for row in rows)
    one = "commit-and-draft" in args.variants
    lines = [
        "| page size | N | bs | fused µs | unfused µs | fused vs unfused | SGLang µs (quoted) | fused vs SGLang |"
        + (" commit_and_draft µs |" if one else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if one else ""),
    ]
    by_key = {(r["page_size"], r["N"], r["bs"], r["variant"]): r["median_us"] for r in rows}
    for page in args.page_sizes:
        for n in args.num_draft_tokens:
            for bs in args.batch_sizes:
                fused, unfused = by_key.get((page, n, bs, "fused")), by_key.get((page, n, bs, "unfused"))
                quoted = SGLANG_QUOTED_US.get((bs, n, page))
                ratio = "—" if args.interpreted or not fused or not unfused else f"{unfused / fused:.2f}×"
                # SGLang's figures are graph replays on an H200: they compare only with this run's graph replays.
                quoted_cell = ("" if quoted is None else f"{quoted}") if args.mode == "graph" else "—"
                vs = "—" if args.mode != "graph" or not fused else (f"{quoted / fused:.2f}×" if quoted else "")
                lines.append(
                    f"| {page} | {n} | {bs} | {_cell(fused)} | {_cell(unfused)} | {ratio} | {quoted_cell} | {vs} |"
                    + (f" {_cell(by_key.get((page, n, bs, 'commit-and-draft')))} |" if one else "")
                )
    summary = "\n".join(
        [
            "\n".join(harness.format_environment(env)),
            f"mode: {_mode_text(args)}, prefix pages: {args.prefix_pages}, rows of req_to_token: "
            + (f"at least {args.context_len} positions" if args.context_len else "what the run needs"),
            "",
            *lines,
        ]
    )
    (args.out_dir / "allocator_summary.md").write_text(summary + "\n")
    print(summary)
    if not args.no_plot:
        plot(rows, args, env, args.out_dir / "allocator_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
