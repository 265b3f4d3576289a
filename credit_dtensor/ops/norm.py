"""Exact group / instance / batch / layer normalization on sharded DTensors: only statistics travel.

PyTorch 2.13 all-gathers a ``Shard(H)`` activation for these ops (full-size memory on every rank)
and has no ``native_group_norm_backward`` rule without affine. Here every rank reduces its own
rows to per-statistic ``(mean, M2)`` and one sum all-reduce of a ``(world, 2, Q)`` buffer (each
rank writes its own slot) gives every rank all partial moments; they are merged locally with
Chan's formula ``M2 = sum M2_r + sum n_r (mean_r - mean)^2`` (never ``E[x^2] - E[x]^2``), in the
same order everywhere, so the statistics -- and running stats -- are bitwise identical on every
domain rank. Counts ``n_r`` come from geometry (global per statistic), so uneven and empty shards
are exact. Backward is the analytic adjoint with one all-reduce of ``(sum g, sum g*xhat)`` per
statistic. Traffic: forward ``world * 2 * Q`` scalars, backward ``2 * Q``, ``Q = N*G`` (group),
``C`` (batch) or ``prod(leading dims)`` (layer): never an activation.

Two entry points share the math:

- ``group_norm`` / ``instance_norm`` / ``batch_norm`` / ``layer_norm`` below: autograd-level
  functions on DTensors (same signatures as ``torch.nn.functional``), used by the module wrappers.
- rules for ``aten.native_{group,batch,layer}_norm`` and their backward ops, so ``F.group_norm``
  etc. called directly on a sharded DTensor are exact too (below autograd: explicit adjoints).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from .. import comm, stats
from ..errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from ..geometry import chunk_range
from ..geometry.norm import NormLayout
from ..sharding import contiguous_stride
from ._dispatch import register_rule

__all__ = ["group_norm", "instance_norm", "batch_norm", "layer_norm", "NormPlan", "plan_norm"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# Where the statistics live
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormPlan:
    """One call's geometry and communication: ``counts`` is ``None`` when statistics are local."""

    mesh: DeviceMesh
    layout: NormLayout
    dim: int | None  # sharded tensor dim, None when the input is replicated
    counts: tuple[int, ...] | None
    label: str  # names the layer in error messages
    op: str  # key of the traffic in ``comm_stats().by_op``

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    @property
    def world(self) -> int:
        return self.mesh.size()

    @property
    def placement(self) -> Placement:
        return Replicate() if self.dim is None else Shard(self.dim)

    @property
    def param_grad_placement(self) -> Placement:
        """Sharded input: each rank holds part of a parameter's gradient (summed later)."""
        return Replicate() if self.dim is None else Partial()

    def local_range(self) -> tuple[int, int]:
        assert self.dim is not None
        return chunk_range(self.layout.shape[self.dim], self.world, self.rank)


def plan_norm(x: DTensor, layout: NormLayout, label: str, op: str | None = None) -> NormPlan:
    """Check ``x``'s placement (clear errors for what we cannot do exactly) and plan the call."""
    op = op or f"{layout.kind}_norm"
    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise UnsupportedShardingError(
            f"{label}: input lives on a {mesh.ndim}-D mesh with placements {x.placements}; expected a DTensor on "
            "the 1-D domain mesh: shard activations with the manager's domain mesh (shard_tensor/shard_batch)"
        )
    p = x.placements[0]
    if isinstance(p, Replicate):
        return NormPlan(mesh, layout, None, None, label, op)
    if not isinstance(p, Shard) or type(p) is not Shard:
        raise UnsupportedShardingError(
            f"{label}: input placement {p!r} is not supported; expected Shard(spatial dim) or Replicate: "
            "redistribute the input first"
        )
    dim = p.dim % len(layout.shape)
    if dim == layout.channel_dim:
        raise UnsupportedShardingError(
            f"{label}: input is sharded on channels (Shard(1)); a channel group's statistics would span ranks "
            "and channel sharding is not supported: shard on a spatial dim instead, e.g. "
            "x.redistribute(mesh, [Shard(2)])"
        )
    counts = layout.rank_counts(dim, mesh.size()) if mesh.size() > 1 else None
    return NormPlan(mesh, layout, dim, None if counts is None else tuple(counts), label, op)


