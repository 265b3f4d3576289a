"""Spectral transforms and finite differences on H-sharded tensors.

* ``torch.fft.*`` along dims that are not the sharded one (an SFNO-style transform of longitude):
  each rank transforms its own rows. DTensor runs the forward of ``rfft(x, dim=-1)`` on the shards
  but all-gathers the activation in its backward. Along H the transform mixes every row: PyTorch's
  rule runs under the gather guard (reported).
* ``torch.diff``, ``torch.gradient`` and ``torch.trapezoid`` along H (finite differences of a field
  over latitude: a physics loss, a vorticity diagnostic): decomposed into shifted slices, which the
  move rules make exact by sending only the neighbours' boundary rows. Along other dims they are
  local.
* ``F.lp_pool1d/2d/3d``: PyTorch's own decomposition (``avg_pool`` of ``x ** p``), run with the rules
  active so its average pooling takes the pooling rule instead of DTensor's gathering one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Number
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .. import intercept
from ..dtensor import domain_shard_dim
from .family import Signature, family
from .pointwise import local_apply

FAMILY = family(
    "spectral",
    "FFTs along other dims local; diff / gradient / trapezoid over H from shifted slices (boundary rows only)",
)

__all__ = ["FFT_1D", "FFT_ND"]

_fft = torch.fft
#: one-dim transforms: ``(input, n, dim=-1, norm)``
FFT_1D: tuple[Callable, ...] = (_fft.fft, _fft.ifft, _fft.rfft, _fft.irfft, _fft.hfft, _fft.ihfft)
#: multi-dim transforms: ``(input, s, dim, norm)``; the ``*2`` forms default to the last two dims
#: (H among them), the ``*n`` forms to every dim
FFT_2D: tuple[Callable, ...] = (_fft.fft2, _fft.ifft2, _fft.rfft2, _fft.irfft2, _fft.hfft2, _fft.ihfft2)
FFT_ND: tuple[Callable, ...] = (*FFT_2D, _fft.fftn, _fft.ifftn, _fft.rfftn, _fft.irfftn, _fft.hfftn, _fft.ihfftn)


@FAMILY.rule(
    FFT_1D,
    h="local",
    note="along a dim other than H: each rank's rows (along H: gathers, reported)",
    signature=Signature(("input", "n", "dim", "norm"), {"n": None, "dim": -1, "norm": None}),
)
def _fft_1d_rule(func: Any, a: Any) -> Any:
    x, dim = a.get("input"), a["dim"]
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(dim, int) or dim % x.ndim == sd or a.has_other(x, torch.Tensor):
        return NotImplemented
    return local_apply(func, a.args, a.kwargs, x, sd, empty_rows=True)


@FAMILY.rule(
    FFT_ND,
    h="local",
    note="over dims other than H: each rank's rows (over H: gathers, reported)",
    signature=Signature(("input", "s", "dim", "norm"), {"s": None, "dim": None, "norm": None}),
)
def _fft_nd_rule(func: Any, a: Any) -> Any:
    x, dims = a.get("input"), a["dim"]
    sd = domain_shard_dim(x)
    if sd is None or a.has_other(x, torch.Tensor):
        return NotImplemented
    if dims is None:
        s = a["s"]
        if func in FFT_2D:
            dims = (-2, -1)
        elif s is not None:
            dims = tuple(range(-len(s), 0))  # PyTorch: the last len(s) dims
        else:
            return NotImplemented  # every dim, H among them
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims) or any(d % x.ndim == sd for d in dims):
        return NotImplemented
    return local_apply(func, a.args, a.kwargs, x, sd, empty_rows=True)


# --- finite differences over H ----------------------------------------------------------------------


def _rows(x: torch.Tensor, dim: int, start: int, stop: int | None = None) -> torch.Tensor:
    """``x`` sliced to ``[start:stop]`` along ``dim`` (negative bounds as Python's)."""
    index: list[Any] = [slice(None)] * x.ndim
    index[dim] = slice(start, stop)
    return x[tuple(index)]


def _diff_over_h(x: DTensor, n: int, dim: int, prepend: Any, append: Any) -> torch.Tensor:
    parts = [p for p in (prepend, x, append) if p is not None]
    y = torch.cat(parts, dim) if len(parts) > 1 else x
    for _ in range(n):
        hi, lo = _rows(y, dim, 1), _rows(y, dim, 0, -1)
        y = hi != lo if y.dtype == torch.bool else hi - lo
    return y


@FAMILY.rule(
    torch.diff,
    torch.Tensor.diff,
    h="halo",
    note="along H: shifted slices (one boundary row per step from the next rank)",
    signature=Signature(
        ("input", "n", "dim", "prepend", "append"), {"n": 1, "dim": -1, "prepend": None, "append": None}
    ),
)
def _diff_rule(func: Any, a: Any) -> Any:
    x, n, dim = a.get("input"), a["n"], a["dim"]
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(dim, int) or not isinstance(n, int) or a.get("out") is not None:
        return NotImplemented
    if dim % x.ndim != sd:
        if a.has_other(x, torch.Tensor):
            return NotImplemented  # a DTensor prepend/append: the shifted-slice path below would do too
        return local_apply(func, a.args, a.kwargs, x, sd)
    if n < 0 or x.shape[sd] == 0:
        return NotImplemented  # PyTorch's own error / empty
    with intercept.scoped():
        return _diff_over_h(x, n, dim % x.ndim, a["prepend"], a["append"])


def _gradient_along(x: torch.Tensor, dim: int, h: Number, edge_order: int) -> torch.Tensor:
    """PyTorch's uniform-spacing ``torch.gradient`` along ``dim``, written with slices (same
    arithmetic in the same order: ``(f[2:] - f[:-2]) / h / 2`` inside, one-sided at the edges)."""
    center = (_rows(x, dim, 2) - _rows(x, dim, 0, -2)) / h
    if edge_order == 1:
        first = (_rows(x, dim, 1, 2) - _rows(x, dim, 0, 1)) / h
        last = (_rows(x, dim, -1) - _rows(x, dim, -2, -1)) / h
    else:
        first = (-1.5 * _rows(x, dim, 0, 1) + 2 * _rows(x, dim, 1, 2) - 0.5 * _rows(x, dim, 2, 3)) / h
        last = (0.5 * _rows(x, dim, -3, -2) - 2 * _rows(x, dim, -2, -1) + 1.5 * _rows(x, dim, -1)) / h
    return torch.cat([first, center / 2, last], dim)


def _spacings(spacing: Any, count: int) -> list[Number] | None:
    """Uniform spacing per dim as numbers, or ``None`` (coordinate tensors: PyTorch's own rule)."""
    if isinstance(spacing, Number) and not isinstance(spacing, bool):
        return [spacing] * count
    if isinstance(spacing, Sequence) and len(spacing) == count:
        if all(isinstance(s, Number) and not isinstance(s, bool) for s in spacing):
            return list(spacing)
    if isinstance(spacing, Sequence) and len(spacing) == 1 and isinstance(spacing[0], Number):
        return [spacing[0]] * count
    return None


@FAMILY.rule(
    torch.gradient,
    h="halo",
    note="uniform spacing along H: central differences from shifted slices (two boundary rows at most)",
    signature=Signature(("input",), {"spacing": 1, "dim": None, "edge_order": 1}),
)
def _gradient_rule(func: Any, a: Any) -> Any:
    x, dim, edge_order = a.get("input"), a["dim"], a["edge_order"]
    sd = domain_shard_dim(x)
    if sd is None or len(a.args) > 1 or edge_order not in (1, 2) or not x.is_floating_point():
        return NotImplemented
    dims = list(range(x.ndim)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    if not all(isinstance(d, int) for d in dims):
        return NotImplemented
    dims = [d % x.ndim for d in dims]
    spacing = _spacings(a["spacing"], len(dims))
    if spacing is None or sd not in dims or any(x.shape[d] < edge_order + 1 for d in dims):
        return NotImplemented  # coordinates / no H / PyTorch's own error for short dims
    with intercept.scoped():
        return tuple(_gradient_along(x, d, h, edge_order) for d, h in zip(dims, spacing))


@FAMILY.rule(
    torch.trapezoid,
    torch.trapz,
    h="reduce",
    note="uniform spacing along H: shifted slices summed (one all-reduce)",
    signature=Signature(("y",), {"dx": None, "dim": -1}),
)
def _trapezoid_rule(func: Any, a: Any) -> Any:
    y, dim = a.get("y"), a["dim"]
    dx = 1.0 if a["dx"] is None else a["dx"]
    sd = domain_shard_dim(y)
    if sd is None or len(a.args) > 1 or "x" in a.kwargs or not isinstance(dim, int):
        return NotImplemented  # coordinate tensors ``x``: PyTorch's own rule
    if not isinstance(dx, Number) or isinstance(dx, bool):
        return NotImplemented
    if dim % y.ndim != sd or y.shape[sd] < 2 or a.has_other(y, torch.Tensor):
        return NotImplemented
    d = dim % y.ndim
    with intercept.scoped():
        return ((_rows(y, d, 1) + _rows(y, d, 0, -1)) * (dx / 2)).sum(d)


_AVG_POOL = {F.lp_pool1d: (1, F.avg_pool1d), F.lp_pool2d: (2, F.avg_pool2d), F.lp_pool3d: (3, F.avg_pool3d)}


@FAMILY.rule(
    tuple(_AVG_POOL),
    h="halo",
    note="PyTorch's decomposition (avg_pool of x ** p, scaled) with the pooling rules",
    signature=Signature(
        ("input", "norm_type", "kernel_size", "stride", "ceil_mode"), {"stride": None, "ceil_mode": False}
    ),
)
def _lp_pool_rule(func: Any, a: Any) -> Any:
    x, p, k = a.get("input"), a.get("norm_type"), a.get("kernel_size")
    nd, avg_pool = _AVG_POOL[func]
    if domain_shard_dim(x) is None or not isinstance(p, (int, float)) or abs(p) == float("inf"):
        return NotImplemented  # the inf norms are max pools: PyTorch's own path
    sizes = [k] * nd if isinstance(k, int) else list(k)
    if len(sizes) != nd or not all(isinstance(v, int) for v in sizes):
        return NotImplemented
    with intercept.scoped():
        out = avg_pool(x.pow(p), k, a["stride"] if a["stride"] is not None else k, 0, a["ceil_mode"])
        return (torch.sign(out) * F.relu(torch.abs(out))).mul(math.prod(sizes)).pow(1.0 / p)


# --- complex views and constructors (spectral filters written by hand) ------------------------------------


@FAMILY.rule(
    torch.view_as_complex,
    torch.view_as_real,
    torch.polar,
    torch.complex,
    h="local",
    note="each rank's rows (DTensor's backward failed: 'last dimension with stride 1', 'unhashable complex')",
)
def _complex_rule(func: Any, args: tuple, kwargs: dict) -> Any:
    """``view_as_complex``/``view_as_real`` of a tensor sharded on a dim other than the last, and
    ``polar``/``complex`` of two operands of one layout: on the local tensors (the forward ran on
    DTensor, but its backward of these ops failed)."""
    if kwargs or not args:
        return NotImplemented
    x = args[0]
    sd = domain_shard_dim(x)
    if sd is None or sd == x.ndim - 1:
        return NotImplemented
    if func in (torch.polar, torch.complex):
        if len(args) != 2 or not isinstance(args[1], DTensor):
            return NotImplemented
        y = args[1]
        if y.shape != x.shape or y.placements != x.placements:
            return NotImplemented
        from ..dtensor import local_of

        return local_apply(lambda t: func(t, local_of(y)), (x,), {}, x, sd)
    if len(args) != 1:
        return NotImplemented
    return local_apply(func, args, {}, x, sd)
