"""``credit-dtensor bench``: traffic, activation memory, FLOPs and time per rank (see tools/bench.py).

    credit-dtensor bench                                    # spawns 1, 2 and 4 CPU ranks itself
    credit-dtensor bench --worlds 2 --resolutions 64x128 --cases conv3x3,group_norm
    credit-dtensor bench --raw rows.jsonl --plots docs/benchmarks
    credit-dtensor bench --from-json rows.jsonl --plots docs/benchmarks   # re-render only
    credit-dtensor bench --cases overhead --plots docs/benchmarks    # per-op overhead, tiny fields
    torchrun --nproc-per-node 4 -m credit_dtensor.cli bench  # the launched world only

Prints a rich table; ``--json`` prints one JSON line per (case, resolution, domain size) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import DomainParallelError
from . import _plots
from ._args import (
    HelpFormatter,
    UsageError,
    check_torchrun_env,
    choices_list,
    config_from,
    existing_file,
    int_list,
    nonneg_int,
    positive_int,
    read_jsonl,
    resolutions,
)
from .bench_models import MODELS, add_model_arguments, run_models

__all__ = ["register", "main", "cmd_bench", "table", "plot", "overhead_table", "plot_overhead"]

DESCRIPTION = (
    "Benchmark the domain-parallel path per rank, forward and backward: bytes sent against the geometric "
    "minimum, activation memory and FLOPs against one device, and time against a hand-written lower bound. "
    "The overhead case times tiny fields side by side: the bound, plain-tensor module wrappers, and "
    "credit_dtensor eager and compiled."
)
EPILOG = """\
examples:
  %(prog)s                                      spawn 1, 2 and 4 CPU ranks, every case
  %(prog)s --worlds 2 --resolutions 64x128 --cases conv3x3,group_norm
  %(prog)s --raw rows.jsonl --plots docs/benchmarks
  %(prog)s --from-json rows.jsonl --json > summary.jsonl
  %(prog)s --cases overhead --plots docs/benchmarks    per-op overhead at tiny fields
  %(prog)s --cases models --worlds 2                 whole training steps vs one device and CREDIT-style
  %(prog)s --profile overhead                          cProfile of the eager path on 2 ranks
  torchrun --nproc-per-node 4 -m credit_dtensor.cli bench     the launched world only

