"""Ops that move whole rows along the sharded dim: roll, flip, slicing / narrow / index_select,
split / chunk and cat (``F.pad`` is the same kind of map: :mod:`.pad`).

Each of them is a *row map*: output row ``i`` (of a new length along the sharded dim) is input
row ``sources[i]`` (or zero). The output is re-chunked with ``torch.chunk`` and each rank fetches,
in one batched exchange, exactly the rows of its output chunk that other ranks own -- for
``torch.roll`` by ``s`` that is ``s`` rows per boundary, for a slice only the rows that change
owner. Backward is the exact adjoint (gradient rows travel back and are added). DTensor all-gathers
the whole tensor for all of these. Along any other dim they are local (also for shards smaller
than the mesh, which DTensor would replicate).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import stats
from ..comm import exchange
from ..dtensor import align_operand, domain_shard_dim, full_operand, is_domain_replicate, wrap_shard
from ..geometry import chunk_range
from ..geometry.window import repartition as repartition_plan
from ..halo import cached_plan, halo_gather, halo_scatter_add
from ..intercept import register
from . import _groups, opaque
from ._rows import ROW_FACTORIES, RowOp, apply_row_op, chunk_needs, domain_info, row_op_ref
from .pointwise import local_apply

__all__ = ["RowMapOp", "row_map", "roll_sources", "slice_sources", "repartition_local"]


class RowMapOp(RowOp):
    """Output row ``i`` along ``dim`` = input row ``sources[i]`` (``None``: zero)."""

    label = "rows"

    def __init__(self, in_shape: tuple[int, ...], dim: int, sources: tuple[int | None, ...], world: int, rank: int):
        self.in_shape, self.dim = tuple(in_shape), dim
        out = list(in_shape)
        out[dim] = len(sources)
        self.out_shape = tuple(out)
        needs = chunk_needs(len(sources), world, lambda o0, o1: sources[o0:o1])
        self.plan = cached_plan(in_shape[dim], world, rank, needs)

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup):
        ext = halo_gather(x, self.dim, self.plan, group)
        return (ext.clone() if ext is x else ext), None, None

    def backward(self, g: torch.Tensor, saved: object, group: dist.ProcessGroup) -> torch.Tensor:
        return halo_scatter_add(g.contiguous(), self.dim, self.plan, group)


@functools.lru_cache(maxsize=1024)
def _cached(in_shape: tuple[int, ...], dim: int, sources: tuple[int | None, ...], world: int, rank: int) -> RowMapOp:
    op = RowMapOp(in_shape, dim, sources, world, rank)
    op.cache_key = ("RowMapOp", (in_shape, dim, sources, world, rank))
    return op


ROW_FACTORIES["RowMapOp"] = _cached


def row_map(x: DTensor, sources: Sequence[int | None]) -> DTensor:
    """``x`` re-assembled along its sharded dim from ``sources`` (differentiable)."""
    _, _, world, rank = domain_info(x)
    dim = domain_shard_dim(x)
    n = x.shape[dim]
    if list(sources) == list(range(n)):
        return x
    out_shape = list(x.shape)
    out_shape[dim] = len(sources)
    return apply_row_op(x, row_op_ref("RowMapOp", (tuple(x.shape), dim, tuple(sources), world, rank), dim, out_shape))


def roll_sources(n: int, shift: int) -> list[int]:
    return [(i - shift) % n for i in range(n)] if n else []


def slice_sources(n: int, start: int | None, stop: int | None, step: int | None) -> list[int]:
    return list(range(*slice(start, stop, step).indices(n)))


def _dims(dims: Any, ndim: int) -> list[int]:
    return [d % ndim for d in ((dims,) if isinstance(dims, int) else dims)]


# --- roll / flip -------------------------------------------------------------------------------------


@register(torch.roll, torch.Tensor.roll)
def _roll_rule(func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    shifts = kwargs.get("shifts", args[1] if len(args) > 1 else None)
    dims = kwargs.get("dims", args[2] if len(args) > 2 else None)
    sd = domain_shard_dim(x)
    if sd is None or dims is None or shifts is None:
        return NotImplemented
    dims = _dims(dims, x.ndim)
    shifts = [shifts] * len(dims) if isinstance(shifts, int) else list(shifts)
    if len(shifts) != len(dims):
        return NotImplemented  # PyTorch raises its own error
    y = x
    rest = [(s, d) for s, d in zip(shifts, dims) if d != sd]
    total = sum(s for s, d in zip(shifts, dims) if d == sd)
    if total % max(x.shape[sd], 1):
        y = row_map(y, roll_sources(x.shape[sd], total))
    if rest:
        y = local_apply(torch.roll, (y, [s for s, _ in rest], [d for _, d in rest]), {}, y, sd)
    return y if y is not x else local_apply(torch.Tensor.clone, (x,), {}, x, sd)


@register(torch.flip, torch.Tensor.flip)
def _flip_rule(func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    sd = domain_shard_dim(x)
    if sd is None:
        return NotImplemented
    dims = kwargs.get("dims", args[1:] if len(args) > 2 else args[1] if len(args) > 1 else None)
    if dims is None:
        return NotImplemented
    dims = _dims(dims, x.ndim)
    y = x
    if sd in dims:
        n = x.shape[sd]
        y = row_map(y, list(range(n - 1, -1, -1)))
    rest = [d for d in dims if d != sd]
    if rest:
        return local_apply(torch.flip, (y, rest), {}, y, sd)
    return y if y is not x else local_apply(torch.Tensor.clone, (x,), {}, x, sd)


# --- slicing / narrow / index_select / split / chunk ---------------------------------------------------------


def _basic_index(idx: Any) -> tuple | None:
    idx = idx if isinstance(idx, tuple) else (idx,)
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, (int, slice, type(None), type(Ellipsis))):
            return None
        if isinstance(i, slice) and not all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)):
            return None
    return idx


@register(torch.Tensor.__getitem__)
def _getitem_rule(func, args, kwargs):
    x, idx = args
    sd = domain_shard_dim(x)
    idx = _basic_index(idx) if sd is not None else None
    if idx is None:
        return NotImplemented  # advanced indexing: DTensor's own rule (under the gather guard)
    consumed = sum(1 for i in idx if isinstance(i, (int, slice)))
    if sum(1 for i in idx if i is Ellipsis) > 1 or consumed > x.ndim:
        return NotImplemented
    full: list[Any] = []
    for i in idx:
        full.extend([slice(None)] * (x.ndim - consumed) if i is Ellipsis else [i])
    if Ellipsis not in idx:
        full.extend([slice(None)] * (x.ndim - consumed))
    d, out_pos = 0, 0
    sd_pos = entry = None
    for k, i in enumerate(full):
        if i is None:
            out_pos += 1
            continue
        if d == sd:
            entry, sd_entry_index = i, k
            sd_pos = out_pos if isinstance(i, slice) else None
        if isinstance(i, slice):
            out_pos += 1
        d += 1
    if isinstance(entry, int):
        return NotImplemented  # selecting one H row makes a replicated result: DTensor (guarded)
    n = x.shape[sd]
    y = x
    if entry != slice(None):
        if entry.step is not None and entry.step <= 0:
            return NotImplemented  # PyTorch's own error
        y = row_map(x, slice_sources(n, entry.start, entry.stop, entry.step))
    rest = list(full)
    rest[sd_entry_index] = slice(None)
    if all(i == slice(None) for i in rest) and y is not x:
        return y
    return local_apply(torch.Tensor.__getitem__, (y, tuple(rest)), {}, y, sd_pos)


@register(torch.Tensor.__setitem__)
def _setitem_rule(func, args, kwargs):
    """``mask[a:b, c:d] = value`` on a ``Replicate`` DTensor (Swin's shifted-window attention mask,
    built with ``x.new_zeros`` from a sharded ``x``): every rank holds the whole tensor and applies
    the same assignment to it, so it runs on the local tensor. DTensor has no strategy for the
    ``fill_.Tensor`` a scalar assignment becomes. Only without autograd (a mask, a buffer):
    anything else is DTensor's."""
    x, idx, value = args
    if not is_domain_replicate(x) or x.requires_grad:
        return NotImplemented
    if isinstance(value, DTensor):
        if not is_domain_replicate(value) or value.device_mesh != x.device_mesh or value.requires_grad:
            return NotImplemented
        value = value.to_local()
    elif isinstance(value, torch.Tensor) and value.requires_grad:
        return NotImplemented
    leaves = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, DTensor) and not is_domain_replicate(i) for i in leaves):
        return NotImplemented
    local = tuple(i.to_local() if isinstance(i, DTensor) else i for i in leaves)
    idx = local if isinstance(idx, tuple) else local[0]
    x.to_local()[idx] = value  # the DTensor's own local tensor (no autograd): updated in place
    return None


