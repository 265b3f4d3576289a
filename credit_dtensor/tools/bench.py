"""Benchmarks: traffic, activation memory, FLOPs and wall time of the domain-parallel path.

Measured per rank, forward + backward, for single layers and the demo U-Net, against exact
references that do not trust our own bookkeeping:

* bytes: every ``torch.distributed`` send/recv/collective (and functional collective) is wrapped
  inside the benchmark process only (:class:`WireCounter`); the minimum is derived from geometry
  (halo rows each rank must receive, statistics scalars) on the single-device model;
* activation memory: unique storages saved for backward (``saved_tensors_hooks``), parameters excluded;
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode``;
* time: medians of repeats, the DTensor path next to a hand-written lower bound (local op on a
  pre-padded shard, raw P2P halo, one all-reduce per statistic, no DTensor) on the same processes.

:func:`run` spawns one gloo world per domain size and returns JSON-able rows.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .._torch_versions import flop_counter
from .bench_bound import lower_bound_fn
from .bench_wire import WireCounter, intercept, minimum_bytes
from .launch import RankContext, free_port, run_ranks

__all__ = ["BenchConfig", "CASES", "run", "summarize"]

logger = logging.getLogger(__name__)

CASES = ("conv3x3", "conv_stride2", "conv_transpose", "group_norm", "demo")


@dataclass
class BenchConfig:
    worlds: tuple[int, ...] = (1, 2, 4)
    resolutions: tuple[tuple[int, int], ...] = ((32, 64), (64, 128), (128, 256))
    cases: tuple[str, ...] = CASES
    batch: int = 2
    channels: int = 8
    repeats: int = 5
    warmup: int = 1
    threads: int = 1
    dtype: str = "float32"


def build_case(name: str, channels: int) -> tuple[nn.Module, int]:
    """``(plain module, input channels)`` for a case name."""
    if name == "conv3x3":
        return nn.Conv2d(channels, channels, 3, padding=1), channels
    if name == "conv_stride2":
        return nn.Conv2d(channels, channels, 3, stride=2, padding=1), channels
    if name == "conv_transpose":
        return nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), channels
    if name == "group_norm":
        return nn.GroupNorm(4, channels), channels
    if name == "demo":
        from ..models.demo import DemoNet

        return DemoNet(channels=4, width=channels), 4
    raise ValueError(f"bench: unknown case {name!r}; choose from {CASES}")


# ---------------------------------------------------------------------------------------------
# activation memory and FLOPs
# ---------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t._local_tensor
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (st.data_ptr(), st.nbytes())


@contextlib.contextmanager
def saved_bytes(exclude: set) -> Iterator[dict[str, int]]:
    """Unique storages autograd saves for backward inside the block (``exclude``: parameter keys)."""
    seen: dict[tuple[int, int], int] = {}
    out = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in exclude and key not in seen:
            seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())


def _param_keys(model: nn.Module) -> set:
    return {k for p in model.parameters() if (k := _storage_key(p.detach())) is not None}


# ---------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------


def _median_time(fn: Callable[[], None], repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _local_flop_counter():
    """``FlopCounterMode`` that counts ops seen on DTensors with the rank's *local* shapes.

    A dispatch mode sees DTensor-level aten ops (e.g. a 1x1 conv PyTorch's own DTensor rule runs)
    with global shapes and never sees the local kernel underneath; stock FlopCounterMode would
    charge every rank the whole field's FLOPs for them.
    """
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import FlopCounterMode

    class LocalFlopCounterMode(FlopCounterMode):
        def _count_flops(self, func_packet, out, args, kwargs):
            def loc(t):
                return t._local_tensor if isinstance(t, DTensor) else t

            largs, lkwargs, lout = tree_map(loc, (args, kwargs, out))
            super()._count_flops(func_packet, lout, largs, lkwargs)
            return out

    return flop_counter(LocalFlopCounterMode(display=False))  # torch 2.11/2.12: no per-module tracking


def _flops(fn: Callable[[], None]) -> int:
    with _local_flop_counter() as fc:
        fn()
    return int(fc.get_total_flops())


def bench_case(name: str, hw: tuple[int, int], cfg: BenchConfig, manager, rank: int, world: int) -> dict:
    from .. import comm_stats, shard_tensor
    from ..convert import convert_to_domain_parallel
    from ..parallelize import reduce_gradients

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    plain, cin = build_case(name, cfg.channels)
    plain = plain.to(dtype)
    input_grad = name != "demo"  # the demo's input is data; single layers sit inside a network
    x = torch.randn(cfg.batch, cin, *hw, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mins = minimum_bytes(plain, x, world, input_grad)
    y_ref = plain(x)
    g = torch.randn(y_ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    row: dict = {
        "case": name,
        "H": hw[0],
        "W": hw[1],
        "world": world,
        "rank": rank,
        "batch": cfg.batch,
        "channels": cfg.channels,
        "dtype": cfg.dtype,
    }

    # single process: the plain module on its own
    if world == 1:
        xs = x.clone().requires_grad_(input_grad)

        def plain_step():
            plain.zero_grad(set_to_none=True)
            plain(xs).backward(g)

        with saved_bytes(_param_keys(plain)) as mem:
            plain(xs).backward(g)
        row["act_bytes_plain"] = mem["bytes"]
        row["flops_plain"] = _flops(plain_step)
        row["time_plain_s"] = _median_time(plain_step, cfg.repeats, cfg.warmup)

    model = convert_to_domain_parallel(copy.deepcopy(plain), manager)
    xd = shard_tensor(x, manager, 2).detach().requires_grad_(input_grad)
    gd = shard_tensor(g, manager, 2)

    def dt_step():
        xd.grad = None
        model.zero_grad(set_to_none=True)
        model(xd).backward(gd)

    dt_step()  # warm caches (halo plans) before counting
    counter = WireCounter()
    with intercept(counter), comm_stats() as ours:
        with counter.phase("fwd_bwd"):
            with saved_bytes(_param_keys(model)) as mem:
                y = model(xd)
            y.backward(gd)
        with counter.phase("grad_reduce"):
            reduce_gradients(model, manager)
    row.update(
        wire_sent_bytes=counter.sent.get("fwd_bwd", 0),
        wire_recv_bytes=counter.recv.get("fwd_bwd", 0),
        wire_calls={k: v for k, v in counter.calls.items()},
        grad_reduce_sent_bytes=counter.sent.get("grad_reduce", 0),
        counted_sent_bytes=ours.sent_bytes,
        counted_by_op={k: v.sent_bytes for k, v in ours.by_op.items()},
        min_halo_bytes=mins["halo"][rank],
        min_stats_bytes=mins["stats"][rank],
        min_bytes=mins["halo"][rank] + mins["stats"][rank],
        min_grad_reduce_bytes=mins["grad_reduce"][rank] if world > 1 else 0,
        act_bytes=mem["bytes"],
        flops=_flops(dt_step),
    )
    row["time_dtensor_s"] = _median_time(dt_step, cfg.repeats, cfg.warmup)
    lb = lower_bound_fn(name, plain, hw[0], rank, world)
    if lb is not None:
        xl = xd.to_local().detach().clone().requires_grad_(input_grad)
        gl = gd.to_local()

        def lb_step():
            xl.grad = None
            lb(xl).backward(gl)

        lb_counter = WireCounter()
        with intercept(lb_counter):
            lb_step()
        row["lower_bound_sent_bytes"] = lb_counter.sent.get("other", 0)
        row["time_lower_bound_s"] = _median_time(lb_step, cfg.repeats, cfg.warmup)
    return row


def _rank_rows(ctx: RankContext, cfg: BenchConfig) -> list[dict]:
    """Every case and resolution on one rank of a ``ctx.world``-rank domain."""
    from ..mesh import DomainParallelManager

    manager = DomainParallelManager(ctx.world, device_type="cpu")
    return [bench_case(name, hw, cfg, manager, ctx.rank, ctx.world) for name in cfg.cases for hw in cfg.resolutions]


def run_world(world: int, cfg: BenchConfig, timeout: float = 1800.0) -> list[dict]:
    """Spawn ``world`` CPU processes (gloo), run every case, return all ranks' rows."""
    per_rank = run_ranks(_rank_rows, world, (cfg,), threads=cfg.threads, timeout=timeout)
    return [row for rows in per_rank for row in rows]


def run(cfg: BenchConfig, on_world: Callable[[int, list[dict]], None] | None = None) -> list[dict]:
    rows: list[dict] = []
    for world in cfg.worlds:
        t0 = time.perf_counter()
        got = run_world(world, cfg)
        logger.info("world %d done in %.1f s", world, time.perf_counter() - t0)
        rows.extend(got)
        if on_world is not None:
            on_world(world, got)
    return rows


# ---------------------------------------------------------------------------------------------
# summary: one line per (case, resolution, world)
# ---------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> list[dict]:
    """Aggregate ranks: max bytes per rank, memory/FLOPs summed over ranks vs one device,
    median times of rank 0 (ranks are barrier-synchronised)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["case"], r["H"], r["W"], r["world"])].append(r)
    single = {(c, h, w): rs[0] for (c, h, w, n), rs in groups.items() if n == 1}
    out = []
    for (case, h, w, n), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["rank"])
        one = single.get((case, h, w))
        s = {"case": case, "H": h, "W": w, "world": n}
        sent = [r["wire_sent_bytes"] for r in rs]
        mins = [r["min_bytes"] for r in rs]
        s["max_sent_bytes"] = max(sent)
        s["max_min_bytes"] = max(mins)
        s["bytes_ratio"] = (sum(sent) / sum(mins)) if sum(mins) else (1.0 if not sum(sent) else float("inf"))
        s["counted_sent_bytes"] = sum(r["counted_sent_bytes"] for r in rs)
        s["grad_reduce_sent_bytes"] = max(r["grad_reduce_sent_bytes"] for r in rs)
        s["min_grad_reduce_bytes"] = max(r["min_grad_reduce_bytes"] for r in rs)
        s["act_bytes_max_rank"] = max(r["act_bytes"] for r in rs)
        s["flops_max_rank"] = max(r["flops"] for r in rs)
        s["time_dtensor_s"] = rs[0]["time_dtensor_s"]
        if "time_lower_bound_s" in rs[0]:
            s["time_lower_bound_s"] = rs[0]["time_lower_bound_s"]
            s["overhead"] = s["time_dtensor_s"] / s["time_lower_bound_s"]
            s["lower_bound_sent_bytes"] = max(r["lower_bound_sent_bytes"] for r in rs)
        if one is not None:
            s["act_bytes_1proc"] = one["act_bytes_plain"]
            s["flops_1proc"] = one["flops_plain"]
            if one["act_bytes_plain"]:
                s["act_ratio"] = n * s["act_bytes_max_rank"] / one["act_bytes_plain"]
            if one["flops_plain"]:  # FlopCounterMode counts matmuls and convolutions only
                s["flops_ratio"] = n * s["flops_max_rank"] / one["flops_plain"]
            s["time_plain_1proc_s"] = one["time_plain_s"]
            s["speedup_vs_1proc"] = one["time_plain_s"] / s["time_dtensor_s"]
        out.append(s)
    return out


def profile_case(name: str, hw: tuple[int, int], cfg: BenchConfig, row_limit: int = 12) -> str:
    """torch.profiler tables (self CPU time) of one DTensor step and one lower-bound step in a
    single-rank gloo world: what the DTensor path spends beyond the local kernels."""
    from torch.profiler import ProfilerActivity, profile

    from .. import shard_tensor
    from ..convert import convert_to_domain_parallel
    from ..mesh import DomainParallelManager

    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        manager = DomainParallelManager(1, device_type="cpu")
        dtype = getattr(torch, cfg.dtype)
        torch.manual_seed(0)
        plain, cin = build_case(name, cfg.channels)
        plain = plain.to(dtype)
        x = torch.randn(cfg.batch, cin, *hw, dtype=dtype)
        g = torch.randn(plain(x).shape, dtype=dtype)
        model = convert_to_domain_parallel(copy.deepcopy(plain), manager)
        xd = shard_tensor(x, manager, 2).detach().requires_grad_()
        gd = shard_tensor(g, manager, 2)
        lb = lower_bound_fn(name, plain, hw[0], 0, 1)
        xl = x.clone().requires_grad_()
        steps = {"DTensor path": lambda: model(xd).backward(gd)}
        if lb is not None:
            steps["lower bound"] = lambda: lb(xl).backward(g)
        out = []
        for label, fn in steps.items():
            for _ in range(2):
                fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(cfg.repeats):
                    fn()
            out.append(f"== {label}: {name} {hw[0]}x{hw[1]}, {cfg.repeats} steps ==")
            out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))
        manager.close()
        return "\n".join(out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
