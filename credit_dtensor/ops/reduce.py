"""Exact reductions over the sharded dim: sum, mean, var/std, norms, amax/amin, max/min, arg* (the
extremes in :mod:`.reduce_extreme`), logsumexp, all/any/count_nonzero, prod over other dims.

PyTorch's DTensor answers ``mean`` over unequal shards with ``Partial(avg)`` (an average of
per-rank means, wrong when shards differ) or all-gathers the whole tensor. Here each rank reduces
its own rows and only the reduced partials cross ranks (a scalar, or one value per kept index):
``mean = sum / global count``, variance by two passes (global mean first, then squared deviations:
no cancellation), ``logsumexp`` shifted by the global max. Results are ``Replicate`` DTensors.
Gradients follow PyTorch's formulas exactly (ties in amax/max share the gradient evenly, across
ranks too). Reductions that keep the sharded dim are left to DTensor (they are local).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import comm, stats
from ..dtensor import domain_shard_dim, wrap_replicate
from ..errors import DomainParallelError
from .family import family
from .pointwise import local_apply

FAMILY = family(
    "reduce",
    "reductions (sum, mean, var, max, norm, logsumexp ...) over the sharded dim: per-rank partials, one all-reduce",
)

__all__ = ["reduced_dims"]


def reduced_dims(dim: Any, ndim: int) -> tuple[int, ...] | None:
    """Normalized reduced dims (all dims for None / empty); None for named dims (not ours)."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(sorted({d % max(ndim, 1) for d in dims}))


