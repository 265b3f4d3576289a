"""``plan``: the audit of a plain model (see :mod:`credit_dtensor.audit`)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten

from ..converters import Converter, converter_for
from ..errors import DomainParallelError
from ..geometry import chunk_range, chunk_sizes
from ..mesh import DomainParallelManager
from ..nn._base import DomainParallelModule
from ..nn.local import block_fits, window_height
from ..ops.family import families
from .report import Plan, PlanRow
from .tracker import HTracker

__all__ = ["plan"]

logger = logging.getLogger("credit_dtensor.audit")


def _halo_counts(needs: Sequence[Sequence[int | None]], n: int, world: int) -> tuple[int, int]:
    up = down = 0
    for r, rows in enumerate(needs):
        a, b = chunk_range(n, world, r)
        up = max(up, sum(1 for g in rows if g is not None and g < a))
        down = max(down, sum(1 for g in rows if g is not None and g >= b))
    return up, down


def _conv_row(row: PlanRow, mod: nn.Module, world: int, needed: bool) -> None:
    from ..ops.conv_spec import conv_spec_from_module, needs

    spec = conv_spec_from_module(mod)
    if spec.transposed and row.in_shape and row.out_shape:  # output_size= may set output_padding
        nd, i = spec.nd, max(spec.nd - 2, 0)
        n_in, n_out = row.in_shape[-nd + i], row.out_shape[-nd + i]
        base = (n_in - 1) * spec.stride[i] - 2 * spec.pad_lo[i] + spec.dilation[i] * (spec.kernel[i] - 1) + 1
        op = list(spec.output_padding)
        op[i] = max(n_out - base, 0)
        spec = conv_spec_from_module(mod, output_padding=tuple(op))
    if row.in_shape is None:
        row.rule = "halo" if needed else "local"
        return
    i = max(spec.nd - 2, 0)
    n = row.in_shape[-spec.nd + i]
    row.halo = _halo_counts(needs(spec, i, n, world), n, world)
    row.rule = "halo" if any(row.halo) else "local"
    if not needed:
        row.notes.append("no wrapper needed: exact functional rule")
        if any(row.halo):
            row.notes.append("shards not stride-aligned here: a few rows move")
    sizes = chunk_sizes(n, world)
    if any(row.halo) and 0 < min(s for s in sizes if s) < max(row.halo):
        row.notes.append(f"shards {sizes} thinner than the halo: rows from beyond the neighbours")


def _pad_row(row: PlanRow, mod: nn.Module, world: int) -> None:
    from ..geometry.pad import normalize_pad_mode, pad_sources

    row.rule = "re-chunk"
    pads = tuple(mod.padding)
    if row.in_shape is None or len(pads) < 2:
        return
    nd = len(pads) // 2
    lo, hi = (pads[2], pads[3]) if nd >= 2 else (pads[0], pads[1])
    n = row.in_shape[-2] if nd >= 2 else row.in_shape[-1]
    mode = {
        "_ConstantPadNd": "constant",
        "_ReflectionPadNd": "reflect",
        "_ReplicationPadNd": "replicate",
        "_CircularPadNd": "circular",
    }
    m = next((v for k, v in mode.items() if any(c.__name__ == k for c in type(mod).__mro__)), "constant")
    n_out = n + lo + hi
    needs = [pad_sources(*chunk_range(n_out, world, r), n, lo, hi, normalize_pad_mode(m)) for r in range(world)]
    row.halo = _halo_counts(needs, n, world)
    if (lo, hi) == (0, 0):
        row.notes.append("no H padding")


def _max_domain(constraints: list[tuple[int, int]], domain: int) -> int | None:
    for d in range(domain, 0, -1):
        if all(block_fits(n, d, b) for n, b in constraints):
            return d
    return None


def plan(
    model: nn.Module,
    manager_or_domain_size: DomainParallelManager | int,
    input_shape: Sequence[int],
    *,
    shard_dim: int = -2,
    dtype: torch.dtype = torch.float32,
    custom_converters: dict[type, Any] | None = None,
    extra_inputs: Sequence[Any] = (),
) -> Plan:
    """Audit the plain ``model`` for inputs of ``input_shape`` split over a domain (see module doc).

    Returns a :class:`Plan` (``plan.ok``, ``plan.rows``, ``plan.hazards``, ``print(plan)``).
    ``custom_converters`` (the ones you will pass to the converter) mark their modules ``custom``.
    ``extra_inputs``: the forward's further positional arguments (a diffusion model's time, a
    static field), passed after the traced input as given (floating tensors in ``dtype``); they
    are full on every rank, not sharded.
    """
    if not isinstance(model, nn.Module):
        raise DomainParallelError(
            f"plan: expected an nn.Module, got {type(model).__name__}: pass the plain model (a model factory "
            "must return an nn.Module)"
        )
    domain = (
        manager_or_domain_size.domain_world_size
        if isinstance(manager_or_domain_size, DomainParallelManager)
        else int(manager_or_domain_size)
    )
    if domain < 1:
        raise DomainParallelError(f"plan: domain size {domain} must be >= 1")
    shape = tuple(int(s) for s in input_shape)
    hdim = shard_dim % len(shape)
    if any(isinstance(m, DomainParallelModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    ):
        raise DomainParallelError("plan: the model is already converted; audit the plain model (before conversion)")
    custom = tuple(custom_converters or ())
    traced, traced_on, trace_error, tracker, order = _trace(model, shape, hdim, dtype, domain, tuple(extra_inputs))
    rows: dict[str, PlanRow] = {}

    def row_for(path: str, mod: nn.Module) -> PlanRow:
        if path not in rows:
            base = traced.get(path)
            rows[path] = PlanRow(path, type(mod).__name__, "")
            if base is not None:
                rows[path].in_shape, rows[path].out_shape, rows[path].calls = base.in_shape, base.out_shape, base.calls
        return rows[path]

    opaque: dict[str, int] = {}  # shard-local / custom subtrees: their insides run locally
    constraints: list[tuple[int, int]] = []
    for path, mod in model.named_modules():
        if any(path.startswith(p + ".") for p in opaque):
            continue
        if custom and isinstance(mod, custom):
            row = row_for(path, mod)
            row.rule = "custom"
            row.notes.append("custom converter: its subtree is not audited")
            opaque[path] = -1
            continue
        conv = converter_for(mod)
        needed = conv is not None and conv.applies(mod)
        if conv is None and list(mod.children()):
            continue
        row = row_for(path, mod)
        if needed and not _is_shard_local(conv) and conv.family != "linear":
            opaque[path] = -1  # the wrapper replaces its forward: what torch's forward does inside is moot
        if conv is not None and conv.family == "conv":
            _conv_row(row, mod, domain, needed)
        elif conv is not None and conv.family == "norm":
            row.rule = "distributed stats" if needed else "local"
        elif conv is not None and conv.family == "pad":
            _pad_row(row, mod, domain)
        elif conv is not None and conv.family == "resample":
            row.rule = "resample"
            row.notes.append("exact resample rule (halo rows from the op's taps)")
        elif conv is not None and _is_shard_local(conv) and needed:
            block = window_height(mod) or 1
            row.rule, row.min_local_h = "shard-local", block
            opaque[path] = block
            n = _module_h(tracker, path)
            if n is not None and block > 1:
                constraints.append((n, block))
                if not block_fits(n, domain, block):
                    row.errors.append(
                        f"windows of {block} rows do not fit the shards {chunk_sizes(n, domain)} of H={n} here: "
                        f"every shard needs a multiple of {block} rows"
                    )
        elif conv is not None and needed and conv.family != "linear":
            row.rule = "custom"
            row.notes.append(f"converted by {getattr(conv.factory, '__name__', conv.factory)} ({conv.family})")
        elif isinstance(mod, nn.SyncBatchNorm):
            row.rule = "unsupported"
            row.errors.append("nn.SyncBatchNorm has no domain-parallel wrapper: use nn.BatchNorm2d")
        elif (why := _refused_module(mod)) is not None:
            row.rule = "unsupported"
            row.hazards.append(f"{type(mod).__name__} mixes rows along H and has no exact rule ({why})")
        else:
            row.rule = "local"
        _global_pool_hazard(row, mod)
        if row.calls == 0 and traced:
            row.notes.append("not called in the traced forward")

    _attach_events(rows, row_for, tracker, opaque, domain, model)
    for r in rows.values():
        r.rule = r.rule or "local"
    errors: list[str] = [trace_error] if trace_error else []
    max_domain = _max_domain(constraints, domain) if constraints else domain
    bad = [r for r in rows.values() if r.errors]
    if bad:
        hint = f"use at most {max_domain} domain ranks" if max_domain else "no domain size fits"
        errors.append(
            f"{len(bad)} module(s) need a local H that the shards of this input do not provide "
            f"(first: {bad[0].path}): {hint}, or change the input size / window sizes"
        )
    ordered = sorted(rows.values(), key=lambda r: order.get(r.path, len(order)))
    return Plan(type(model).__name__, shape, domain, hdim, ordered, traced_on, errors, max_domain)


def _global_pool_hazard(row: PlanRow, mod: nn.Module) -> None:
    """Adaptive pooling to one row along H: exact (an all-reduce), but the result is not sharded."""
    pools = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
    if isinstance(mod, pools) and row.in_shape and row.out_shape and len(row.in_shape) >= 3:
        i = -2 if len(row.in_shape) >= 4 else -1
        if row.out_shape[i] == 1 and row.in_shape[i] > 1:
            row.notes.append(
                f"global pooling over H ({type(mod).__name__} to 1 row): exact, one all-reduce of the pooled "
                "tensor; the output is Replicate (flatten + Linear heads and gates work on it)"
            )


def _refused_module(mod: nn.Module) -> str | None:
    """Why ``mod``'s class has no exact rule, from the op-family descriptors (``None``: it has one)."""
    for fam in families():
        for t, why in fam.refused_modules.items():
            if isinstance(mod, t):
                return why
    return None


