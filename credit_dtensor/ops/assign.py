"""Assignment into H-sharded tensors: ``x[idx] = value`` (and so ``x[idx] += v`` and friends),
``masked_fill_``, ``index_put_``, ``masked_scatter_`` -- exact, moving only the value rows a rank
writes, never silently dropping a write.

DTensor's own ``__setitem__`` on a ``Shard(H)`` tensor slices the *local* shard with the *global*
index and writes into a gathered copy: the write is lost (``y[:, :, 2:9] = t`` leaves ``y``
unchanged) while the gather guard reports an exact-looking gather. Here the index is expanded per
dim (:mod:`credit_dtensor.geometry.index`); its entry on the sharded dim decides the global rows
written (a slice, one row, an index tensor or a boolean mask), and each rank writes the rows it owns:

* the value is aligned to those rows: a full value (plain or ``Replicate``) is cut locally; a value
  sharded like the selection (``y[:, :, 2:9] += 1`` re-reads the slice, a sharded copy) gets the
  rows this rank writes by one re-chunking exchange (only rows that change owner move);
* the write is out of place on the local tensor, then one DTensor ``copy_`` into ``x`` (local for
  the same placement), so autograd records it like PyTorch's own in-place write: the overwritten
  values get no gradient, the value gets the written rows' gradient, and a tensor saved for
  backward that is overwritten later raises like on one device (its version moves).

Every rank runs the same graph (ranks that own none of the rows write nothing but keep the value in
the graph), so gradients of values that every rank holds are reduced exactly once.
``x[mask]`` (a read with a boolean mask over H) has a data-dependent, unsharded result: refused with
the fix. What cannot be written exactly raises a :class:`~credit_dtensor.DomainParallelError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import comm, intercept
from ..dtensor import domain_shard_dim, full_operand, is_domain_replicate, local_replicated, wrap_shard
from ..errors import DomainParallelError, UnsupportedShardingError
from ..geometry import chunk_offsets, chunk_range
from ..geometry.index import Entry, local_selection, owner_runs, result_position
from . import alias
from .family import Signature, family
from .move import parse_index
from .rechunk import fetch_rows, repartition_local

FAMILY = family(
    "assign",
    "writes into an H-sharded tensor (setitem, masked_fill_, index_put_, masked_scatter_): each rank writes its rows",
)

__all__ = ["assign"]


def _refuse(where: str, why: str, fix: str) -> DomainParallelError:
    from .. import guard

    path = guard.module_path()
    head = f"{path}: " if path else ""
    return DomainParallelError(f"{head}{where} on an H-sharded tensor: {why}. Fix: {fix}")


_FIX = (
    "write with torch.where(mask, value, x) / x.masked_fill(mask, v) or a slice along H, or gather explicitly "
    "(credit_dtensor.gather_tensor) where a full tensor is really needed"
)


class _KeepInGraph(torch.autograd.Function):
    """``y`` unchanged; ``v`` gets a zero gradient. A rank that writes none of the rows keeps the
    value in its graph, so every rank runs the same backward (a value's gradient reduction is a
    collective)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.v_shape, ctx.v_dtype = v.shape, v.dtype
        return y.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, g.new_zeros(ctx.v_shape, dtype=ctx.v_dtype)


def _local_item(item: Any, where: str) -> Any:
    """An index entry that does not touch the sharded dim, as this rank uses it."""
    if isinstance(item, DTensor):
        if is_domain_replicate(item):
            return item.to_local()
        raise _refuse(where, f"an index tensor is sharded ({item.placements}) on a dim other than H", _FIX)
    return item


