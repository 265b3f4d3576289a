"""Benchmark: exact halo conv on an H-sharded DTensor vs the hand-written lower bound.

The lower bound runs on the same processes with no DTensor: exchange one halo row with each
neighbour by raw P2P, ``F.conv2d`` on the pre-padded shard, backward through autograd on the local
tensors, and the gradient halo sent back by raw P2P. Both sides use the same data and threads.

    python scripts/bench_conv.py                      # (4, 64, 256, 512) fp32, 2 ranks, 3x3
    python scripts/bench_conv.py --height 64 --width 128 --channels 16 --repeats 3

Prints a rich table; with --json FILE also appends one JSON line per rank to FILE.
"""

from __future__ import annotations

import argparse
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


def _exchange_rows(top: torch.Tensor | None, bottom: torch.Tensor | None, rank: int, world: int):
    """Raw P2P: send my first row up and my last row down; receive the neighbours' rows."""
    ops, recv_up, recv_down = [], None, None
    if rank > 0:
        recv_up = torch.empty_like(top)
        ops += [dist.P2POp(dist.isend, top.contiguous(), rank - 1), dist.P2POp(dist.irecv, recv_up, rank - 1)]
    if rank < world - 1:
        recv_down = torch.empty_like(bottom)
        ops += [dist.P2POp(dist.isend, bottom.contiguous(), rank + 1), dist.P2POp(dist.irecv, recv_down, rank + 1)]
    if ops:
        for r in dist.batch_isend_irecv(ops):
            r.wait()
    return recv_up, recv_down


def lower_bound_step(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor, rank: int, world: int):
    up, down = _exchange_rows(x[:, :, :1], x[:, :, -1:], rank, world)
    pieces = [
        up if up is not None else torch.zeros_like(x[:, :, :1]),
        x,
        down if down is not None else torch.zeros_like(x[:, :, :1]),
    ]
    xp = torch.cat(pieces, 2).requires_grad_()
    wl = w.detach().requires_grad_()
    bl = b.detach().requires_grad_()
    y = F.conv2d(xp, wl, bl, padding=(0, 1))
    gx, gw, gb = torch.autograd.grad(y, (xp, wl, bl), g)
    # adjoint of the halo: send the gradient of the borrowed rows back to their owners, add
    back_up, back_down = _exchange_rows(gx[:, :, :1], gx[:, :, -1:], rank, world)
    gxl = gx[:, :, 1:-1].clone()
    if back_up is not None:
        gxl[:, :, :1] += back_up
    if back_down is not None:
        gxl[:, :, -1:] += back_down
    return y, gxl, gw, gb


def _rank(ctx: RankContext, args: argparse.Namespace) -> dict:
    rank, world = ctx.rank, ctx.world
    from torch import nn

    from credit_dtensor import DomainParallelConv2d, DomainParallelManager, comm_stats, shard_tensor

    manager = DomainParallelManager(world, device_type="cpu")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.height, args.width)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    conv = nn.Conv2d(args.channels, args.channels, 3, padding=1).to(dtype)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    mod = DomainParallelConv2d(conv, manager)
    xd = shard_tensor(x, manager, 2).requires_grad_()
    x_local = xd.to_local().detach()
    gen_g = torch.Generator().manual_seed(1)
    y_probe = mod(xd)
    g = torch.randn(y_probe.shape, generator=gen_g, dtype=dtype)
    gd = shard_tensor(g, manager, 2)
    g_local = gd.to_local()

    def dtensor_step():
        xd.grad = None
        for p in mod.parameters():
            p.grad = None
        y = mod(xd)
        y.backward(gd)

    def bound_step():
        lower_bound_step(x_local, w0, b0, g_local, rank, world)

    def timed(fn):
        times = []
        for i in range(args.warmup + args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # interleave the two to share any drift in machine load
    t_dt, t_lb = [], []
    for _ in range(args.rounds):
        t_dt.append(timed(dtensor_step))
        t_lb.append(timed(bound_step))
    with comm_stats() as s:
        dtensor_step()
    row_bytes = args.batch * args.channels * args.width * x.element_size()
    halo_rows = (rank > 0) + (rank < world - 1)
    result = {
        "bench": "conv2d_3x3",
        "shape": list(shape),
        "dtype": args.dtype,
        "world": world,
        "rank": rank,
        "dtensor_s": statistics.median(t_dt),
        "lower_bound_s": statistics.median(t_lb),
        "overhead": statistics.median(t_dt) / statistics.median(t_lb),
        "recv_bytes_fwd_bwd": s.recv_bytes,
        "sent_bytes_fwd_bwd": s.sent_bytes,
        "min_bytes_fwd_bwd": 2 * halo_rows * row_bytes,
        "threads": args.threads,
    }
    return result


DESCRIPTION = (
    "Time an exact halo 3x3 convolution (forward and backward) on an H-sharded DTensor against a "
    "hand-written lower bound (raw P2P halo exchange and a local convolution) on the same processes, "
    "and compare the bytes sent with the halo minimum."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--world", type=positive_int, default=2, help="ranks that split H (local CPU processes)")
    p.add_argument("--batch", type=positive_int, default=4, help="batch size")
    p.add_argument("--channels", type=positive_int, default=64, help="input and output channels")
    p.add_argument("--height", type=positive_int, default=256, help="H of the global input")
    p.add_argument("--width", type=positive_int, default=512, help="W of the global input")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="data dtype")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per round (median)")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed repeats per round")
    p.add_argument("--rounds", type=positive_int, default=2, help="alternating rounds of both variants")
    p.add_argument(
        "--threads", type=positive_int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per rank"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="append one JSON line per rank to FILE")
    args = p.parse_args(argv)
    results = run_ranks(_rank, args.world, (args,), threads=args.threads, timeout=3600)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"3x3 conv fwd+bwd, shape {results[0]['shape']} {args.dtype}, {args.world} ranks (median s)")
    for col in ("rank", "DTensor path", "lower bound", "overhead", "bytes (ours)", "bytes (minimum)"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r["rank"]),
            f"{r['dtensor_s']:.4f}",
            f"{r['lower_bound_s']:.4f}",
            f"{r['overhead']:.3f}x",
            f"{r['sent_bytes_fwd_bwd']:,}",
            f"{r['min_bytes_fwd_bwd']:,}",
        )
    Console().print(table)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
