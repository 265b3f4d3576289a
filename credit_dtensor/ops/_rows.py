"""Shared machinery of the row-resampling rules (pad, interpolate, pooling, pixel shuffle).

Every such op, along the sharded axis, is "each output row reads a few input rows". A *row op*
(:class:`RowOp`) is built from pure geometry for one (shape, params, world, rank): it knows every
rank's extended input (so the halo exchange needs no negotiation) and has an explicit forward and
an explicit adjoint on *local* tensors. Both entry points use the same pair:

* the module / public-function path wraps it in one autograd node (:func:`apply_row_op`);
* the functional path (aten rules, below autograd) calls ``forward`` in the forward rule and
  ``backward`` in the rule of the aten backward op.

So one tested implementation serves both, and no path ever all-gathers the activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .. import stats
from ..errors import DomainParallelError, UnsupportedShardingError
from ..geometry import chunk_range
from ..sharding import contiguous_stride
from . import _groups, opaque

__all__ = [
    "RowOp",
    "Taps",
    "apply_row_op",
    "spatial_shard_dim",
    "domain_info",
    "wrap",
    "grad_local",
    "chunk_needs",
    "broadcast_shape",
]


def spatial_shard_dim(x: object, nd: int, where: str) -> int | None:
    """The tensor dim (one of the last ``nd``) a DTensor is sharded on; None if not spatially sharded."""
    if not isinstance(x, DTensor):
        return None
    first = x.ndim - nd
    dims = [p.dim for p in x.placements if isinstance(p, Shard) and p.dim >= first]
    if not dims:
        return None
    if x.device_mesh.ndim != 1:
        raise UnsupportedShardingError(
            f"{where}: input is spatially sharded on a {x.device_mesh.ndim}-D mesh {x.device_mesh}: "
            "activations must live on the 1-D domain mesh (DomainParallelManager.domain_mesh)"
        )
    return dims[0]


def domain_info(x: DTensor) -> tuple[DeviceMesh, dist.ProcessGroup, int, int]:
    mesh = x.device_mesh
    return mesh, mesh.get_group(), mesh.size(), mesh.get_local_rank()


def wrap(local: torch.Tensor, mesh: DeviceMesh, dim: int, shape: Sequence[int]) -> DTensor:
    """``DTensor.from_local`` with explicit global shape/stride (uneven shards safe)."""
    shape = torch.Size(shape)
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=shape, stride=contiguous_stride(shape))


def grad_local(g: object, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    """This rank's rows of an output gradient, redistributed to ``Shard(dim)`` if it arrives otherwise."""
    if not isinstance(g, DTensor):
        raise DomainParallelError(f"expected a DTensor gradient for a Shard({dim}) output, got {type(g).__name__}")
    if tuple(g.placements) != (Shard(dim),):
        g = g.redistribute(mesh, [Shard(dim)])
    return g.to_local().contiguous()


def chunk_needs(n_out: int, world: int, rows_of: Any) -> tuple[tuple[int | None, ...], ...]:
    """Every rank's extended input: ``rows_of(o0, o1)`` for its ``torch.chunk`` output rows."""
    return tuple(tuple(rows_of(*chunk_range(n_out, world, r))) for r in range(world))


def broadcast_shape(ndim: int, dim: int, n: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = n
    return shape


class Taps:
    """Output rows as weighted sums of extended-input rows along ``dim`` (padded to equal tap counts).

    ``rows[i]`` is the list of ``(ext index, weight)`` of local output row ``i``; padding taps
    repeat the row's first tap with weight 0, so they never read a row the output does not read.
    """

    def __init__(self, rows: Sequence[Sequence[tuple[int, float]]]) -> None:
        self.n_out = len(rows)
        self.n_taps = max((len(r) for r in rows), default=0)
        idx: list[list[int]] = [[] for _ in range(self.n_taps)]
        wts: list[list[float]] = [[] for _ in range(self.n_taps)]
        for row in rows:
            first = row[0][0] if row else 0
            for t in range(self.n_taps):
                i, w = row[t] if t < len(row) else (first, 0.0)
                idx[t].append(i)
                wts[t].append(w)
        self._idx, self._w = idx, wts
        self.empty_rows = tuple(i for i, r in enumerate(rows) if not r)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                torch.tensor(self._idx, dtype=torch.long, device=device).reshape(self.n_taps, self.n_out),
                torch.tensor(self._w, dtype=dtype, device=device).reshape(self.n_taps, self.n_out),
            )
        return self._cache[key]

    @staticmethod
    def _math_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def apply(self, ext: torch.Tensor, dim: int) -> torch.Tensor:
        """``y[i] = sum_t w[t, i] * ext[idx[t, i]]`` along ``dim`` (math in float32 for half types)."""
        shape = list(ext.shape)
        shape[dim] = self.n_out
        cdt = self._math_dtype(ext.dtype)
        if self.n_out == 0 or self.n_taps == 0 or ext.shape[dim] == 0:
            return ext.new_zeros(shape)
        idx, w = self.tensors(ext.device, cdt)
        src = ext.to(cdt)
        bshape = broadcast_shape(ext.ndim, dim, self.n_out)
        y = src.index_select(dim, idx[0]) * w[0].view(bshape)
        for t in range(1, self.n_taps):
            y = y + src.index_select(dim, idx[t]) * w[t].view(bshape)
        return y.to(ext.dtype)

    def adjoint(self, g: torch.Tensor, dim: int, ext_len: int) -> torch.Tensor:
        """Transpose of :meth:`apply`: scatter-add ``w * g`` into the extended rows."""
        shape = list(g.shape)
        shape[dim] = ext_len
        cdt = self._math_dtype(g.dtype)
        out = torch.zeros(shape, dtype=cdt, device=g.device)
        if self.n_out == 0 or self.n_taps == 0 or ext_len == 0:
            return out.to(g.dtype)
        idx, w = self.tensors(g.device, cdt)
        gc = g.to(cdt)
        bshape = broadcast_shape(g.ndim, dim, self.n_out)
        for t in range(self.n_taps):
            out.index_add_(dim, idx[t], gc * w[t].view(bshape))
        return out.to(g.dtype)


