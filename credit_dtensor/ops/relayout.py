"""Moving the sharded dim: ``Shard(a)`` -> ``Shard(b)`` of the same tensor, by one all-to-all.

Attention written as ``einsum`` / ``matmul`` over tokens that span the shards needs every key for
every query; a free dim (batch, heads, windows, groups) does not mix. Re-laying the operands out to
shard that dim makes the product local (Ulysses-style), and a later reshape or a convolution lays
the result out on H again. Each element moves at most once: rank ``r`` sends rank ``s`` its own
rows of ``a`` restricted to ``s``'s ``torch.chunk`` slice of ``b`` (so about ``1 - 1/N`` of its
share), and nothing is ever gathered. Backward is the reverse move. Uneven and empty shards on
either dim are fine (both layouts are ``torch.chunk``'s).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import comm, stats
from ..dtensor import domain_shard_dim, wrap_shard
from ..errors import DomainParallelError
from ..geometry import chunk_offsets
from . import _groups, opaque

__all__ = ["reshard"]


def _local_shape(shape: tuple, dim: int, offs: list[int], rank: int) -> list[int]:
    s = list(shape)
    s[dim] = offs[rank + 1] - offs[rank]
    return s


class _Reshard:
    """One rank's ``Shard(src)`` -> ``Shard(dst)`` move of a tensor of global ``shape``."""

    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    differentiable_outputs = (0,)

    def __init__(self, shape: tuple, src: int, dst: int, group: str, world: int, rank: int) -> None:
        self.shape, self.src, self.dst, self.group = tuple(shape), src, dst, group
        self.world, self.rank = world, rank
        self.src_offs = chunk_offsets(shape[src], world)
        self.dst_offs = chunk_offsets(shape[dst], world)

    def _move(self, x: torch.Tensor, a: int, a_offs: list[int], b: int, b_offs: list[int]) -> torch.Tensor:
        """Local rows of ``a`` (full ``b``) -> full ``a``, local rows of ``b``."""
        x = x.contiguous()
        world, rank = self.world, self.rank
        sends = [[x.narrow(b, b_offs[s], b_offs[s + 1] - b_offs[s])] for s in range(world)]
        mine = b_offs[rank + 1] - b_offs[rank]
        shapes = []
        for r in range(world):
            s = list(x.shape)
            s[a] = a_offs[r + 1] - a_offs[r]
            s[b] = mine
            shapes.append(s)
        recv = [int(torch.Size(s).numel()) for s in shapes]
        with stats.op_label("relayout"):
            flat = comm.all_to_all(sends, recv, _groups.resolve(self.group), dtype=x.dtype, device=x.device)
        parts = [f.view(s) for f, s in zip(flat, shapes)]
        return torch.cat(parts, a) if len(parts) > 1 else parts[0].clone()

    def forward(self, inputs: list) -> list[torch.Tensor]:
        return [self._move(inputs[0], self.src, self.src_offs, self.dst, self.dst_offs)]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        g = grads[0]
        if g is None:
            return [None]
        return [self._move(g, self.dst, self.dst_offs, self.src, self.src_offs)]

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        shape = list(self.shape)
        shape[self.dst] = self.dst_offs[self.rank + 1] - self.dst_offs[self.rank]
        return [inputs[0].new_empty(shape)]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        shape = list(self.shape)
        shape[self.src] = self.src_offs[self.rank + 1] - self.src_offs[self.rank]
        return [grads[0].new_empty(shape)]


@opaque.builder("reshard")
def _build(shape: tuple, src: int, dst: int, group: str, world: int, rank: int) -> _Reshard:
    return _Reshard(shape, src, dst, group, world, rank)


def reshard(x: DTensor, dim: int) -> DTensor:
    """``x`` (sharded on one dim of a 1-D mesh) sharded on ``dim`` instead (differentiable,
    compile-friendly; every rank of the mesh must call it)."""
    src = domain_shard_dim(x)
    if src is None:
        raise DomainParallelError(
            f"reshard: expected a tensor sharded on a 1-D mesh, got {getattr(x, 'placements', x)}"
        )
    dim %= x.ndim
    if dim == src:
        return x
    mesh = x.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    if world == 1:
        return wrap_shard(x.to_local(), mesh, dim, x.shape)
    key = opaque.make_key("reshard", tuple(x.shape), src, dim, _groups.name_of(mesh), world, rank)
    local = opaque.apply(key, [x.to_local()])[0]
    return wrap_shard(local, mesh, dim, x.shape)


def best_free_dim(x_shape: Any, candidates: list[int], world: int) -> int | None:
    """The candidate dim to shard on: the largest, preferring sizes ``>= world`` (every rank gets a
    share); ``None`` without candidates."""
    if not candidates:
        return None
    return max(candidates, key=lambda d: (x_shape[d] >= world, x_shape[d], -d))


def to_spatial(x: Any, nd: int) -> Any:
    """A ``Partial`` input reduced first; ``x`` sharded on its H dim when a spatial op (``nd`` spatial dims) gets it sharded on a dim the
    op mixes (channels, e.g. heads merged back into channels after attention re-laid out onto them):
    one all-to-all instead of an error or a gather. Batch-sharded, spatially sharded, replicated and
    plain inputs are returned as they are."""
    if isinstance(x, DTensor) and any(p.is_partial() for p in x.placements):
        # a partial sum (a contraction DTensor ran): reduce it once (an all-reduce, not a gather)
        from torch.distributed.tensor import Replicate

        x = x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)
    d = domain_shard_dim(x)
    if d is None or x.ndim not in (nd + 1, nd + 2):
        return x
    first = x.ndim - nd
    if d >= first or (d == 0 and x.ndim == nd + 2):
        return x
    h = x.ndim - 2 if nd >= 2 else x.ndim - 1
    return reshard(x, h)
