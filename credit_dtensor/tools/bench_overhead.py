"""The ``overhead`` benchmark: per-op host cost at tiny fields, every implementation in one run.

For each field ``(B, C, H, W)`` and case (``conv3x3``: ``Conv2d(C, C, 3, padding=1)``;
``conv_gn_silu``: that conv, ``GroupNorm(4, C)`` and ``SiLU``), forward + backward with input
gradient, on the same processes and data:

* ``bound``: the hand-written lower bound (plain local tensors, one batched halo round,
  ``F.conv2d``, one all-reduce of the GroupNorm sums; :mod:`.bench_bound`);
* ``plain``: plain-tensor module wrappers in the style of NCAR CREDIT (:mod:`.bench_plain`);
* ``eager``: credit_dtensor, the converted model on an H-sharded DTensor;
* ``aot_eager`` / ``inductor``: the converted model under ``torch.compile(fullgraph=True,
  dynamic=False)``; the first step (compilation) is timed separately and never in the medians.

Repetitions are interleaved (each repetition runs every variant once, in a rotating order, each
step between a barrier and its own end), so load changes hit every variant alike. Each rank
records its own step times, wall-clock and process CPU time (all threads, gloo's included: the
host cost, which the load of other processes on a shared machine does not inflate);
:func:`summarize_overhead` takes the maximum over ranks per repetition, then the median (and
quartiles) over repetitions.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .launch import RankContext, run_ranks

__all__ = [
    "OVERHEAD_CASES",
    "VARIANTS",
    "OverheadConfig",
    "overhead_rows",
    "run_overhead",
    "summarize_overhead",
    "profile_overhead",
]

OVERHEAD_CASES = ("conv3x3", "conv_gn_silu")
VARIANTS = ("bound", "plain", "eager", "aot_eager", "inductor")
DEFAULT_FIELDS = ((1, 8, 16, 32), (2, 32, 64, 128))


@dataclass
class OverheadConfig:
    worlds: tuple[int, ...] = (1, 2, 4)
    fields: tuple[tuple[int, int, int, int], ...] = DEFAULT_FIELDS
    cases: tuple[str, ...] = OVERHEAD_CASES
    backends: tuple[str, ...] = ("aot_eager", "inductor")
    repeats: int = 50
    warmup: int = 3
    threads: int = 1


def build_block(case: str, channels: int) -> nn.Module:
    if case == "conv3x3":
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1))
    if case == "conv_gn_silu":
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.SiLU())
    raise ValueError(f"overhead: unknown case {case!r}; choose from {OVERHEAD_CASES}")


def _bound(case: str, model: nn.Module, h: int, rank: int, world: int) -> Callable:
    from .bench_bound import block_bound_fn, lower_bound_fn

    if case == "conv3x3":
        return lower_bound_fn("conv3x3", model[0], h, rank, world)  # type: ignore[return-value]
    return block_bound_fn(model[0], model[1], h, rank, world)


def _steps(case: str, field: tuple[int, ...], cfg: OverheadConfig, manager, rank: int, world: int):
    """``({variant: step()}, {variant: compile seconds})``; each step returns (output, input grad)
    as local tensors."""
    from .. import shard_tensor
    from ..convert import convert_to_domain_parallel
    from ..geometry import chunk_range
    from .bench_plain import plain_wrap

    b, c, h, w = field
    torch.manual_seed(0)
    plain = build_block(case, c)
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1))
    g = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(2))
    lo, hi = chunk_range(h, world, rank)
    xl, gl = x[:, :, lo:hi].contiguous(), g[:, :, lo:hi].contiguous()
    steps: dict[str, Callable] = {}

    bound = _bound(case, plain, h, rank, world)
    xb = xl.clone().requires_grad_()

    def step_bound():
        xb.grad = None
        for p in bound.params:  # type: ignore[attr-defined]
            p.grad = None
        y = bound(xb)
        y.backward(gl)
        return y, xb.grad

    steps["bound"] = step_bound

    wrapped = plain_wrap(copy.deepcopy(plain), rank, world)
    xp = xl.clone().requires_grad_()

    def step_plain():
        xp.grad = None
        wrapped.zero_grad(set_to_none=True)
        y = wrapped(xp)
        y.backward(gl)
        return y, xp.grad

    steps["plain"] = step_plain

    def dtensor_step(model: nn.Module) -> Callable:
        xd = shard_tensor(x, manager, 2).detach().requires_grad_()
        gd = shard_tensor(g, manager, 2)

        def step():
            xd.grad = None
            model.zero_grad(set_to_none=True)
            y = model(xd)
            y.backward(gd)
            return y.to_local(), xd.grad.to_local()

        return step

    steps["eager"] = dtensor_step(convert_to_domain_parallel(copy.deepcopy(plain), manager))
    compile_s: dict[str, float] = {}
    if cfg.backends:
        torch._dynamo.reset()
    for backend in cfg.backends:
        model = convert_to_domain_parallel(copy.deepcopy(plain), manager)
        step = dtensor_step(torch.compile(model, backend=backend, fullgraph=True, dynamic=False))
        dist.barrier()
        t0 = time.perf_counter()
        step()  # compiles forward, then backward
        compile_s[backend] = time.perf_counter() - t0
        steps[backend] = step
    return steps, compile_s


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def _interleaved(steps: dict[str, Callable], repeats: int, warmup: int):
    """``({variant: wall seconds per repetition}, {variant: CPU seconds per repetition})``; CPU time
    is the process's (all threads: gloo's too), which other processes' load does not inflate."""
    names = list(steps)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:  # the same rotating order on every rank
            dist.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            steps[n]()
            t1, c1 = time.perf_counter(), time.process_time()
            if i >= warmup:
                wall[n].append(t1 - t0)
                cpu[n].append(c1 - c0)
    return wall, cpu


