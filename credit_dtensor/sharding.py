"""Plain tensor <-> H-sharded DTensor.

``shard_tensor`` slices locally (every rank already holds the full tensor) or, with ``src=``,
scatters only each rank's rows from one rank; ``gather_tensor`` rebuilds the full tensor on every
rank; ``shard_batch`` applies the H rule of weather data (4-D: dim 2, 5-D: dim 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from . import comm
from .errors import DomainParallelError, MeshMismatchError
from .geometry import chunk_range
from .mesh import DomainParallelManager

__all__ = ["shard_tensor", "gather_tensor", "shard_batch", "h_dim_of", "contiguous_stride", "wrap_local"]


def contiguous_stride(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _normalize_dim(ndim: int, dim: int, what: str) -> int:
    d = dim + ndim if dim < 0 else dim
    if not 0 <= d < ndim:
        raise DomainParallelError(
            f"{what}: shard dim {dim} does not exist on a {ndim}-D tensor: pass a tensor with at "
            f"least {abs(dim) if dim < 0 else dim + 1} dims or a valid dim"
        )
    return d


def _mesh_of(manager_or_mesh: DomainParallelManager | DeviceMesh, what: str = "sharding") -> DeviceMesh:
    if isinstance(manager_or_mesh, DomainParallelManager):
        return manager_or_mesh.domain_mesh
    if not isinstance(manager_or_mesh, DeviceMesh) or manager_or_mesh.ndim != 1:
        raise DomainParallelError(
            f"{what}: expected a DomainParallelManager or a 1-D domain DeviceMesh, got {manager_or_mesh!r}: "
            "pass the manager (or manager.domain_mesh)"
        )
    return manager_or_mesh


def _check_device(x: torch.Tensor, mesh: DeviceMesh, what: str) -> None:
    if x.device.type != mesh.device_type:
        raise DomainParallelError(
            f"{what}: tensor is on device type {x.device.type!r} but the mesh is {mesh.device_type!r}: "
            f"move it with .to({mesh.device_type!r}) first"
        )


def wrap_local(local: torch.Tensor, mesh: DeviceMesh, dim: int, global_shape: torch.Size | tuple[int, ...]) -> DTensor:
    """Differentiable ``DTensor.from_local`` with an explicit global shape (uneven shards safe)."""
    shape = torch.Size(global_shape)
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=shape, stride=contiguous_stride(shape))


def shard_tensor(
    x: torch.Tensor | None,
    manager: DomainParallelManager | DeviceMesh,
    dim: int = -2,
    *,
    src: int | None = None,
) -> DTensor:
    """Shard ``x`` along ``dim`` over the domain mesh (``torch.chunk`` rule; empty shards allowed).

    Without ``src`` every rank must pass the same full tensor and nothing is communicated. With
    ``src`` (a domain rank) only that rank's ``x`` is read; it sends each rank exactly its rows.
    The result is differentiable with respect to ``x`` (local slice).
    """
    mesh = _mesh_of(manager, "shard_tensor")
    world, rank = mesh.size(), mesh.get_local_rank()
    if isinstance(x, DTensor):
        raise DomainParallelError(
            f"shard_tensor: x is already a DTensor placed {x.placements}: pass the plain full tensor, "
            "or use x.redistribute(mesh, [Shard(dim)]) to change its placement"
        )
    if src is None:
        if x is None:
            raise DomainParallelError("shard_tensor: x is None; pass the full tensor, or src= to scatter from one rank")
        _check_device(x, mesh, "shard_tensor")
        d = _normalize_dim(x.ndim, dim, "shard_tensor")
        a, b = chunk_range(x.shape[d], world, rank)
        # a copy: the shard must not alias (nor keep alive) the caller's full tensor
        return wrap_local(x.narrow(d, a, b - a).clone(memory_format=torch.contiguous_format), mesh, d, x.shape)
    if not 0 <= src < world:
        raise DomainParallelError(f"shard_tensor: src={src} is not a domain rank (0..{world - 1})")
    group = mesh.get_group()
    if rank == src:
        if x is None:
            raise DomainParallelError(f"shard_tensor: rank {src} is src but passed x=None")
        _check_device(x, mesh, "shard_tensor")
        meta = (tuple(x.shape), x.dtype, _normalize_dim(x.ndim, dim, "shard_tensor"))
    else:
        meta = None
    shape, dtype, d = comm.broadcast_object(meta, src, group)  # type: ignore[misc]
    device = (
        torch.device(mesh.device_type)
        if mesh.device_type == "cpu"
        else torch.device(mesh.device_type, torch.cuda.current_device())
    )
    sends = []
    if rank == src:
        for r in range(world):
            if r != src:
                a, b = chunk_range(shape[d], world, r)
                sends.append((r, x.narrow(d, a, b - a)))
    recv = []
    if rank != src:
        a, b = chunk_range(shape[d], world, rank)
        rshape = list(shape)
        rshape[d] = b - a
        recv = [(src, tuple(rshape))]
    got = comm.exchange(sends, recv, group, dtype=dtype, device=device)
    if rank == src:
        a, b = chunk_range(shape[d], world, rank)
        local = x.narrow(d, a, b - a).clone(memory_format=torch.contiguous_format)
    else:
        local = got[0]
    return wrap_local(local, mesh, d, shape)


def gather_tensor(dt: DTensor, manager: DomainParallelManager | DeviceMesh | None = None) -> torch.Tensor:
    """The full plain tensor on every rank (differentiable all-gather)."""
    if not isinstance(dt, DTensor):
        raise DomainParallelError(f"gather_tensor: expected a DTensor, got {type(dt).__name__}")
    if manager is not None:
        mesh = _mesh_of(manager, "gather_tensor")
        if dt.device_mesh != mesh:
            raise MeshMismatchError(
                f"gather_tensor: the DTensor lives on mesh {dt.device_mesh} but the manager's domain mesh is "
                f"{mesh}: gather with the manager that created it (or omit manager=)"
            )
    return dt.full_tensor()


def h_dim_of(x: torch.Tensor) -> int | None:
    """H of weather tensors: dim 2 of (B, C, H, W), dim 3 of (B, C, T, H, W); None otherwise."""
    return {4: 2, 5: 3}.get(x.ndim)


def shard_batch(batch: Any, manager: DomainParallelManager | DeviceMesh) -> Any:
    """Shard every 4-D/5-D tensor of a (nested) batch on H; pass everything else through."""
    if isinstance(batch, DTensor):
        return batch
    if isinstance(batch, torch.Tensor):
        d = h_dim_of(batch)
        return batch if d is None else shard_tensor(batch, manager, d)
    if isinstance(batch, Mapping):
        items = [(k, shard_batch(v, manager)) for k, v in batch.items()]
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:  # e.g. defaultdict, mappingproxy: fall back to a plain dict
            return dict(items)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard_batch(v, manager) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, manager) for v in batch)
    return batch
