"""Exact extremes over the sharded dim (part of the reduce family, :mod:`.reduce`; split from it by
concern): ``amax``/``amin`` with ties sharing the gradient evenly across ranks, ``max``/``min``
with their first index, ``argmax``/``argmin`` as PyTorch's flat or per-dim index."""

from __future__ import annotations

import math

import torch

from .. import comm, intercept, stats
from ..dtensor import domain_shard_dim, wrap_replicate
from ..geometry import chunk_range
from .reduce import FAMILY, _Call, _EvenExtreme, _over_h, _parse

# --- amax / amin / max / min / argmax / argmin -----------------------------------------------------


@FAMILY.rule(torch.amax, torch.Tensor.amax, torch.amin, torch.Tensor.amin, h="reduce")
@_over_h(("dim", "keepdim"), ((), False))
def _amax_rule(func, p, c):
    op = "max" if func in (torch.amax, torch.Tensor.amax) else "min"
    return c.out(_EvenExtreme.apply(c.local, c, op))


def _global_flat_index(c: _Call, local_idx: torch.Tensor, sd: int) -> torch.Tensor:
    """Local flat indices (over the whole local tensor) -> flat indices in the global tensor."""
    a, _ = chunk_range(c.x.shape[sd], c.mesh.size(), c.mesh.get_local_rank())
    coords = list(torch.unravel_index(local_idx, tuple(c.local.shape)))
    coords[sd] = coords[sd] + a
    flat = torch.zeros_like(local_idx)
    for d, size in enumerate(c.x.shape):
        flat = flat * size + coords[d]
    return flat


