"""The hand-written lower bound of the single-layer benchmark cases: raw P2P halo + local op, no
DTensor, on the same processes and data as the DTensor path (what an ideal implementation costs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["lower_bound_fn", "block_bound_fn"]


def _p2p(
    send_up: torch.Tensor | None,
    send_down: torch.Tensor | None,
    n_up: int,
    n_down: int,
    like: torch.Tensor,
    rank: int,
    world: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send ``send_up`` to rank-1 and ``send_down`` to rank+1; receive ``n_up`` rows from rank-1
    and ``n_down`` rows from rank+1, all in one batched round."""
    ops, up, down = [], None, None
    shape = list(like.shape)
    if rank > 0:
        if n_up:
            shape[2] = n_up
            up = like.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, up, rank - 1))
        if send_up is not None and send_up.shape[2]:
            ops.append(dist.P2POp(dist.isend, send_up.contiguous(), rank - 1))
    if rank < world - 1:
        if n_down:
            shape[2] = n_down
            down = like.new_empty(shape)
            ops.append(dist.P2POp(dist.irecv, down, rank + 1))
        if send_down is not None and send_down.shape[2]:
            ops.append(dist.P2POp(dist.isend, send_down.contiguous(), rank + 1))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return up, down


class _Halo(torch.autograd.Function):
    """Pad the local shard with ``t`` rows from above and ``b`` from below (zeros at the edges);
    backward sends the borrowed rows' gradients back and adds them."""

    @staticmethod
    def forward(ctx, x, t, b, rank, world):
        ctx.t, ctx.b, ctx.rank, ctx.world = t, b, rank, world
        up, down = _p2p(x[:, :, :b] if b else None, x[:, :, x.shape[2] - t :] if t else None, t, b, x, rank, world)
        zeros = lambda n: x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3])  # noqa: E731
        return torch.cat([up if up is not None else zeros(t), x, down if down is not None else zeros(b)], 2)

    @staticmethod
    def backward(ctx, g):
        t, b = ctx.t, ctx.b
        n = g.shape[2] - t - b
        gx = g[:, :, t : t + n].clone()
        back_up, back_down = _p2p(
            g[:, :, :t] if t else None, g[:, :, t + n :] if b else None, b, t, g, ctx.rank, ctx.world
        )
        if back_up is not None:
            gx[:, :, :b] += back_up
        if back_down is not None:
            gx[:, :, n - t :] += back_down
        return gx, None, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(g)
        return g


def _group_norm_bound(x: torch.Tensor, groups: int, eps: float, h_global: int, w, b) -> torch.Tensor:
    """GroupNorm of an H-shard: one all-reduce of (sum, sum of squares) per (sample, group)."""
    bsz, c = x.shape[:2]
    xg = x.reshape(bsz, groups, -1)
    s = _AllReduce.apply(torch.stack([xg.sum(-1), (xg * xg).sum(-1)]))
    count = c // groups * h_global * x.shape[3]
    mean = s[0] / count
    inv = torch.rsqrt(s[1] / count - mean * mean + eps)
    y = ((xg - mean[..., None]) * inv[..., None]).reshape(x.shape)
    return y * w[None, :, None, None] + b[None, :, None, None]


def _copy(p: torch.Tensor) -> torch.Tensor:
    return p.detach().clone().requires_grad_()


def lower_bound_fn(name: str, mod: nn.Module, h_global: int, rank: int, world: int) -> Callable | None:
    """``fn(x_local) -> y_local`` for the hand-written lower bound of a single-layer case.

    ``fn.params`` lists the bound's own parameter copies (to reset their gradients between steps).
    """
    if name not in ("conv3x3", "conv_stride2", "conv_transpose", "group_norm"):
        return None
    w, b = _copy(mod.weight), _copy(mod.bias)
    if name == "conv3x3":
        fn = lambda x: F.conv2d(_Halo.apply(x, 1, 1, rank, world), w, b, padding=(0, 1))  # noqa: E731
    elif name == "conv_stride2":
        fn = lambda x: F.conv2d(_Halo.apply(x, 1, 0, rank, world), w, b, stride=2, padding=(0, 1))  # noqa: E731
    elif name == "conv_transpose":

        def fn(x):
            y = F.conv_transpose2d(_Halo.apply(x, 1, 1, rank, world), w, b, stride=2, padding=(0, 1))
            return y[:, :, 3 : 3 + 2 * x.shape[2]]

    else:
        groups, eps = mod.num_groups, mod.eps
        fn = lambda x: _group_norm_bound(x, groups, eps, h_global, w, b)  # noqa: E731
    fn.params = [w, b]
    return fn


def block_bound_fn(conv: nn.Conv2d, gn: nn.GroupNorm, h_global: int, rank: int, world: int) -> Callable:
    """The bound of a 3x3 conv (padding 1) + GroupNorm + SiLU block on an H-shard: one batched halo
    round, the local conv, one all-reduce of the statistics; the adjoints in backward."""
    w, b, gw, gb = _copy(conv.weight), _copy(conv.bias), _copy(gn.weight), _copy(gn.bias)
    groups, eps = gn.num_groups, gn.eps

    def fn(x):
        y = F.conv2d(_Halo.apply(x, 1, 1, rank, world), w, b, padding=(0, 1))
        return F.silu(_group_norm_bound(y, groups, eps, h_global, gw, gb))

    fn.params = [w, b, gw, gb]
    return fn
