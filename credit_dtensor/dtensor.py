"""DTensor plumbing shared by every rule: which dim is sharded, local <-> DTensor with the global
shape (uneven shards need an explicit ``shape=``), and operands aligned with a sharded tensor.

Everything here is local arithmetic on placements and shapes; the only communication is the
backward of :func:`full_operand` for plain tensors that require grad (one all-reduce of the
gradient, as for a parameter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta  # the spec cache (as_dtensor)

from . import comm
from .errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from .geometry import chunk_range

__all__ = [
    "contiguous_stride",
    "sharded_dim",
    "is_sharded",
    "domain_shard_dim",
    "is_domain_sharded",
    "spatial_shard_dim",
    "first_sharded",
    "as_dtensor",
    "local_of",
    "wrap_shard",
    "global_stride",
    "wrap_replicate",
    "local_replicated",
    "check_replicated",
    "align_operand",
    "has_dtensor",
    "is_domain_replicate",
]


def contiguous_stride(shape: torch.Size | Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _shard_dims(x: object) -> list[int]:
    """The tensor dims of a DTensor's ``Shard`` placements, one per mesh dim that shards it (the
    one place that reads placements for "which dim"); empty for anything else."""
    if not isinstance(x, DTensor):
        return []
    return [p.dim % x.ndim for p in x.placements if isinstance(p, Shard)]


def sharded_dim(x: object) -> int | None:
    """The tensor dim of a DTensor's first ``Shard`` placement (any mesh); None for plain tensors
    and DTensors that are not sharded."""
    dims = _shard_dims(x)
    return dims[0] if dims else None


def is_sharded(x: object) -> bool:
    """A DTensor sharded somewhere, on any mesh: a rule's business (exact, or a clear error)."""
    return sharded_dim(x) is not None


def domain_shard_dim(x: object) -> int | None:
    """The tensor dim a DTensor on a 1-D mesh is ``Shard``-ed on; None for anything else."""
    if not isinstance(x, DTensor) or x.device_mesh.ndim != 1:
        return None
    return sharded_dim(x)


def is_domain_sharded(x: object) -> bool:
    return domain_shard_dim(x) is not None


def is_domain_replicate(x: object) -> bool:
    """A DTensor ``Replicate`` on a 1-D (domain) mesh: every rank holds all of it (a pooled tensor,
    a statistic, a mask)."""
    return isinstance(x, DTensor) and x.device_mesh.ndim == 1 and x.placements[0].is_replicate()


def spatial_shard_dim(x: object, nd: int, where: str) -> int | None:
    """The tensor dim (one of the last ``nd``) a DTensor is sharded on; None when it is not
    spatially sharded (plain, replicated, or sharded on a leading dim). Spatial sharding on a
    multi-dim mesh is refused: activations live on the 1-D domain mesh."""
    dims = [d for d in _shard_dims(x) if d >= x.ndim - nd]  # type: ignore[attr-defined]
    if not dims:
        return None
    mesh = x.device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1:
        raise UnsupportedShardingError(
            f"{where}: input is spatially sharded on a {mesh.ndim}-D mesh {mesh}: "
            "activations must live on the 1-D domain mesh (DomainParallelManager.domain_mesh)"
        )
    return dims[0]


def has_dtensor(args: Sequence[Any], kwargs: dict | None = None) -> bool:
    """Whether any (shallowly nested) argument is a DTensor; cheap, for the interception fast path."""
    for a in args:
        if isinstance(a, DTensor):
            return True
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, DTensor):
                    return True
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, DTensor):
                return True
            if isinstance(a, (list, tuple)) and any(isinstance(b, DTensor) for b in a):
                return True
    return False


def first_sharded(*tensors: object) -> DTensor | None:
    """The first argument that is a Shard-placed DTensor on a 1-D mesh."""
    for t in tensors:
        if is_domain_sharded(t):
            return t  # type: ignore[return-value]
    return None


def global_stride(local: torch.Tensor, shape: Sequence[int]) -> tuple[int, ...]:
    """The global stride of a DTensor whose local tensor is ``local``: the layout of ``local`` (its
    dims ordered by stride, outermost first) over the global ``shape``. A local tensor that is not
    contiguous (a channels-last view, a window view of a permuted tensor) must not be described as
    contiguous: DTensor turns a later ``reshape`` into a ``view`` of the local tensor when the
    global stride says it is one, which fails ("view size is not compatible ...")."""
    if local.is_contiguous():
        return contiguous_stride(shape)
    strides = local.stride()
    order = sorted(range(local.ndim), key=lambda d: (-strides[d], d))  # outermost first
    out, acc = [0] * local.ndim, 1
    for d in reversed(order):
        out[d] = acc
        acc *= max(int(shape[d]), 1)
    return tuple(out)


_SPECS: dict[tuple, DTensorSpec] = {}
comm.register_group_cache(_SPECS.clear)  # specs hold meshes: dropped with the process groups


