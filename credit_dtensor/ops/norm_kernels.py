"""Statistics and local kernels of the exact normalizations (:mod:`.norm` has the public functions).

Every rank reduces its own rows to per-statistic ``(mean, M2)`` and one all-gather of them
(``comm.all_gather_stats``: each rank sends only its own ``2*Q``) gives every rank all partial moments;
they are merged locally with Chan's formula ``M2 = sum M2_r + sum n_r (mean_r - mean)^2`` (never
``E[x^2] - E[x]^2``), in the same order everywhere, so the statistics -- and running stats -- are
bitwise identical on every domain rank. Counts ``n_r`` come from geometry (global per statistic),
so uneven and empty shards are exact. Backward is the analytic adjoint with one all-reduce of
``(sum g, sum g*xhat)`` per statistic. Traffic sent per rank: forward ``2 * Q`` scalars, backward
``2 * Q``, ``Q = N*G`` (group), ``C`` (batch) or ``prod(leading dims)`` (layer): never an
activation.

Both kernels run inside the generic ``credit_dtensor::rule`` custom op (:mod:`.opaque`), rebuilt
from a key of primitives (:class:`LocalPlan`): :func:`channel_norm` (group / instance / batch
norm over the ``(N, C, K)`` view) and :func:`layer_xhat` (layer norm over the canonical
``(1, M, R)`` view).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import comm, stats
from ..geometry import chunk_range
from ..geometry.norm import NormLayout
from . import _groups, opaque

__all__ = ["LocalPlan", "channel_norm", "layer_xhat"]


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


# ---------------------------------------------------------------------------------------------
# Statistics (no autograd): local (mean, M2), merged across ranks with Chan's formula
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _merge(mean: torch.Tensor, m2: torch.Tensor, n: int, plan: LocalPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Global mean and biased variance from this rank's ``(mean, M2)`` over ``n`` elements.

    One all-gather of every rank's ``(2, Q)`` into a ``(world, 2, Q)`` buffer (each rank sends only
    its own numbers); every rank then merges the same numbers in the same order: identical results.
    """
    if plan.counts is None:
        return mean, m2 / n
    with stats.op_label(plan.op):
        buf = comm.all_gather_stats(torch.stack((mean.reshape(-1), m2.reshape(-1))), plan.group)
    return merge_gathered(buf, plan)