def timed_rows(bench: str, what: dict, field, world: int, rank: int, threads: int, steps, cfg, compile_s) -> dict:
    """``{variant: record}``: the keys every benchmark row shares (what, where, the timings of
    :func:`_interleaved` over ``steps``); each benchmark adds its own measurements."""
    times, cpu = _interleaved(steps, cfg.repeats, cfg.warmup)
    return {
        n: {
            "bench": bench,
            **what,
            "field": list(field),
            "world": world,
            "rank": rank,
            "variant": n,
            "threads": threads,
            "times_s": times[n],
            "cpu_s": cpu[n],
            "compile_s": compile_s.get(n),
        }
        for n in steps
    }


def bench_overhead_case(case: str, field: tuple[int, ...], cfg: OverheadConfig, manager, rank: int, world: int):
    steps, compile_s = _steps(case, field, cfg, manager, rank, world)
    ref_y, ref_gx = steps["eager"]()
    diffs = {}
    for n, step in steps.items():
        y, gx = step()
        diffs[n] = max(_max_diff(y, ref_y), _max_diff(gx, ref_gx))
    rows = timed_rows("overhead", {"case": case}, field, world, rank, cfg.threads, steps, cfg, compile_s)
    return [{**r, "max_abs_diff_vs_eager": diffs[n]} for n, r in rows.items()]


@contextlib.contextmanager
def rank_compile_cache(rank: int) -> Iterator[None]:
    """A private inductor cache for this rank: compiled graphs bake in the rank, so ranks must not
    share cache entries."""
    import torch._functorch.config

    cache = tempfile.mkdtemp(prefix=f"credit_dtensor_bench_r{rank}_")
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    torch._functorch.config.enable_autograd_cache = False
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
        shutil.rmtree(cache, ignore_errors=True)


def overhead_rows(cfg: OverheadConfig, manager, rank: int, world: int) -> list[dict]:
    """This rank's rows for every field and case, in an initialised process group (spawned ranks or
    torchrun)."""
    with rank_compile_cache(rank):
        return [
            row
            for field in cfg.fields
            for case in cfg.cases
            for row in bench_overhead_case(case, field, cfg, manager, rank, world)
        ]


def _rank_rows(ctx: RankContext, rows_fn: Callable, cfg: Any) -> list[dict]:
    from ..mesh import DomainParallelManager

    manager = DomainParallelManager(ctx.world, device_type="cpu")
    try:
        return rows_fn(cfg, manager, ctx.rank, ctx.world)
    finally:
        manager.close()


