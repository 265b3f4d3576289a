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
import math
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
from ..intercept import register
from ..sharding import contiguous_stride
from . import _groups, opaque

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


@dataclass(frozen=True)
class LocalPlan:
    """What the local statistics code needs of a :class:`NormPlan`: primitives only (the group by
    name), so an opaque custom op can rebuild it from its key."""

    layout: NormLayout
    dim: int | None
    counts: tuple[int, ...] | None
    op: str
    world: int
    rank: int
    group_name: str

    @property
    def group(self) -> dist.ProcessGroup:
        return _groups.resolve(self.group_name)

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
# Statistics (no autograd): local (mean, M2), merged across ranks with Chan's formula
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _merge(mean: torch.Tensor, m2: torch.Tensor, n: int, plan: NormPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and biased variance from this rank's ``(mean, M2)`` over ``n`` elements.

    One all-reduce of a ``(world, 2, Q)`` buffer in which each rank fills its own slot (so the sum
    is exact); every rank then merges the same numbers in the same order: identical results.
    """
    if plan.counts is None:
        return mean, m2 / n
    buf = mean.new_zeros(plan.world, 2, mean.numel())
    buf[plan.rank, 0] = mean
    buf[plan.rank, 1] = m2
    with stats.op_label(plan.op):
        comm.all_reduce_sum(buf, plan.group)
    cnt = torch.tensor(plan.counts, dtype=buf.dtype, device=buf.device).view(-1, 1)
    total = sum(plan.counts)
    mean = (cnt * buf[:, 0]).sum(0) / total
    m2 = buf[:, 1].sum(0) + (cnt * (buf[:, 0] - mean).square()).sum(0)
    return mean, m2 / total


def _local_moments(v: torch.Tensor, dims: tuple[int, ...], q: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's per-statistic mean and M2, two-pass (zeros for an empty shard)."""
    mean = v.sum(dims, keepdim=True) / max(n, 1)
    m2 = torch.linalg.vector_norm(v - mean, dim=dims).square()
    return mean.reshape(q), m2.reshape(q)


# ---------------------------------------------------------------------------------------------
# Group / instance / batch norm: one fused autograd Function over the (N, C, K) view
# ---------------------------------------------------------------------------------------------


def _channel_view(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _channel_count(plan: NormPlan, n: int, c: int, k: int) -> int:
    """Elements per statistic: global when distributed, else this rank's."""
    if plan.counts is not None:
        return sum(plan.counts)
    return c // plan.layout.groups * k if plan.layout.kind == "group" else n * k


def _per_channel(t: torch.Tensor, plan: NormPlan, n: int, c: int) -> torch.Tensor:
    """Statistics ``(Q,)`` broadcast to ``(N, C)`` (group) or ``(1, C)`` (batch)."""
    if plan.layout.kind == "group":
        g = plan.layout.groups
        return t.view(n, g, 1).expand(n, g, c // g).reshape(n, c)
    return t.view(1, c)


def _to_stats(t: torch.Tensor, plan: NormPlan) -> torch.Tensor:
    """Per-(n, c) sums ``(N, C)`` reduced to per-statistic sums ``(Q,)``."""
    if plan.layout.kind == "group":
        n, c = t.shape
        g = plan.layout.groups
        return t.view(n, g, c // g).sum(-1).reshape(-1)
    return t.sum(0)


def _local_normalized(xv: torch.Tensor, plan: NormPlan, eps: float) -> tuple[torch.Tensor, ...]:
    """This rank's ``(d, mean_l, M2_l, inv_l)`` with ``d = (x - mean_l) * inv_l`` (a fresh buffer).

    Normally torch's own fused kernel normalizes with the *local* statistics (one stats pass, one
    write; its moments are Welford-stable) and ``M2_l = n * (1/rstd_l^2 - eps)`` (exact to a few
    ulp of ``var + eps``, which is all the normalization uses). Empty shards, and ``eps <= 0`` (a
    constant local group would give ``inf``), use plain two-pass moments with ``inv_l = 1``.
    """
    n, c, k = xv.shape
    group = plan.layout.kind == "group"
    g = plan.layout.groups
    cnt = c // g * k if group else n * k
    if cnt and eps > 0:
        if group:
            d, mean_l, inv_l = torch.native_group_norm(xv, None, None, n, c, k, g, eps)
        else:
            d, mean_l, inv_l = torch.native_batch_norm(xv, None, None, None, None, True, 0.0, eps)
        mean_l, inv_l = mean_l.reshape(-1), inv_l.reshape(-1)
        m2_l = (inv_l.pow(-2) - eps).clamp_min(0) * cnt
        return d, mean_l, m2_l, inv_l
    view, dims = (xv.reshape(n, g, c // g * k), (2,)) if group else (xv, (0, 2))
    mean_l = view.sum(dims, keepdim=True) / max(cnt, 1)  # an empty shard: 0 (count 0 in the merge)
    d = view - mean_l
    m2_l = torch.linalg.vector_norm(d, dim=dims).square().reshape(-1)
    mean_l = mean_l.reshape(-1)
    return d.view(n, c, k), mean_l, m2_l, torch.ones_like(mean_l)


def _channel_forward(
    xv: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, plan: NormPlan, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var, rstd)`` from the ``(N, C, K)`` view with batch statistics.

    ``y = d * scale + shift`` in place on the locally normalized ``d`` (see
    :func:`_local_normalized`), ``scale = rstd / inv_l * w``, ``shift = (mean_l - mean) * rstd * w
    + b``: no cancellation against a large mean.
    """
    n, c, _ = xv.shape
    d, mean_l, m2_l, inv_l = _local_normalized(xv, plan, eps)
    cnt = c // plan.layout.groups * xv.shape[2] if plan.layout.kind == "group" else n * xv.shape[2]
    mean, var = _merge(mean_l, m2_l, cnt, plan)
    rstd = torch.rsqrt(var + eps)
    wv = None if w is None else w.to(xv.dtype).view(1, c)
    scale = _per_channel(rstd / inv_l, plan, n, c)
    shift = _per_channel((mean_l - mean) * rstd, plan, n, c)
    if wv is not None:
        scale, shift = scale * wv, shift * wv
    if b is not None:
        shift = shift + b.to(xv.dtype).view(1, c)
    return torch.addcmul(shift.unsqueeze(-1), d, scale.unsqueeze(-1), out=d), mean, var, rstd


def _channel_apply(
    xv: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    plan: NormPlan,
) -> torch.Tensor:
    """``y = x * scale + shift`` per (n, c) with given statistics (eval), one fused pass."""
    n, c, _ = xv.shape
    scale = _per_channel(rstd, plan, n, c)
    if w is not None:
        scale = scale * w.to(xv.dtype).view(1, c)
    shift = -_per_channel(mean, plan, n, c) * scale
    if b is not None:
        shift = shift + b.to(xv.dtype).view(1, c)
    return torch.addcmul(shift.unsqueeze(-1), xv, scale.unsqueeze(-1))


def _channel_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    w: torch.Tensor | None,
    plan: NormPlan,
    mask: Sequence[bool],
    fixed: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Analytic adjoint on local shards. ``fixed``: statistics are constants (eval, running stats).

    Local per-(n, c) sums ``sum dy`` and ``sum dy*x`` give the parameter gradients (partial on
    this rank) and, reduced per statistic and all-reduced (``2*Q`` scalars), the input gradient
    ``dx = rstd*(g - mean(g) - xhat*mean(g*xhat))``, ``g = gamma*dy``, as ``A*dy + B*x + C``.
    """
    acc = _acc_dtype(x.dtype)
    xv, dyv = _channel_view(x).to(acc), _channel_view(dy).to(acc)
    n, c, k = xv.shape
    mean_nc = _per_channel(mean.to(acc), plan, n, c)
    rstd_nc = _per_channel(rstd.to(acc), plan, n, c)
    db_nc = dyv.sum(-1)
    dsx_nc = (torch.einsum("nck,nck->nc", dyv, xv) - mean_nc * db_nc) * rstd_nc  # sum dy * xhat
    dw = dsx_nc.sum(0) if mask[1] else None
    db = db_nc.sum(0) if mask[2] else None
    dx = None
    if mask[0]:
        gamma = xv.new_ones(1, c) if w is None else w.to(acc).view(1, c)
        a = rstd_nc * gamma
        if fixed:
            dxv = dyv * a.unsqueeze(-1)
        else:
            sums = torch.stack([_to_stats(gamma * db_nc, plan), _to_stats(gamma * dsx_nc, plan)])
            if plan.counts is not None:
                with stats.op_label(plan.op):
                    comm.all_reduce_sum(sums, plan.group)
            sums = sums / _channel_count(plan, n, c, k)
            mg, mgx = _per_channel(sums[0], plan, n, c), _per_channel(sums[1], plan, n, c)
            bcoef = -rstd_nc * rstd_nc * mgx
            ccoef = -rstd_nc * mg - bcoef * mean_nc
            dxv = torch.addcmul(ccoef.unsqueeze(-1), xv, bcoef.unsqueeze(-1)).addcmul_(dyv, a.unsqueeze(-1))
        dx = dxv.reshape(x.shape).to(x.dtype)
    return dx, dw, db


class _NormRule:
    """Base of the opaque custom-op rules of this module (built from the key's primitives)."""

    differentiable_outputs = (0,)

    def __init__(self, plan: LocalPlan, eps: float) -> None:
        self.plan, self.eps = plan, float(eps)


def _norm_key(kind: str, plan: NormPlan, eps: float) -> str:
    lay = plan.layout
    return opaque.make_key("norm", kind, lay.kind, lay.shape, lay.groups, lay.norm_ndim, plan.dim, plan.counts,
                           plan.op, float(eps), plan.world, plan.rank, _groups.name_of(plan.mesh))


@opaque.builder("norm")
def _build_norm_rule(kind, lay_kind, shape, groups, norm_ndim, dim, counts, op, eps, world, rank, group):
    layout = NormLayout(lay_kind, tuple(shape), groups=groups, norm_ndim=norm_ndim)
    plan = LocalPlan(layout, dim, None if counts is None else tuple(counts), op, world, rank, group)
    return (_ChannelRule if kind == "channel" else _LayerRule)(plan, eps)


class _ChannelRule(_NormRule):
    """Group/instance/batch norm with distributed batch statistics: ``(x, w, b) -> (y, mean, var, rstd)``."""

    saved_inputs = (0, 1)
    saved_outputs = (1, 3)

    def forward(self, inputs: list) -> list[torch.Tensor]:
        x, w, b = inputs
        y, mean, var, rstd = _channel_forward(_channel_view(x).to(_acc_dtype(x.dtype)), w, b, self.plan, self.eps)
        return [y.reshape(x.shape).to(x.dtype), mean, var, rstd]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        x, w, mean, rstd = saved
        g = grads[0]
        if g is None:
            return [None, None, None]
        dx, dw, db = _channel_backward(g, x, mean, rstd, w, self.plan, (needs[0], needs[1], needs[2]), fixed=False)
        dt = w.dtype if w is not None else x.dtype
        return [dx, None if dw is None else dw.to(dt), None if db is None else db.to(dt)]

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        x = inputs[0]
        q = self.plan.layout.canonical(tuple(x.shape))[1] if self.plan.layout.kind == "group" else x.shape[1]
        stat = x.new_empty(q, dtype=_acc_dtype(x.dtype))
        return [x.new_empty(x.shape), stat, stat.new_empty(q), stat.new_empty(q)]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        x, w = saved[0], saved[1]
        c = (x.shape[1],)
        dt = w.dtype if w is not None else x.dtype
        return [x.new_empty(x.shape) if needs[0] else None, x.new_empty(c, dtype=dt) if needs[1] else None,
                x.new_empty(c, dtype=dt) if needs[2] else None]


def _channel_norm(x: torch.Tensor, w, b, plan: NormPlan, eps: float) -> tuple[torch.Tensor, ...]:
    y, mean, var, _ = opaque.apply(_norm_key("channel", plan, eps), [x, w, b])
    return y, mean, var


# ---------------------------------------------------------------------------------------------
# Layer norm over the sharded dim: canonical (1, M, R) view; weight varies along R
# ---------------------------------------------------------------------------------------------


def _layer_normalize(x: torch.Tensor, plan: NormPlan, eps: float) -> tuple[torch.Tensor, ...]:
    """``(xhat (1, M, R), mean, var, rstd)`` of a local shard."""
    p, q, r = plan.layout.canonical(tuple(x.shape))
    xv = x.reshape(p, q, r).to(_acc_dtype(x.dtype))
    mean, m2 = _local_moments(xv, (0, 2), q, p * r)
    mean, var = _merge(mean, m2, p * r, plan)
    rstd = torch.rsqrt(var + eps)
    return (xv - mean.view(1, q, 1)) * rstd.view(1, q, 1), mean, var, rstd


def _layer_count(plan: NormPlan, local_shape: Sequence[int]) -> int:
    if plan.counts is not None:
        return sum(plan.counts)
    p, _, r = plan.layout.canonical(tuple(local_shape))
    return p * r


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


def _layer_param_slice(t: torch.Tensor, plan: NormPlan) -> torch.Tensor:
    """This rank's rows of a layer-norm weight when the sharded dim is a normalized dim."""
    lead = len(plan.layout.shape) - plan.layout.norm_ndim
    if plan.dim is None or plan.dim < lead:
        return t
    a, b = plan.local_range()
    return t.narrow(plan.dim - lead, a, b - a)


class _LayerRule(_NormRule):
    """``x -> xhat`` over normalized dims that include the sharded one; backward = exact adjoint."""

    saved_inputs = ()
    saved_outputs = (0, 1)

    def forward(self, inputs: list) -> list[torch.Tensor]:
        x = inputs[0]
        xhat, _mean, _var, rstd = _layer_normalize(x, self.plan, self.eps)
        return [xhat.reshape(x.shape).to(x.dtype), rstd]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        y, rstd = saved
        xhat = y.reshape(self.plan.layout.canonical(tuple(y.shape))).to(rstd.dtype)
        g = grads[0]
        if g is None:
            return [None]
        shape = list(self.plan.layout.shape)
        if self.plan.dim is not None:
            a, b = self.plan.local_range()
            shape[self.plan.dim] = b - a
        gv = g.reshape(xhat.shape).to(xhat.dtype)
        dx = _xhat_backward(gv, xhat, rstd, _layer_count(self.plan, shape), self.plan)
        return [dx.reshape(g.shape).to(g.dtype)]

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        x = inputs[0]
        q = self.plan.layout.canonical(tuple(x.shape))[1]
        return [x.new_empty(x.shape), x.new_empty(q, dtype=_acc_dtype(x.dtype))]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        return [grads[0].new_empty(grads[0].shape)]


# ---------------------------------------------------------------------------------------------
# Autograd-level functions on DTensors (used by the module wrappers)
# ---------------------------------------------------------------------------------------------


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
    """Local view of a parameter whose gradient comes back Partial (sharded input) or Replicate."""
    if p is None:
        return None
    _check_param(p, plan, name)
    if isinstance(p, DTensor):
        return p.to_local(grad_placements=[plan.param_grad_placement])
    if plan.dim is not None and p.requires_grad and torch.is_grad_enabled() and plan.world > 1:
        return _SumGrad.apply(p, plan)
    return p


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """Local tensor of a DTensor (buffers: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def _wrap(local: torch.Tensor, plan: NormPlan, shape: Sequence[int]) -> DTensor:
    shape = torch.Size(shape)
    return DTensor.from_local(
        local, plan.mesh, [plan.placement], run_check=False, shape=shape, stride=contiguous_stride(shape)
    )


def _check_shapes(label: str, expected: tuple[int, ...], what: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != expected:
            raise DomainParallelError(f"{label}: {name} shape {tuple(t.shape)} != {expected} {what}")


def _running_update(running: torch.Tensor | None, value: torch.Tensor, momentum: float) -> None:
    """``running = momentum * value + (1 - momentum) * running`` in place (plain or DTensor buffer)."""
    if running is None:
        return
    with torch.no_grad():
        r = _local(running)
        r.copy_(momentum * value.to(r.dtype) + (1 - momentum) * r)


def _unbiased(var: torch.Tensor, n: int) -> torch.Tensor:
    """torch tracks the unbiased variance (normalizes with the biased one)."""
    return var * (n / max(n - 1, 1))


def _batch_mean(t: torch.Tensor, plan: NormPlan) -> torch.Tensor:
    """Mean over the (possibly batch-sharded) dim 0 of per-sample statistics ``(N_local, C)``."""
    s = t.sum(0)
    if plan.dim == 0 and plan.world > 1:
        with stats.op_label(plan.op):
            comm.all_reduce_sum(s, plan.group)
    return s / plan.layout.shape[0]


def _verify_size(shape: Sequence[int], first: int, what: str, label: str) -> None:
    """torch's ``_verify_batch_size`` / ``_verify_spatial_size`` on the *global* shape."""
    prod = shape[0] if first == 0 else 1
    for s in shape[2:]:
        prod *= s
    if prod == 1:
        raise DomainParallelError(f"{label}: expected more than 1 {what} when training, got input size {list(shape)}")


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
    _check_shapes(label, (shape[1],), "(channels)", weight=weight, bias=bias)
    plan = plan_norm(input, NormLayout("group", shape, groups=num_groups), label, "group_norm")
    x, w, b = input.to_local(), _param_local(weight, plan, "weight"), _param_local(bias, plan, "bias")
    if plan.counts is None:  # statistics are local: torch's own kernel
        y = F.group_norm(x, num_groups, w, b, eps)
    else:
        y = _channel_norm(x, w, b, plan, eps)[0]
    return _wrap(y, plan, shape)


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
    if len(shape) < 2:
        raise DomainParallelError(f"{label}: expected (N, C, ...) input, got shape {shape}")
    _check_shapes(
        label, (shape[1],), "(channels)", weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    plan = plan_norm(input, NormLayout("batch", shape), label, "batch_norm")
    _check_param(running_mean, plan, "running_mean")
    _check_param(running_var, plan, "running_var")
    x, w, b = input.to_local(), _param_local(weight, plan, "weight"), _param_local(bias, plan, "bias")
    rm, rv = _local(running_mean), _local(running_var)
    if not training and (rm is None or rv is None):
        raise DomainParallelError(f"{label}: running_mean and running_var are required when training=False")
    if training:
        _verify_size(shape, 0, "value per channel", label)
        if eps <= 0:
            raise DomainParallelError(f"{label}: batch_norm eps must be positive during training, got {eps}")
    if not training or plan.counts is None:  # running statistics (pointwise) or local statistics
        y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    else:
        y, mean, var = _channel_norm(x, w, b, plan, eps)
        _running_update(rm, mean, momentum)
        _running_update(rv, _unbiased(var, plan.layout.count()), momentum)
    return _wrap(y, plan, shape)


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
    _check_shapes(
        label, (c,), "(channels)", weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    layout = NormLayout("group", shape, groups=c)
    plan = plan_norm(input, layout, label, "instance_norm")
    _check_param(running_mean, plan, "running_mean")
    _check_param(running_var, plan, "running_var")
    x, w, b = input.to_local(), _param_local(weight, plan, "weight"), _param_local(bias, plan, "bias")
    rm, rv = _local(running_mean), _local(running_var)
    if not use_input_stats and (rm is None or rv is None):
        raise DomainParallelError(f"{label}: running_mean and running_var are required when use_input_stats=False")
    if use_input_stats:
        _verify_size(shape, 2, "spatial element", label)
    tracked = rm is not None or rv is not None
    batch_split = plan.dim == 0 and plan.world > 1  # running stats average over the global batch
    if not use_input_stats or (plan.counts is None and not (tracked and batch_split)):
        y = F.instance_norm(x, rm, rv, w, b, use_input_stats, momentum, eps)
    else:
        y, mean, var = _channel_norm(x, w, b, plan, eps)
        if tracked:
            nl, n = x.shape[0], layout.count()
            _running_update(rm, _batch_mean(mean.view(nl, c), plan), momentum)
            _running_update(rv, _batch_mean(_unbiased(var, n).view(nl, c), plan), momentum)
    return _wrap(y, plan, shape)


def _check_normalized_shape(shape: Sequence[int], normalized_shape: Sequence[int] | int, label: str) -> tuple[int, ...]:
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
    over; purely local (torch's kernel, no communication) when it is a leading dim (e.g. over C)."""
    if not isinstance(input, DTensor):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    shape = tuple(input.shape)
    ns = _check_normalized_shape(shape, normalized_shape, label)
    _check_shapes(label, ns, "(normalized_shape)", weight=weight, bias=bias)
    plan = plan_norm(input, NormLayout("layer", shape, norm_ndim=len(ns)), label, "layer_norm")
    x, w, b = input.to_local(), _param_local(weight, plan, "weight"), _param_local(bias, plan, "bias")
    w = None if w is None else _layer_param_slice(w, plan)
    b = None if b is None else _layer_param_slice(b, plan)
    if plan.counts is None:
        y = F.layer_norm(x, x.shape[x.ndim - len(ns) :], w, b, eps)
    else:
        y = opaque.apply(_norm_key("layer", plan, eps), [x])[0]
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
    return _wrap(y, plan, shape)


# ---------------------------------------------------------------------------------------------
# Functional path: F.group_norm / F.batch_norm / F.instance_norm / F.layer_norm as users call them
# ---------------------------------------------------------------------------------------------


def _ours(x: object) -> bool:
    """A DTensor sharded somewhere: ours (exact or a clear error). Replicate etc.: PyTorch's."""
    return isinstance(x, DTensor) and any(isinstance(p, Shard) for p in x.placements)


def _route(public):
    def rule(func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not _ours(x):
            return NotImplemented
        return public(*args, **kwargs)

    rule.__qualname__ = f"{public.__name__}_rule"
    return rule


register(F.group_norm)(_route(group_norm))
register(F.batch_norm)(_route(batch_norm))
register(F.instance_norm)(_route(instance_norm))
register(F.layer_norm)(_route(layer_norm))
