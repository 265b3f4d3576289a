"""Benchmark: latency of one small sum between two gloo ranks, gloo's all-reduce vs one
send/receive pair (``credit_dtensor.comm._pair_sum``, what every norm-statistics sum uses on a
two-rank domain group), and of a bare send/receive round.

    python scripts/bench_latency.py                 # 64 and 4096 floats, 7 blocks of 200 rounds
    python scripts/bench_latency.py --numel 64 --rounds 1000 --json lat.jsonl

Prints a rich table (median over interleaved blocks of rounds, on rank 0); with --json FILE also appends one
JSON line per case to FILE.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from credit_dtensor.cli._args import HelpFormatter, int_list, positive_int
from credit_dtensor.tools.launch import RankContext, run_ranks


def _round(t: torch.Tensor, buf: torch.Tensor, peer: int) -> None:
    for r in dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, peer), dist.P2POp(dist.isend, t, peer)]):
        r.wait()


def _rank(ctx: RankContext, args: argparse.Namespace) -> list[dict]:
    from credit_dtensor import comm

    group = dist.group.WORLD
    peer = 1 - ctx.rank
    rows = []
    for n in args.numel:
        t = torch.randn(n)
        buf = torch.empty(n)

        cases = {
            "gloo all_reduce": lambda t=t: dist.all_reduce(t.clone(), group=group),
            "comm.all_reduce_sum (pair)": lambda t=t: comm.all_reduce_sum(t.clone(), group),
            "send/receive round": lambda t=t, buf=buf: _round(t, buf, peer),
        }
        blocks: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.blocks):  # cases interleaved block by block: the VM's drift hits all alike
            for name, fn in cases.items():
                for _ in range(10):
                    fn()
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.rounds):
                    fn()
                blocks[name].append((time.perf_counter() - t0) / args.rounds)
        for name, times in blocks.items():
            rows.append({"bench": "latency", "case": name, "numel": n, "us": 1e6 * statistics.median(times)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--numel", type=int_list, default="64,4096", help="floats per sum, comma separated")
    p.add_argument("--rounds", type=positive_int, default=200, help="rounds per timed block")
    p.add_argument("--blocks", type=positive_int, default=7, help="timed blocks per case (the median is reported)")
    p.add_argument("--json", default=None, metavar="FILE", help="append one JSON line per case to FILE")
    args = p.parse_args(argv)
    rows = run_ranks(_rank, 2, (args,), threads=1, timeout=1800)[0]
    table = Table(title="one small sum between 2 gloo ranks (median us per round, rank 0)")
    for c in ("case", "floats", "us"):
        table.add_column(c, justify="left" if c == "case" else "right")
    for r in rows:
        table.add_row(r["case"], str(r["numel"]), f"{r['us']:.0f}")
    Console().print(table)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
