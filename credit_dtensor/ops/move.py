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

from .. import comm, guard, stats
from ..dtensor import align_operand, domain_shard_dim, full_operand, local_of, wrap_replicate, wrap_shard
from ..geometry import chunk_range, owner_of
from ..geometry.index import Entry, expand_index, result_position
from ..halo import cached_plan, halo_gather, halo_scatter_add
from . import _groups, alias, opaque
from ._rows import ROW_FACTORIES, RowOp, apply_row_op, chunk_needs, domain_info, row_op_ref
from .family import Signature, family, input_of
from .pointwise import local_apply
from .rechunk import fetch_rows, repartition_local  # noqa: F401 - re-exported

FAMILY = family(
    "move",
    "moving rows: roll, flip, slicing, narrow, index_select, split/chunk, cat along H; only the rows that change owner move",
)

__all__ = ["RowMapOp", "row_map", "roll_sources", "slice_sources", "repartition_local", "fetch_rows"]


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


@FAMILY.rule(
    torch.roll, torch.Tensor.roll, h="relayout", signature=Signature(("input", "shifts", "dims"), {"dims": None})
)
def _roll_rule(func, a):
    x, shifts, dims = a["input"], a.get("shifts"), a["dims"]
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


@FAMILY.rule(torch.flip, torch.Tensor.flip, h="relayout")
def _flip_rule(func, args, kwargs):
    x = input_of(args, kwargs)
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


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _classify(item: Any) -> tuple[str, int] | None:
    if isinstance(item, torch.Tensor):
        if item.dtype == torch.bool:
            return "mask", item.ndim
        if item.dtype in _INT_DTYPES:
            return "tensor", 1
    return None


def _tensorize(idx: Any) -> Any:
    """Python lists in an index are index tensors (``x[[0, 2]]``), as in PyTorch."""
    if isinstance(idx, list):
        return torch.tensor(idx)
    if isinstance(idx, tuple):
        return tuple(torch.tensor(i) if isinstance(i, list) else i for i in idx)
    return idx


def parse_index(x: torch.Tensor, idx: Any) -> list[Entry] | None:
    """``idx`` expanded to one entry per dim of ``x`` (``None``: not an index we understand)."""
    return expand_index(_tensorize(idx), x.ndim, _classify)


def _entries_item(entries: list[Entry]) -> tuple:
    return tuple(e.value if e.kind != "none" else None for e in entries)


@FAMILY.rule(torch.Tensor.__getitem__, h="relayout")
def _getitem_rule(func, args, kwargs):
    """``x[idx]`` of an H-sharded ``x``: the H entry moves only the rows it selects (a slice or an
    index tensor: re-chunked rows; one row: a ``Replicate`` row from its owner), the rest of the
    index runs on the local tensor. The result is tracked as a view of ``x`` (:mod:`.alias`)."""
    x, idx = args
    sd = domain_shard_dim(x)
    entries = parse_index(x, idx) if sd is not None else None
    if entries is None:
        return NotImplemented
    t = next(i for i, e in enumerate(entries) if e.kind != "none" and e.dim <= sd < e.dim + max(e.ndim, 1))
    e = entries[t]
    n = x.shape[sd]
    adv = [en for en in entries if en.kind in ("tensor", "mask")]
    if e.kind == "mask" or (e.kind == "tensor" and (len(adv) > 1 or e.value.ndim != 1)):
        return NotImplemented  # ops.assign refuses masks over H; several index tensors: DTensor (guarded)
    if any(isinstance(en.value, DTensor) for en in adv):
        return NotImplemented
    rest = list(entries)
    rest[t] = Entry("slice", slice(None), e.dim, 1)
    if e.kind == "int":  # one H row: every rank gets it (a Replicate result), from its owner
        if not -n <= e.value < n:
            return NotImplemented  # PyTorch's own IndexError
        row = select_row(x, e.value % n)
        rest.pop(t)
        items = _entries_item(rest)
        y = (
            row
            if all(en.kind == "slice" and en.value == slice(None) for en in rest)
            else _replicate_getitem(row, items)
        )
        return alias.track(y, x, idx, _assign_back(idx), shares_memory=False)
    y = x
    if e.kind == "tensor":
        y = row_map(x, [int(i) % n if n else int(i) for i in e.value.reshape(-1).tolist()])
    elif e.value != slice(None):
        if e.value.step is not None and e.value.step <= 0:
            return NotImplemented  # PyTorch's own error
        y = row_map(x, slice_sources(n, e.value.start, e.value.stop, e.value.step))
    if y is x or not all(en.kind == "slice" and en.value == slice(None) for en in rest):
        others = [tuple(en.value.shape) if en.kind == "tensor" else (1,) for en in adv if en is not e]
        pos = result_position(rest, t, len(torch.broadcast_shapes(*others)) if others else 1)
        y = local_apply(torch.Tensor.__getitem__, (y, _entries_item(rest)), {}, y, pos)
    shares = e.kind == "slice" and e.value == slice(None)
    return alias.track(y, x, idx, _assign_back(idx), shares_memory=shares)


