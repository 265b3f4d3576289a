"""``credit-dtensor bench --cases models``: whole training steps of model-shaped networks (see
:mod:`credit_dtensor.tools.bench_step`): one device, CREDIT-style plain tensors, credit_dtensor
eager and compiled, side by side on the same ranks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import _plots
from ._args import choices_list, config_from

__all__ = ["MODELS", "add_model_arguments", "run_models", "step_table", "plot_steps"]

MODELS = "models"


def add_model_arguments(p: argparse.ArgumentParser, fields_type) -> None:
    from ..tools.bench_step import STEP_MODELS

    p.add_argument(
        "--step-models",
        type=choices_list(STEP_MODELS),
        default=",".join(STEP_MODELS),
        help=f"models of the '{MODELS}' case: resunet (CREDIT's UNet shape), demo (the demo U-Net), "
        "crossformer (a CREDIT-style CrossFormer stage)",
    )
    p.add_argument(
        "--step-fields",
        type=fields_type,
        default="1x3x128x128,1x3x256x256",
        help=f"BxCxHxW list of the '{MODELS}' case (whole training steps)",
    )
    p.add_argument("--width", type=int, default=16, help=f"base width of the '{MODELS}' case's models")


def step_table(summary: list[dict]) -> Table:
    """One row per (model, field, N, variant)."""
    t = Table(title="whole training step (fwd + bwd + gradient reduction): median of the slowest rank")
    for c in (
        "model",
        "BxCxHxW",
        "N",
        "path",
        "step ms",
        "CPU ms",
        "speedup",
        "efficiency",
        "syncs",
        "MiB sent",
        "saved MiB",
        "max rel diff",
        "compile s",
    ):
        t.add_column(c, justify="left" if c in ("model", "path") else "right")

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for s in summary:
        t.add_row(
            s["model"],
            "x".join(map(str, s["field"])),
            str(s["world"]),
            s["variant"],
            f"{1e3 * s['step_s']:.1f}",
            f"{1e3 * s['cpu_s']:.1f}",
            num(s["speedup"], ".2f"),
            num(s["efficiency"], ".2f"),
            str(s["collectives"]),
            f"{s['sent_bytes'] / 2**20:.2f}",
            num(s.get("saved_mib"), ".1f"),
            num(s["max_rel_diff"], ".1e"),
            num(s["compile_s"], ".1f"),
        )
    return t


def plot_steps(summary: list[dict], out: Path) -> Path:
    """``steps.png``: the median step of every path, one panel per model, grouped by field and
    ranks, each bar labelled with its speedup over one device."""
    plt = _plots.pyplot()

    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(s["model"] for s in summary))
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes.flat, models):
        rows = [s for s in summary if s["model"] == model]
        groups = list(dict.fromkeys((tuple(s["field"]), s["world"]) for s in rows))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            for j, (field, world) in enumerate(groups):
                hit = [s for s in rows if s["variant"] == v and tuple(s["field"]) == field and s["world"] == world]
                if not hit:
                    continue
                s = hit[0]
                x = j + (i - (len(variants) - 1) / 2) * width
                ax.bar(x, 1e3 * s["step_s"], width, color=f"C{i}", label=v if j == 0 else None)
                if s["speedup"]:
                    ax.annotate(f"{s['speedup']:.2f}x", (x, 1e3 * s["step_s"]), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{f[2]}x{f[3]}, N={n}" for f, n in groups])
        ax.set_title(f"{model}: one training step")
        ax.set_ylabel("ms per step (median of the slowest rank)")
        ax.legend(fontsize=7)
    return _plots.save(fig, out, "steps.png")


def run_models(args: argparse.Namespace, console: Console, rows: list[dict] | None = None) -> list[dict]:
    """Run (or take from ``--from-json``) the models rows; print the table or JSON; return the summary."""
    from ..tools.bench_step import StepConfig, run_step, summarize_step

    if rows is None:
        worlds = tuple(n for n in args.worlds if n > 1) or (2,)
        cfg = config_from(StepConfig, args, worlds=worlds, fields=args.step_fields, models=args.step_models)
        rows = run_step(cfg)
        if args.raw:
            with Path(args.raw).open("w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    summary = summarize_step(rows)
    for (model, field, world), why in sorted(
        {(r["model"], tuple(r["field"]), r["world"]): r["skipped"] for r in rows if "skipped" in r}.items()
    ):
        (Console(stderr=True) if args.json else console).print(
            f"[yellow]skipped[/yellow] {model} at {'x'.join(map(str, field))} on {world} ranks: {why}"
        )
    if args.json:
        for s in summary:
            console.out(json.dumps(s), highlight=False)
    else:
        console.print(step_table(summary))
    if getattr(args, "plots", None):
        path = plot_steps(summary, Path(args.plots))
        (Console(stderr=True) if args.json else console).print(f"plots: {path}")
    return summary