class _Call:
    """One reduction call on an H-sharded DTensor: local tensor, group, dims, and the wrap-up."""

    def __init__(self, x: DTensor, dims: tuple[int, ...], keepdim: bool) -> None:
        self.x, self.dims, self.keepdim = x, dims, keepdim
        self.mesh = x.device_mesh
        self.group = self.mesh.get_group()
        self.local = x.to_local()
        self.count = math.prod([x.shape[d] for d in dims])

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over ranks of a per-rank partial (reduced with keepdim=True).

        Its backward passes the output gradient through unchanged, which is exact when that
        gradient is the same on every rank: use the total only in replicated computations (the
        result DTensor's users are DTensor ops, which all-reduce partial gradients themselves)."""
        with stats.op_label("reduce"):
            return comm.sum_over_ranks(partial, self.group)

    def extreme(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """Global max/min over ``dims`` (keepdim; not differentiable); empty shards contribute -inf/+inf."""
        if t.numel() == 0 or any(t.shape[d] == 0 for d in self.dims):
            shape = [1 if d in self.dims else s for d, s in enumerate(t.shape)]
            fill = -math.inf if op == "max" else math.inf
            local = (
                torch.full(shape, fill, dtype=t.dtype, device=t.device)
                if t.is_floating_point()
                else (
                    torch.full(
                        shape,
                        torch.iinfo(t.dtype).min if op == "max" else torch.iinfo(t.dtype).max,
                        dtype=t.dtype,
                        device=t.device,
                    )
                )
            )
        else:
            local = (
                t.detach().amax(self.dims, keepdim=True) if op == "max" else t.detach().amin(self.dims, keepdim=True)
            )
        with stats.op_label("reduce"):
            return comm.all_reduce(local, self.group, op)

    def out(self, t: torch.Tensor) -> DTensor:
        if not self.keepdim:
            t = t.squeeze(self.dims) if self.dims else t
        return wrap_replicate(t, self.mesh)


def _parse(args: tuple, kwargs: dict, names: Sequence[str], defaults: Sequence[Any]) -> dict | None:
    """Positional-or-keyword arguments after the input; None if the call has something unexpected."""
    vals = dict(zip(names, defaults))
    rest = args[1:]
    if len(rest) > len(names):
        return None
    vals.update(zip(names, rest))
    for k, v in kwargs.items():
        if k in ("input", "self"):
            continue
        if k not in vals and k not in ("dtype", "correction", "unbiased", "out"):
            return None
        vals[k] = v
    if vals.get("out") is not None:
        return None
    return vals


def _sharded_call(args: tuple, kwargs: dict, dim: Any, keepdim: bool) -> _Call | None:
    x = args[0] if args else kwargs.get("input")
    sd = domain_shard_dim(x)
    if sd is None:
        return None
    dims = reduced_dims(dim, x.ndim)
    if dims is None or sd not in dims:
        return None
    return _Call(x, dims, bool(keepdim))


def _local_reduce(func, args: tuple, kwargs: dict, dim: Any, keepdim: bool) -> Any:
    """A reduction over dims that are not the sharded one (``mean(dim=1)`` over channels, a channel
    LayerNorm's statistics): every rank reduces its own rows; the result stays sharded. DTensor would
    replicate shards smaller than the mesh first (a deep stage with fewer rows than ranks)."""
    x = args[0] if args else kwargs.get("input")
    sd = domain_shard_dim(x)
    dims = reduced_dims(dim, x.ndim) if sd is not None else None
    if dims is None or sd in dims:
        return NotImplemented
    out_dim = sd if keepdim else sd - sum(1 for d in dims if d < sd)
    try:
        return local_apply(func, args, kwargs, x, out_dim)
    except ValueError:
        return NotImplemented


def _over_h(names: Sequence[str] = ("dim", "keepdim"), defaults: Sequence[Any] = (None, False)) -> Callable:
    """The opening every reduction rule shares: bind the arguments after the input (an unexpected
    call: ``NotImplemented``), reduce locally when the sharded dim is not reduced, else call
    ``body(func, p, c)`` with the bound arguments ``p`` and the :class:`_Call` ``c``."""

    def deco(body: Callable) -> Callable:
        def rule(func, args, kwargs):
            p = _parse(args, kwargs, names, defaults)
            if p is None:
                return NotImplemented
            keepdim = p.get("keepdim", False)
            c = _sharded_call(args, kwargs, p["dim"], keepdim)
            if c is None:
                return _local_reduce(func, args, kwargs, p["dim"], keepdim)
            return body(func, p, c)

        rule.__name__ = rule.__qualname__ = body.__name__
        return rule

    return deco


# --- sum / mean / nansum / nanmean -------------------------------------------------------------------


@FAMILY.rule(torch.sum, torch.Tensor.sum, torch.nansum, torch.Tensor.nansum, h="reduce")
@_over_h()
def _sum_rule(func, p, c):
    nan = func in (torch.nansum, torch.Tensor.nansum)
    local = (c.local.nansum if nan else c.local.sum)(c.dims, keepdim=True, dtype=p.get("dtype"))
    return c.out(c.total(local))


@FAMILY.rule(torch.mean, torch.Tensor.mean, torch.nanmean, torch.Tensor.nanmean, h="reduce")
@_over_h()
def _mean_rule(func, p, c):
    x = c.local if p.get("dtype") is None else c.local.to(p["dtype"])
    if not (x.is_floating_point() or x.is_complex()):
        raise DomainParallelError(f"mean(): input dtype {x.dtype} is not floating point (PyTorch rejects it too)")
    if func in (torch.nanmean, torch.Tensor.nanmean):
        keep = ~torch.isnan(x)
        s = c.total(torch.where(keep, x, torch.zeros_like(x)).sum(c.dims, keepdim=True))
        n = c.total(keep.sum(c.dims, keepdim=True).to(x.dtype))
        return c.out(s / n)
    return c.out(c.total(x.sum(c.dims, keepdim=True)) / c.count)


# --- var / std / var_mean / std_mean -----------------------------------------------------------------


def _var_args(args: tuple, kwargs: dict) -> tuple[Any, float, bool] | None:
    rest = list(args[1:])
    dim, correction, keepdim = kwargs.get("dim"), 1.0, bool(kwargs.get("keepdim", False))
    if rest and isinstance(rest[0], bool):  # var(input, unbiased)
        correction = float(rest.pop(0))
        if rest:
            return None
    elif rest:
        dim = rest.pop(0)
        if rest:
            correction = float(bool(rest.pop(0)))  # var(input, dim, unbiased, keepdim)
        if rest:
            keepdim = bool(rest.pop(0))
        if rest:
            return None
    if "unbiased" in kwargs:
        correction = float(bool(kwargs["unbiased"]))
    if kwargs.get("correction") is not None:
        correction = float(kwargs["correction"])
    if set(kwargs) - {"dim", "unbiased", "correction", "keepdim", "input"}:
        return None
    return dim, correction, keepdim


def _variance(c: _Call) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, m2, n) over ``c.dims`` with keepdim, both global (two passes).

    The deviations use the mean detached: its gradient path is exactly zero (the deviations sum to
    zero globally), which is PyTorch's own var backward ``2 (x - mean) / (n - correction)``; a local
    mean-path term would not cancel across ranks.
    """
    x = c.local
    mean = c.total(x.sum(c.dims, keepdim=True)) / c.count
    dev = x - mean.detach()
    m2 = c.total(
        (dev * dev.conj()).real.sum(c.dims, keepdim=True) if x.is_complex() else (dev * dev).sum(c.dims, keepdim=True)
    )
    return mean, m2, c.count


@FAMILY.rule(torch.var, torch.Tensor.var, torch.std, torch.Tensor.std, torch.var_mean, torch.std_mean, h="reduce")
def _var_rule(func, args, kwargs):
    parsed = _var_args(args, kwargs)
    if parsed is None:
        return NotImplemented
    dim, correction, keepdim = parsed
    c = _sharded_call(args, kwargs, dim, keepdim)
    if c is None:
        return _local_reduce(func, args, kwargs, dim, keepdim)
    mean, m2, n = _variance(c)
    var = m2 / max(n - correction, 0)
    std_like = func in (torch.std, torch.Tensor.std, torch.std_mean)
    value = var.sqrt() if std_like else var
    if func in (torch.var_mean, torch.std_mean):
        return c.out(value), c.out(mean)
    return c.out(value)


# --- extremes shared by amax/amin (ops.reduce_extreme) and the inf norms ----------------------


class _EvenExtreme(torch.autograd.Function):
    """Global amax/amin over dims; the gradient is shared evenly among all equal elements, on all ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: _Call, op: str) -> torch.Tensor:  # type: ignore[override]
        m = c.extreme(x, op)
        ctx.save_for_backward(x, m)
        ctx.c = c
        return m

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, m = ctx.saved_tensors
        c = ctx.c
        mask = (x == m) | (torch.isnan(x) & torch.isnan(m)) if x.is_floating_point() else (x == m)
        count = comm.all_reduce(mask.sum(c.dims, keepdim=True), c.group, "sum").to(g.dtype)
        return mask.to(g.dtype) * g / count, None, None


