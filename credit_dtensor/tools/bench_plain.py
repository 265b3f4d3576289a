"""A plain-tensor module-wrapper baseline for the overhead benchmark, in the style of NCAR CREDIT's
domain parallelism (written for this benchmark, not taken from CREDIT): every rank holds its H rows
as a plain local tensor, a wrapped ``Conv2d`` exchanges ``(k - 1) // 2`` rows with each neighbour
by point-to-point ``isend``/``irecv`` (one pair per neighbour, each waited on), concatenates them
(zeros at the domain edges) and runs ``F.conv2d`` without H padding; a wrapped ``GroupNorm``
all-reduces per-(sample, group) sums. Backward is the adjoint (gradient rows sent back and added).
Parameter gradients stay per-rank partial sums, as with credit_dtensor's ``Partial`` gradients.

It is what "no DTensor, no rule layer" costs with ordinary module wrappers: the overhead
benchmark's target for credit_dtensor's eager path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["PlainHaloConv2d", "PlainGroupNorm", "plain_wrap"]


def _swap(
    to_prev: torch.Tensor, to_next: torch.Tensor, rank: int, world: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send ``to_prev`` to rank - 1 and ``to_next`` to rank + 1; return what they sent us."""
    reqs, from_prev, from_next = [], None, None
    if rank > 0:
        from_prev = torch.empty_like(to_prev)
        reqs.append(dist.irecv(from_prev, rank - 1))
        reqs.append(dist.isend(to_prev.contiguous(), rank - 1))
    if rank < world - 1:
        from_next = torch.empty_like(to_next)
        reqs.append(dist.irecv(from_next, rank + 1))
        reqs.append(dist.isend(to_next.contiguous(), rank + 1))
    for r in reqs:
        r.wait()
    return from_prev, from_next


class _HaloExchange(torch.autograd.Function):
    """``h`` rows from each neighbour around the local rows (zeros at the domain edges)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: int, rank: int, world: int) -> torch.Tensor:  # type: ignore[override]
        ctx.h, ctx.rank, ctx.world = h, rank, world
        top, bottom = _swap(x[:, :, :h], x[:, :, -h:], rank, world)
        edge = x.new_zeros(x.shape[0], x.shape[1], h, x.shape[3])
        return torch.cat([edge if top is None else top, x, edge if bottom is None else bottom], 2)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        h = ctx.h
        gx = g[:, :, h:-h].clone()
        first, last = _swap(g[:, :, :h], g[:, :, -h:], ctx.rank, ctx.world)
        if first is not None:
            gx[:, :, :h] += first
        if last is not None:
            gx[:, :, -h:] += last
        return gx, None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g)
        return g


class PlainHaloConv2d(nn.Module):
    """A ``Conv2d`` with odd kernel and 'same' H padding on H-shards held as plain tensors; a stride
    s > 1 needs every shard's first row to be a multiple of s (even shards of a field divisible by
    s x ranks), as CREDIT's plain path assumes."""

    def __init__(self, conv: nn.Conv2d, rank: int, world: int) -> None:
        super().__init__()
        if conv.kernel_size[0] % 2 == 0 or conv.padding[0] != (conv.kernel_size[0] - 1) // 2 or conv.dilation[0] != 1:
            raise ValueError("PlainHaloConv2d: odd kernel, 'same' H padding and no H dilation only")
        self.conv, self.rank, self.world = conv, rank, world
        self.halo = (conv.kernel_size[0] - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.halo and self.world > 1:
            x = _HaloExchange.apply(x, self.halo, self.rank, self.world)
        elif self.halo:
            x = F.pad(x, (0, 0, self.halo, self.halo))
        return F.conv2d(x, c.weight, c.bias, c.stride, (0, c.padding[1]), c.dilation, c.groups)


class PlainGroupNorm(nn.Module):
    """``GroupNorm`` over the whole sample from per-rank sums (one all-reduce of the sums, sums of
    squares and element counts)."""

    def __init__(self, gn: nn.GroupNorm, world: int) -> None:
        super().__init__()
        self.gn, self.world = gn, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gn = self.gn
        bsz = x.shape[0]
        xg = x.reshape(bsz, gn.num_groups, -1)
        # the element count travels with the sums: a layer after a strided conv has fewer rows
        s = torch.stack([xg.sum(-1), (xg * xg).sum(-1), torch.full_like(xg[..., 0], xg.shape[-1])])
        if self.world > 1:
            s = _AllReduceSum.apply(s)
        count = s[2]
        mean = s[0] / count
        inv = torch.rsqrt(s[1] / count - mean * mean + gn.eps)
        y = ((xg - mean[..., None]) * inv[..., None]).reshape(x.shape)
        return y * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]


def plain_wrap(model: nn.Module, rank: int, world: int) -> nn.Module:
    """Replace every ``Conv2d`` / ``GroupNorm`` child of ``model`` (in place) by its plain wrapper."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(model, name, PlainHaloConv2d(child, rank, world))
        elif isinstance(child, nn.GroupNorm):
            setattr(model, name, PlainGroupNorm(child, world))
        else:
            plain_wrap(child, rank, world)
    return model