class _Selection:
    """How this rank writes one assignment: local index items and the value positions it needs."""

    def __init__(self, x: DTensor, entries: list[Entry], where: str) -> None:
        self.sd = sd = domain_shard_dim(x)
        mesh = x.device_mesh
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        self.n = n = x.shape[sd]
        a, b = chunk_range(n, self.world, self.rank)
        self.lo, self.hi = a, b
        t = next(i for i, e in enumerate(entries) if e.kind != "none" and e.dim <= sd < e.dim + max(e.ndim, 1))
        e = entries[t]
        adv = [en for en in entries if en.kind in ("tensor", "mask")]
        shapes = [tuple(en.value.shape) if en.kind == "tensor" else (1,) for en in adv]
        self.adv_ndim = len(torch.broadcast_shapes(*shapes)) if adv else 0
        self.result_ndim = sum(1 for en in entries if en.kind in ("slice", "none")) + self.adv_ndim
        self.kind = e.kind
        self.pos = result_position(entries, t, max(self.adv_ndim, 1))
        self.skip = False  # this rank writes nothing
        self.run: tuple[int, int] | None = None  # contiguous value positions [k0, k1) (slices)
        self.offsets: list[int] | None = None  # every rank's first value position (slices)
        self.positions: torch.Tensor | None = None  # value positions (index tensors, masks)
        self.length = 0  # global length of the selection along the result dim
        items = [_local_item(en.value, where) if i != t else None for i, en in enumerate(entries)]
        if e.kind == "slice":
            start, stop, step = e.value.indices(n)
            if step <= 0:
                raise ValueError("step must be greater than zero")
            rows = list(range(start, stop, step))
            self.length = len(rows)
            per_rank = [local_selection(rows, *chunk_range(n, self.world, r)).positions for r in range(self.world)]
            self.offsets = owner_runs(per_rank)
            sel = local_selection(rows, a, b)
            k0 = self.offsets[self.rank] if self.offsets else 0
            self.run = (k0, k0 + len(sel.positions))
            items[t] = slice(sel.local_rows[0], sel.local_rows[-1] + 1, step) if sel.positions else slice(0, 0)
        elif e.kind == "int":
            r = e.value
            if not -n <= r < n:
                raise IndexError(f"index {r} is out of bounds for dimension {sd} with size {n}")
            r %= n
            self.skip = not a <= r < b
            items[t] = r - a if not self.skip else None
        elif e.kind == "mask" and len(adv) == 1:  # one boolean mask covering the sharded dim
            self.mask_dim = j = sd - e.dim
            m = e.value
            if isinstance(m, DTensor):
                if domain_shard_dim(m) == j and m.shape == torch.Size(x.shape[e.dim : e.dim + m.ndim]):
                    self.mask_local, self.mask_full = m.to_local(), None  # sharded like x
                elif is_domain_replicate(m):
                    self.mask_full = m.to_local()
                    self.mask_local = self.mask_full.narrow(j, a, b - a)
                else:
                    raise _refuse(where, f"the mask's placements {m.placements} do not match the tensor's", _FIX)
            else:
                if m.shape[j] != n:
                    raise IndexError(
                        f"The shape of the mask {list(m.shape)} at index {j} does not match the shape of the indexed "
                        f"tensor {list(x.shape)} at index {sd}"
                    )
                self.mask_full, self.mask_local = m, m.narrow(j, a, b - a)
            items[t] = self.mask_local
        else:  # index tensors (and masks) together: the written elements as a list of points
            self.kind = "points"
            items = self._points(x, entries, items, where)
        self.items = tuple(items)

    def _points(self, x: DTensor, entries: list[Entry], items: list, where: str) -> list:
        """Advanced entries as 1-D index tensors of the points they select (masks by their nonzero
        coordinates), broadcast together and flattened; this rank keeps the points on its rows."""
        tensors, dims, owner = [], [], []
        for i, en in enumerate(entries):
            if en.kind not in ("tensor", "mask"):
                continue
            v = en.value
            if isinstance(v, DTensor):
                if not is_domain_replicate(v):
                    raise _refuse(where, "a sharded mask or index tensor together with other index tensors", _FIX)
                v = v.to_local()
            if en.kind == "mask":
                cols = v.nonzero(as_tuple=True)
                tensors.extend(cols)
                dims.extend(range(en.dim, en.dim + v.ndim))
                owner.extend([i] * len(cols))
            else:
                tensors.append(v)
                dims.append(en.dim)
                owner.append(i)
        for k, (tt, d) in enumerate(zip(tensors, dims)):
            size = x.shape[d]
            if tt.numel() and not (-size <= int(tt.min()) and int(tt.max()) < size):
                raise IndexError(f"index out of bounds for dimension {d} with size {size}")
            tensors[k] = tt.long() % max(size, 1)
        bt = torch.broadcast_tensors(*tensors)
        self.adv_shape = tuple(bt[0].shape)
        self.length = bt[0].numel()
        flat = [tt.reshape(-1) for tt in bt]
        h = flat[dims.index(self.sd)]
        owners = torch.bucketize(h, torch.tensor(chunk_offsets(self.n, self.world)[1:], device=h.device), right=True)
        self.all_positions = [(owners == r).nonzero().squeeze(1).tolist() for r in range(self.world)]
        keep = (owners == self.rank).nonzero().squeeze(1)
        self.positions = keep
        local = [f[keep] for f in flat]
        local[dims.index(self.sd)] = local[dims.index(self.sd)] - self.lo
        first = next(i for i, en in enumerate(entries) if en.kind in ("tensor", "mask"))
        self.pos = result_position(entries, first, len(self.adv_shape))
        self.result_shape = _result_shape(x.shape, entries, self.adv_shape, self.pos)
        self.result_ndim = len(self.result_shape)
        out: list = []
        for i, en in enumerate(entries):
            if en.kind in ("tensor", "mask"):
                out.extend(lt for lt, o in zip(local, owner) if o == i)
            else:
                out.append(items[i])
        return out

    # --- value positions for masks (only when the value is not broadcast along the selection) ----------------

    def mask_positions(self, group: Any) -> torch.Tensor:
        """Positions, in the global order of the mask's True elements, of this rank's True elements."""
        j = self.mask_dim
        if self.mask_full is not None:
            order = self.mask_full.reshape(-1).long().cumsum(0) - 1
            return order.view(self.mask_full.shape).narrow(j, self.lo, self.hi - self.lo)[self.mask_local]
        m = self.mask_local
        prefix = m.shape[:j].numel()
        slabs = m.reshape(prefix, -1)
        counts = comm.all_gather_small(slabs.long().sum(1), group)  # (world, prefix): metadata
        before = counts.sum(0).cumsum(0) - counts.sum(0)  # Trues in earlier prefixes, every rank
        base = before + counts[: self.rank].sum(0)  # + earlier ranks in the same prefix
        within = slabs.long().cumsum(1) - 1
        return (within + base[:, None]).reshape(m.shape)[m]