def _first_index(c: _Call, op: str, sd: int, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(global extreme, global index of its first occurrence) over ``dim`` (None: flattened)."""
    x = c.local.detach()
    m = c.extreme(x, op)
    big = torch.iinfo(torch.int64).max
    if dim is None:
        hit = (
            (x == m).flatten() | (torch.isnan(x).flatten() & torch.isnan(m).flatten())
            if x.is_floating_point()
            else (x == m).flatten()
        )
        pos = torch.arange(x.numel(), device=x.device)
        cand = torch.where(hit, _global_flat_index(c, pos, sd), torch.full_like(pos, big))
        local = cand.min().reshape([1] * x.ndim) if cand.numel() else torch.full([1] * x.ndim, big, device=x.device)
    else:
        a, _ = chunk_range(c.x.shape[sd], c.mesh.size(), c.mesh.get_local_rank())
        hit = (x == m) | (torch.isnan(x) & torch.isnan(m)) if x.is_floating_point() else (x == m)
        shape = [1] * x.ndim
        shape[dim] = x.shape[dim]
        pos = torch.arange(x.shape[dim], device=x.device).reshape(shape) + a
        cand = torch.where(hit, pos.expand_as(x), torch.full_like(x, big, dtype=torch.int64))
        if x.shape[dim] == 0:
            kshape = list(x.shape)
            kshape[dim] = 1
            local = torch.full(kshape, big, dtype=torch.int64, device=x.device)
        else:
            local = cand.amin(dim, keepdim=True)
    with stats.op_label("reduce"):
        return m, comm.all_reduce(local, c.group, "min")


class _SelectAt(torch.autograd.Function):
    """Values at given global indices along the sharded dim; gradient only to those elements."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor, idx: torch.Tensor, dim: int, offset: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.dim, ctx.offset, ctx.shape = dim, offset, x.shape
        return m.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        n = ctx.shape[ctx.dim]
        local = idx - ctx.offset
        mine = (local >= 0) & (local < n)
        out = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        if n:
            out.scatter_add_(
                ctx.dim, local.clamp(0, n - 1).expand_as(g).contiguous(), torch.where(mine, g, 0).contiguous()
            )
        return out, None, None, None, None


@FAMILY.rule(torch.max, torch.Tensor.max, torch.min, torch.Tensor.min, h="reduce")
def _max_rule(func, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    sd = domain_shard_dim(x)
    rest = list(args[1:])
    if sd is None or any(isinstance(r, torch.Tensor) for r in rest) or "other" in kwargs:
        return NotImplemented  # elementwise max(a, b): pointwise, DTensor's own rule
    op = "max" if func in (torch.max, torch.Tensor.max) else "min"
    dim = kwargs.get("dim", rest[0] if rest else None)
    keepdim = bool(kwargs.get("keepdim", rest[1] if len(rest) > 1 else False))
    if dim is None:
        c = _Call(x, tuple(range(x.ndim)), False)
        return c.out(_EvenExtreme.apply(c.local, c, op))
    if not isinstance(dim, int):
        return NotImplemented
    dim %= x.ndim
    if dim != sd:
        return NotImplemented
    c = _Call(x, (dim,), keepdim)
    m, idx = _first_index(c, op, sd, dim)
    a, _ = chunk_range(x.shape[sd], c.mesh.size(), c.mesh.get_local_rank())
    values = _SelectAt.apply(c.local, m, idx, dim, a)
    ret = torch.return_types.max if op == "max" else torch.return_types.min
    return ret((c.out(values), c.out(idx)))


@FAMILY.rule(torch.argmax, torch.Tensor.argmax, torch.argmin, torch.Tensor.argmin, h="reduce")
def _argmax_rule(func, args, kwargs):
    p = _parse(args, kwargs, ("dim", "keepdim"), (None, False))
    x = args[0] if args else kwargs.get("input")
    sd = domain_shard_dim(x)
    if p is None or sd is None:
        return NotImplemented
    op = "max" if func in (torch.argmax, torch.Tensor.argmax) else "min"
    dim = p["dim"]
    if dim is None:
        c = _Call(x, tuple(range(x.ndim)), False)
        _, idx = _first_index(c, op, sd, None)
        out = idx.reshape([1] * x.ndim if p["keepdim"] else [])
        return wrap_replicate(out, c.mesh)
    dim %= x.ndim
    if dim != sd:
        return NotImplemented
    c = _Call(x, (dim,), bool(p["keepdim"]))
    return c.out(_first_index(c, op, sd, dim)[1])


# --- aminmax, matrix norms: compositions of the rules above ---------------------------------------------


@FAMILY.rule(torch.aminmax, torch.Tensor.aminmax, h="reduce")
def _aminmax_rule(func, args, kwargs):
    """``(amin, amax)`` through their rules (DTensor's own ``aminmax`` raised on an empty shard --
    H=4 over 3 ranks -- while the other ranks waited in its collective)."""
    x = args[0] if args else kwargs.get("input")
    sd = domain_shard_dim(x)
    extra = set(kwargs) - {"input", "dim", "keepdim"}
    if sd is None or len(args) > 1 or extra:
        return NotImplemented
    dim, keepdim = kwargs.get("dim"), bool(kwargs.get("keepdim", False))
    with intercept.scoped():
        lo = torch.amin(x, () if dim is None else dim, keepdim)
        hi = torch.amax(x, () if dim is None else dim, keepdim)
    return torch.return_types.aminmax((lo, hi))


@FAMILY.rule(torch.linalg.matrix_norm, h="reduce")
def _matrix_norm_rule(func, args, kwargs):
    """The entrywise and induced 1 / inf norms over two dims, one of them the sharded one, as sums
    and extremes through their rules (DTensor's own returned a ``_NormPartial`` that ``sum`` kept,
    and raised on an empty shard); the spectral and nuclear norms (an SVD) are PyTorch's own."""
    names = ("input", "ord", "dim", "keepdim")
    p = {"ord": "fro", "dim": (-2, -1), "keepdim": False, **dict(zip(names, args)), **kwargs}
    x, ord_, dims, keepdim = p.get("input"), p["ord"], p["dim"], bool(p["keepdim"])
    sd = domain_shard_dim(x)
    if sd is None or set(p) - {*names, "dtype"} or not isinstance(dims, (list, tuple)) or len(dims) != 2:
        return NotImplemented
    rows, cols = (int(d) % x.ndim for d in dims)
    if sd not in (rows, cols) or ord_ not in ("fro", 1, -1, math.inf, -math.inf):
        return NotImplemented
    with intercept.scoped():
        if p.get("dtype") is not None:
            x = x.to(p["dtype"])
        if ord_ == "fro":
            return torch.linalg.vector_norm(x, 2, (rows, cols), keepdim)
        # induced norms: ord +-1 sums each column over the rows, +-inf each row over the columns
        summed, over = (rows, cols) if abs(ord_) == 1 else (cols, rows)
        s = x.abs().sum(summed, keepdim=True)
        out = torch.amax(s, over, keepdim=True) if ord_ > 0 else torch.amin(s, over, keepdim=True)
        return out if keepdim else out.squeeze((rows, cols) if rows < cols else (cols, rows))


@FAMILY.rule(torch.renorm, torch.Tensor.renorm, h="reduce")
def _renorm_rule(func, args, kwargs):
    """``x.renorm(p, dim, maxnorm)``: each slice along ``dim`` scaled down to p-norm ``maxnorm``
    (by ``maxnorm / (norm + 1e-7)``, PyTorch's factor) when its norm exceeds it. The norms are a
    vector norm over the other dims through its rule (a sum over the ranks when those include the
    sharded dim; local when ``dim`` is the sharded dim), the scaling pointwise; autograd of the
    composition is PyTorch's renorm backward (DTensor had no rule: "aten.renorm.default does not
    have a sharding strategy")."""
    names = ("input", "p", "dim", "maxnorm")
    v = {**dict(zip(names, args)), **kwargs}
    x, p, dim, maxnorm = v.get("input"), v.get("p"), v.get("dim"), v.get("maxnorm")
    sd = domain_shard_dim(x)
    if sd is None or set(v) - set(names) or not isinstance(dim, int) or not isinstance(p, (int, float)):
        return NotImplemented
    if not isinstance(maxnorm, (int, float)) or not p > 0 or not maxnorm >= 0 or not -x.ndim <= dim < x.ndim:
        return NotImplemented  # PyTorch's own errors
    dim %= x.ndim
    others = tuple(d for d in range(x.ndim) if d != dim)
    with intercept.scoped():
        norm = torch.linalg.vector_norm(x, p, others, keepdim=True) if others else x.abs()
        factor = torch.where(norm > maxnorm, maxnorm / (norm + 1e-7), 1.0)
        return x * factor