def _is_shard_local(conv: Converter) -> bool:
    from ..nn.local import DomainParallelShardLocal, shard_local

    return conv.factory is shard_local or conv.factory is DomainParallelShardLocal


def _module_h(tracker: HTracker | None, path: str) -> int | None:
    return None if tracker is None else tracker.module_h.get(path)


def _attach_events(rows, row_for, tracker, opaque, domain, model) -> None:
    if tracker is None:
        return
    seen: set[tuple[str, str]] = set()
    inside: dict[str, list[str]] = {}  # shard-local owner -> short descriptions of what it does locally
    for path, kind, msg, block in tracker.events:
        if (path, msg) in seen:
            continue
        seen.add((path, msg))
        owner = next((p for p in sorted(opaque, key=len) if path == p or path.startswith(p + ".")), None)
        if owner is not None:
            if kind != "note" and opaque[owner] >= 0:
                short = {"split": f"windows of {block} rows", "merge": "H merged into windows"}.get(kind, msg)
                if short not in inside.setdefault(owner, []):
                    inside[owner].append(short)
            continue
        row = row_for(path, model.get_submodule(path) if path else model)
        if kind == "note":
            row.notes.append(msg)
        elif kind == "unknown":
            row.notes.append(msg)
            if row.rule in ("", "local"):
                row.rule = "unknown"
        elif kind == "split":
            n = _module_h(tracker, path)
            fits = n is not None and block_fits(n, domain, block or 1)
            row.hazards.append(
                f"{msg}: exact only if each shard holds whole windows"
                + (" (these shards do)" if fits else "")
                + "; declare the module shard-local"
            )
            row.min_local_h = max(row.min_local_h, block or 0)
        elif kind == "merge":
            row.hazards.append(
                f"{msg}: raises DomainParallelError when run; declare the module shard-local if each window "
                "lies in one shard (docs/patterns.md, 'Window reshapes')"
            )
        else:
            row.hazards.append(msg)
    for owner, items in inside.items():
        rows[owner].notes.append("runs on each shard's rows: " + "; ".join(items))


