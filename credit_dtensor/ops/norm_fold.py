"""The norm half of a folded ``norm -> elementwise -> conv`` chain (:mod:`.fold`): one message per
peer and direction carries both the norm's statistics and the convolution's halo rows.

Forward: each peer gets this rank's partial ``(mean, M2)``, and the peers the convolution's halo
plan names also get the input rows they will read; the received rows are normalized here with the
merged global statistics. Backward: the borrowed rows' gradient adds its share to this rank's
partial sums (their ``xhat`` is known here) and travels back to the rows' owner with the sums; the
owner adds it to its own output gradient before forming ``dx``. Same arithmetic as
:mod:`.norm_kernels` (Chan's merge, ``dx = A*dy + B*x + C``), eager fp32/fp64 only.
"""

from __future__ import annotations

import math

import torch

from .. import comm, intercept, stats
from ..halo import HaloPlan, row_shape, send_index
from . import _groups
from ._rows import build_row_op
from .conv_ops import decode
from .conv_spec import plan as conv_plan
from .fold import Carry, Consumer, RowKey
from .norm_kernels import (
    LocalPlan,
    channel_forward,
    channel_view,
    input_grad,
    merge_gathered,
    partial_sums,
    per_channel,
    row_sums,
)

__all__ = ["folded_channel_norm", "halo_plan_for"]


def halo_plan_for(conv: Consumer, world: int, rank: int) -> HaloPlan:
    """This rank's halo plan of the convolution (or max pooling) a norm borrows rows for."""
    if isinstance(conv, RowKey):
        return build_row_op(conv.name, (*conv.args, world, rank)).plan
    spec = decode(conv.enc)
    return conv_plan(spec, conv.dim - (len(conv.shape) - spec.nd), conv.shape[conv.dim], world, rank)


def _round(
    mine: torch.Tensor,
    rows_out: dict[int, torch.Tensor],
    rows_in: dict[int, tuple[int, ...]],
    plan: LocalPlan,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One message to every peer: ``mine`` (a flat statistic) and, for some peers, rows. Returns
    every rank's statistic ``(world, len)`` in rank order and the rows received from each peer."""
    q = mine.numel()
    peers = [p for p in range(plan.world) if p != plan.rank]
    sends = [(p, torch.cat((mine, rows_out[p].reshape(-1))) if p in rows_out else mine) for p in peers]
    recvs = [(p, (q + (math.prod(rows_in[p]) if p in rows_in else 0),)) for p in peers]
    with stats.op_label(plan.op):
        got = comm.exchange(sends, recvs, plan.group, dtype=mine.dtype, device=mine.device)
    parts = [mine] * plan.world
    rows = {}
    for p, g in zip(peers, got):
        parts[p] = g[:q]
        if p in rows_in:
            rows[p] = g[q:].view(rows_in[p])
    return torch.stack(parts), rows


class _FoldedChannelNorm(torch.autograd.Function):
    """``(x, w, b) -> (y, mean, var, *borrowed rows normalized)``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, w, b, plan: LocalPlan, eps: float, hplan: HaloPlan, dim: int):  # type: ignore[override]
        rows_out = {dst: x.index_select(dim, i) for (dst, _), i in zip(hplan.sends, send_index(hplan, x.device))}
        rows_in = {src: row_shape(x, dim, len(r)) for src, r in hplan.recvs}
        got: dict[int, torch.Tensor] = {}

        def merge(mean_l: torch.Tensor, m2_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            buf, rows = _round(torch.stack((mean_l, m2_l)).reshape(-1), rows_out, rows_in, plan)
            got.update(rows)
            return merge_gathered(buf.view(plan.world, 2, -1), plan)

        y, mean, var, rstd = channel_forward(channel_view(x), w, b, plan, eps, merge)
        n, c = x.shape[0], x.shape[1]
        mean_nc, rstd_nc = per_channel(mean, plan, n, c).unsqueeze(-1), per_channel(rstd, plan, n, c).unsqueeze(-1)
        scale = rstd_nc if w is None else rstd_nc * w.to(x.dtype).view(1, c, 1)
        borrowed, normalized = [], []
        for src, _ in hplan.recvs:
            r = got[src]
            rv = (channel_view(r) - mean_nc) * scale
            if b is not None:
                rv = rv + b.to(x.dtype).view(1, c, 1)
            borrowed.append(r)
            normalized.append(rv.reshape(r.shape))
        ctx.save_for_backward(x, w, mean, rstd, *borrowed)
        ctx.plan, ctx.hplan, ctx.dim = plan, hplan, dim
        ctx.mark_non_differentiable(mean, var)
        return (y.reshape(x.shape), mean, var, *normalized)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, *drows):  # type: ignore[override]
        with intercept.suspended():  # local tensors and our own round: no rule applies
            return _FoldedChannelNorm._backward(ctx, dy, *drows)

    @staticmethod
    def _backward(ctx, dy, *drows):
        x, w, mean, rstd, *borrowed = ctx.saved_tensors
        plan, hplan, dim = ctx.plan, ctx.hplan, ctx.dim
        need = ctx.needs_input_grad
        n, c = x.shape[0], x.shape[1]
        xv = channel_view(x)
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        mean_nc, rstd_nc = per_channel(mean, plan, n, c), per_channel(rstd, plan, n, c)
        db_nc, dsx_nc = row_sums(channel_view(dy), xv, mean_nc, rstd_nc)
        for r, g in zip(borrowed, drows):
            if g is not None:  # the rows' share of this rank's partial sums (their owner sums the rest)
                db_r, dsx_r = row_sums(channel_view(g.contiguous()), channel_view(r), mean_nc, rstd_nc)
                db_nc, dsx_nc = db_nc + db_r, dsx_nc + dsx_r
        dt = x.dtype if w is None else w.dtype
        dw = dsx_nc.sum(0).to(dt) if need[1] else None
        db = db_nc.sum(0).to(dt) if need[2] else None
        dx = None
        if need[0]:
            gamma = x.new_ones(1, c) if w is None else w.to(x.dtype).view(1, c)
            rows_out = {
                src: (torch.zeros_like(r) if g is None else g) for (src, _), r, g in zip(hplan.recvs, borrowed, drows)
            }
            rows_in = {dst: row_shape(x, dim, len(r)) for dst, r in hplan.sends}
            buf, got = _round(partial_sums(gamma, db_nc, dsx_nc, plan).reshape(-1), rows_out, rows_in, plan)
            for (dst, _), i in zip(hplan.sends, send_index(hplan, x.device)):
                dy = dy.index_add(dim, i, got[dst])  # the rows' gradient from the rank that borrowed them
            sums = buf.sum(0).view(2, -1)
            dx = input_grad(channel_view(dy), xv, sums, mean_nc, rstd_nc, rstd_nc * gamma, plan).reshape(x.shape)
        return dx, dw, db, None, None, None, None


def folded_channel_norm(x: torch.Tensor, w, b, nplan, eps: float, conv: Consumer) -> tuple:
    """``(y, mean, var, carry)`` of group/instance/batch norm (plan: a :class:`~.norm.NormPlan` with
    distributed statistics) whose statistics round also brings ``conv``'s halo rows."""
    plan = LocalPlan(
        nplan.layout, nplan.dim, nplan.counts, nplan.op, nplan.world, nplan.rank, _groups.name_of(nplan.mesh)
    )
    hplan = halo_plan_for(conv, nplan.world, nplan.rank)
    y, mean, var, *rows = _FoldedChannelNorm.apply(x, w, b, plan, float(eps), hplan, nplan.dim)
    return y, mean, var, Carry(conv, hplan, rows)