class _SelectRow:
    """Row ``row`` of the local tensors along ``dim``, broadcast from its owner (a ``Replicate``
    result); backward: the owner takes the (replicated) gradient of the row, nothing moves."""

    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    differentiable_outputs = (0,)

    def __init__(self, shape: tuple, dim: int, row: int, group: str, world: int, rank: int) -> None:
        self.shape, self.dim, self.group, self.rank = tuple(shape), dim, group, rank
        self.owner = owner_of(row, shape[dim], world)
        a, b = chunk_range(shape[dim], world, rank)
        self.local_row, self.local_rows = row - a, b - a
        self.row_shape = self.shape[:dim] + self.shape[dim + 1 :]

    def forward(self, inputs: list) -> list[torch.Tensor]:
        x = inputs[0]
        if self.rank == self.owner:
            out = x.select(self.dim, self.local_row).contiguous().clone()
        else:
            out = x.new_empty(self.row_shape)
        with stats.op_label("select"):
            return [comm.broadcast(out, self.owner, _groups.resolve(self.group))]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        g = grads[0]
        local = list(self.shape)
        local[self.dim] = self.local_rows
        out = g.new_zeros(local)
        if self.rank == self.owner and g is not None:
            out.select(self.dim, self.local_row).copy_(g)
        return [out]

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        return [inputs[0].new_empty(self.row_shape)]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        local = list(self.shape)
        local[self.dim] = self.local_rows
        return [grads[0].new_empty(local)]


@opaque.builder("select_row")
def _build_select_row(shape: tuple, dim: int, row: int, group: str, world: int, rank: int) -> _SelectRow:
    return _SelectRow(shape, dim, row, group, world, rank)


def select_row(x: DTensor, row: int) -> DTensor:
    """Global row ``row`` of ``x`` along its sharded dim, on every rank (``Replicate``; one row moves,
    from its owner). Its gradient flows back to the owner's row."""
    mesh, _, world, rank = domain_info(x)
    dim = domain_shard_dim(x)
    key = opaque.make_key("select_row", tuple(x.shape), dim, row, _groups.name_of(mesh), world, rank)
    local = opaque.apply(key, [x.to_local()])[0]
    return wrap_replicate(local, mesh)


def single_row_replicated(x: DTensor) -> DTensor:
    """``x``, sharded on a dim of one global row (``t[:, :, :1]``, ``t[:, :, -1:]``), as a
    ``Replicate`` DTensor of the same shape: the row broadcast from its owner, the least a row that
    every rank's rows broadcast against can cost (``t - t[:, :, :1]``, ``t[:, :, 3:4].expand_as(t)``)."""
    d = domain_shard_dim(x)
    return wrap_replicate(local_of(select_row(x, 0)).unsqueeze(d), x.device_mesh)


def _replicate_getitem(t: DTensor, idx: tuple) -> DTensor:
    """``t[idx]`` for a ``Replicate`` DTensor, on the local value (every rank the same computation,
    so the same gradient: it stays ``Replicate``)."""
    return wrap_replicate(t.to_local()[idx], t.device_mesh)


def _assign_back(idx: Any):
    """How a slice ``x[idx]`` is written back into ``x`` (view semantics, :mod:`.alias`)."""

    def write(base: DTensor, value: DTensor) -> None:
        from .assign import assign

        assign(base, idx, value)

    return write


@FAMILY.rule(torch.narrow, torch.Tensor.narrow, h="relayout", signature=Signature(("input", "dim", "start", "length")))
def _narrow_rule(func, a):
    x, dim, start, length = a["input"], a.get("dim"), a.get("start"), a.get("length")
    sd = domain_shard_dim(x)
    if sd is None or not all(isinstance(v, int) for v in (dim, start, length)):
        return NotImplemented
    dim %= x.ndim
    if dim != sd:
        out = local_apply(torch.narrow, (x, dim, start, length), {}, x, sd)
        return _track_slices(out, x, dim, [(start % max(x.shape[dim], 1), None, length)], True)
    n = x.shape[sd]
    start = start + n if start < 0 else start
    if not 0 <= start <= start + length <= n:
        return NotImplemented  # PyTorch's own error
    return _track_slices(row_map(x, list(range(start, start + length))), x, dim, [(start, None, length)], False)


def _track_slices(out: Any, x: DTensor, dim: int, pieces: list[tuple[int, Any, int]], shares: bool) -> Any:
    """Track ``out`` (one piece, or a tuple of pieces ``x.narrow(dim, start, length)``) as views of ``x``."""
    idxs = [(slice(None),) * dim + (slice(a, a + n),) for a, _, n in pieces]
    if not isinstance(out, (tuple, list)):
        return alias.track(out, x, idxs[0], _assign_back(idxs[0]), shares_memory=shares)

    def write(base: DTensor, value: DTensor, i: int) -> None:
        _assign_back(idxs[i])(base, value)

    return alias.track(out, x, tuple(idxs), write, shares_memory=shares)