@register(torch.narrow, torch.Tensor.narrow)
def _narrow_rule(func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    dim, start, length = (list(args[1:]) + [kwargs.get(k) for k in ("dim", "start", "length")][len(args) - 1 :])[:3]
    sd = domain_shard_dim(x)
    if sd is None or not all(isinstance(v, int) for v in (dim, start, length)):
        return NotImplemented
    dim %= x.ndim
    if dim != sd:
        return local_apply(torch.narrow, (x, dim, start, length), {}, x, sd)
    n = x.shape[sd]
    start = start + n if start < 0 else start
    if not 0 <= start <= start + length <= n:
        return NotImplemented  # PyTorch's own error
    return row_map(x, list(range(start, start + length)))


@register(torch.index_select, torch.Tensor.index_select)
def _index_select_rule(func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    index = kwargs.get("index", args[2] if len(args) > 2 else None)
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(dim, int) or not isinstance(index, torch.Tensor):
        return NotImplemented
    if isinstance(index, DTensor):
        if domain_shard_dim(index) is not None:
            return NotImplemented
        index = index.to_local()
    dim %= x.ndim
    if dim != sd:
        return local_apply(torch.index_select, (x, dim, index), {}, x, sd)
    n = x.shape[sd]
    rows = [int(i) % n if n else int(i) for i in index.reshape(-1).tolist()]
    return row_map(x, rows)


def _split_sizes(n: int, split: Any) -> list[int]:
    if isinstance(split, int):
        return [min(split, n - a) for a in range(0, n, split)] if split > 0 else []
    return list(split)


@register(torch.split, torch.Tensor.split)
def _split_rule(func, args, kwargs):
    x = args[0] if args else kwargs["tensor"]
    split = kwargs.get("split_size_or_sections", kwargs.get("split_size", args[1] if len(args) > 1 else None))
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    sd = domain_shard_dim(x)
    if sd is None or split is None or not isinstance(dim, int):
        return NotImplemented
    if dim % x.ndim != sd:
        return _along_other_dim(func, args, kwargs, x, sd)
    sizes = _split_sizes(x.shape[sd], split)
    if sum(sizes) != x.shape[sd]:
        return NotImplemented
    out, a = [], 0
    for s in sizes:
        out.append(row_map(x, list(range(a, a + s))))
        a += s
    return tuple(out)


def _along_other_dim(func, args, kwargs, x: DTensor, sd: int):
    """``split``/``chunk`` along a dim that is not sharded (``qkv.chunk(3, dim=1)`` of a tensor
    sharded on windows): every piece keeps each rank's rows, so it runs on the local tensor. DTensor
    may gather uneven shards for it (torch 2.14)."""
    try:
        return local_apply(func, args, kwargs, x, sd)
    except ValueError:
        return NotImplemented


@register(torch.chunk, torch.Tensor.chunk)
def _chunk_rule(func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    chunks = kwargs.get("chunks", args[1] if len(args) > 1 else None)
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(chunks, int) or chunks < 1 or not isinstance(dim, int):
        return NotImplemented
    if dim % x.ndim != sd:
        return _along_other_dim(func, args, kwargs, x, sd)
    n = x.shape[sd]
    size = -(-n // chunks) if n else 0
    return _split_rule(torch.split, (x, size, sd), {}) if size else (x,)


# --- cat -----------------------------------------------------------------------------------------------------


@register(torch.cat, torch.concat, torch.concatenate)
def _cat_rule(func, args, kwargs):
    tensors = args[0] if args else kwargs.get("tensors")
    dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return NotImplemented
    ref = next((t for t in tensors if domain_shard_dim(t) is not None), None)
    if ref is None or kwargs.get("out") is not None:
        return NotImplemented
    sd = domain_shard_dim(ref)
    dim %= ref.ndim
    if any(isinstance(t, torch.Tensor) and t.ndim != ref.ndim for t in tensors):
        return NotImplemented
    if dim != sd:  # concatenation of other dims: local rows of every operand
        try:
            local = [align_operand(t, ref, sd, ref.ndim, "torch.cat") for t in tensors]
        except Exception:  # noqa: BLE001 - let DTensor raise its own error
            return NotImplemented
        out = torch.cat(local, dim)
        shape = list(out.shape)
        shape[sd] = ref.shape[sd]
        return wrap_shard(out, ref.device_mesh, sd, shape)
    total = sum(t.shape[sd] for t in tensors)
    mesh, _, world, rank = domain_info(ref)
    o0, o1 = chunk_range(total, world, rank)
    parts, offset = [], 0
    for t in tensors:
        n = t.shape[sd]
        if domain_shard_dim(t) == sd and isinstance(t, DTensor):
            if t.device_mesh != mesh:
                return NotImplemented
            sources = [None] * offset + list(range(n)) + [None] * (total - offset - n)
            parts.append(row_map(t, sources).to_local())
        else:  # a full operand: this rank's output rows that come from it, locally
            full = full_operand(t, mesh) if isinstance(t, DTensor) else full_operand(t, mesh)
            a, b = max(o0, offset), min(o1, offset + n)
            shape = list(ref.to_local().shape)
            shape[sd] = o1 - o0
            piece = full.new_zeros(shape)
            if b > a:
                piece = torch.cat(
                    [
                        full.new_zeros(_with(shape, sd, a - o0)),
                        full.narrow(sd, a - offset, b - a),
                        full.new_zeros(_with(shape, sd, o1 - b)),
                    ],
                    sd,
                )
            parts.append(piece)
        offset += n
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    shape = list(ref.shape)
    shape[sd] = total
    return wrap_shard(out, mesh, sd, shape)


def _with(shape: list[int], dim: int, n: int) -> list[int]:
    s = list(shape)
    s[dim] = n
    return s


# --- re-chunking: contiguous runs change owner (window-aligned layouts, reshapes) ---------------------


class _Repartition:
    """One rank's re-chunking along ``dim`` from ``in_units`` to ``out_units`` ownership (both
    ``world + 1`` offsets of the same total), as an opaque custom-op rule. Each run moves once, in
    one batched exchange; backward is the reverse re-chunking (a permutation's adjoint is its
    inverse). Pure geometry: :func:`credit_dtensor.geometry.window.repartition`."""

    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    differentiable_outputs = (0,)

    def __init__(self, dim: int, in_units: tuple, out_units: tuple, group: str, world: int, rank: int) -> None:
        self.dim, self.group, self.rank = dim, group, rank
        self.fwd = repartition_plan(in_units, out_units, rank)
        self.bwd = repartition_plan(out_units, in_units, rank)

    def _move(self, x: torch.Tensor, plan: Any) -> torch.Tensor:
        x = x.contiguous()
        sends = [(dst, x.narrow(self.dim, a, c)) for dst, a, c in plan.sends]
        shapes = [(s, _with(list(x.shape), self.dim, c)) for s, _, c in plan.pieces if s != self.rank]
        received = exchange(sends, shapes, _groups.resolve(self.group), dtype=x.dtype, device=x.device)
        pieces, k = [], 0
        for s, a, c in plan.pieces:
            if s == self.rank:
                pieces.append(x.narrow(self.dim, a, c))
            else:
                pieces.append(received[k])
                k += 1
        if not pieces:
            return x.new_zeros(_with(list(x.shape), self.dim, 0))
        return torch.cat(pieces, self.dim) if len(pieces) > 1 else pieces[0].clone()

    def forward(self, inputs: list) -> list[torch.Tensor]:
        with stats.op_label("reshape"):
            return [self._move(inputs[0], self.fwd)]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        if grads[0] is None:
            return [None]
        with stats.op_label("reshape"):
            return [self._move(grads[0], self.bwd)]

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        return [inputs[0].new_empty(_with(list(inputs[0].shape), self.dim, self.fwd.out_len))]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        return [grads[0].new_empty(_with(list(grads[0].shape), self.dim, self.fwd.in_len))]


@opaque.builder("repartition")
def _build_repartition(dim: int, in_units: tuple, out_units: tuple, group: str, world: int, rank: int) -> _Repartition:
    return _Repartition(dim, in_units, out_units, group, world, rank)


def repartition_local(
    local: torch.Tensor, mesh: Any, dim: int, in_units: Sequence[int], out_units: Sequence[int]
) -> torch.Tensor:
    """Re-chunk plain local tensors along ``dim``: rank ``r`` holds global rows
    ``[in_units[r], in_units[r+1])`` and gets ``[out_units[r], out_units[r+1])`` (differentiable,
    compile-friendly; every rank of the mesh must call it). Only rows that change owner move.
    Unlike :func:`row_map`, neither layout has to be ``torch.chunk`` (e.g. window-aligned rows)."""
    in_units, out_units = tuple(int(v) for v in in_units), tuple(int(v) for v in out_units)
    if in_units == out_units:
        return local
    world, rank = mesh.size(), mesh.get_local_rank()
    key = opaque.make_key("repartition", dim, in_units, out_units, _groups.name_of(mesh), world, rank)
    return opaque.apply(key, [local])[0]