def _spec(mesh: DeviceMesh, placements: tuple, shape: torch.Size, stride: tuple[int, ...], dtype) -> DTensorSpec:
    """The spec of a DTensor, shared by every DTensor of that mesh, placement, shape, stride and dtype
    (DTensor replaces a tensor's spec object, it never mutates one): building a spec and its
    tensor meta is most of ``from_local``'s host time (~190 us with autograd, 80 us without)."""
    key = (id(mesh), placements, shape, stride, dtype)
    hit = _SPECS.get(key)
    if hit is None or hit.mesh is not mesh:
        if len(_SPECS) >= 8192:
            _SPECS.clear()
        hit = _SPECS[key] = DTensorSpec(mesh, placements, tensor_meta=TensorMeta(shape, stride, dtype))
    return hit


def _constructor() -> Any:
    """``DTensor(local, spec, requires_grad=False)`` without its Python ``__init__``: in torch
    2.11-2.14 ``__new__`` is the C++ ``Tensor._dtensor__new__`` that builds the whole DTensor, and
    ``__init__`` only calls ``Tensor.__init__`` through two decorators (Dynamo's disable, export's
    constructor marker) that cost twice the construction itself in eager mode. Falls back to the
    class call if a later torch moves work into ``__init__``."""
    new = getattr(torch.Tensor, "_dtensor__new__", None)
    if new is not None and DTensor.__new__ is new:
        return lambda local, spec: new(DTensor, local, spec, requires_grad=False)
    return lambda local, spec: DTensor(local, spec, requires_grad=False)


_new_dtensor = _constructor()