@FAMILY.rule(
    torch.index_select, torch.Tensor.index_select, h="relayout", signature=Signature(("input", "dim", "index"))
)
def _index_select_rule(func, a):
    x, dim, index = a["input"], a.get("dim"), a.get("index")
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


@FAMILY.rule(
    torch.split,
    torch.Tensor.split,
    h="relayout",
    signature=Signature(("tensor", "split_size_or_sections", "dim"), {"dim": 0}),
)
def _split_rule(func, a):
    args, kwargs = a.args, a.kwargs
    x, split, dim = a["tensor"], a.get("split_size_or_sections", a.get("split_size")), a["dim"]
    sd = domain_shard_dim(x)
    if sd is None or split is None or not isinstance(dim, int):
        return NotImplemented
    dim %= x.ndim
    sizes = _split_sizes(x.shape[dim], split)
    pieces, a = [], 0
    for s in sizes:
        pieces.append((a, None, s))
        a += s
    if dim != sd:
        out = _along_other_dim(func, args, kwargs, x, sd)
        return out if out is NotImplemented else _track_slices(out, x, dim, pieces, True)
    if sum(sizes) != x.shape[sd]:
        return NotImplemented
    out = [row_map(x, list(range(a, a + n))) for a, _, n in pieces]
    return _track_slices(tuple(out), x, dim, pieces, False)


def _along_other_dim(func, args, kwargs, x: DTensor, sd: int):
    """``split``/``chunk`` along a dim that is not sharded (``qkv.chunk(3, dim=1)`` of a tensor
    sharded on windows): every piece keeps each rank's rows, so it runs on the local tensor. DTensor
    may gather uneven shards for it (torch 2.14)."""
    try:
        return local_apply(func, args, kwargs, x, sd)
    except ValueError:
        return NotImplemented


@FAMILY.rule(torch.chunk, torch.Tensor.chunk, h="relayout", signature=Signature(("input", "chunks", "dim"), {"dim": 0}))
def _chunk_rule(func, a):
    args, kwargs = a.args, a.kwargs
    x, chunks, dim = a["input"], a.get("chunks"), a["dim"]
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(chunks, int) or chunks < 1 or not isinstance(dim, int):
        return NotImplemented
    dim %= x.ndim
    n = x.shape[dim]
    size = -(-n // chunks) if n else 0
    if dim != sd:
        if not size:
            return _along_other_dim(func, args, kwargs, x, sd)
        return _split_rule(torch.split, (x, size, dim), {})
    return _split_rule(torch.split, (x, size, sd), {}) if size else (x,)


# --- cat -----------------------------------------------------------------------------------------------------


def _native_cat(tensors, ref: DTensor, dim: int) -> bool:
    """Every operand a DTensor on ``ref``'s mesh and placements (one Shard, at least a row per rank),
    equal shapes but along ``dim``: DTensor's own cat keeps the shards, no rows move."""
    if len(ref.placements) != 1 or ref.shape[ref.placements[0].dim] < ref.device_mesh.size():
        return False
    shape = list(ref.shape)
    for t in tensors:
        if not isinstance(t, DTensor) or t.device_mesh is not ref.device_mesh or t.placements != ref.placements:
            return False
        other = list(t.shape)
        other[dim] = shape[dim]
        if other != shape:
            return False
    return True


@FAMILY.rule(
    torch.cat, torch.concat, torch.concatenate, h="relayout", signature=Signature(("tensors", "dim"), {"dim": 0})
)
def _cat_rule(func, a):
    args, kwargs = a.args, a.kwargs
    tensors, dim = a.get("tensors"), a.get("axis", a["dim"])
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return NotImplemented
    ref = next((t for t in tensors if domain_shard_dim(t) is not None), None)
    if ref is None or kwargs.get("out") is not None:
        return NotImplemented
    sd = domain_shard_dim(ref)
    dim %= ref.ndim
    if any(isinstance(t, torch.Tensor) and t.ndim != ref.ndim for t in tensors):
        return NotImplemented
    if dim != sd and _native_cat(tensors, ref, dim):
        with guard.trusted():  # DTensor's own cat (and its backward, slices) is local here, and cheaper
            return func(*args, **kwargs)
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
            full = full_operand(t, mesh)
            a, b = max(o0, offset), min(o1, offset + n)
            shape = list(ref.to_local().shape)
            shape[sd] = o1 - o0
            if b <= a:  # no rows here: an empty slice keeps the operand in the graph on every rank
                a = b = o0
            rows = full.narrow(sd, a - offset if b > a else 0, b - a)
            piece = torch.cat(
                [full.new_zeros(_with(shape, sd, a - o0)), rows, full.new_zeros(_with(shape, sd, o1 - b))], sd
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


from . import tile as _tile  # noqa: E402,F401 - registers x.repeat / tensor_split (imports this module)
