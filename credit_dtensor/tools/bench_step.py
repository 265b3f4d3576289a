"""The ``step`` benchmark: a whole training step of model-shaped networks, every path in one run.

For each model and field, on the same spawned gloo ranks (1 torch thread each) and the same data,
one training step (forward, ``backward`` of a fixed output gradient, parameter-gradient reduction):

* ``one``: the plain model on the whole field on rank 0 alone (the other ranks wait): one device;
* ``plain``: plain local tensors with module wrappers in the style of NCAR CREDIT's domain
  parallelism (:mod:`.bench_plain`: halo convs by point-to-point exchange, BatchNorm statistics
  left local as CREDIT leaves them -- so not exact in training mode -- one bucketed all-reduce of
  the parameter gradients);
* ``eager``: credit_dtensor, the converted model on an H-sharded DTensor,
  :func:`~credit_dtensor.reduce_gradients` after backward;
* ``overlap``: the same with the gradient buckets reduced during backward
  (:func:`~credit_dtensor.gradsync.overlap_gradient_reduction`);
* ``<backend>``: the converted model under ``torch.compile`` (compile time reported apart).

Per variant: the median step (max over ranks per repetition; repetitions interleaved so load hits
every variant alike), process CPU time, speedup (one device / step) and efficiency (speedup / N),
collectives per step (every process-group call counted in the benchmark process), and the
largest output difference from the one-device model (``exact`` for credit_dtensor's paths).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .bench_overhead import rank_compile_cache, run_worlds, timed_rows

__all__ = ["STEP_MODELS", "StepConfig", "build_model", "run_step", "step_rows", "summarize_step"]

#: ``resunet``: CREDIT's ``SegmentationModel`` shape (ResNet encoder, BatchNorm, UNet decoder);
#: ``demo``: the training demo's U-Net (circular W padding, GroupNorm, strided and transposed convs);
#: ``crossformer``: a CREDIT-style CrossFormer stage (earth padding, cross-embedding, short- and
#: long-distance attention, feed-forward, transposed conv, crop)
STEP_MODELS = ("resunet", "demo", "crossformer")
DEFAULT_FIELDS = ((1, 3, 128, 128), (1, 3, 256, 256))


@dataclass
class StepConfig:
    worlds: tuple[int, ...] = (2,)
    fields: tuple[tuple[int, int, int, int], ...] = DEFAULT_FIELDS
    models: tuple[str, ...] = STEP_MODELS
    width: int = 16
    backends: tuple[str, ...] = ("inductor",)
    repeats: int = 5
    warmup: int = 1
    threads: int = 1


def build_model(name: str, in_channels: int, width: int) -> nn.Module:
    if name == "resunet":
        from ..models.resunet import resunet

        return resunet(in_channels, in_channels, width)
    if name == "demo":
        from ..models.demo import DemoNet

        return DemoNet(in_channels, width)
    if name == "crossformer":
        from ..models.crossformer_credit import CrossFormerStage

        # padding 4: (H + 8) / 2 rows after the embedding hold whole windows of 2 on each of 2 ranks
        return CrossFormerStage(
            in_channels, 2 * width, in_channels, local_window=2, global_window=2, pad_lat=4, pad_lon=4, dim_head=8
        )
    raise ValueError(f"step: unknown model {name!r}; choose from {STEP_MODELS}")


def _all_reduce_grads(model: nn.Module) -> None:
    """CREDIT-style: every parameter gradient summed over the ranks in one flat all-reduce."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _reference_run(model: nn.Module, x: torch.Tensor, world: int) -> tuple[torch.Size, bool]:
    """One forward of a copy of ``model`` on the whole field: the output shape, and whether
    CREDIT-style plain halo convs are right on ``world`` even shards of ``x``: every strided conv's
    input rows must split into equal shards that are multiples of its stride, every halo conv's
    shards hold its halo (the plain path has no uneven-shard geometry). Decided from the global
    shapes: the same on every rank."""
    fits = [True]

    def check(mod: nn.Module, inputs: tuple) -> None:
        h, s, halo = inputs[0].shape[-2], mod.stride[0], (mod.kernel_size[0] - 1) // 2
        if (s > 1 and h % (world * s)) or h < world * max(halo, 1):
            fits[0] = False

    probe = copy.deepcopy(model)
    hooks = [m.register_forward_pre_hook(check) for m in probe.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        out = probe(x)
    for hook in hooks:
        hook.remove()
    return out.shape, fits[0]


def _steps(name: str, field: tuple[int, ...], cfg: StepConfig, manager, rank: int, world: int):
    """``({variant: step() -> local output}, {variant: compile seconds}, reference output rows)``."""
    from .. import shard_tensor
    from ..convert import convert_to_domain_parallel
    from ..geometry import chunk_range
    from ..gradsync import overlap_gradient_reduction
    from ..parallelize import reduce_gradients
    from .bench_plain import plain_wrap

    b, c, h, w = field
    torch.manual_seed(0)
    plain = build_model(name, c, cfg.width).train()
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1))
    out_shape, plain_fits = _reference_run(plain, x, world)
    g = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))
    lo, hi = chunk_range(h, world, rank)
    steps: dict[str, Callable] = {}

    one = copy.deepcopy(plain)

    def step_one():
        if rank != 0:
            return None
        one.zero_grad(set_to_none=True)
        y = one(x)
        y.backward(g)
        return y

    steps["one"] = step_one

    xl, gl = x[:, :, lo:hi].contiguous(), g[:, :, lo:hi].contiguous()
    try:  # no plain path where CREDIT's wrappers do not apply: even kernels, or uneven strided shards
        wrapped = plain_wrap(copy.deepcopy(plain), rank, world) if plain_fits else None
    except ValueError:
        wrapped = None
    if wrapped is not None:

        def step_plain():
            wrapped.zero_grad(set_to_none=True)
            y = wrapped(xl)
            y.backward(gl)
            _all_reduce_grads(wrapped)
            return y

        steps["plain"] = step_plain

    xd, gd = shard_tensor(x, manager, 2), shard_tensor(g, manager, 2)

    def dtensor_step(model: nn.Module, converted: nn.Module) -> Callable:
        def step():
            converted.zero_grad(set_to_none=True)
            y = model(xd)
            y.backward(gd)
            reduce_gradients(converted, manager)
            return y.to_local()

        return step

    converted = convert_to_domain_parallel(copy.deepcopy(plain), manager)
    steps["eager"] = dtensor_step(converted, converted)
    overlapped = convert_to_domain_parallel(copy.deepcopy(plain), manager)
    overlap_gradient_reduction(overlapped, manager)
    steps["overlap"] = dtensor_step(overlapped, overlapped)
    compile_s: dict[str, float] = {}
    if cfg.backends:
        torch._dynamo.reset()
    for backend in cfg.backends:
        conv_b = convert_to_domain_parallel(copy.deepcopy(plain), manager)
        step = dtensor_step(torch.compile(conv_b, backend=backend, dynamic=False), conv_b)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        compile_s[backend] = time.perf_counter() - t0
        steps[backend] = step
    with torch.no_grad():
        ref = copy.deepcopy(plain)(x)[:, :, lo:hi]
    return (
        steps,
        compile_s,
        ref,
        _param_storages(one, *([wrapped] if wrapped is not None else []), converted, overlapped),
    )