def _result_shape(shape: Any, entries: list[Entry], adv_shape: tuple, pos: int) -> list[int]:
    """The global shape of ``x[idx]`` (advanced dims ``adv_shape`` at ``pos``)."""
    out: list[int] = []
    for en in entries:
        if en.kind == "slice":
            out.append(len(range(*en.value.indices(shape[en.dim]))))
        elif en.kind == "none":
            out.append(1)
    return out[:pos] + list(adv_shape) + out[pos:]


def _value_operand(value: Any, sel: _Selection, x: DTensor, where: str) -> Any:
    """The part of ``value`` this rank writes, as a local tensor (gradient exact)."""
    if not isinstance(value, torch.Tensor):
        return value
    mesh = x.device_mesh
    vd = value.ndim - (sel.result_ndim - sel.pos) if sel.pos is not None else -1
    along = vd >= 0 and value.shape[vd] != 1
    if isinstance(value, DTensor):
        if value.device_mesh != mesh:
            raise _refuse(where, "the value lives on another mesh", "shard every operand with the same manager")
        if is_domain_replicate(value):
            local = local_replicated(value)
        else:
            vs = domain_shard_dim(value)
            if vs is None:
                raise UnsupportedShardingError(f"{where}: value placements {value.placements} are not supported")
            if vd < 0 or vs != vd or value.shape[vd] != sel.length:
                raise _refuse(
                    where,
                    f"the value {tuple(value.shape)} is sharded on dim {vs}, which is not the assignment's H selection",
                    "assign a plain/Replicate value, or one sharded along the selected rows",
                )
            if sel.kind == "slice" and sel.offsets is not None:
                ins = chunk_offsets(sel.length, sel.world)
                return repartition_local(value.to_local(), mesh, vd, ins, sel.offsets)
            if sel.kind == "points" and len(sel.adv_shape) == 1:  # y[:, :, rows] += 1: any rows, any order
                return fetch_rows(value.to_local(), mesh, vd, sel.length, sel.all_positions)
            raise _refuse(where, "a sharded value written through a mask or a multi-dim index", _FIX)
    else:
        local = full_operand(value, mesh)
    if sel.kind == "points":
        k = len(sel.adv_shape)
        full = local.expand(sel.result_shape)
        full = full.flatten(sel.pos, sel.pos + k - 1) if k else full.unsqueeze(sel.pos)
        return full.index_select(sel.pos, sel.positions.to(local.device))  # type: ignore[union-attr]
    if not along:
        return local
    if value.shape[vd] != sel.length and sel.kind != "mask":
        raise RuntimeError(
            f"shape mismatch: value tensor of shape {list(value.shape)} cannot be broadcast to the indexing result "
            f"({sel.length} elements along the selected rows)"
        )
    if sel.kind == "slice":
        k0, k1 = sel.run  # type: ignore[misc]
        return local.narrow(vd, k0, k1 - k0)
    return local.index_select(vd, sel.mask_positions(mesh.get_group()).to(local.device))


def assign(x: DTensor, idx: Any, value: Any, where: str = "Tensor.__setitem__") -> None:
    """``x[idx] = value`` for ``x`` sharded on one dim of a 1-D mesh (see the module docstring)."""
    entries = parse_index(x, idx)
    if entries is None:
        raise _refuse(where, f"the index {idx!r} is not supported", _FIX)
    sel = _Selection(x, entries, where)
    lv = _value_operand(value, sel, x, where)
    with intercept.suspended():
        xl = x.to_local()
        if sel.skip:
            newl = _KeepInGraph.apply(xl, lv) if isinstance(lv, torch.Tensor) and lv.requires_grad else xl.clone()
        else:
            newl = xl.clone()
            newl[sel.items] = lv
        x.copy_(wrap_shard(newl, x.device_mesh, sel.sd, x.shape))