# --- logsumexp ----------------------------------------------------------------------------------------


@FAMILY.rule(torch.logsumexp, torch.Tensor.logsumexp, h="reduce")
@_over_h(("dim", "keepdim"), ((), False))
def _logsumexp_rule(func, p, c):
    x = c.local if c.local.is_floating_point() else c.local.to(torch.get_default_dtype())
    m = c.extreme(x, "max")
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    s = c.total(torch.exp(x - m).sum(c.dims, keepdim=True))
    return c.out(torch.log(s) + m)


# --- norms ----------------------------------------------------------------------------------------------


class _PNorm(torch.autograd.Function):
    """``(sum |x|^p over ranks)^(1/p)`` with PyTorch's vector-norm gradient (0 where the norm is 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: _Call, p: float) -> torch.Tensor:  # type: ignore[override]
        a = x.detach().abs()
        if p == 0:
            part = (a != 0).to(a.dtype).sum(c.dims, keepdim=True)
        elif p == 1:
            part = a.sum(c.dims, keepdim=True)
        else:
            part = a.pow(p).sum(c.dims, keepdim=True)
        with stats.op_label("reduce"):
            total = comm.all_reduce(part, c.group, "sum")
        norm = total if p in (0, 1) else total.pow(1.0 / p)
        ctx.save_for_backward(x, norm)
        ctx.p = p
        return norm

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, norm = ctx.saved_tensors
        p = ctx.p
        if p == 0:
            return torch.zeros_like(x), None, None
        if p == 1:
            return x.sgn() * g, None, None
        if p == 2:
            return x * (g / norm).masked_fill(norm == 0, 0), None, None
        scale = (g / norm.pow(p - 1)).masked_fill(norm == 0, 0)
        return x * x.abs().pow(p - 2) * scale, None, None


def _vector_norm(c: _Call, ord: Any, dtype: torch.dtype | None) -> DTensor:
    x = c.local if dtype is None else c.local.to(dtype)
    c.local = x
    if ord in ("fro", None):
        ord = 2
    if not isinstance(ord, (int, float)):
        raise DomainParallelError(
            f"norm(p={ord!r}) over the sharded dim is not supported: only vector norms (p a number, 'fro'); "
            "gather explicitly (credit_dtensor.gather_tensor) for matrix norms"
        )
    if math.isinf(ord):
        return c.out(_EvenExtreme.apply(x.abs(), c, "max" if ord > 0 else "min"))
    return c.out(_PNorm.apply(x, c, float(ord)))


@FAMILY.rule(torch.linalg.vector_norm, h="reduce")
@_over_h(("ord", "dim", "keepdim"), (2, None, False))
def _vector_norm_rule(func, p, c):
    return _vector_norm(c, p["ord"], p.get("dtype"))


@FAMILY.rule(torch.norm, torch.Tensor.norm, h="reduce")
@_over_h(("p", "dim", "keepdim"), ("fro", None, False))
def _norm_rule(func, p, c):
    if p["p"] == "nuc":
        raise DomainParallelError("norm(p='nuc') over the sharded dim is not supported: gather explicitly")
    return _vector_norm(c, p["p"], p.get("dtype"))


# --- boolean / counting ---------------------------------------------------------------------------------


@FAMILY.rule(torch.count_nonzero, torch.Tensor.count_nonzero, h="reduce")
@_over_h(("dim",), (None,))
def _count_rule(func, p, c):
    return c.out(comm.all_reduce((c.local != 0).sum(c.dims, keepdim=True), c.group, "sum"))


@FAMILY.rule(torch.all, torch.Tensor.all, torch.any, torch.Tensor.any, h="reduce")
@_over_h()
def _all_rule(func, p, c):
    is_all = func in (torch.all, torch.Tensor.all)
    b = c.local != 0
    local = (b.logical_not().sum(c.dims, keepdim=True) == 0) if is_all else (b.sum(c.dims, keepdim=True) > 0)
    return c.out(comm.all_reduce(local, c.group, "min" if is_all else "max"))


# --- prod -----------------------------------------------------------------------------------------------


@FAMILY.rule(
    torch.prod,
    torch.Tensor.prod,
    h="gathers",
    note="over other dims: local; over H: PyTorch's rule without gradients, refused with them",
)
@_over_h()
def _prod_rule(func, p, c):
    """Over other dims :func:`_over_h` reduces each rank's rows (DTensor's ``prod_backward`` mixed
    plain tensors and DTensors there). Over H, without gradients, PyTorch's own rule gathers (the
    guard reports it); with gradients that backward fails, so the call is refused up front."""
    if not (c.x.requires_grad and torch.is_grad_enabled()):
        return NotImplemented
    raise DomainParallelError(
        "prod over the sharded dim H with gradients: DTensor's prod backward cannot run on shards. "
        "For positive values use x.log().sum(dim).exp() (exact rules), or reduce an explicitly "
        "gathered x.full_tensor()"
    )


FAMILY.unsupported(torch.median, torch.Tensor.median, note="over H")


# the extremes (amax/amin, max/min, argmax/argmin) live in their own module, registered with this family
from . import reduce_extreme as _reduce_extreme  # noqa: E402,F401
