"""Exact ``F.interpolate`` / ``nn.Upsample`` on DTensors sharded on a spatial dim.

Nearest, nearest-exact, (bi/tri)linear, bicubic and area (adaptive average pooling, see
:mod:`.pool`); ``size`` or ``scale_factor`` (the kernel's use of the user's scale when
``recompute_scale_factor`` is not True is reproduced); antialias is refused with a clear error.
Along the sharded axis every output row is a weighted sum of a few input rows
(:mod:`credit_dtensor.geometry.resample`, bit-identical to PyTorch's CPU index/weight formulas):
each rank gathers the rows its ``torch.chunk`` output slice reads (halo primitive), applies the
taps, and PyTorch's own kernel does the other spatial axes with their original settings (the
sharded axis is made trivial for it). Bicubic does the other axis with its own taps as well.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..dtensor import spatial_shard_dim, wrap_shard
from ..errors import DomainParallelError
from ..geometry.resample import interp_taps, nearest_is_local, nearest_uses_shortcuts
from ._route import route_rule
from ._rows import RowOpRef, SeparableOp, Taps, apply_row_op, domain_info, meta_like, register_row_ops, row_op_ref
from .family import family
from .pool import AdaptiveAvgPoolOp

FAMILY = family("resample")

aten = torch.ops.aten

_LINEAR = ("linear", "bilinear", "trilinear")


def _fold(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``(B, C, .., L@dim, ..) -> (B*L, C, .., 1@dim, ..)``: the sharded axis joins the batch."""
    u = t.movedim(dim, 1)
    u = u.reshape(t.shape[0] * t.shape[dim], *u.shape[2:])
    return u.unsqueeze(dim)