@FAMILY.rule(torch.Tensor.__setitem__, h="local")
def _setitem_rule(func, args, kwargs):
    x, idx, value = args
    if domain_shard_dim(x) is not None:
        if not alias.already_written(x, idx, value):
            assign(x, idx, value)
        return None
    if is_domain_replicate(x):
        return _replicate_setitem(x, idx, value)
    return NotImplemented


def _replicate_setitem(x: DTensor, idx: Any, value: Any) -> Any:
    """``mask[a:b, c:d] = value`` on a ``Replicate`` DTensor (Swin's shifted-window attention mask,
    built with ``x.new_zeros`` from a sharded ``x``): every rank holds the whole tensor and applies
    the same assignment to it, so it runs on the local tensor. DTensor has no strategy for the
    ``fill_.Tensor`` a scalar assignment becomes. Only without autograd (a mask, a buffer):
    anything else is DTensor's."""
    if x.requires_grad:
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


# --- in-place writes spelled as methods ----------------------------------------------------------------------


@FAMILY.rule(torch.Tensor.masked_fill_, h="local", signature=Signature(("self", "mask", "value")))
def _masked_fill_rule(func, a):
    """``x.masked_fill_(mask, v)``: ``x[mask] = v`` with the mask broadcast to ``x``'s shape."""
    x, mask, value = a["self"], a.get("mask"), a.get("value")
    if domain_shard_dim(x) is None or not isinstance(mask, torch.Tensor):
        return NotImplemented
    if mask.ndim > x.ndim or any(m not in (1, s) for m, s in zip(mask.shape[::-1], x.shape[::-1])):
        return NotImplemented  # PyTorch's own error
    with intercept.suspended():
        full_mask = mask.expand(x.shape) if mask.shape != x.shape else mask
    assign(x, full_mask, value, "Tensor.masked_fill_")
    return x


@FAMILY.rule(
    torch.Tensor.index_put_,
    h="local",
    signature=Signature(("self", "indices", "values", "accumulate"), {"accumulate": False}),
)
def _index_put_rule(func, a):
    x, indices, values, accumulate = a["self"], a.get("indices"), a.get("values"), a["accumulate"]
    if domain_shard_dim(x) is None:
        return NotImplemented
    idx = tuple(slice(None) if i is None else i for i in indices)  # None: the whole dim
    if accumulate:
        raise _refuse(
            "Tensor.index_put_",
            "accumulate=True (rows may repeat and sum)",
            "use index_add / scatter_add along a dim that is not sharded, or x[idx] += v with unique rows",
        )
    assign(x, idx, values, "Tensor.index_put_")
    return x


@FAMILY.rule(torch.Tensor.masked_scatter_, h="local", signature=Signature(("self", "mask", "source")))
def _masked_scatter_rule(func, a):
    """``x.masked_scatter_(mask, source)``: the True elements of the mask, in row-major order, take
    ``source``'s first elements: ``x[mask] = source.reshape(-1)[:count]``."""
    x, mask, source = a["self"], a.get("mask"), a.get("source")
    if domain_shard_dim(x) is None or not isinstance(mask, torch.Tensor):
        return NotImplemented
    if isinstance(source, DTensor) and not is_domain_replicate(source):
        raise _refuse("Tensor.masked_scatter_", "the source is sharded", "pass a plain or Replicate source")
    with intercept.suspended():
        full_mask = mask.expand(x.shape) if mask.shape != x.shape else mask
        count = int(full_mask.sum()) if not isinstance(full_mask, DTensor) else None
    if count is None:
        raise _refuse("Tensor.masked_scatter_", "the mask is a DTensor", "pass a plain mask")
    src = source.reshape(-1)[:count]
    assign(x, full_mask, src, "Tensor.masked_scatter_")
    return x


@FAMILY.rule(torch.Tensor.__getitem__, h="refused")
def _mask_read_rule(func, args, kwargs):
    """``x[mask]`` with a boolean mask over H: the result is a 1-D tensor whose length depends on the
    data, sharded nowhere; refused with the fix instead of DTensor's sharding-propagation error."""
    x, idx = args
    sd = domain_shard_dim(x)
    if sd is None:
        return NotImplemented
    entries = parse_index(x, idx)
    if entries is None:
        return NotImplemented
    for e in entries:
        if e.kind == "mask" and e.dim <= sd < e.dim + e.ndim:
            raise _refuse(
                "Tensor.__getitem__ with a boolean mask",
                "the result is a 1-D tensor whose length depends on the data of every shard (not a sharded tensor)",
                "keep the layout with torch.where(mask, x, 0) / x * mask / x.masked_fill(~mask, 0) (then reduce, "
                "e.g. .sum() / mask.sum()), or select from a full tensor explicitly: gather_tensor(x)[gather_tensor(mask)]",
            )
    return NotImplemented
