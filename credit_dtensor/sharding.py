"""Plain tensor <-> H-sharded DTensor.

``shard_tensor`` slices locally (every rank already holds the full tensor) or, with ``src=``,
scatters only each rank's rows from one rank; ``gather_tensor`` rebuilds the full tensor on every
rank; ``shard_batch`` applies the H rule of weather data (4-D: dim 2, 5-D: dim 3).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from . import comm, intercept
from .agreement import VERIFY_ENV, check_agreement
from .dtensor import wrap_shard
from .errors import DomainParallelError, MeshMismatchError
from .geometry import chunk_range, chunk_sizes
from .mesh import DomainParallelManager

__all__ = ["shard_tensor", "gather_tensor", "shard_batch", "h_dim_of", "verifying"]

#: Former name of :func:`credit_dtensor.dtensor.wrap_shard` (the same function), for old imports.
wrap_local = wrap_shard


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
        manager_or_mesh.check_open(what)
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


def _verify_default() -> bool:
    return os.environ.get(VERIFY_ENV, "").strip().lower() in ("1", "true", "yes", "on") or _VERIFY[0]


_VERIFY = [False]


@contextlib.contextmanager
def verifying() -> Iterator[None]:
    """Content checks on inside the block (``check`` uses it), as ``verify=True`` everywhere."""
    previous = _VERIFY[0]
    _VERIFY[0] = True
    try:
        yield
    finally:
        _VERIFY[0] = previous


def _check_tensor(x: object, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    kind = type(x).__name__
    raise DomainParallelError(
        f"{what}: expected a torch.Tensor, got {kind}: convert it first (torch.as_tensor(x) for lists and numpy "
        "arrays; for a nested batch of tensors use credit_dtensor.shard_batch)"
    )


class _FromFull(torch.autograd.Function):
    """This rank's rows of a full plain tensor; backward returns the *full* gradient on every rank
    (the rows of all ranks, gathered), so a plain input that requires grad gets exact gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, a: int, b: int, sizes: tuple[int, ...], group) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.sizes, ctx.group = dim, sizes, group
        return x.narrow(dim, a, b - a).clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        full = comm.all_gather_rows(g.contiguous(), ctx.dim, ctx.sizes, ctx.group)
        return full, None, None, None, None, None


def _slice(x: torch.Tensor, mesh: DeviceMesh, d: int) -> DTensor:
    """This rank's rows of a full tensor every rank holds, as a DTensor (no communication)."""
    world, rank = mesh.size(), mesh.get_local_rank()
    a, b = chunk_range(x.shape[d], world, rank)
    if x.requires_grad and world > 1:
        local = _FromFull.apply(x, d, a, b, tuple(chunk_sizes(x.shape[d], world)), mesh.get_group())
    else:  # a copy: the shard must not alias (nor keep alive) the caller's full tensor
        local = x.narrow(d, a, b - a).clone(memory_format=torch.contiguous_format)
    return wrap_shard(local, mesh, d, x.shape)


def shard_tensor(
    x: torch.Tensor | None,
    manager: DomainParallelManager | DeviceMesh,
    dim: int = -2,
    *,
    src: int | None = None,
    verify: bool | None = None,
) -> DTensor:
    """Shard ``x`` along ``dim`` over the domain mesh (``torch.chunk`` rule; empty shards allowed).

    Without ``src`` every rank must pass the same full tensor and nothing is communicated but a
    tiny check that every rank passed the same shape and dtype (a mismatch raises
    :class:`DomainParallelError` on every rank, naming the ranks). With ``verify=True`` (or
    ``CREDIT_DTENSOR_VERIFY=1``, and always inside ``credit_dtensor.check``) the content is
    compared too, by checksum. With ``src`` (a domain rank) only that rank's ``x`` is read; it
    sends each rank exactly its rows.

    The result is differentiable with respect to ``x``: a plain ``x`` that requires grad receives
    the full, exact gradient on every rank (its rows are gathered in backward).
    """
    intercept.ensure_enabled()
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
        x = _check_tensor(x, "shard_tensor")
        _check_device(x, mesh, "shard_tensor")
        d = _normalize_dim(x.ndim, dim, "shard_tensor")
        check_agreement(x, d, mesh, "shard_tensor", verify=_verify_default() if verify is None else verify)
        return _slice(x, mesh, d)
    if not isinstance(src, int) or not 0 <= src < world:
        raise DomainParallelError(f"shard_tensor: src={src} is not a domain rank (0..{world - 1})")
    group = mesh.get_group()
    if rank == src:
        if x is None:
            raise DomainParallelError(f"shard_tensor: rank {src} is src but passed x=None")
        x = _check_tensor(x, "shard_tensor")
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
    return wrap_shard(local, mesh, d, shape)


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


def shard_batch(batch: Any, manager: DomainParallelManager | DeviceMesh, *, verify: bool | None = None) -> Any:
    """Shard every 4-D/5-D tensor of a (nested) batch on H; pass everything else through.

    One agreement check covers the whole batch (every rank must pass the same structure, shapes
    and dtypes; with ``verify`` the same content), as in :func:`shard_tensor`.
    """
    intercept.ensure_enabled()
    mesh = _mesh_of(manager, "shard_batch")
    found: list[torch.Tensor] = []

    def collect(b: Any) -> None:
        if isinstance(b, DTensor):
            return
        if isinstance(b, torch.Tensor):
            if h_dim_of(b) is not None:
                _check_device(b, mesh, "shard_batch")
                found.append(b)
        elif isinstance(b, Mapping):
            for v in b.values():
                collect(v)
        elif isinstance(b, (list, tuple)):
            for v in b:
                collect(v)

    collect(batch)
    check_agreement(
        found,
        [h_dim_of(t) for t in found],
        mesh,
        "shard_batch",  # type: ignore[misc]
        verify=_verify_default() if verify is None else verify,
    )
    return _shard_tree(batch, mesh)


def _shard_tree(batch: Any, mesh: DeviceMesh) -> Any:
    if isinstance(batch, DTensor):
        return batch
    if isinstance(batch, torch.Tensor):
        d = h_dim_of(batch)
        return batch if d is None else _slice(batch, mesh, d)
    if isinstance(batch, Mapping):
        items = [(k, _shard_tree(v, mesh)) for k, v in batch.items()]
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:  # e.g. defaultdict, mappingproxy: fall back to a plain dict
            return dict(items)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_shard_tree(v, mesh) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_shard_tree(v, mesh) for v in batch)
    return batch
