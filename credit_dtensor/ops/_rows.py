"""Shared machinery of the row-resampling rules (pad, interpolate, pooling, pixel shuffle).

Every such op, along the sharded axis, is "each output row reads a few input rows". A *row op*
(:class:`RowOp`) is built from pure geometry for one (shape, params, world, rank): it knows every
rank's extended input (so the halo exchange needs no negotiation) and has an explicit forward and
an explicit adjoint on *local* tensors. :func:`apply_row_op` runs the pair inside the generic
``credit_dtensor::rule`` custom op (:mod:`.opaque`), rebuilt there from a :class:`RowOpRef` (the
op's factory name and arguments, see :func:`register_row_ops`). The module wrappers, the public
functions and the torch-function rules (``F.pad(x_sharded, ...)`` etc.) all end there, so one
tested implementation serves every entry point and no path ever all-gathers the activation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .. import stats
from ..dtensor import wrap_shard
from ..geometry import chunk_range
from ..geometry.resample import taps_rows
from ..halo import cached_plan, halo_gather, halo_scatter_add
from . import _groups, opaque

__all__ = [
    "RowOp",
    "RowOpRef",
    "SeparableOp",
    "Taps",
    "apply_row_op",
    "register_row_ops",
    "row_op_ref",
    "domain_info",
    "chunk_needs",
    "broadcast_shape",
    "local_shape",
    "meta_like",
]


def domain_info(x: DTensor) -> tuple[DeviceMesh, dist.ProcessGroup, int, int]:
    mesh = x.device_mesh
    return mesh, mesh.get_group(), mesh.size(), mesh.get_local_rank()


def chunk_needs(n_out: int, world: int, rows_of: Any) -> tuple[tuple[int | None, ...], ...]:
    """Every rank's extended input: ``rows_of(o0, o1)`` for its ``torch.chunk`` output rows."""
    return tuple(tuple(rows_of(*chunk_range(n_out, world, r))) for r in range(world))


def local_shape(shape: Sequence[int], dim: int, rows: int) -> list[int]:
    """``shape`` with ``rows`` along ``dim``."""
    s = list(shape)
    s[dim] = rows
    return s


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A ``meta`` tensor of ``t``'s global shape and dtype: PyTorch's own shape checks and output
    shape for an op, without memory or compute."""
    return torch.empty(tuple(t.shape), device="meta", dtype=t.dtype)


def broadcast_shape(ndim: int, dim: int, n: int) -> list[int]:
    return local_shape([1] * ndim, dim, n)


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
    nd: int = 0  # trailing dims the op owns; the ones before them (batch, if any) pass through

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        raise NotImplementedError

    def backward(self, g: torch.Tensor, saved: Any, group: dist.ProcessGroup) -> torch.Tensor:
        raise NotImplementedError

    def local_out_shape(self, rank_rows: int) -> list[int]:
        return local_shape(self.out_shape, self.dim, rank_rows)

    def shape_like(self, t: torch.Tensor, shape: Sequence[int], rows: int) -> list[int]:
        """``t``'s leading dims, then the last ``nd`` dims of ``shape`` with ``rows`` along ``dim``."""
        lead = list(t.shape[: t.ndim - self.nd])
        return local_shape(lead + list(shape[len(shape) - self.nd :]), self.dim, rows)