class RowOp:
    """One rank's exact sharded op: ``forward(x_local) -> (y_local, aux_local | None, saved)`` and
    ``backward(g_local, saved) -> grad_x_local`` (both may communicate on ``group``).

    Subclasses set ``label`` (for :func:`credit_dtensor.comm_stats`), ``dim`` (sharded dim of input
    and output), ``in_shape`` and ``out_shape`` (global).
    """

    label = "resample"
    dim: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        raise NotImplementedError

    def backward(self, g: torch.Tensor, saved: Any, group: dist.ProcessGroup) -> torch.Tensor:
        raise NotImplementedError

    def local_out_shape(self, rank_rows: int) -> list[int]:
        shape = list(self.out_shape)
        shape[self.dim] = rank_rows
        return shape


#: RowOp class name -> cached factory ``(*args) -> RowOp`` (each family registers its ops)
ROW_FACTORIES: dict[str, Any] = {}


class RowOpRef(NamedTuple):
    """What the DTensor side needs of a :class:`RowOp` without building it: its factory name and
    arguments (the custom op builds the op from them, once), sharded dim and global output shape.
    Building plans is Python work Dynamo should not trace, so compiled code only carries this."""

    name: str
    args: tuple
    dim: int
    out_shape: tuple[int, ...]
    with_indices: bool = False

    @property
    def cache_key(self) -> tuple:
        return (self.name, self.args)


def row_op_ref(name: str, args: tuple, dim: int, out_shape: Sequence[int], with_indices: bool = False) -> RowOpRef:
    """A :class:`RowOpRef`; in eager mode the op is built here too and its output shape checked
    against ``out_shape`` (PyTorch's own, from a meta run), so a geometry bug fails loudly."""
    ref = RowOpRef(name, tuple(args), dim, tuple(int(s) for s in out_shape), with_indices)
    if not torch.compiler.is_compiling():
        op = ROW_FACTORIES[name](*args)
        if tuple(op.out_shape) != ref.out_shape:
            raise AssertionError(f"{op.label}: sharded output shape {tuple(op.out_shape)} != PyTorch's {ref.out_shape}")
    return ref


class _RowRule:
    """A :class:`RowOp` of one rank on one process group, as an opaque custom-op rule."""

    saved_inputs: tuple[int, ...] = ()
    saved_outputs = (2,)
    differentiable_outputs = (0,)

    def __init__(self, op: RowOp, group: str, world: int, rank: int) -> None:
        self.op, self.group = op, group
        self.rows = chunk_range(op.out_shape[op.dim], world, rank)
        self.in_rows = chunk_range(op.in_shape[op.dim], world, rank)

    def forward(self, inputs: list) -> list[torch.Tensor]:
        x = inputs[0]
        with stats.op_label(self.op.label):
            y, aux, saved = self.op.forward(x, _groups.resolve(self.group))
        return [y, y.new_empty(0, dtype=torch.long) if aux is None else aux,
                y.new_empty(0, dtype=torch.long) if saved is None else saved]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        g = grads[0]
        if g is None:
            return [None]
        with stats.op_label(self.op.label):
            return [self.op.backward(g.contiguous(), saved[0] if saved[0].numel() else None,
                                     _groups.resolve(self.group))]

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        x = inputs[0]
        y = x.new_empty(self.op.local_out_shape(self.rows[1] - self.rows[0]))
        idx = getattr(self.op, "with_indices", None)
        aux = y.new_empty(y.shape, dtype=torch.long) if idx else y.new_empty(0, dtype=torch.long)
        saved = y.new_empty(y.shape, dtype=torch.long) if idx is not None else y.new_empty(0, dtype=torch.long)
        return [y, aux, saved]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        g = grads[0]
        shape = list(self.op.in_shape)
        shape[self.op.dim] = self.in_rows[1] - self.in_rows[0]
        return [g.new_empty(shape)]


@opaque.builder("rows")
def _build_row_rule(name: str, args: tuple, group: str, world: int, rank: int) -> _RowRule:
    return _RowRule(ROW_FACTORIES[name](*args), group, world, rank)


def apply_row_op(x: DTensor, op: RowOp | RowOpRef) -> Any:
    """Run ``op`` on ``x`` with autograd (returns the output DTensor, or ``(output, aux)``): the
    local forward and its explicit adjoint run inside one custom op (compile-friendly)."""
    mesh, _, world, rank = domain_info(x)
    key = opaque.make_key("rows", *op.cache_key, _groups.name_of(mesh), world, rank)
    y, aux, _ = opaque.apply(key, [x.to_local()])
    out = wrap(y, mesh, op.dim, op.out_shape)
    if getattr(op, "with_indices", False):
        return out, wrap(aux, mesh, op.dim, op.out_shape)
    return out