def _unfold(u: torch.Tensor, dim: int, batch: int) -> torch.Tensor:
    u = u.squeeze(dim)
    u = u.reshape(batch, u.shape[0] // batch, *u.shape[1:])
    return u.movedim(1, dim).contiguous()


def _interp_aten(mode: str, nd: int):
    """(forward op, backward op, takes align_corners) of PyTorch's kernel for a mode."""
    if mode == "nearest":
        name = f"upsample_nearest{nd}d"
    elif mode == "nearest-exact":
        name = f"_upsample_nearest_exact{nd}d"
    elif mode in _LINEAR:
        name = {1: "upsample_linear1d", 2: "upsample_bilinear2d", 3: "upsample_trilinear3d"}[nd]
    elif mode == "bicubic":
        name = "upsample_bicubic2d"
    else:
        raise ValueError(mode)
    return getattr(aten, name).default, getattr(aten, name + "_backward").default, mode in _LINEAR + ("bicubic",)


@functools.lru_cache(maxsize=256)
def _interp_global_taps(mode, n_in, n_out, align_corners, scale, single, special=True):
    return tuple(tuple(interp_taps(mode, o, n_in, n_out, align_corners, scale, single, special)) for o in range(n_out))


class InterpOp(SeparableOp):
    """``F.interpolate`` (every mode but area) of one rank's shard."""

    label = "interpolate"

    def __init__(self, mode, in_shape, out_size, scales, align_corners, dim, single, world, rank) -> None:
        self.mode, self.nd, self.dim = mode, len(in_shape) - 2, dim
        self.in_shape, self.out_shape = tuple(in_shape), tuple(in_shape[:2]) + tuple(out_size)
        self.scales, self.align_corners = tuple(scales), align_corners
        sd = dim - 2
        n, n_out = in_shape[dim], out_size[sd]
        nd = len(in_shape) - 2
        allt = _interp_global_taps(
            mode, n, n_out, align_corners, scales[sd], single, nearest_uses_shortcuts(nd, backward=False)
        )
        if mode == "bicubic" and tuple(out_size) == tuple(in_shape[2:]):
            # PyTorch's bicubic backward copies the gradient when no spatial size changes, while
            # its forward still applies the (user-scaled) cubic weights: match both
            allb = tuple(((o, 1.0),) for o in range(n_out))
        else:
            allb = _interp_global_taps(
                mode, n, n_out, align_corners, scales[sd], single, nearest_uses_shortcuts(nd, backward=True)
            )
        self._setup_taps(n, n_out, lambda o: allt[o], world, rank, lambda o: allb[o])
        self.fwd_op, self.bwd_op, self.takes_ac = _interp_aten(mode, self.nd)
        self.c_out = list(out_size)
        self.c_out[sd] = 1
        self.c_scales = list(scales)
        self.c_scales[sd] = None
        self.trivial = self.nd == 1
        self.cubic_other = None
        if mode == "bicubic":
            # the other axis with our own taps: PyTorch's backward shortcut depends on *both* axes,
            # which a folded call cannot see
            od = 1 - sd  # the other spatial index of a 2-D op
            m_in, m_out = in_shape[2 + od], out_size[od]
            fwd = [interp_taps(mode, o, m_in, m_out, align_corners, scales[od], single) for o in range(m_out)]
            same = tuple(out_size) == tuple(in_shape[2:])
            bwd = [[(o, 1.0)] for o in range(m_out)] if same else fwd
            self.cubic_other = (2 + od, m_in, Taps(fwd), Taps(bwd))

    def _args(self) -> list:
        return [bool(self.align_corners)] if self.takes_ac else []

    def _other(self, yh: torch.Tensor) -> torch.Tensor:
        if self.trivial:
            return yh
        if self.cubic_other is not None:
            od, _, taps, _ = self.cubic_other
            return taps.apply(yh, od)
        u = self.fwd_op(_fold(yh, self.dim), self.c_out, *self._args(), *self.c_scales)
        return _unfold(u, self.dim, yh.shape[0])

    def _other_adjoint(self, g: torch.Tensor, yh_shape: list[int]) -> torch.Tensor:
        if self.trivial:
            return g
        if self.cubic_other is not None:
            od, m_in, _, taps_b = self.cubic_other
            return taps_b.adjoint(g, od, m_in)
        b, rows = yh_shape[0], yh_shape[self.dim]
        rest = [s for i, s in enumerate(yh_shape) if i not in (0, self.dim)]
        folded_in = [b * rows, *rest]
        folded_in.insert(self.dim, 1)
        gu = self.bwd_op(_fold(g, self.dim), self.c_out, folded_in, *self._args(), *self.c_scales)
        return _unfold(gu, self.dim, b)


register_row_ops(InterpOp)


def _interp_scales(nd, size, scale_factor, mode, recompute) -> tuple[float | None, ...]:
    """The per-dim scales F.interpolate hands to the kernel (None: computed from the sizes)."""
    if size is not None or scale_factor is None or mode == "area" or recompute:
        return (None,) * nd
    sf = scale_factor if isinstance(scale_factor, (list, tuple)) else [scale_factor] * nd
    return tuple(float(s) for s in sf)


def _interp_op(x: DTensor, mode, out_size, scales, align_corners, dim, out_shape) -> RowOpRef:
    _, _, world, rank = domain_info(x)
    shape = tuple(x.shape)
    if mode == "area":
        args = (shape, tuple(out_size), dim, world, rank)
        return row_op_ref(AdaptiveAvgPoolOp.__name__, args, dim, out_shape)
    single = x.dtype != torch.float64
    ac = bool(align_corners) if mode in _LINEAR + ("bicubic",) else None
    args = (mode, shape, tuple(out_size), tuple(scales), ac, dim, single, world, rank)
    return row_op_ref(InterpOp.__name__, args, dim, out_shape)


def _local_nearest(x: DTensor, dim: int, nd: int, size, scale_factor, mode, recompute) -> DTensor | None:
    """A UNet decoder's ``F.interpolate(x, scale_factor=2)``: when every rank's output rows come from
    its own input rows (:func:`nearest_is_local`), each rank upsamples its shard; no row op, no
    exchange, plain autograd on the local rows. ``None`` otherwise (the general row op)."""
    if mode != "nearest" or size is not None or scale_factor is None or recompute:
        return None
    sf = list(scale_factor) if isinstance(scale_factor, (list, tuple)) else [scale_factor] * nd
    if len(sf) != nd or not nearest_is_local(x.shape[dim], float(sf[dim - 2]), x.device_mesh.size()):
        return None
    y = F.interpolate(x.to_local(), None, scale_factor, mode)
    shape = list(x.shape[:2]) + [int(x.shape[d] * sf[d - 2]) if d == dim else y.shape[d] for d in range(2, x.ndim)]
    return wrap_shard(y, x.device_mesh, dim, shape)


def interpolate(
    input: torch.Tensor,
    size: int | Sequence[int] | None = None,
    scale_factor: float | Sequence[float] | None = None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    antialias: bool = False,
) -> torch.Tensor:
    """``F.interpolate``, exact for DTensors sharded on a spatial dim (output re-chunked on it)."""
    nd = input.ndim - 2
    dim = spatial_shard_dim(input, nd, "interpolate") if nd >= 1 else None
    if dim is None:
        return F.interpolate(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
    if antialias or mode == "lanczos":
        raise DomainParallelError(
            f"interpolate(mode={mode!r}, antialias={antialias}) on an input sharded on dim {dim}: antialiased "
            "resampling is not supported on sharded tensors: use antialias=False, or gather_tensor() first"
        )
    local = _local_nearest(input, dim, nd, size, scale_factor, mode, recompute_scale_factor)
    if local is not None:
        return local
    try:
        meta = F.interpolate(
            meta_like(input), size, scale_factor, mode, align_corners, recompute_scale_factor, antialias
        )
    except ZeroDivisionError as e:  # the meta kernel divides by an empty output size
        raise DomainParallelError(
            f"interpolate: input of shape {tuple(input.shape)} with size={size}, scale_factor={scale_factor} gives an "
            "empty output: PyTorch rejects output sizes < 1; use a larger size or scale_factor"
        ) from e
    scales = _interp_scales(nd, size, scale_factor, mode, recompute_scale_factor)
    op = _interp_op(input, mode, tuple(meta.shape[2:]), scales, align_corners, dim, meta.shape)  # type: ignore[arg-type]
    return apply_row_op(input, op)  # type: ignore[arg-type]


upsample = interpolate

_ROUTES = {F.interpolate: (interpolate, None, {})}
FAMILY.rule(_ROUTES, h="halo", note="every mode but antialiased ones; nearest 2x is local when chunks align")(
    route_rule("interpolate_rule", _ROUTES)
)