def _count_collectives(step: Callable) -> tuple[int, int]:
    """(process-group calls, bytes sent) of one step on this rank."""
    from .bench_wire import WireCounter, intercept

    counter = WireCounter()
    with intercept(counter):
        step()
    return sum(counter.calls.values()), sum(counter.sent.values())


def _param_storages(*models: nn.Module) -> set[int]:
    from torch.distributed.tensor import DTensor

    out = set()
    for m in models:
        for p in m.parameters():
            local = p._local_tensor if isinstance(p, DTensor) else p
            out.add(local.untyped_storage().data_ptr())
    return out


def _saved_bytes(step: Callable, params: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward during one step on this rank
    (local shards of DTensors; a tensor saved by several nodes counts once): the activation memory
    a step holds at its peak, parameters aside."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t._local_tensor if isinstance(t, DTensor) else t
        if local.numel():
            storage = local.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def bench_step_case(name: str, field: tuple[int, ...], cfg: StepConfig, manager, rank: int, world: int) -> list[dict]:
    """The rows of one model and field; a model that cannot run exactly on these shards (windows
    that do not fit: a clear error, raised on every rank before any message) gives one ``skipped``
    row with the reason instead of ending the benchmark."""
    from ..errors import DomainParallelError

    try:
        return _bench_step_case(name, field, cfg, manager, rank, world)
    except DomainParallelError as exc:
        return [
            {"bench": "step", "model": name, "field": list(field), "world": world, "rank": rank, "skipped": str(exc)}
        ]


def _bench_step_case(name: str, field: tuple[int, ...], cfg: StepConfig, manager, rank: int, world: int) -> list[dict]:
    steps, compile_s, ref, params = _steps(name, field, cfg, manager, rank, world)
    diffs: dict[str, float] = {}
    counts: dict[str, tuple[int, int]] = {}
    saved: dict[str, int | None] = {}
    for n, step in steps.items():
        dist.barrier()
        y = step()
        if n != "one":  # the reference itself
            diffs[n] = float((y.detach() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            step()  # the second call makes one-time agreements (a norm's fold decision): not per step
        counts[n] = (0, 0) if n == "one" else _count_collectives(step)
        saved[n] = (
            _saved_bytes(step, params) if n in ("one", "plain", "eager", "overlap") else None
        )  # compiled: inside the graph
    what = {"model": name}
    rows = timed_rows("step", what, field, world, rank, cfg.threads, steps, cfg, compile_s)
    return [
        {
            **r,
            "width": cfg.width,
            "collectives": counts[n][0],
            "sent_bytes": counts[n][1],
            "saved_bytes": saved[n],
            "max_rel_diff_vs_one": diffs.get(n),
        }
        for n, r in rows.items()
    ]


def step_rows(cfg: StepConfig, manager, rank: int, world: int) -> list[dict]:
    with rank_compile_cache(rank):
        return [
            row
            for field in cfg.fields
            for name in cfg.models
            for row in bench_step_case(name, field, cfg, manager, rank, world)
        ]


def run_step(cfg: StepConfig, timeout: float = 3600.0) -> list[dict]:
    """Spawn one gloo world per domain size; every rank's rows."""
    return run_worlds(step_rows, cfg, timeout)


def summarize_step(rows: list[dict]) -> list[dict]:
    """One row per (model, field, world, variant): medians of the per-repetition max over ranks."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "skipped" in r:
            continue
        groups.setdefault((r["model"], tuple(r["field"]), r["world"], r["variant"]), []).append(r)
    out = []
    one_time: dict[tuple, float] = {}
    for (model, field, world, variant), rs in groups.items():
        reps = len(rs[0]["times_s"])
        wall = statistics.median(max(r["times_s"][i] for r in rs) for i in range(reps))
        cpu = statistics.median(max(r["cpu_s"][i] for r in rs) for i in range(reps))
        if variant == "one":
            one_time[(model, field, world)] = wall
        diffs = [r["max_rel_diff_vs_one"] for r in rs if r["max_rel_diff_vs_one"] is not None]
        out.append(
            {
                "model": model,
                "field": list(field),
                "world": world,
                "variant": variant,
                "step_s": wall,
                "cpu_s": cpu,
                "compile_s": max((r["compile_s"] or 0.0) for r in rs) or None,
                "collectives": max(r["collectives"] for r in rs),
                "sent_bytes": max(r["sent_bytes"] for r in rs),
                "saved_mib": max((r.get("saved_bytes") or 0) for r in rs) / 2**20 or None,
                "max_rel_diff": max(diffs) if diffs else None,
            }
        )
    for s in out:
        base = one_time.get((s["model"], tuple(s["field"]), s["world"]))
        s["speedup"] = base / s["step_s"] if base and s["variant"] != "one" else None
        s["efficiency"] = s["speedup"] / s["world"] if s["speedup"] else None
    return out