def _trace(model: nn.Module, shape: tuple[int, ...], hdim: int, dtype: torch.dtype, domain: int = 2, extra: tuple = ()):
    """Run the model once with hooks and the H tracker: on meta first, then on real CPU zeros."""
    last_error = ""
    for device in ("meta", "cpu"):
        try:
            return _trace_on(model, shape, hdim, dtype, device, domain, extra)
        except Exception as exc:  # noqa: BLE001 - fall back, then report
            last_error = f"{type(exc).__name__}: {exc}"
            logger.info("plan: tracing on %s failed (%s)", device, last_error)
    return {}, "none", f"the model could not be traced ({last_error}): static audit only, shapes unknown", None, {}


def _first_tensor(x: Any) -> torch.Tensor | None:
    return next((a for a in tree_flatten(x)[0] if isinstance(a, torch.Tensor)), None)


def _trace_on(
    model: nn.Module,
    shape: tuple[int, ...],
    hdim: int,
    dtype: torch.dtype,
    device: str,
    domain: int = 2,
    extra: tuple = (),
):
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    stack: list[str] = []
    tracker = HTracker(stack, domain)
    rows: dict[str, PlanRow] = {}
    order: dict[str, int] = {}
    handles = []

    def pre(module: nn.Module, args: tuple, path: str) -> None:
        stack.append(path)
        order.setdefault(path, len(order))
        row = rows.setdefault(path, PlanRow(path, type(module).__name__, ""))
        t = _first_tensor(args)
        if row.calls == 0 and t is not None:
            row.in_shape = tuple(t.shape)
            h = tracker.get(t)
            if h is not None:
                tracker.module_h[path] = t.shape[h]
        row.calls += 1

    def post(module: nn.Module, args: tuple, out: Any, path: str) -> None:
        row = rows[path]
        t = _first_tensor(out)
        if row.out_shape is None:
            row.out_shape = tuple(t.shape) if t is not None else None
        t_in = _first_tensor(args)
        h = tracker.get(t_in)
        if h is not None and t is not None and tracker.get(t) is None and t.ndim > h and t.shape[h] == t_in.shape[h]:
            conv = converter_for(module)
            if conv is not None and _is_shard_local(conv) and conv.applies(module):
                tracker.mark(t, h)  # a shard-local module keeps each rank's rows: follow H past it
        stack.pop()

    for path, mod in m.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda mod_, a, p=path: pre(mod_, a, p)))
        handles.append(mod.register_forward_hook(lambda mod_, a, o, p=path: post(mod_, a, o, p)))
    x = torch.zeros(shape, dtype=dtype, device=device)
    args = tuple(
        (a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device=device))
        if isinstance(a, torch.Tensor)
        else a
        for a in extra
    )
    m.eval()
    try:
        with torch.no_grad(), tracker:
            tracker.mark(x, hdim)
            m(x, *args)
    finally:
        for hd in handles:
            hd.remove()
    return rows, device, "", tracker, order
