"""``index_add`` / ``index_copy`` / ``index_fill`` (in place or not) along the sharded dim, exact
with repeated rows; ``scatter*`` / ``gather`` local along other dims and refused along the sharded
one with the fix. Split out of :mod:`.assign` (whose error helper it shares)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import intercept
from ..dtensor import domain_shard_dim, full_operand, is_domain_replicate, local_replicated, wrap_shard
from ..geometry import chunk_range
from ..geometry.index import local_selection
from .assign import _FIX, _refuse
from .family import Signature, family
from .rechunk import fetch_rows

FAMILY = family("index_write", "index_add/copy/fill along H on owned rows; scatter/gather along H refused")

__all__: list[str] = []


# --- index_add / index_copy / index_fill along a dim ------------------------------------------------------------

_INDEX_OPS = {
    torch.Tensor.index_add_: ("add", True),
    torch.Tensor.index_add: ("add", False),
    torch.index_add: ("add", False),
    torch.Tensor.index_copy_: ("copy", True),
    torch.Tensor.index_copy: ("copy", False),
    torch.index_copy: ("copy", False),
    torch.Tensor.index_fill_: ("fill", True),
    torch.Tensor.index_fill: ("fill", False),
    torch.index_fill: ("fill", False),
}


_INDEX_SIGNATURES = {
    f: Signature(("input", "dim", "index", "value" if kind == "fill" else "source"), {"alpha": 1})
    for f, (kind, _) in _INDEX_OPS.items()
}


def _index_rule(func, a):
    """``x.index_add_(dim, index, source, alpha=)`` / ``index_copy_`` / ``index_fill_`` (and their
    out-of-place forms) on a sharded ``x``: along the sharded dim each rank applies the entries of
    ``index`` that fall on its rows (repeated rows accumulate, as on one device), taking the
    matching rows of ``source`` (cut from a full source, fetched from a sharded one); along another
    dim it is local. In place: out of place on the local tensor, then one DTensor ``copy_``."""
    kind, inplace = _INDEX_OPS[func]
    x = a.get("input")
    sd = domain_shard_dim(x)
    if sd is None:
        return NotImplemented
    dim, index, other = a.get("dim"), a.get("index"), a.get("value" if kind == "fill" else "source")
    if not isinstance(dim, int) or not isinstance(index, torch.Tensor) or isinstance(index, DTensor):
        return NotImplemented
    if index.ndim > 1:
        return NotImplemented  # PyTorch's own error
    dim %= x.ndim
    mesh = x.device_mesh
    n = x.shape[sd]
    where = f"Tensor.index_{kind}"
    idx = index
    src_local: Any = other
    if dim == sd:
        rows = [int(i) % n for i in index.tolist()] if n else []
        world, rank = mesh.size(), mesh.get_local_rank()
        per_rank = [local_selection(rows, *chunk_range(n, world, r)) for r in range(world)]
        mine = per_rank[rank]
        idx = torch.tensor(mine.local_rows, dtype=torch.long, device=index.device)
        if kind != "fill" and isinstance(other, torch.Tensor):
            sdim = sd - (x.ndim - other.ndim)
            if isinstance(other, DTensor) and domain_shard_dim(other) is not None:
                if domain_shard_dim(other) != sdim or other.shape[sdim] != len(rows):
                    raise _refuse(where, "the source is sharded on another dim than the indexed one", _FIX)
                src_local = fetch_rows(other.to_local(), mesh, sdim, len(rows), [p.positions for p in per_rank])
            else:
                full = full_operand(other, mesh)
                src_local = full.index_select(sdim, torch.tensor(mine.positions, dtype=torch.long))
    elif kind != "fill" and isinstance(other, torch.Tensor):
        if isinstance(other, DTensor) and domain_shard_dim(other) is not None:
            src_local = other.to_local()
        else:
            src_local = full_operand(other, mesh)
            sdim = sd - (x.ndim - other.ndim)
            if sdim >= 0 and src_local.shape[sdim] == n:
                a, b = chunk_range(n, mesh.size(), mesh.get_local_rank())
                src_local = src_local.narrow(sdim, a, b - a)
    if isinstance(src_local, DTensor):
        src_local = local_replicated(src_local) if is_domain_replicate(src_local) else src_local
    with intercept.suspended():
        xl = x.to_local()
        if kind == "add":
            newl = xl.index_add(dim, idx, src_local, alpha=a["alpha"])
        elif kind == "copy":
            newl = xl.index_copy(dim, idx, src_local)
        else:
            newl = xl.index_fill(dim, idx, src_local)
        out = wrap_shard(newl, mesh, sd, x.shape)
        if not inplace:
            return out
        x.copy_(out)
    return x


FAMILY.rule(*_INDEX_OPS, h="local", signature=_INDEX_SIGNATURES)(_index_rule)


# --- scatter / gather: local along other dims, refused along the sharded one -----------------------------------

_SCATTER_OPS = {
    torch.Tensor.scatter_: True,
    torch.Tensor.scatter: False,
    torch.scatter: False,
    torch.Tensor.scatter_add_: True,
    torch.Tensor.scatter_add: False,
    torch.scatter_add: False,
    torch.Tensor.scatter_reduce_: True,
    torch.Tensor.scatter_reduce: False,
    torch.scatter_reduce: False,
    torch.gather: False,
    torch.Tensor.gather: False,
}


def _scatter_rule(func, a):
    """``scatter*`` / ``gather`` along a dim that is not sharded, with ``index`` (and ``src``) shaped
    like ``x``: each rank handles its own rows (operands sharded like ``x``, or full ones cut to the
    local rows). Along the sharded dim the rows an element reaches are only known from the index
    values: refused with the fix."""
    args, kwargs = a.args, a.kwargs
    x, dim = a.get("input"), a.get("dim")
    sd = domain_shard_dim(x)
    if sd is None:
        return NotImplemented
    if not isinstance(dim, int):
        return NotImplemented
    name = getattr(func, "__name__", "scatter")
    if dim % x.ndim == sd:
        raise _refuse(
            f"Tensor.{name} along H",
            "the rows each element reads or writes come from the index values, on any rank",
            "index along another dim (e.g. per row), use one-hot masks with torch.where, or gather explicitly",
        )
    n = x.shape[sd]
    a, b = chunk_range(n, x.device_mesh.size(), x.device_mesh.get_local_rank())

    def loc(t: Any) -> Any:
        if t is x:
            return x.to_local()
        if isinstance(t, DTensor):
            if domain_shard_dim(t) == sd and t.shape[sd] == n:
                return t.to_local()
            if is_domain_replicate(t):
                t = local_replicated(t)
            else:
                raise _refuse(f"Tensor.{name}", f"an operand is sharded as {t.placements}", _FIX)
        if isinstance(t, torch.Tensor) and t.ndim == x.ndim and t.shape[sd] == n:
            return (full_operand(t, x.device_mesh) if t.is_floating_point() else t).narrow(sd, a, b - a)
        return t

    largs = tuple(loc(t) for t in args)
    lkwargs = {k: loc(v) for k, v in kwargs.items()}
    inplace = _SCATTER_OPS[func]
    with intercept.suspended():
        if inplace:
            out_of_place = getattr(torch.Tensor, name.rstrip("_"))
            newl = out_of_place(*largs, **lkwargs)
        else:
            newl = func(*largs, **lkwargs)
        if newl.shape[sd] != b - a:
            raise _refuse(f"Tensor.{name}", "the index does not span the sharded rows like the tensor", _FIX)
        shape = list(newl.shape)
        shape[sd] = n
        out = wrap_shard(newl, x.device_mesh, sd, shape)
        if not inplace:
            return out
        x.copy_(out)
    return x


FAMILY.rule(*_SCATTER_OPS, h="refused", note="along H; local along other dims", signature=Signature(("input", "dim")))(
    _scatter_rule
)