def _check_param(p: torch.Tensor | None, plan: NormPlan, name: str) -> None:
    if isinstance(p, DTensor):
        if p.device_mesh != plan.mesh:
            raise MeshMismatchError(
                f"{plan.label}: {name} lives on mesh {p.device_mesh} but the input on {plan.mesh}: "
                "convert the module (or distribute the parameter) with the manager that shards the input"
            )
        if not all(isinstance(q, Replicate) for q in p.placements):
            raise UnsupportedShardingError(
                f"{plan.label}: {name} has placements {p.placements}; normalization parameters must be "
                "Replicate on the domain mesh: use the module wrappers or distribute_tensor(p, mesh, [Replicate()])"
            )


# ---------------------------------------------------------------------------------------------
# Local math (no autograd): statistics, normalization, and the adjoint of xhat
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _moments(xv: torch.Tensor, plan: NormPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per statistic of a canonical ``(P, Q, R)`` view."""
    p, q, r = xv.shape
    n = p * r
    if n:
        mean = xv.sum((0, 2)) / n
        m2 = (xv - mean.view(1, q, 1)).square().sum((0, 2))
    else:  # empty shard: contributes count 0, still joins the collective
        mean = m2 = xv.new_zeros(q)
    if plan.counts is None:
        return mean, m2 / n
    buf = xv.new_zeros(plan.world, 2, q)
    buf[plan.rank, 0] = mean
    buf[plan.rank, 1] = m2
    with stats.op_label(plan.op):
        comm.all_reduce_sum(buf, plan.group)
    cnt = torch.tensor(plan.counts, dtype=xv.dtype, device=xv.device).view(-1, 1)
    total = sum(plan.counts)
    mean = (cnt * buf[:, 0]).sum(0) / total
    m2 = buf[:, 1].sum(0) + (cnt * (buf[:, 0] - mean).square()).sum(0)
    return mean, m2 / total


def _count(plan: NormPlan, local_shape: Sequence[int]) -> int:
    """Elements per statistic: global when distributed, else this rank's."""
    if plan.counts is not None:
        return sum(plan.counts)
    p, _, r = plan.layout.canonical(tuple(local_shape))
    return p * r


def _normalize(x: torch.Tensor, plan: NormPlan, eps: float) -> tuple[torch.Tensor, ...]:
    """``(xhat in the canonical view, mean, biased var, rstd)`` of a local shard."""
    p, q, r = plan.layout.canonical(tuple(x.shape))
    xv = x.reshape(p, q, r).to(_acc_dtype(x.dtype))
    mean, var = _moments(xv, plan)
    rstd = torch.rsqrt(var + eps)
    xhat = (xv - mean.view(1, q, 1)) * rstd.view(1, q, 1)
    return xhat, mean, var, rstd


def _xhat_backward(gv: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, n: int, plan: NormPlan) -> torch.Tensor:
    """Adjoint of ``x -> xhat`` (statistics included) in the canonical view: one all-reduce."""
    q = gv.shape[1]
    sums = torch.stack([gv.sum((0, 2)), (gv * xhat).sum((0, 2))])
    if plan.counts is not None:
        with stats.op_label(plan.op):
            comm.all_reduce_sum(sums, plan.group)
    mg = (sums[0] / n).view(1, q, 1)
    mgx = (sums[1] / n).view(1, q, 1)
    return (gv - mg - xhat * mgx) * rstd.view(1, q, 1)


def _param_view(t: torch.Tensor, layout: NormLayout, ndim: int) -> torch.Tensor:
    """Broadcast a per-channel (group/batch) or normalized-shape (layer) tensor against the input."""
    if layout.kind == "layer":
        return t
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _layer_param_slice(t: torch.Tensor, plan: NormPlan) -> torch.Tensor:
    """This rank's rows of a layer-norm weight when the sharded dim is a normalized dim."""
    lead = len(plan.layout.shape) - plan.layout.norm_ndim
    if plan.layout.kind != "layer" or plan.dim is None or plan.dim < lead:
        return t
    a, b = plan.local_range()
    return t.narrow(plan.dim - lead, a, b - a)


# ---------------------------------------------------------------------------------------------
# Autograd-level functions (module wrappers)
# ---------------------------------------------------------------------------------------------


class _Normalize(torch.autograd.Function):
    """``x -> (xhat, mean, var)`` with distributed statistics; backward = exact adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: NormPlan, eps: float):  # type: ignore[override]
        xhat, mean, var, _rstd = _normalize(x, plan, eps)
        ctx.save_for_backward(xhat, _rstd)
        ctx.plan, ctx.shape, ctx.dtype = plan, x.shape, x.dtype
        mean, var = mean.detach(), var.detach()
        ctx.mark_non_differentiable(mean, var)
        return xhat.reshape(x.shape).to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, g: torch.Tensor, _gm: torch.Tensor, _gv: torch.Tensor):  # type: ignore[override]
        xhat, rstd = ctx.saved_tensors
        gv = g.reshape(xhat.shape).to(xhat.dtype)
        dx = _xhat_backward(gv, xhat, rstd, _count(ctx.plan, ctx.shape), ctx.plan)
        return dx.reshape(ctx.shape).to(ctx.dtype), None, None


class _SumGrad(torch.autograd.Function):
    """Identity whose backward all-reduces the gradient: a plain-tensor parameter used with a
    sharded activation gets each rank's partial gradient summed (otherwise silently wrong)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, plan: NormPlan):  # type: ignore[override]
        ctx.plan = plan
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        g = g.clone()
        with stats.op_label(ctx.plan.op):
            comm.all_reduce_sum(g, ctx.plan.group)
        return g, None


def _param_local(p: torch.Tensor | None, plan: NormPlan, name: str) -> torch.Tensor | None:
    if p is None:
        return None
    _check_param(p, plan, name)
    if isinstance(p, DTensor):
        return p.to_local(grad_placements=[plan.param_grad_placement])
    if plan.dim is not None and p.requires_grad and torch.is_grad_enabled() and plan.world > 1:
        return _SumGrad.apply(p, plan)
    return p


def _wrap(local: torch.Tensor, plan: NormPlan, shape: Sequence[int]) -> DTensor:
    shape = torch.Size(shape)
    return DTensor.from_local(
        local, plan.mesh, [plan.placement], run_check=False, shape=shape, stride=contiguous_stride(shape)
    )


def _affine(xhat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, plan: NormPlan) -> torch.Tensor:
    w = _param_local(weight, plan, "weight")
    b = _param_local(bias, plan, "bias")
    y = xhat
    if w is not None:
        y = y * _param_view(_layer_param_slice(w, plan), plan.layout, xhat.ndim)
    if b is not None:
        y = y + _param_view(_layer_param_slice(b, plan), plan.layout, xhat.ndim)
    return y


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    label: str = "group_norm",
) -> torch.Tensor:
    """``F.group_norm`` for a DTensor sharded on a spatial dim (or replicated); exact, autograd-aware."""
    if not isinstance(input, DTensor):
        return F.group_norm(input, num_groups, weight, bias, eps)
    shape = tuple(input.shape)
    if len(shape) < 2 or num_groups < 1 or shape[1] % num_groups:
        raise DomainParallelError(
            f"{label}: {shape[1] if len(shape) > 1 else '?'} channels of input {shape} are not divisible "
            f"by num_groups={num_groups}: choose a divisor of the channel count"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (shape[1],):
            raise DomainParallelError(f"{label}: {name} shape {tuple(t.shape)} != ({shape[1]},) channels")
    plan = plan_norm(input, NormLayout("group", shape, groups=num_groups), label, "group_norm")
    xhat, _, _ = _Normalize.apply(input.to_local(), plan, eps)
    return _wrap(_affine(xhat, weight, bias, plan), plan, shape)


def _running_update(running: torch.Tensor | None, value: torch.Tensor, momentum: float) -> None:
    """``running = momentum * value + (1 - momentum) * running`` in place (plain or DTensor buffer)."""
    if running is None:
        return
    with torch.no_grad():
        r = running.to_local() if isinstance(running, DTensor) else running
        r.copy_(momentum * value.to(r.dtype) + (1 - momentum) * r)


def _batch_mean(t: torch.Tensor, plan: NormPlan) -> torch.Tensor:
    """Mean over the (possibly batch-sharded) dim 0 of per-sample statistics ``(N_local, C)``."""
    s = t.sum(0)
    if plan.dim == 0 and plan.world > 1:
        with stats.op_label(plan.op):
            comm.all_reduce_sum(s, plan.group)
    return s / plan.layout.shape[0]


def _fixed_stats(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize with given per-channel statistics (eval): pointwise, no communication."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    acc = _acc_dtype(x.dtype)
    rstd = torch.rsqrt(var.detach().to(acc) + eps)
    return ((x.to(acc) - mean.detach().to(acc).reshape(shape)) * rstd.reshape(shape)).to(x.dtype)


def _local_buffer(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


def _verify_size(shape: Sequence[int], first: int, what: str, label: str) -> None:
    """torch's ``_verify_batch_size`` / ``_verify_spatial_size`` on the *global* shape."""
    prod = shape[0] if first == 0 else 1
    for s in shape[2:]:
        prod *= s
    if prod == 1:
        raise DomainParallelError(f"{label}: expected more than 1 {what} when training, got input size {list(shape)}")


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    label: str = "batch_norm",
) -> torch.Tensor:
    """``F.batch_norm`` on a sharded DTensor: training statistics over (N, H, W, ...) across the domain
    group; running stats (unbiased variance, as torch) updated identically on every rank."""
    if not isinstance(input, DTensor):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    shape = tuple(input.shape)
    c = shape[1] if len(shape) > 1 else None
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise DomainParallelError(f"{label}: {name} shape {tuple(t.shape)} != ({c},) channels of input {shape}")
    plan = plan_norm(input, NormLayout("batch", shape), label)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_param(t, plan, name)
    x = input.to_local()
    if training:
        _verify_size(shape, 0, "value per channel", label)
        xhat, mean, var = _Normalize.apply(x, plan, eps)
        n = plan.layout.count()
        if running_mean is not None or running_var is not None:
            _running_update(running_mean, mean, momentum)
            _running_update(running_var, var * (n / max(n - 1, 1)), momentum)
    else:
        if running_mean is None or running_var is None:
            raise DomainParallelError(f"{label}: running_mean and running_var are required when training=False")
        xhat = _fixed_stats(x, _local_buffer(running_mean), _local_buffer(running_var), eps)
    return _wrap(_affine(xhat, weight, bias, plan), plan, shape)


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    label: str = "instance_norm",
) -> torch.Tensor:
    """``F.instance_norm`` on a sharded DTensor (group norm with one channel per group, plus running
    stats averaged over the batch exactly like torch)."""
    if not isinstance(input, DTensor):
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    shape = tuple(input.shape)
    if len(shape) < 3:
        raise DomainParallelError(f"{label}: expected (N, C, *spatial) input, got shape {shape}")
    c = shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise DomainParallelError(f"{label}: {name} shape {tuple(t.shape)} != ({c},) channels of input {shape}")
    layout = NormLayout("group", shape, groups=c)
    plan = plan_norm(input, layout, label, "instance_norm")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_param(t, plan, name)
    x = input.to_local()
    if use_input_stats:
        _verify_size(shape, 2, "spatial element", label)
        xhat, mean, var = _Normalize.apply(x, plan, eps)
        if running_mean is not None or running_var is not None:
            n = layout.count()
            nl = x.shape[0]
            _running_update(running_mean, _batch_mean(mean.view(nl, c), plan), momentum)
            _running_update(running_var, _batch_mean((var * (n / max(n - 1, 1))).view(nl, c), plan), momentum)
    else:
        if running_mean is None or running_var is None:
            raise DomainParallelError(f"{label}: running_mean and running_var are required when use_input_stats=False")
        xhat = _fixed_stats(x, _local_buffer(running_mean), _local_buffer(running_var), eps)
    return _wrap(_affine(xhat, weight, bias, plan), plan, shape)


def _check_normalized_shape(shape: Sequence[int], normalized_shape: Sequence[int], label: str) -> tuple[int, ...]:
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    if not ns or len(ns) > len(shape) or tuple(shape[len(shape) - len(ns) :]) != ns:
        raise DomainParallelError(
            f"{label}: normalized_shape {list(ns)} does not match the trailing dims of the input shape "
            f"{list(shape)}: it must equal input.shape[-{max(len(ns), 1)}:]"
        )
    return ns


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    label: str = "layer_norm",
) -> torch.Tensor:
    """``F.layer_norm`` on a sharded DTensor. Exact across ranks when the sharded dim is normalized
    over; purely local (no communication) when it is a leading dim (e.g. LayerNorm over C)."""
    if not isinstance(input, DTensor):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    shape = tuple(input.shape)
    ns = _check_normalized_shape(shape, normalized_shape, label)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != ns:
            raise DomainParallelError(f"{label}: {name} shape {tuple(t.shape)} != normalized_shape {list(ns)}")
    plan = plan_norm(input, NormLayout("layer", shape, norm_ndim=len(ns)), label)
    xhat, _, _ = _Normalize.apply(input.to_local(), plan, eps)
    return _wrap(_affine(xhat, weight, bias, plan), plan, shape)