class SeparableOp(RowOp):
    """Taps along the sharded dim (:class:`Taps`) + PyTorch's kernel on the other spatial dims
    (``_other`` and its adjoint; identity by default)."""

    def _setup_taps(self, n: int, n_out: int, taps_of, world: int, rank: int, bwd_taps_of=None) -> None:
        """Forward taps, and (when PyTorch's backward is not the forward's adjoint, see
        :func:`~credit_dtensor.geometry.resample.nearest_source`) separate backward taps; the
        extended input holds the rows of both."""
        allt = [taps_of(o) for o in range(n_out)]
        allb = [bwd_taps_of(o) for o in range(n_out)] if bwd_taps_of is not None else None
        if allb == allt:
            allb = None

        def rows_of(o0, o1):
            rows = set(taps_rows(allt[o0:o1]))
            if allb is not None:
                rows.update(taps_rows(allb[o0:o1]))
            return tuple(sorted(rows))

        needs = chunk_needs(n_out, world, rows_of)
        self.plan = cached_plan(n, world, rank, needs)
        self.o0, self.o1 = chunk_range(n_out, world, rank)
        pos = {g: i for i, g in enumerate(needs[rank])}
        self.ext_len = len(needs[rank])

        def local(taps):
            return Taps([[(pos[r], w) for r, w in taps[o] if w != 0.0] for o in range(self.o0, self.o1)])

        self.taps = local(allt)
        self.taps_bwd = local(allb) if allb is not None else self.taps

    @property
    def rows(self) -> int:
        return self.o1 - self.o0

    def _other(self, yh: torch.Tensor) -> torch.Tensor:
        return yh

    def _other_adjoint(self, g: torch.Tensor, yh_shape: list[int]) -> torch.Tensor:
        return g

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup):
        ext = halo_gather(x, self.dim, self.plan, group)
        if self.rows == 0:
            return x.new_zeros(self.shape_like(x, self.out_shape, 0)), None, None
        return self._other(self.taps.apply(ext, self.dim)), None, None

    def backward(self, g: torch.Tensor, saved: object, group: dist.ProcessGroup) -> torch.Tensor:
        ext_shape = self.shape_like(g, self.in_shape, self.ext_len)
        if self.rows == 0:
            g_ext = g.new_zeros(ext_shape)
        else:
            yh_shape = local_shape(ext_shape, self.dim, self.rows)
            g_ext = self.taps_bwd.adjoint(self._other_adjoint(g, yh_shape), self.dim, self.ext_len)
        return halo_scatter_add(g_ext.contiguous(), self.dim, self.plan, group)


#: RowOp class name -> cached factory ``(*args) -> RowOp`` (each family registers its ops)
ROW_FACTORIES: dict[str, Any] = {}


@functools.lru_cache(maxsize=1024)
def _cached(cls: type, *args: Any) -> RowOp:
    op = cls(*args)
    op.cache_key = (cls.__name__, args)
    return op


def build_row_op(name: str, args: tuple) -> RowOp:
    """The op ``name`` of ``args`` (one cached instance per argument tuple: plans computed once)."""
    return ROW_FACTORIES[name](*args)


def register_row_ops(*classes: type) -> None:
    """Make each :class:`RowOp` class buildable by name (``row_op_ref(cls.__name__, args, ...)``),
    one cached instance per argument tuple."""
    for cls in classes:
        ROW_FACTORIES[cls.__name__] = functools.partial(_cached, cls)


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
        op = build_row_op(name, args)
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
        return [
            y,
            y.new_empty(0, dtype=torch.long) if aux is None else aux,
            y.new_empty(0, dtype=torch.long) if saved is None else saved,
        ]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        g = grads[0]
        if g is None:
            return [None]
        with stats.op_label(self.op.label):
            return [
                self.op.backward(g.contiguous(), saved[0] if saved[0].numel() else None, _groups.resolve(self.group))
            ]

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
    return _RowRule(build_row_op(name, args), group, world, rank)


def apply_row_op(x: DTensor, op: RowOp | RowOpRef) -> Any:
    """Run ``op`` on ``x`` with autograd (returns the output DTensor, or ``(output, aux)``): the
    local forward and its explicit adjoint run inside one custom op (compile-friendly)."""
    mesh, _, world, rank = domain_info(x)
    key = opaque.make_key("rows", *op.cache_key, _groups.name_of(mesh), world, rank)
    y, aux, _ = opaque.apply(key, [x.to_local()])
    out = wrap_shard(y, mesh, op.dim, op.out_shape)
    if getattr(op, "with_indices", False):
        return out, wrap_shard(aux, mesh, op.dim, op.out_shape)
    return out
