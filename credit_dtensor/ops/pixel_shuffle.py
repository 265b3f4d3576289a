"""Exact ``F.pixel_shuffle`` / ``F.pixel_unshuffle`` on DTensors sharded on H or W, any shard sizes.

Output rows ``[o0, o1)`` along the sharded axis read input rows ``[o0 // r, ceil(o1 / r))``
(shuffle) or ``[o0 * r, o1 * r)`` (unshuffle), :mod:`credit_dtensor.geometry.resample`: each rank
fetches them with the halo primitive and runs PyTorch's kernel on them. Sharding on the channel
dim is refused (the channels are what moves between H and W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..dtensor import spatial_shard_dim
from ..errors import DomainParallelError, UnsupportedShardingError
from ..geometry import chunk_range
from ..geometry.resample import pixel_shuffle_rows, pixel_unshuffle_rows
from ..halo import cached_plan, halo_gather, halo_scatter_add
from ._route import route_rule
from ._rows import RowOp, apply_row_op, chunk_needs, domain_info, meta_like, register_row_ops, row_op_ref
from .family import family

FAMILY = family("resample")


class PixelShuffleOp(RowOp):
    """``pixel_shuffle`` (``shuffle=True``) or ``pixel_unshuffle`` of one rank's shard (H or W)."""

    label = "pixel_shuffle"
    nd = 3  # (C, H, W)

    def __init__(self, in_shape, factor, shuffle, dim, world, rank) -> None:
        self.in_shape, self.factor, self.shuffle, self.dim = tuple(in_shape), factor, shuffle, dim
        r = factor
        *lead, c, h, w = in_shape
        if shuffle:
            self.out_shape = (*lead, c // (r * r), h * r, w * r)
        else:
            self.out_shape = (*lead, c * r * r, h // r, w // r)
        n, n_out = in_shape[dim], self.out_shape[dim]
        rows_fn = pixel_shuffle_rows if shuffle else pixel_unshuffle_rows
        needs = chunk_needs(n_out, world, lambda o0, o1: tuple(range(*rows_fn(o0, o1, r))))
        self.plan = cached_plan(n, world, rank, needs)
        self.o0, self.o1 = chunk_range(n_out, world, rank)
        self.e0 = rows_fn(self.o0, self.o1, r)[0]
        self.ext_len = len(needs[rank])

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup):
        ext = halo_gather(x, self.dim, self.plan, group)
        rows = self.o1 - self.o0
        if rows == 0:
            return x.new_zeros(self.shape_like(x, self.out_shape, 0)), None, None
        if self.shuffle:
            z = F.pixel_shuffle(ext, self.factor)
            return z.narrow(self.dim, self.o0 - self.e0 * self.factor, rows).contiguous(), None, None
        return F.pixel_unshuffle(ext, self.factor), None, None

    def backward(self, g: torch.Tensor, saved: object, group: dist.ProcessGroup) -> torch.Tensor:
        rows = self.o1 - self.o0
        ext_shape = self.shape_like(g, self.in_shape, self.ext_len)
        if rows == 0:
            g_ext = g.new_zeros(ext_shape)
        elif self.shuffle:
            z_shape = self.shape_like(g, self.out_shape, self.ext_len * self.factor)
            gz = g.new_zeros(z_shape)
            gz.narrow(self.dim, self.o0 - self.e0 * self.factor, rows).copy_(g)
            g_ext = F.pixel_unshuffle(gz, self.factor)
        else:
            g_ext = F.pixel_shuffle(g, self.factor)
        return halo_scatter_add(g_ext.contiguous(), self.dim, self.plan, group)


register_row_ops(PixelShuffleOp)


def _pixel_dim(input: torch.Tensor, where: str) -> int | None:
    """H or W shard dim; None for unsharded / leading-dim sharding (purely local for PyTorch)."""
    if input.ndim < 3:
        return None
    dim = spatial_shard_dim(input, 3, where)
    if dim is None:
        return None
    if dim == input.ndim - 3:
        raise UnsupportedShardingError(
            f"{where}: input is sharded on its channel dim {dim}: shard on H (dim {input.ndim - 2}) instead"
        )
    return dim


def _check_unshuffle(shape: Sequence[int], factor: int) -> None:
    """The *global* H and W must be multiples of the factor (any shard sizes are fine)."""
    for d, name in ((len(shape) - 2, "H"), (len(shape) - 1, "W")):
        if shape[d] % factor:
            lo, hi = shape[d] - shape[d] % factor, shape[d] + factor - shape[d] % factor
            raise DomainParallelError(
                f"pixel_unshuffle: global {name}={shape[d]} (dim {d}) is not divisible by downscale_factor="
                f"{factor}: pad or crop {name} to a multiple of {factor} (e.g. {lo} or {hi})"
            )


def _pixel(input: torch.Tensor, factor: int, shuffle: bool):
    where = "pixel_shuffle" if shuffle else "pixel_unshuffle"
    fn = F.pixel_shuffle if shuffle else F.pixel_unshuffle
    dim = _pixel_dim(input, where)
    if dim is None:
        return fn(input, factor)
    if not shuffle:
        _check_unshuffle(input.shape, factor)
    meta = fn(meta_like(input), factor)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    op = row_op_ref(
        PixelShuffleOp.__name__, (tuple(input.shape), int(factor), shuffle, dim, world, rank), dim, meta.shape
    )
    return apply_row_op(input, op)  # type: ignore[arg-type]


def pixel_shuffle(input: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """``F.pixel_shuffle``; exact on inputs sharded on H or W, any shard sizes."""
    return _pixel(input, upscale_factor, True)


def pixel_unshuffle(input: torch.Tensor, downscale_factor: int) -> torch.Tensor:
    """``F.pixel_unshuffle``; exact on inputs sharded on H or W, any shard sizes (the *global*
    H/W must be divisible by the factor, as on one device)."""
    return _pixel(input, downscale_factor, False)


_ROUTES = {F.pixel_shuffle: (pixel_shuffle, None, {}), F.pixel_unshuffle: (pixel_unshuffle, None, {})}
FAMILY.rule(_ROUTES, h="halo")(route_rule("pixel_shuffle_rule", _ROUTES))
