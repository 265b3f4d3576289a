"""Benchmark: exact distributed GroupNorm on an H-sharded DTensor vs single-device GroupNorm on a
tensor of the same *local* size (what each rank would do if statistics were free).

Timed per rank, forward alone and forward+backward, for the module wrapper
(``DomainParallelGroupNorm``) and for ``F.group_norm`` called on the DTensor (our aten rule); the
baseline is ``nn.GroupNorm`` on a plain ``(B, C, H/world, W)`` tensor in the same process with the
same threads. Traffic per call is reported next to the statistics-only minimum.

    python scripts/bench_norm.py                                  # (4, 64, 256, 256) fp32, 32 groups
    python scripts/bench_norm.py --height 64 --width 64 --repeats 5

Prints a rich table; with --json FILE also appends one JSON line per rank to FILE.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from credit_dtensor.cli._args import HelpFormatter, nonneg_int, positive_int
from credit_dtensor.tools.launch import RankContext, run_ranks


def _rank(ctx: RankContext, args: argparse.Namespace) -> dict:
    rank, world = ctx.rank, ctx.world
    from torch import nn
    from torch.distributed.tensor import DTensor

    from credit_dtensor import DomainParallelManager, comm_stats, shard_tensor
    from credit_dtensor.nn.norm import DomainParallelGroupNorm

    manager = DomainParallelManager(world, device_type="cpu")
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.channels, args.height, args.width)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref = nn.GroupNorm(args.groups, args.channels).to(dtype)
    mod = DomainParallelGroupNorm(copy.deepcopy(ref), manager)
    xd = shard_tensor(x, manager, 2)  # activations are contiguous in practice: so is the shard here
    xd = DTensor.from_local(
        xd.to_local().contiguous(), xd.device_mesh, xd.placements, shape=xd.shape, stride=xd.stride()
    )
    xd.requires_grad_()
    gd = shard_tensor(g, manager, 2)
    x_local = xd.to_local().detach().clone().requires_grad_()
    g_local = gd.to_local().contiguous()
    w, b = mod.weight, mod.bias

    def ours_fwd():
        with torch.no_grad():
            mod(xd)

    def ours_step():
        xd.grad = None
        mod.zero_grad(set_to_none=True)
        mod(xd).backward(gd)

    def functional_step():
        xd.grad = None
        mod.zero_grad(set_to_none=True)
        F.group_norm(xd, args.groups, w, b).backward(gd)

    def local_fwd():
        with torch.no_grad():
            ref(x_local)

    def local_step():
        x_local.grad = None
        ref.zero_grad(set_to_none=True)
        ref(x_local).backward(g_local)

    def timed(fn) -> float:
        times = []
        for i in range(args.warmup + args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    cases = {
        "ours_fwd": ours_fwd,
        "local_fwd": local_fwd,
        "ours_fwd_bwd": ours_step,
        "functional_fwd_bwd": functional_step,
        "local_fwd_bwd": local_step,
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):  # interleave to share drift in machine load
        for k, fn in cases.items():
            samples[k].append(timed(fn))
    t = {k: statistics.median(v) for k, v in samples.items()}
    with comm_stats() as s_fwd:
        y = mod(xd)
    with comm_stats() as s_bwd:
        y.backward(gd)
    q = args.batch * args.groups
    item = torch.finfo(dtype).bits // 8
    result = {
        "bench": "group_norm",
        "shape": list(shape),
        "local_shape": list(x_local.shape),
        "groups": args.groups,
        "dtype": args.dtype,
        "world": world,
        "rank": rank,
        **{f"{k}_s": v for k, v in t.items()},
        "overhead_fwd": t["ours_fwd"] / t["local_fwd"],
        "overhead_fwd_bwd": t["ours_fwd_bwd"] / t["local_fwd_bwd"],
        "sent_bytes_fwd": s_fwd.sent_bytes,
        "sent_bytes_bwd": s_bwd.sent_bytes,
        "stats_bytes_fwd": (world * 2 * q * item) if world > 1 else 0,
        "stats_bytes_bwd": (2 * q * item) if world > 1 else 0,
        "activation_bytes": x_local.numel() * item,
        "threads": args.threads,
    }
    return result


DESCRIPTION = (
    "Time the exact distributed GroupNorm on an H-sharded DTensor (module wrapper and functional call, "
    "forward and forward+backward) against nn.GroupNorm on a plain tensor of the same local size, and "
    "compare the bytes sent with the statistics-only minimum."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--world", type=positive_int, default=2, help="ranks that split H (local CPU processes)")
    p.add_argument("--batch", type=positive_int, default=4, help="batch size")
    p.add_argument("--channels", type=positive_int, default=64, help="channels (a multiple of --groups)")
    p.add_argument("--groups", type=positive_int, default=32, help="GroupNorm groups")
    p.add_argument("--height", type=positive_int, default=256, help="H of the global input")
    p.add_argument("--width", type=positive_int, default=256, help="W of the global input")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="data dtype")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per round (median)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed repeats per round")
    p.add_argument("--rounds", type=positive_int, default=2, help="alternating rounds of every variant")
    p.add_argument(
        "--threads", type=positive_int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per rank"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="append one JSON line per rank to FILE")
    args = p.parse_args(argv)
    if args.channels % args.groups:
        p.error(f"argument --channels: {args.channels} is not a multiple of --groups {args.groups}")
    results = run_ranks(_rank, args.world, (args,), threads=args.threads, timeout=3600)
    from rich.console import Console
    from rich.table import Table

    r0 = results[0]
    table = Table(
        title=f"GroupNorm({args.groups}) shape {r0['shape']} {args.dtype}, {args.world} ranks vs one device on "
        f"the local shape {r0['local_shape']} (median ms)"
    )
    cols = ("rank", "fwd ours", "fwd local", "fwd+bwd ours", "fwd+bwd F.group_norm", "fwd+bwd local",
            "overhead", "bytes fwd/bwd", "stats minimum", "activation bytes")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r["rank"]),
            f"{1e3 * r['ours_fwd_s']:.2f}",
            f"{1e3 * r['local_fwd_s']:.2f}",
            f"{1e3 * r['ours_fwd_bwd_s']:.2f}",
            f"{1e3 * r['functional_fwd_bwd_s']:.2f}",
            f"{1e3 * r['local_fwd_bwd_s']:.2f}",
            f"{r['overhead_fwd_bwd']:.2f}x",
            f"{r['sent_bytes_fwd']:,}/{r['sent_bytes_bwd']:,}",
            f"{r['stats_bytes_fwd']:,}/{r['stats_bytes_bwd']:,}",
            f"{r['activation_bytes']:,}",
        )
    Console().print(table)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