def merge_gathered(buf: torch.Tensor, plan: LocalPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan's merge of every rank's ``(mean, M2)`` (``buf``: ``(world, 2, Q)`` in rank order)."""
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
# Group / instance / batch norm over the (N, C, K) view
# ---------------------------------------------------------------------------------------------


def channel_view(x: torch.Tensor) -> torch.Tensor:
    """The contiguous ``(N, C, K)`` view of ``x`` (a copy for a channels-last input, whose
    flattened view is strided: torch's group/batch-norm kernels take contiguous inputs only)."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).contiguous()


def _channel_count(plan: LocalPlan, n: int, c: int, k: int) -> int:
    """Elements per statistic: global when distributed, else this rank's."""
    if plan.counts is not None:
        return sum(plan.counts)
    return c // plan.layout.groups * k if plan.layout.kind == "group" else n * k


def per_channel(t: torch.Tensor, plan: LocalPlan, n: int, c: int) -> torch.Tensor:
    """Statistics ``(Q,)`` broadcast to ``(N, C)`` (group) or ``(1, C)`` (batch)."""
    if plan.layout.kind == "group":
        g = plan.layout.groups
        return t.view(n, g, 1).expand(n, g, c // g).reshape(n, c)
    return t.view(1, c)


def _to_stats(t: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
    """Per-(n, c) sums ``(N, C)`` reduced to per-statistic sums ``(Q,)``."""
    if plan.layout.kind == "group":
        n, c = t.shape
        g = plan.layout.groups
        return t.view(n, g, c // g).sum(-1).reshape(-1)
    return t.sum(0)


def _local_normalized(xv: torch.Tensor, plan: LocalPlan, eps: float) -> tuple[torch.Tensor, ...]:
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


def channel_forward(
    xv: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    plan: LocalPlan,
    eps: float,
    merge: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var, rstd)`` from the ``(N, C, K)`` view with batch statistics.

    ``y = d * scale + shift`` in place on the locally normalized ``d`` (see
    :func:`_local_normalized`), ``scale = rstd / inv_l * w``, ``shift = (mean_l - mean) * rstd * w
    + b``: no cancellation against a large mean. ``merge(mean_l, M2_l)`` gives the global
    ``(mean, var)`` (default: the all-gather of :func:`_merge`; :mod:`.norm_fold` sends rows with it).
    """
    n, c, _ = xv.shape
    d, mean_l, m2_l, inv_l = _local_normalized(xv, plan, eps)
    cnt = c // plan.layout.groups * xv.shape[2] if plan.layout.kind == "group" else n * xv.shape[2]
    mean, var = _merge(mean_l, m2_l, cnt, plan) if merge is None else merge(mean_l, m2_l)
    rstd = torch.rsqrt(var + eps)
    wv = None if w is None else w.to(xv.dtype).view(1, c)
    scale = per_channel(rstd / inv_l, plan, n, c)
    shift = per_channel((mean_l - mean) * rstd, plan, n, c)
    if wv is not None:
        scale, shift = scale * wv, shift * wv
    if b is not None:
        shift = shift + b.to(xv.dtype).view(1, c)
    return torch.addcmul(shift.unsqueeze(-1), d, scale.unsqueeze(-1), out=d), mean, var, rstd


def _channel_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    w: torch.Tensor | None,
    plan: LocalPlan,
    mask: Sequence[bool],
    fixed: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Analytic adjoint on local shards. ``fixed``: statistics are constants (eval, running stats).

    Local per-(n, c) sums ``sum dy`` and ``sum dy*x`` give the parameter gradients (partial on
    this rank) and, reduced per statistic and all-reduced (``2*Q`` scalars), the input gradient
    ``dx = rstd*(g - mean(g) - xhat*mean(g*xhat))``, ``g = gamma*dy``, as ``A*dy + B*x + C``.
    """
    acc = _acc_dtype(x.dtype)
    xv, dyv = channel_view(x).to(acc), channel_view(dy).to(acc)
    n, c, k = xv.shape
    mean_nc = per_channel(mean.to(acc), plan, n, c)
    rstd_nc = per_channel(rstd.to(acc), plan, n, c)
    db_nc, dsx_nc = row_sums(dyv, xv, mean_nc, rstd_nc)
    dw = dsx_nc.sum(0) if mask[1] else None
    db = db_nc.sum(0) if mask[2] else None
    dx = None
    if mask[0]:
        gamma = xv.new_ones(1, c) if w is None else w.to(acc).view(1, c)
        a = rstd_nc * gamma
        if fixed:
            dxv = dyv * a.unsqueeze(-1)
        else:
            sums = partial_sums(gamma, db_nc, dsx_nc, plan)
            if plan.counts is not None:
                with stats.op_label(plan.op):
                    comm.all_reduce_sum(sums, plan.group)
            dxv = input_grad(dyv, xv, sums, mean_nc, rstd_nc, a, plan)
        dx = dxv.reshape(x.shape).to(x.dtype)
    return dx, dw, db


def row_sums(dyv: torch.Tensor, xv: torch.Tensor, mean_nc: torch.Tensor, rstd_nc: torch.Tensor):
    """Per-(n, c) ``(sum dy, sum dy*xhat)`` of rows in the ``(N, C, K)`` view."""
    db = dyv.sum(-1)
    return db, (torch.einsum("nck,nck->nc", dyv, xv) - mean_nc * db) * rstd_nc


def partial_sums(gamma: torch.Tensor, db_nc: torch.Tensor, dsx_nc: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
    """This rank's ``(2, Q)`` share of ``(sum gamma*dy, sum gamma*dy*xhat)`` per statistic."""
    return torch.stack([_to_stats(gamma * db_nc, plan), _to_stats(gamma * dsx_nc, plan)])


def input_grad(dyv, xv, sums, mean_nc, rstd_nc, a, plan: LocalPlan) -> torch.Tensor:
    """``dx = A*dy + B*x + C`` on the ``(N, C, K)`` view from the global ``sums`` (:func:`partial_sums`)."""
    n, c, k = xv.shape
    sums = sums / _channel_count(plan, n, c, k)
    mg, mgx = per_channel(sums[0], plan, n, c), per_channel(sums[1], plan, n, c)
    bcoef = -rstd_nc * rstd_nc * mgx
    ccoef = -rstd_nc * mg - bcoef * mean_nc
    return torch.addcmul(ccoef.unsqueeze(-1), xv, bcoef.unsqueeze(-1)).addcmul_(dyv, a.unsqueeze(-1))


class _NormRule:
    """Base of the opaque custom-op rules of this module (built from the key's primitives)."""

    differentiable_outputs = (0,)

    def __init__(self, plan: LocalPlan, eps: float) -> None:
        self.plan, self.eps = plan, float(eps)


def _norm_key(kind: str, plan: Any, eps: float) -> str:
    """The opaque op's key for a :class:`~.norm.NormPlan` (its group by name)."""
    lay = plan.layout
    return opaque.make_key(
        "norm",
        kind,
        lay.kind,
        lay.shape,
        lay.groups,
        lay.norm_ndim,
        plan.dim,
        plan.counts,
        plan.op,
        float(eps),
        plan.world,
        plan.rank,
        _groups.name_of(plan.mesh),
    )


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
        y, mean, var, rstd = channel_forward(channel_view(x).to(_acc_dtype(x.dtype)), w, b, self.plan, self.eps)
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
        return [
            x.new_empty(x.shape) if needs[0] else None,
            x.new_empty(c, dtype=dt) if needs[1] else None,
            x.new_empty(c, dtype=dt) if needs[2] else None,
        ]


def channel_norm(x: torch.Tensor, w, b, plan: Any, eps: float) -> tuple[torch.Tensor, ...]:
    """``(y, mean, var)`` of group/instance/batch norm with distributed statistics (one custom op)."""
    y, mean, var, _ = opaque.apply(_norm_key("channel", plan, eps), [x, w, b])
    return y, mean, var


def layer_xhat(x: torch.Tensor, plan: Any, eps: float) -> torch.Tensor:
    """``(x - mean) * rstd`` of layer norm over dims that include the sharded one (one custom op)."""
    return opaque.apply(_norm_key("layer", plan, eps), [x])[0]


# ---------------------------------------------------------------------------------------------
# Layer norm over the sharded dim: canonical (1, M, R) view; weight varies along R
# ---------------------------------------------------------------------------------------------


def _layer_normalize(x: torch.Tensor, plan: LocalPlan, eps: float) -> tuple[torch.Tensor, ...]:
    """``(xhat (1, M, R), mean, var, rstd)`` of a local shard."""
    p, q, r = plan.layout.canonical(tuple(x.shape))
    xv = x.reshape(p, q, r).to(_acc_dtype(x.dtype))
    mean, m2 = _local_moments(xv, (0, 2), q, p * r)
    mean, var = _merge(mean, m2, p * r, plan)
    rstd = torch.rsqrt(var + eps)
    return (xv - mean.view(1, q, 1)) * rstd.view(1, q, 1), mean, var, rstd


def _layer_count(plan: LocalPlan, local_shape: Sequence[int]) -> int:
    if plan.counts is not None:
        return sum(plan.counts)
    p, _, r = plan.layout.canonical(tuple(local_shape))
    return p * r


def _xhat_backward(gv: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, n: int, plan: LocalPlan) -> torch.Tensor:
    """Adjoint of ``x -> xhat`` (statistics included) in the canonical view: one all-reduce."""
    q = gv.shape[1]
    sums = torch.stack([gv.sum((0, 2)), (gv * xhat).sum((0, 2))])
    if plan.counts is not None:
        with stats.op_label(plan.op):
            comm.all_reduce_sum(sums, plan.group)
    mg = (sums[0] / n).view(1, q, 1)
    mgx = (sums[1] / n).view(1, q, 1)
    return (gv - mg - xhat * mgx) * rstd.view(1, q, 1)


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