exit status: 0 ok, 1 a rank failed, 2 usage error.
"""


OVERHEAD = "overhead"
BACKENDS = ("aot_eager", "inductor")


def _cases() -> tuple[str, ...]:
    from ..tools.bench import CASES

    return CASES


def fields(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """``"1x8x16x32,2x32x64x128"`` -> ((1, 8, 16, 32), (2, 32, 64, 128)), every size positive."""
    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        try:
            parts = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            parts = ()
        if len(parts) != 4 or min(parts) < 1:
            raise argparse.ArgumentTypeError(
                f"expected BxCxHxW[,BxCxHxW...] with positive sizes (e.g. 1x8x16x32), got {text!r}"
            )
        out.append(parts)
    if not out:
        raise argparse.ArgumentTypeError(f"expected BxCxHxW[,BxCxHxW...] (e.g. 1x8x16x32), got {text!r}")
    return tuple(out)  # type: ignore[return-value]


def backends(text: str) -> tuple[str, ...]:
    """Comma-separated torch.compile backends out of aot_eager, inductor; ``none`` for eager only."""
    if text.strip().lower() == "none":
        return ()
    return choices_list(BACKENDS)(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    cases = _cases()
    p.add_argument("--worlds", type=int_list, default="1,2,4", help="domain sizes (spawned CPU ranks), comma separated")
    p.add_argument("--resolutions", type=resolutions, default="32x64,64x128,128x256", help="HxW list, comma separated")
    p.add_argument(
        "--cases",
        type=choices_list((*cases, OVERHEAD, MODELS)),
        default=",".join(cases),
        help=f"comma-separated subset; '{OVERHEAD}' (not in the default) times tiny fields side by side: "
        "hand-written bound, plain-tensor module wrappers, credit_dtensor eager and compiled; "
        f"'{MODELS}' (not in the default) times whole training steps of a ResNet-UNet the same way",
    )
    add_model_arguments(p, fields)
    p.add_argument("--fields", type=fields, default="1x8x16x32,2x32x64x128", help="BxCxHxW list of the overhead case")
    p.add_argument(
        "--backends",
        type=backends,
        default="aot_eager,inductor",
        help="torch.compile backends of the overhead case (aot_eager, inductor), or none",
    )
    p.add_argument(
        "--overhead-repeats",
        type=positive_int,
        default=50,
        help="interleaved repetitions of the overhead case (the median of the slowest rank is reported)",
    )
    p.add_argument("--batch", type=positive_int, default=2, help="samples per input")
    p.add_argument("--channels", type=positive_int, default=8, help="channels of the single-layer cases")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats (the median is reported)")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed repeats before timing")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="data and parameter dtype")
    p.add_argument("--json", action="store_true", help="print the summary as JSON lines on stdout instead of a table")
    p.add_argument("--raw", default=None, metavar="FILE", help="also write every rank's row as JSON lines to FILE")
    p.add_argument(
        "--from-json", type=existing_file, default=None, metavar="FILE", help="render a --raw FILE instead of running"
    )
    p.add_argument(
        "--plots", default=None, metavar="DIR", help="write PNG plots to DIR (needs matplotlib; skipped without it)"
    )
    p.add_argument(
        "--profile",
        default=None,
        choices=(*cases, OVERHEAD),
        metavar="CASE",
        help="print torch.profiler tables of CASE (first resolution) on one rank and exit; 'overhead': "
        "cProfile of the plain wrappers and credit_dtensor eager (first field, 3x3 conv, 2 ranks)",
    )


def _validate(args: argparse.Namespace) -> None:
    check_torchrun_env()
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # the numbers are still worth having: say so up front, skip the plots
            Console(stderr=True).print(
                "bench: --plots skipped: matplotlib is not installed (pip install 'credit-dtensor[bench]')"
            )
            args.plots = None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="communication, memory, FLOPs and time benchmarks",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(handler=cmd_bench, validate=_validate)


def _config(args: argparse.Namespace):
    from ..tools.bench import BenchConfig

    return config_from(BenchConfig, args)


def _overhead_config(args: argparse.Namespace):
    from ..tools.bench_overhead import OverheadConfig

    # --cases picks the benchmarks; the overhead benchmark runs its own cases
    return config_from(
        OverheadConfig, args, defaults=("cases",), repeats=args.overhead_repeats, warmup=max(args.warmup, 3)
    )


def _kb(n: float) -> str:
    return f"{n / 1024:,.1f}"


def table(summary: list[dict]) -> Table:
    t = Table(title="fwd+bwd per rank: bytes sent (KiB) vs minimum, activations and FLOPs x N vs one device, time")
    cols = (
        "case",
        "HxW",
        "N",
        "sent",
        "min",
        "ratio",
        "grad red.",
        "act xN/1",
        "FLOPs xN/1",
        "DTensor ms",
        "bound ms",
        "overhead",
        "1 proc ms",
    )
    for c in cols:
        t.add_column(c, justify="right" if c not in ("case",) else "left")
    for s in summary:
        t.add_row(
            s["case"],
            f"{s['H']}x{s['W']}",
            str(s["world"]),
            _kb(s["max_sent_bytes"]),
            _kb(s["max_min_bytes"]),
            f"{s['bytes_ratio']:.2f}",
            f"{_kb(s['grad_reduce_sent_bytes'])}/{_kb(s['min_grad_reduce_bytes'])}",
            f"{s.get('act_ratio', float('nan')):.3f}",
            f"{s.get('flops_ratio', float('nan')):.3f}",
            f"{1e3 * s['time_dtensor_s']:.2f}",
            f"{1e3 * s['time_lower_bound_s']:.2f}" if "time_lower_bound_s" in s else "-",
            f"{s['overhead']:.2f}" if "overhead" in s else "-",
            f"{1e3 * s['time_plain_1proc_s']:.2f}" if "time_plain_1proc_s" in s else "-",
        )
    return t


def _field(f) -> str:
    return "x".join(str(v) for v in f)


def overhead_table(summary: list[dict], key: str = "time_s") -> Table:
    """One row per (case, field, N): every variant's median step time (``key``: ``time_s`` wall-clock,
    ``cpu_s`` process CPU), eager vs plain, compile times."""
    from ..tools.bench_overhead import VARIANTS

    what = "wall-clock" if key == "time_s" else "process CPU time (all threads)"
    t = Table(title=f"per-op overhead, fwd+bwd, {what}: median over interleaved repetitions of the slowest rank (ms)")
    present = [v for v in VARIANTS if any(s["variant"] == v for s in summary)]
    ratio_key = "vs_plain" if key == "time_s" else "cpu_vs_plain"
    for c in ("case", "BxCxHxW", "N", *present, "eager/plain", "compile s"):
        t.add_column(c, justify="left" if c == "case" else "right")
    groups: dict[tuple, dict[str, dict]] = {}
    for s in summary:
        groups.setdefault((s["case"], tuple(s["field"]), s["world"]), {})[s["variant"]] = s
    for (case, field, n), by in groups.items():
        cells = [f"{1e3 * by[v][key]:.2f}" if v in by and by[v].get(key) is not None else "-" for v in present]
        ratio = by.get("eager", {}).get(ratio_key)
        comp = "/".join(f"{by[v]['compile_s']:.1f}" for v in present if v in by and by[v].get("compile_s") is not None)
        t.add_row(case, _field(field), str(n), *cells, f"{ratio:.2f}" if ratio else "-", comp or "-")
    return t


def plot_overhead(summary: list[dict], out: Path) -> list[Path]:
    """``overhead_ops.png`` (wall-clock) and ``overhead_ops_cpu.png`` (process CPU): median step time vs ranks,
    one line per variant, one panel per (case, field)."""
    paths = [_plot_overhead(summary, out, "time_s", "overhead_ops.png")]
    if all(s.get("cpu_s") is not None for s in summary):
        paths.append(_plot_overhead(summary, out, "cpu_s", "overhead_ops_cpu.png"))
    return paths


def _plot_overhead(summary: list[dict], out: Path, key: str, fname: str) -> Path:
    plt = _plots.pyplot()

    from ..tools.bench_overhead import VARIANTS

    out.mkdir(parents=True, exist_ok=True)
    panels = sorted({(s["case"], tuple(s["field"])) for s in summary}, key=lambda p: (p[1], p[0]))
    cols = min(len(panels), 2)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (case, field) in zip(axes.flat, panels):
        for v in VARIANTS:
            pts = sorted(
                (s["world"], s)
                for s in summary
                if s["case"] == case and tuple(s["field"]) == field and s["variant"] == v
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [1e3 * p[1][key] for p in pts]
            if key == "time_s":
                err = [
                    [y - 1e3 * p[1]["q1_s"] for y, p in zip(ys, pts)],
                    [1e3 * p[1]["q3_s"] - y for y, p in zip(ys, pts)],
                ]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=v)
            else:
                ax.plot(xs, ys, marker="o", label=v)
            ax.set_xticks(xs)
        ax.set_title(f"{case}, field {_field(field)}")
        ax.set_xlabel("ranks (gloo, CPU)")
        ax.set_ylabel("fwd+bwd ms, wall (median, IQR)" if key == "time_s" else "fwd+bwd ms, process CPU (median)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return _plots.save(fig, out, fname)


def plot(summary: list[dict], out: Path) -> list[Path]:
    """Four PNGs: bytes ratio, activation ratio, FLOPs ratio, time vs the bound, each vs resolution."""
    plt = _plots.pyplot()

    out.mkdir(parents=True, exist_ok=True)
    cases = sorted({s["case"] for s in summary})
    worlds = sorted({s["world"] for s in summary if s["world"] > 1})
    panels = [
        ("bytes_ratio", "bytes sent / minimum (fwd+bwd)", "bytes.png", 1.0),
        ("act_ratio", "activation bytes x N / one device", "memory.png", 1.10),
        ("flops_ratio", "FLOPs x N / one device", "flops.png", 1.05),
        ("overhead", "DTensor time / hand-written bound", "time_ratio.png", 1.10),
    ]
    written = []
    for key, title, fname, target in panels:
        fig, axes = plt.subplots(1, len(worlds), figsize=(5 * len(worlds), 3.6), squeeze=False, sharey=True)
        for ax, n in zip(axes[0], worlds):
            for case in cases:
                pts = sorted(
                    (s["H"] * s["W"], s[key], s) for s in summary if s["case"] == case and s["world"] == n and key in s
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=case)
                    ax.set_xticks([p[0] for p in pts], [f"{p[2]['H']}x{p[2]['W']}" for p in pts])
            ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target}")
            ax.set_title(f"N = {n}")
            ax.set_xscale("log")
            ax.minorticks_off()
            hw = sorted({(s["H"] * s["W"], f"{s['H']}x{s['W']}") for s in summary if s["world"] == n})
            ax.set_xticks([v for v, _ in hw], [t for _, t in hw])
            ax.set_xlabel("resolution (H x W)")
        axes[0][0].set_ylabel(title)
        axes[0][-1].legend(fontsize=7)
        path = _plots.save(fig, out, fname)
        written.append(path)
    # time vs N
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for case in cases:
        for hw in sorted({(s["H"], s["W"]) for s in summary if s["case"] == case})[-1:]:
            pts = sorted(
                (s["world"], s["time_dtensor_s"]) for s in summary if s["case"] == case and (s["H"], s["W"]) == hw
            )
            ax.plot([p[0] for p in pts], [1e3 * p[1] for p in pts], marker="o", label=f"{case} {hw[0]}x{hw[1]}")
    ax.set_xlabel("domain size N (ranks on a shared 2-core CPU)")
    ax.set_ylabel("fwd+bwd median (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    path = _plots.save(fig, out, "time_vs_n.png")
    written.append(path)
    return written


def _run_under_torchrun(cfg, ocfg=None) -> list[dict]:
    import torch.distributed as dist

    from ..mesh import DomainParallelManager
    from ..tools.bench import bench_case
    from ..tools.bench_overhead import overhead_rows

    world = int(os.environ["WORLD_SIZE"])
    manager = DomainParallelManager(world)
    try:
        rows = [bench_case(c, hw, cfg, manager, dist.get_rank(), world) for c in cfg.cases for hw in cfg.resolutions]
        if ocfg is not None:
            rows += overhead_rows(ocfg, manager, dist.get_rank(), world)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
        return [r for rs in gathered for r in rs] if dist.get_rank() == 0 else []
    finally:
        manager.close()


def _split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    main = [r for r in rows if r.get("bench") not in (OVERHEAD, "step")]
    return main, [r for r in rows if r.get("bench") == OVERHEAD]


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from ..tools.bench import run, summarize
    from ..tools.bench_overhead import run_overhead, summarize_overhead
    from ..tools.launch import LaunchError

    if args.profile == OVERHEAD:
        from ..tools.bench_overhead import profile_overhead

        world = next((n for n in args.worlds if n > 1), 2)
        console.out(profile_overhead("conv3x3", args.fields[0], world), highlight=False)
        return 0
    if args.profile:
        from ..tools.bench import profile_case

        cfg = _config(args)
        console.out(profile_case(args.profile, cfg.resolutions[0], cfg), highlight=False)
        return 0
    if args.from_json:
        rows = read_jsonl(args.from_json, "--from-json", "a --raw file")
        if any(r.get("bench") == "step" for r in rows):
            run_models(args, console, [r for r in rows if r.get("bench") == "step"])
    else:
        if MODELS in args.cases:
            if "RANK" in os.environ:
                raise UsageError(f"--cases {MODELS} spawns its own ranks: run it without torchrun")
            run_models(args, console)
            if set(args.cases) == {MODELS}:
                return 0
        cfg = _config(args)
        cfg.cases = tuple(c for c in args.cases if c not in (OVERHEAD, MODELS))
        ocfg = _overhead_config(args) if OVERHEAD in args.cases else None
        try:
            if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
                rows = _run_under_torchrun(cfg, ocfg)
                if not rows:
                    return 0
            else:
                rows = run(cfg) if cfg.cases else []
                if ocfg is not None:
                    rows += run_overhead(ocfg)
        except LaunchError as exc:
            console.print(f"[red]credit-dtensor bench[/red]: {exc}")
            return 1
        if args.raw:
            with open(args.raw, "a" if MODELS in args.cases else "w") as f:  # after the models rows
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    main_rows, overhead_rows = _split(rows)
    summary = summarize(main_rows) if main_rows else []
    osummary = summarize_overhead(overhead_rows) if overhead_rows else []
    if args.json:
        for s in (*summary, *osummary):
            console.out(json.dumps(s), highlight=False)
    else:
        if summary:
            console.print(table(summary))
        if osummary:
            console.print(overhead_table(osummary))
            if all(s.get("cpu_s") is not None for s in osummary):
                console.print(overhead_table(osummary, "cpu_s"))
    if args.plots:
        paths = plot(summary, Path(args.plots)) if summary else []
        if osummary:
            paths += plot_overhead(osummary, Path(args.plots))
        if paths:
            (Console(stderr=True) if args.json else console).print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/bench.py``: the ``bench`` subcommand as a program of its own."""
    from . import _setup_logging

    p = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) if argv is None else "bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_arguments(p)
    args = p.parse_args(argv)
    console = Console()
    _setup_logging(False, console)
    try:
        _validate(args)
        return cmd_bench(args, console)
    except UsageError as exc:
        p.error(str(exc))
    except DomainParallelError as exc:
        console.print(f"[red]bench[/red]: {exc}")
    return 2