# ---------------------------------------------------------------------------------------------
# aten rules (below autograd): F.group_norm / F.batch_norm / F.layer_norm / F.instance_norm
# ---------------------------------------------------------------------------------------------


def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list:
    """Positional values of ``op``'s schema arguments (kwargs and defaults filled in)."""
    out = []
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out.append(args[i])
        elif a.name in kwargs:
            out.append(kwargs[a.name])
        else:
            out.append(a.default_value)
    return out


def _ours(x: object) -> bool:
    """A DTensor sharded somewhere: ours (exact or a clear error). Replicate etc.: PyTorch's."""
    return isinstance(x, DTensor) and any(isinstance(p, Shard) for p in x.placements)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


def _dt(local: torch.Tensor, plan: NormPlan, placement: Placement, shape: Sequence[int]) -> DTensor:
    shape = torch.Size(shape)
    return DTensor.from_local(
        local, plan.mesh, [placement], run_check=False, shape=shape, stride=contiguous_stride(shape)
    )


def _stats_out(t: torch.Tensor, plan: NormPlan) -> DTensor:
    """mean/rstd outputs: replicated when distributed, else sharded like the input's leading dims."""
    shape = plan.layout.stats_shape()
    if plan.dim is None or plan.dim in plan.layout.reduce_dims():
        return _dt(t.reshape(shape), plan, Replicate(), shape)
    local_shape = list(shape)
    a, b = plan.local_range()
    local_shape[plan.dim] = b - a
    return _dt(t.reshape(local_shape), plan, Shard(plan.dim), shape)