class _FromLocal(torch.autograd.Function):
    """``DTensor.from_local`` (``run_check=False``, explicit shape and stride) for a local tensor in
    the autograd graph, with a cached spec; backward: the output gradient redistributed to the
    forward placements if it arrives in others, then its local tensor (as ``from_local``'s)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, spec: DTensorSpec) -> DTensor:  # type: ignore[override]
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return _new_dtensor(local.detach(), spec)

    @staticmethod
    def backward(ctx, grad: Any) -> tuple[Any, None]:  # type: ignore[override]
        if grad is None:
            return None, None
        if isinstance(grad, DTensor):
            spec = ctx.spec
            if grad.placements != spec.placements:
                grad = grad.redistribute(spec.mesh, spec.placements)
            grad = grad.to_local()
        return grad, None


def as_dtensor(
    local: torch.Tensor, mesh: DeviceMesh, placements: Sequence[Any], shape: Sequence[int], stride
) -> DTensor:
    """``DTensor.from_local(local, mesh, placements, run_check=False, shape=, stride=)``, differentiable,
    for the rules' hot paths: inside a compiled region PyTorch's own (Dynamo traces it); in eager
    mode a DTensor built on a cached spec, directly when no gradient can flow to ``local`` (inside
    an ``autograd.Function``, under ``no_grad``, a tensor that needs none), else through one small
    autograd node."""
    if torch.compiler.is_compiling():
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)
    spec = _spec(mesh, tuple(placements), torch.Size(shape), tuple(stride), local.dtype)
    if local.requires_grad and torch.is_grad_enabled():
        return _FromLocal.apply(local, spec)
    return _new_dtensor(local.detach() if local.requires_grad else local, spec)


class _ToLocal(torch.autograd.Function):
    """``DTensor.to_local`` for a DTensor in the autograd graph; backward: the local gradient as a
    DTensor of ``grad_placements`` (default: the input's) on a cached spec (``to_local``'s own backward
    goes through ``from_local``, several times the host time)."""

    @staticmethod
    def forward(ctx, x: DTensor, grad_placements: tuple) -> torch.Tensor:  # type: ignore[override]
        ctx.meta = (x.device_mesh, grad_placements, x.shape, isinstance(grad_placements[0], Shard))
        ctx.set_materialize_grads(False)
        # an alias with the local's own strides: view_as recomputes the strides of size-1 dims, and
        # PyTorch's CPU batch_norm backward returns wrong gradients for a channels-last (1, C, H, W)
        # whose batch stride is not H*W*C
        return x._local_tensor[...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> tuple[Any, None]:  # type: ignore[override]
        if grad is None:
            return None, None
        mesh, placements, shape, sharded = ctx.meta
        with torch._C.DisableTorchFunction():  # metadata reads and a DTensor built: no rule applies
            stride = global_stride(grad, shape) if sharded else grad.stride()
            return as_dtensor(grad, mesh, placements, shape, stride), None


def local_of(x: DTensor, grad_placements: Sequence[Any] | None = None) -> torch.Tensor:
    """``x.to_local(grad_placements=...)`` for the rules' hot paths (the same values, views and
    gradients; eager mode skips ``from_local`` in backward, see :class:`_ToLocal`)."""
    if torch.compiler.is_compiling():
        return x.to_local(grad_placements=grad_placements)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x._local_tensor
    placements = tuple(grad_placements) if grad_placements is not None else x.placements
    if any(p.is_partial() for p in x.placements) and grad_placements is None:
        return x.to_local()  # Partial forward: PyTorch's own gradient placement rule
    return _ToLocal.apply(x, placements)


def wrap_shard(local: torch.Tensor, mesh: DeviceMesh, dim: int, shape: Sequence[int]) -> DTensor:
    """Differentiable ``DTensor.from_local`` as ``Shard(dim)`` with an explicit global shape (and
    the stride of the local layout, :func:`global_stride`)."""
    shape = torch.Size(shape)
    return as_dtensor(local, mesh, (Shard(dim),), shape, global_stride(local, shape))


def wrap_replicate(local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """A tensor every rank holds identically, as a ``Replicate`` DTensor (no communication)."""
    return as_dtensor(local, mesh, (Replicate(),) * mesh.ndim, local.shape, local.stride())


def check_replicated(t: object, mesh: DeviceMesh, where: str, name: str) -> None:
    """A DTensor used next to an H-sharded input (a parameter, a buffer) must live on the input's
    mesh and be ``Replicate`` there; anything else is a clear error. Plain tensors pass."""
    if not isinstance(t, DTensor):
        return
    if t.device_mesh is not mesh and t.device_mesh != mesh:
        raise MeshMismatchError(
            f"{where}: {name} lives on mesh {t.device_mesh} but the input on {mesh}: convert the module (or "
            "distribute the parameter) with the same manager that shards the input"
        )
    if not all(isinstance(p, Replicate) for p in t.placements):
        raise UnsupportedShardingError(
            f"{where}: {name} placements {t.placements} are not supported next to an H-sharded input: it must be "
            "Replicate on the domain mesh: use the module wrappers or distribute_tensor(t, mesh, [Replicate()])"
        )


def local_replicated(t: DTensor) -> torch.Tensor:
    """The local value of a replicated DTensor; its gradient flows back ``Partial`` (summed once)."""
    return local_of(t, (Partial(),) * t.device_mesh.ndim)


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group. For a plain tensor that every
    rank holds in full and uses partially (its own rows): the full gradient on every rank."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return t[...]  # an alias with t's own strides (view_as re-strides size-1 dims)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return comm.all_reduce_sum(g.contiguous().clone(), ctx.group), None


def full_operand(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """A plain full tensor (or Replicate DTensor) as a local tensor whose gradient, if any, is exact:
    summed over the domain group for plain tensors, ``Partial`` for DTensors."""
    if isinstance(t, DTensor):
        if any(not isinstance(p, Replicate) for p in t.placements):
            raise UnsupportedShardingError(f"expected a Replicate DTensor operand, got placements {t.placements}")
        return local_replicated(t)
    if t.requires_grad and mesh.size() > 1:
        return _SumGradOverRanks.apply(t, mesh.get_group())
    return t


def align_operand(t: object, ref: DTensor, ref_dim: int, out_ndim: int, where: str) -> object:
    """``t`` (an operand broadcast against the H-sharded ``ref``) as this rank's local operand.

    ``ref`` is sharded on ``ref_dim``; the broadcast result has ``out_ndim`` dims, so the sharded
    dim is ``out_ndim - ref.ndim + ref_dim`` of the result. An operand that is sharded the same way
    contributes its local rows; a full operand (plain tensor or Replicate DTensor) is sliced to this
    rank's rows along that dim (no communication) unless it broadcasts there (size 1 or absent).
    Non-tensors pass through.
    """
    if not isinstance(t, torch.Tensor):
        return t
    mesh = ref.device_mesh
    out_dim = out_ndim - ref.ndim + ref_dim
    t_dim = out_dim - (out_ndim - t.ndim)
    n = ref.shape[ref_dim]
    if isinstance(t, DTensor):
        if t.device_mesh != mesh:
            raise MeshMismatchError(
                f"{where}: operands live on different meshes ({ref.device_mesh} and {t.device_mesh}): "
                "shard every operand with the same manager"
            )
        d = domain_shard_dim(t)
        if d is not None:
            if d != t_dim or t.shape[d] != n:
                raise UnsupportedShardingError(
                    f"{where}: operand of shape {tuple(t.shape)} is sharded on dim {d} but the other operand "
                    f"{tuple(ref.shape)} on dim {ref_dim}: shard both on the same (H) dim, with the same size"
                )
            return local_of(t)
        if not all(isinstance(p, Replicate) for p in t.placements):
            raise UnsupportedShardingError(
                f"{where}: operand placements {t.placements} are not supported next to an H-sharded tensor: "
                "use Replicate or Shard(H)"
            )
    local = full_operand(t, mesh)
    if t_dim < 0 or local.shape[t_dim] == 1:
        return local
    if local.shape[t_dim] != n:
        raise DomainParallelError(
            f"{where}: operand of shape {tuple(t.shape)} does not broadcast against {tuple(ref.shape)} "
            f"along the sharded dim ({local.shape[t_dim]} vs {n}): PyTorch rejects this too"
        )
    a, b = chunk_range(n, mesh.size(), mesh.get_local_rank())
    return local.narrow(t_dim, a, b - a)