def run_worlds(rows_fn: Callable, cfg: Any, timeout: float = 3600.0) -> list[dict]:
    """Spawn one gloo world per domain size in ``cfg.worlds`` (``cfg.threads`` torch threads per
    rank), run ``rows_fn(cfg, manager, rank, world)`` on every rank; every rank's rows."""
    rows: list[dict] = []
    for world in cfg.worlds:
        for got in run_ranks(_rank_rows, world, (rows_fn, cfg), threads=cfg.threads, timeout=timeout):
            rows.extend(got)
    return rows


def run_overhead(cfg: OverheadConfig, timeout: float = 3600.0) -> list[dict]:
    """Spawn one gloo world per domain size; every rank's rows (times of every repetition)."""
    return run_worlds(overhead_rows, cfg, timeout)


def summarize_overhead(rows: list[dict]) -> list[dict]:
    """One line per (case, field, world, variant): median over repetitions of the slowest rank."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["case"], tuple(r["field"]), r["world"], r["variant"])].append(r)
    out = []
    for (case, field, world, variant), rs in groups.items():
        per_rep = [max(ts) for ts in zip(*(r["times_s"] for r in rs))]
        q = statistics.quantiles(per_rep, n=4) if len(per_rep) > 1 else [per_rep[0]] * 3
        cpu_rep = [max(ts) for ts in zip(*(r["cpu_s"] for r in rs))] if all("cpu_s" in r for r in rs) else []
        compiles = [r["compile_s"] for r in rs if r.get("compile_s") is not None]
        out.append(
            {
                "bench": "overhead",
                "case": case,
                "field": list(field),
                "world": world,
                "variant": variant,
                "time_s": statistics.median(per_rep),
                "q1_s": q[0],
                "q3_s": q[2],
                "cpu_s": statistics.median(cpu_rep) if cpu_rep else None,
                "repeats": len(per_rep),
                "compile_s": max(compiles) if compiles else None,
                "max_abs_diff_vs_eager": max(r["max_abs_diff_vs_eager"] for r in rs),
            }
        )
    order = {v: i for i, v in enumerate(VARIANTS)}
    out.sort(
        key=lambda s: (
            OVERHEAD_CASES.index(s["case"]) if s["case"] in OVERHEAD_CASES else 99,
            s["field"],
            s["world"],
            order.get(s["variant"], 99),
        )
    )
    plain = {(s["case"], tuple(s["field"]), s["world"]): s for s in out if s["variant"] == "plain"}
    for s in out:
        ref = plain.get((s["case"], tuple(s["field"]), s["world"]))
        if ref and ref["time_s"]:
            s["vs_plain"] = s["time_s"] / ref["time_s"]
        if ref and ref.get("cpu_s") and s.get("cpu_s") is not None:
            s["cpu_vs_plain"] = s["cpu_s"] / ref["cpu_s"]
    return out


# ---------------------------------------------------------------------------------------------
# profile: where credit_dtensor eager spends its host time
# ---------------------------------------------------------------------------------------------


def _profile_rank(ctx: RankContext, case: str, field: tuple[int, ...], steps_n: int, limit: int) -> str:
    import cProfile
    import io
    import pstats

    from ..mesh import DomainParallelManager

    manager = DomainParallelManager(ctx.world, device_type="cpu")
    cfg = OverheadConfig(backends=())
    try:
        steps, _ = _steps(case, field, cfg, manager, ctx.rank, ctx.world)
        out = []
        for name in ("plain", "eager"):
            for _ in range(5):
                steps[name]()
            dist.barrier()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(steps_n):
                steps[name]()
            prof.disable()
            dt = (time.perf_counter() - t0) / steps_n
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(limit)
            out.append(
                f"== {name}: {case} {field}, {ctx.world} ranks, rank {ctx.rank}, {steps_n} steps, "
                f"{1e3 * dt:.2f} ms/step under cProfile ==\n{buf.getvalue()}"
            )
        return "\n".join(out)
    finally:
        manager.close()


def profile_overhead(
    case: str = "conv3x3",
    field: tuple[int, ...] = DEFAULT_FIELDS[0],
    world: int = 2,
    steps_n: int = 200,
    limit: int = 25,
) -> str:
    """cProfile (self time) of the plain-wrapper and credit_dtensor eager steps, rank 0's view."""
    return run_ranks(_profile_rank, world, (case, field, steps_n, limit), threads=1)[0]