def _stats_in(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _local(t).reshape(-1)


def _param_grads(
    dy: torch.Tensor,
    xhat: torch.Tensor,
    weight: torch.Tensor | None,
    plan: NormPlan,
    mask: Sequence[bool],
    pshape: Sequence[int],
) -> tuple[object, object]:
    """Weight/bias gradients: local partial sums, returned ``Partial`` (or all-reduced for plain params)."""
    dims = plan.layout.affine_reduce_dims()
    out: list[object] = [None, None]
    for i, val in ((0, lambda: (dy * xhat).sum(dims)), (1, lambda: dy.sum(dims))):
        if not mask[i + 1]:
            continue
        g = val()
        if (
            plan.layout.kind == "layer"
            and plan.dim is not None
            and plan.dim >= len(plan.layout.shape) - plan.layout.norm_ndim
        ):
            full = g.new_zeros(pshape)
            a, b = plan.local_range()
            full.narrow(plan.dim - (len(plan.layout.shape) - plan.layout.norm_ndim), a, b - a).copy_(g)
            g = full
        if isinstance(weight, DTensor) or weight is None:
            out[i] = _dt(g.to(dy.dtype), plan, plan.param_grad_placement, pshape)
        else:  # plain-tensor parameters: every rank must hold the full sum
            if plan.dim is not None and plan.world > 1:
                with stats.op_label(plan.op):
                    comm.all_reduce_sum(g, plan.group)
            out[i] = g.to(dy.dtype)
    return out[0], out[1]


def _rule_forward(
    x: DTensor,
    layout: NormLayout,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    label: str,
) -> tuple[NormPlan, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = plan_norm(x, layout, label)
    _check_param(weight, plan, "weight")
    _check_param(bias, plan, "bias")
    xl = x.to_local()
    xhat, mean, var, rstd = _normalize(xl, plan, eps)
    y = xhat.reshape(xl.shape)
    w, b = _local(weight), _local(bias)
    if w is not None:
        y = y * _param_view(_layer_param_slice(w, plan), layout, xl.ndim)
    if b is not None:
        y = y + _param_view(_layer_param_slice(b, plan), layout, xl.ndim)
    return plan, y.to(xl.dtype), mean, var, rstd, xhat


def _group_norm_rule(op, args, kwargs):
    x, weight, bias, _n, c, _hxw, group, eps = _bind(op, args, kwargs)
    if not _ours(x):
        return NotImplemented
    layout = NormLayout("group", tuple(x.shape), groups=group) if c % group == 0 else None
    if layout is None:
        raise DomainParallelError(f"group_norm: {c} channels not divisible by {group} groups")
    plan, y, mean, _var, rstd, _ = _rule_forward(x, layout, weight, bias, eps, "group_norm")
    return _dt(y, plan, plan.placement, x.shape), _stats_out(mean.to(y.dtype), plan), _stats_out(rstd.to(y.dtype), plan)


def _group_norm_backward_rule(op, args, kwargs):
    dy, x, mean, rstd, weight, _n, _c, _hxw, group, mask = _bind(op, args, kwargs)
    if not _ours(x):
        return NotImplemented
    layout = NormLayout("group", tuple(x.shape), groups=group)
    plan = plan_norm(x, layout, "group_norm")
    _check_param(weight, plan, "weight")
    return _backward_common(plan, dy, x, _stats_in(mean), _stats_in(rstd), weight, mask, (x.shape[1],), True)


def _backward_common(
    plan: NormPlan,
    dy: DTensor,
    x: DTensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    mask: Sequence[bool],
    pshape: Sequence[int],
    batch_stats: bool,
) -> tuple:
    """Explicit adjoint of a normalization with saved (mean, rstd) on local shards."""
    with stats.op_label(plan.op):
        if isinstance(dy, DTensor) and dy.placements != x.placements:
            dy = dy.redistribute(x.device_mesh, x.placements)  # e.g. a Replicate grad: a local slice
        dyl, xl = _local(dy), x.to_local()
        acc = _acc_dtype(xl.dtype)
        p, q, r = plan.layout.canonical(tuple(xl.shape))
        xhat = (xl.reshape(p, q, r).to(acc) - mean.to(acc).view(1, q, 1)) * rstd.to(acc).view(1, q, 1)
        xhat_n = xhat.reshape(xl.shape)
        dya = dyl.to(acc)
        w = _local(weight)
        g = dya if w is None else dya * _param_view(_layer_param_slice(w.to(acc), plan), plan.layout, xl.ndim)
        dx = None
        if mask[0]:
            gv = g.reshape(p, q, r)
            if batch_stats:
                dxv = _xhat_backward(gv, xhat, rstd.to(acc), _count(plan, xl.shape), plan)
            else:  # fixed (running) statistics: pointwise
                dxv = gv * rstd.to(acc).view(1, q, 1)
            dx = _dt(dxv.reshape(xl.shape).to(xl.dtype), plan, plan.placement, x.shape)
        dw, db = _param_grads(dya, xhat_n, weight, plan, mask, pshape)
    return dx, dw, db


def _batch_norm_rule(op, args, kwargs):
    x, weight, bias, running_mean, running_var, training, momentum, eps = _bind(op, args, kwargs)
    if not _ours(x):
        return NotImplemented
    layout = NormLayout("batch", tuple(x.shape))
    if training:
        plan, y, mean, var, rstd, _ = _rule_forward(x, layout, weight, bias, eps, "batch_norm")
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            _check_param(t, plan, name)
        n = layout.count()
        _running_update(running_mean, mean, momentum)
        _running_update(running_var, var * (n / max(n - 1, 1)), momentum)
        return (
            _dt(y, plan, plan.placement, x.shape),
            _stats_out(mean.to(y.dtype), plan),
            _stats_out(rstd.to(y.dtype), plan),
        )
    plan = plan_norm(x, layout, "batch_norm")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(t, plan, name)
    if running_mean is None or running_var is None:
        raise DomainParallelError("batch_norm: running_mean and running_var are required when training=False")
    xl = x.to_local()
    y = _fixed_stats(xl, _local(running_mean), _local(running_var), eps)
    w, b = _local(weight), _local(bias)
    if w is not None:
        y = y * _param_view(w, layout, xl.ndim)
    if b is not None:
        y = y + _param_view(b, layout, xl.ndim)
    empty = xl.new_empty(0)
    return (
        _dt(y.to(xl.dtype), plan, plan.placement, x.shape),
        _dt(empty, plan, Replicate(), (0,)),
        _dt(empty.clone(), plan, Replicate(), (0,)),
    )


def _batch_norm_backward_rule(op, args, kwargs):
    dy, x, weight, running_mean, running_var, save_mean, save_invstd, train, eps, mask = _bind(op, args, kwargs)
    if not _ours(x):
        return NotImplemented
    plan = plan_norm(x, NormLayout("batch", tuple(x.shape)), "batch_norm")
    _check_param(weight, plan, "weight")
    if train:
        mean, rstd = _stats_in(save_mean), _stats_in(save_invstd)
    else:
        mean = _local(running_mean)
        rstd = torch.rsqrt(_local(running_var).to(_acc_dtype(x.dtype)) + eps)
    return _backward_common(plan, dy, x, mean, rstd, weight, mask, (x.shape[1],), bool(train))


def _layer_norm_rule(op, args, kwargs):
    x, normalized_shape, weight, bias, eps = _bind(op, args, kwargs)
    if not _ours(x):
        return NotImplemented
    ns = _check_normalized_shape(tuple(x.shape), normalized_shape, "layer_norm")
    layout = NormLayout("layer", tuple(x.shape), norm_ndim=len(ns))
    plan, y, mean, _var, rstd, _ = _rule_forward(x, layout, weight, bias, eps, "layer_norm")
    return _dt(y, plan, plan.placement, x.shape), _stats_out(mean.to(y.dtype), plan), _stats_out(rstd.to(y.dtype), plan)


def _layer_norm_backward_rule(op, args, kwargs):
    dy, x, normalized_shape, mean, rstd, weight, _bias, mask = _bind(op, args, kwargs)
    if not _ours(x):
        return NotImplemented
    ns = _check_normalized_shape(tuple(x.shape), normalized_shape, "layer_norm")
    plan = plan_norm(x, NormLayout("layer", tuple(x.shape), norm_ndim=len(ns)), "layer_norm")
    _check_param(weight, plan, "weight")
    return _backward_common(plan, dy, x, _stats_in(mean), _stats_in(rstd), weight, mask, ns, True)


def register() -> None:
    """Install the aten rules (idempotent; done on import)."""
    register_rule(aten.native_group_norm.default, _group_norm_rule)
    register_rule(aten.native_group_norm_backward.default, _group_norm_backward_rule)
    register_rule(aten.native_batch_norm.default, _batch_norm_rule)
    register_rule(aten.native_batch_norm_backward.default, _batch_norm_backward_rule)
    register_rule(aten.native_layer_norm.default, _layer_norm_rule)
    register_rule(aten.native_layer_norm_backward.default, _layer_norm_backward_rule)


register()
