"""Probe NCAR CREDIT's own models (installed miles-credit) converted with credit_dtensor.

Runs the matrix of the opt-in tier (``tests/credit``: every model x world x field) with the gather
guard in ``allow`` mode, recording every implicit activation gather, and reports per case:

* status: ``exact`` (within tolerance, no gather), ``gathered`` (within tolerance, but activations
  were all-gathered), ``inexact`` (beyond tolerance), ``error`` (an exception; or ``hang`` when a
  rank did not answer);
* the max relative error (output, input gradient, every parameter gradient);
* the implicit gathers (module path + op, CREDIT's source line, phase, count);
* for errors: exception type, the message's first line, the innermost frames in CREDIT and in
  credit_dtensor, the failing aten op with its DTensor arguments.

One JSON line per case on stdout (and in ``--jsonl``), then a table. Run with the CREDIT tier's
environment from the repository root::

    .venv-credit/bin/python scripts/credit_probe.py                       # everything
    .venv-credit/bin/python scripts/credit_probe.py --models crossformer,fuxi --worlds 2,3 --fields 32x64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_fields(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    return [tuple(int(v) for v in f.lower().split("x")) for f in text.split(",")]  # type: ignore[misc]


def _row(name: str, world: int, field: tuple[int, int], seconds: float, results=None, err=None) -> dict:
    from tests.credit.runner import parse_failure

    row: dict = {"model": name, "world": world, "field": f"{field[0]}x{field[1]}", "seconds": round(seconds, 1)}
    if results is not None:
        r0 = results[0]
        max_err = max(r["max_err"] for r in results)
        worst = max(r0["errs"], key=r0["errs"].get)
        n_gathers = max(r["n_gathers"] for r in results)
        bad = {k: v for r in results for k, v in r["bad"].items()}
        if bad:
            status = "inexact"
        elif n_gathers:
            status = "gathered"
        else:
            status = "exact"
        row.update(
            status=status,
            max_rel_err=max_err,
            worst=worst,
            worst_errs=dict(sorted(r0["errs"].items(), key=lambda kv: -kv[1])[:4]),
            over_tolerance=dict(sorted(bad.items(), key=lambda kv: -kv[1])[:6]),
            n_gathers=n_gathers,
            gathers=r0["gathers"],
            out_placement=r0["out_placement"],
            sent_bytes_rank0=r0["sent_bytes"],
            x_local_bytes_rank0=r0["x_local_bytes"],
        )
        if "layout_problems" in r0:
            row["layout_problems"] = r0["layout_problems"]
        return row
    text = str(err)
    rep = parse_failure(text)
    if rep is None:
        hang = "did not finish" in text or "process died" in text
        lines = [ln.strip() for ln in text.strip().splitlines()]
        errors = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith("rank ")]
        row.update(
            status="hang" if hang else "error",
            message=lines[-1][:300] if lines else "",
            rank_lines=errors[-8:],
            raw_tail=text[-3000:],
        )
        return row
    row.update(
        status="error",
        type=rep["type"],
        message=rep["message"],
        credit_frame=rep.get("innermost_credit"),
        other_frame=rep.get("innermost_other"),
        credit_dtensor_frame=rep.get("innermost_credit_dtensor"),
        torch_frame=rep.get("innermost_torch"),
        aten_op=rep.get("aten_op"),
        tensors=rep.get("credit_tensors"),
        cause=rep.get("cause"),
        model_stack=rep.get("model_stack"),
        gathers_before=rep.get("gathers_before"),
    )
    for key in ("layout_problems", "backward_of", "traceback_tail"):
        if key in rep:
            row[key] = rep[key]
    return row


def _table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CREDIT models converted with credit_dtensor", show_lines=True)
    for col in ("model", "world", "field", "status", "max rel err", "gathers", "where / what"):
        table.add_column(col, overflow="fold")
    colour = {"exact": "green", "gathered": "yellow", "inexact": "red", "error": "red", "hang": "magenta"}
    for r in rows:
        if r["status"] in ("exact", "gathered", "inexact"):
            what = "\n".join(
                f"{g['count']}x {g['op']} [{g['phase']}] {g['module']} @ {g['site']}" for g in r.get("gathers", [])
            )
            err = f"{r['max_rel_err']:.1e}"
            ng = str(r["n_gathers"])
        else:
            cf = r.get("credit_frame") or {}
            df = r.get("credit_dtensor_frame") or {}
            op = r.get("aten_op") or {}
            what = (
                f"{r.get('type', '')}: {r.get('message', '')}\n"
                f"credit: {cf.get('at', '-')}  {cf.get('line', '')}\n"
                f"credit_dtensor: {df.get('at', '-')}\n"
                f"op: {op.get('op', '-')}"
            )
            err, ng = "-", str(sum(g["count"] for g in r.get("gathers_before") or []))
        table.add_row(
            r["model"], str(r["world"]), r["field"], f"[{colour[r['status']]}]{r['status']}[/]", err, ng, what
        )
    Console(width=220).print(table)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, ROOT)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated case names, see --list (default: all)")
    parser.add_argument("--worlds", default="2,3,4", help="comma-separated world sizes (default: 2,3,4)")
    parser.add_argument("--fields", help="comma-separated HxW fields, e.g. 32x64 (default: each case's own)")
    parser.add_argument("--jsonl", help="also append the JSON lines to this file (default: none)")
    parser.add_argument(
        "--timeout", type=float, default=400, help="seconds per case before the world is restarted (default: 400)"
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="also check every DTensor a torch function returns (local shape / contiguity vs placements) "
        "and report the first inconsistent ones with the op and CREDIT's line; autograd anomaly mode "
        "names the forward line of a failing backward (default: off)",
    )
    parser.add_argument("--no-table", action="store_true", help="print only the JSON lines (default: off)")
    parser.add_argument(
        "--list", action="store_true", help="list the cases and what each exercises, then exit (default: off)"
    )
    args = parser.parse_args(argv)

    from tests.credit.cases import CASES

    if args.list:
        for name, case in CASES.items():
            print(f"{name:24s} {str(case.dtype).replace('torch.', '')}  {case.what}")
        return 0
    names = args.models.split(",") if args.models else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(CASES)}")
    fields = _parse_fields(args.fields)

    from tests.credit.runner import run_case
    from tests.harness import RankError, close_all, get_world

    rows = []
    out = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115 - closed below
    try:
        for world in (int(w) for w in args.worlds.split(",")):
            for name in names:
                for field in fields or CASES[name].fields:
                    t0 = time.perf_counter()
                    try:
                        res = get_world(world).run(run_case, name, *field, "allow", args.trace, timeout=args.timeout)
                        row = _row(name, world, field, time.perf_counter() - t0, results=res)
                    except RankError as err:
                        row = _row(name, world, field, time.perf_counter() - t0, err=err)
                    rows.append(row)
                    line = json.dumps(row)
                    print(line, flush=True)
                    if out is not None:
                        out.write(line + "\n")
                        out.flush()
    finally:
        if out is not None:
            out.close()
        close_all()
    if not args.no_table:
        _table(rows)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the harness's task queues may still hold items for workers that are gone; their feeder threads
    # would block interpreter exit: the worlds are closed, leave without waiting for them
    os._exit(code)
