"""Exact interpolation, pooling and pixel (un)shuffle on DTensors sharded on a spatial dim.

Each op is separable along the sharded axis: every output row reads a few input rows with known
weights (:mod:`credit_dtensor.geometry.resample`, bit-identical to PyTorch's CPU index/weight
formulas). For each rank the output chunk is its ``torch.chunk`` slice of the *global* output,
the input rows it reads are gathered with the halo primitive (only those rows, from whichever
rank owns them), the sharded axis is resampled with explicit taps, and PyTorch's own kernel does
the other spatial axes with their original settings (the sharded axis is made trivial for it).

* interpolate / ``nn.Upsample``: nearest, nearest-exact, (bi/tri)linear, bicubic, area; ``size``
  or ``scale_factor`` (the kernel's use of the user's scale when ``recompute_scale_factor`` is
  not True is reproduced); antialias is rejected with a clear error.
* max pooling (1-D/2-D/3-D, dilation, ceil_mode, ``return_indices`` with *global* flat indices,
  equal to the single-device ones): PyTorch's kernel runs on the extended rows with ``-inf``
  for padding rows; an index that lands on a padding row (all-``-inf`` window) is moved to the
  window's first real row, as PyTorch does. The gradient is scattered by those indices.
* avg pooling (count_include_pad, divisor_override, ceil_mode) and adaptive avg/max pooling.
* pixel_shuffle / pixel_unshuffle sharded on H or W (any shard sizes).

The same forward/adjoint pair serves the public functions (autograd node) and the aten rules.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from .. import comm, stats
from ..dtensor import wrap_replicate
from ..errors import DomainParallelError, UnsupportedShardingError
from ..geometry import chunk_range
from ..geometry.resample import (
    adaptive_range,
    avg_pool_taps,
    interp_taps,
    nearest_uses_shortcuts,
    pixel_shuffle_rows,
    pixel_unshuffle_rows,
    pool_first_real,
    pool_out_len,
    taps_rows,
)
from ..halo import cached_plan, halo_gather, halo_scatter_add
from ..intercept import register
from ._rows import (
    ROW_FACTORIES,
    RowOp,
    RowOpRef,
    Taps,
    apply_row_op,
    chunk_needs,
    domain_info,
    row_op_ref,
    spatial_shard_dim,
)

__all__ = [
    "interpolate",
    "upsample",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "pixel_shuffle",
    "pixel_unshuffle",
    "InterpOp",
    "MaxPoolOp",
    "AvgPoolOp",
    "AdaptiveAvgPoolOp",
    "AdaptiveMaxPoolOp",
    "PixelShuffleOp",
]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_LINEAR = ("linear", "bilinear", "trilinear")


def _ntuple(v: int | Sequence[int] | None, n: int, default: Sequence[int] | None = None) -> tuple[int, ...]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        if default is None:
            raise ValueError("missing value")
        return tuple(default)
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(a) for a in v)
    return t * n if len(t) == 1 else t


def _local_shape(shape: Sequence[int], dim: int, rows: int) -> list[int]:
    s = list(shape)
    s[dim] = rows
    return s


def _neg_inf(dtype: torch.dtype) -> float:
    if not dtype.is_floating_point:
        raise DomainParallelError(f"max pooling of a sharded {dtype} tensor: only floating point dtypes are supported")
    return float("-inf")


def _rows_needs(n_out: int, world: int, rows_of) -> tuple[tuple[int | None, ...], ...]:
    return chunk_needs(n_out, world, rows_of)


# ---------------------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------------------


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


class _SeparableOp(RowOp):
    """Taps along the sharded dim + PyTorch's kernel on the other spatial dims."""

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

        needs = _rows_needs(n_out, world, rows_of)
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
            return x.new_zeros(_local_shape(self.out_shape_local(x), self.dim, 0)), None, None
        yh = self.taps.apply(ext, self.dim)
        return self._other(yh), None, None

    def backward(self, g: torch.Tensor, saved: object, group: dist.ProcessGroup) -> torch.Tensor:
        lead = list(g.shape[: len(g.shape) - self.nd])
        ext_shape = lead + list(self.in_shape[len(self.in_shape) - self.nd :])
        ext_shape[self.dim] = self.ext_len
        if self.rows == 0:
            g_ext = g.new_zeros(ext_shape)
        else:
            yh_shape = _local_shape(ext_shape, self.dim, self.rows)
            g_ext = self.taps_bwd.adjoint(self._other_adjoint(g, yh_shape), self.dim, self.ext_len)
        return halo_scatter_add(g_ext.contiguous(), self.dim, self.plan, group)

    def out_shape_local(self, x: torch.Tensor) -> list[int]:
        lead = list(x.shape[: x.ndim - self.nd])
        return lead + list(self.out_shape[len(self.out_shape) - self.nd :])


class InterpOp(_SeparableOp):
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


class AdaptiveAvgPoolOp(_SeparableOp):
    """Adaptive average pooling (== ``interpolate(mode='area')``) of one rank's shard."""

    label = "adaptive_avg_pool"

    def __init__(self, in_shape, out_size, dim, world, rank) -> None:
        self.nd = len(out_size)
        self.dim, self.in_shape = dim, tuple(in_shape)
        lead = len(in_shape) - self.nd
        self.out_shape = tuple(in_shape[:lead]) + tuple(out_size)
        n, n_out = in_shape[dim], out_size[dim - lead]
        self.sd = dim - lead

        def taps_of(o):
            a, b = adaptive_range(o, n, n_out)
            return [(r, 1.0 / (b - a)) for r in range(a, b)]

        self._setup_taps(n, n_out, taps_of, world, rank)
        self.out_size = list(out_size)

    def _c_out(self) -> list[int]:
        s = list(self.out_size)
        s[self.sd] = self.rows
        return s

    def _other(self, yh: torch.Tensor) -> torch.Tensor:
        if self.nd == 1:
            return yh
        return getattr(aten, f"_adaptive_avg_pool{self.nd}d").default(yh, self._c_out())

    def _other_adjoint(self, g: torch.Tensor, yh_shape: list[int]) -> torch.Tensor:
        if self.nd == 1:
            return g
        return getattr(aten, f"_adaptive_avg_pool{self.nd}d_backward").default(g, g.new_empty(yh_shape))


class AvgPoolOp(_SeparableOp):
    """``avg_pool{1,2,3}d`` of one rank's shard."""

    label = "avg_pool"

    def __init__(self, in_shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor, dim, world, rank):
        self.nd = len(kernel)
        self.dim, self.in_shape = dim, tuple(in_shape)
        lead = len(in_shape) - self.nd
        sd = self.sd = dim - lead
        out = [pool_out_len(in_shape[lead + i], kernel[i], stride[i], padding[i], 1, ceil_mode) for i in range(self.nd)]
        self.out_shape = tuple(in_shape[:lead]) + tuple(out)
        n = in_shape[dim]
        k, s, p = kernel[sd], stride[sd], padding[sd]
        h_only = self.nd == 1

        def taps_of(o):
            rows, div = avg_pool_taps(o, n, k, s, p, count_include_pad, divisor)
            if divisor is not None and not h_only:
                return rows  # stage C divides by the override
            return [(r, 1.0 / div) for r, _ in rows]

        self._setup_taps(n, out[sd], taps_of, world, rank)
        self.c_kernel = list(kernel)
        self.c_stride = list(stride)
        self.c_pad = list(padding)
        self.c_kernel[sd], self.c_stride[sd], self.c_pad[sd] = 1, 1, 0
        self.ceil_mode, self.count_include_pad, self.divisor = ceil_mode, count_include_pad, divisor

    def _other(self, yh: torch.Tensor) -> torch.Tensor:
        if self.nd == 1:
            return yh
        op = getattr(aten, f"avg_pool{self.nd}d").default
        return op(yh, self.c_kernel, self.c_stride, self.c_pad, self.ceil_mode, self.count_include_pad, self.divisor)

    def _other_adjoint(self, g: torch.Tensor, yh_shape: list[int]) -> torch.Tensor:
        if self.nd == 1:
            return g
        op = getattr(aten, f"avg_pool{self.nd}d_backward").default
        return op(
            g,
            g.new_empty(yh_shape),
            self.c_kernel,
            self.c_stride,
            self.c_pad,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor,
        )


# ---------------------------------------------------------------------------------------------
# Max pooling (indices)
# ---------------------------------------------------------------------------------------------


class _IndexedMaxOp(RowOp):
    """Shared by max and adaptive max pooling: flat-index bookkeeping and the scatter adjoint.

    Subclasses set ``ext_len``, ``plan``, ``rows``, ``nd``, ``lead_ndim`` and implement
    ``_pool(ext) -> (y, ext_row_of_output_index)`` returning, per output element, the extended
    row its max came from (``h``) and the flat index's pieces before/after the sharded axis.
    """

    label = "max_pool"
    with_indices = False

    def _inner(self) -> int:
        return math.prod(self.in_shape[self.dim + 1 :])

    def _split(self, idx: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = self._inner()
        return idx // (inner * rows), (idx // inner) % rows, idx % inner

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup):
        ext = halo_gather(x, self.dim, self.plan, group)
        lead = list(x.shape[: x.ndim - self.nd])
        out_local = lead + list(self.out_shape[len(self.out_shape) - self.nd :])
        out_local[self.dim] = self.rows
        if self.rows == 0:
            y = x.new_zeros(out_local)
            empty = torch.zeros(out_local, dtype=torch.long, device=x.device)
            return y, (empty if self.with_indices else None), empty
        y, pre, h, rest = self._pool(ext)
        inner = self._inner()
        n = self.in_shape[self.dim]
        ext_rows = self._ext_rows_tensor(x.device)
        global_idx = (pre * n + ext_rows[h]) * inner + rest
        local_idx = (pre * self.ext_len + h) * inner + rest
        return y, (global_idx if self.with_indices else None), local_idx

    def local_from_global(self, gidx: torch.Tensor) -> torch.Tensor:
        """Indices into this rank's extended plane from global flat indices (for the aten rule)."""
        n = self.in_shape[self.dim]
        pre, hg, rest = self._split(gidx, n)
        lookup = self._global_to_ext_tensor(gidx.device)
        return (pre * self.ext_len + lookup[hg]) * self._inner() + rest

    def backward(self, g: torch.Tensor, saved: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        lead = list(g.shape[: g.ndim - self.nd])
        ext_shape = lead + list(self.in_shape[len(self.in_shape) - self.nd :])
        ext_shape[self.dim] = self.ext_len
        g_ext = g.new_zeros(ext_shape)
        if self.rows and self.ext_len:
            first = len(lead)
            flat = g_ext.flatten(first)
            flat.scatter_add_(first, saved.flatten(first), g.flatten(first))
            g_ext = flat.view(ext_shape)
        return halo_scatter_add(g_ext.contiguous(), self.dim, self.plan, group)

    # lookup tables (cached per device)
    def _ext_rows_tensor(self, device: torch.device) -> torch.Tensor:
        key = ("ext_rows", device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(
                [-1 if r is None else r for r in self.ext_rows], dtype=torch.long, device=device
            )
        return self._cache[key]

    def _global_to_ext_tensor(self, device: torch.device) -> torch.Tensor:
        key = ("g2e", device)
        if key not in self._cache:
            table = [0] * self.in_shape[self.dim]
            for e, r in enumerate(self.ext_rows):
                if r is not None:
                    table[r] = e
            self._cache[key] = torch.tensor(table, dtype=torch.long, device=device)
        return self._cache[key]


class MaxPoolOp(_IndexedMaxOp):
    """``max_pool{1,2,3}d`` of one rank's shard (global indices)."""

    label = "max_pool"

    def __init__(self, in_shape, kernel, stride, padding, dilation, ceil_mode, with_indices, dim, world, rank):
        self.nd = len(kernel)
        self.dim, self.in_shape, self.with_indices = dim, tuple(in_shape), with_indices
        lead = len(in_shape) - self.nd
        sd = dim - lead
        out = [
            pool_out_len(in_shape[lead + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode)
            for i in range(self.nd)
        ]
        self.out_shape = tuple(in_shape[:lead]) + tuple(out)
        n, k, s, p, d = in_shape[dim], kernel[sd], stride[sd], padding[sd], dilation[sd]
        span = d * (k - 1) + 1

        def rows_of(o0, o1):
            if o1 <= o0:
                return ()
            a, b = o0 * s - p, (o1 - 1) * s - p + span
            touched = {o * s - p + j * d for o in range(o0, o1) for j in range(k)}
            return tuple(v if (0 <= v < n and v in touched) else None for v in range(a, b))

        needs = _rows_needs(out[sd], world, rows_of)
        self.plan = cached_plan(n, world, rank, needs)
        o0, o1 = chunk_range(out[sd], world, rank)
        self.rows, self.ext_len, self.a = o1 - o0, len(needs[rank]), o0 * s - p
        self.ext_rows = needs[rank]
        first = []
        for o in range(o0, o1):
            f = pool_first_real(o, n, k, s, p, d)
            if f is None:
                raise DomainParallelError(
                    f"max_pool: window {o} of the sharded dim (kernel {k}, stride {s}, padding {p}, dilation {d}) "
                    "reads only padding rows; PyTorch's result for it is undefined: use a smaller padding"
                )
            first.append(f - self.a)
        self.first = tuple(first)
        self.none_rows = tuple(i for i, r in enumerate(self.ext_rows) if r is None)
        self.kernel, self.stride, self.dilation, self.ceil_mode = list(kernel), list(stride), list(dilation), ceil_mode
        self.c_pad = list(padding)
        self.c_pad[sd] = 0
        self._cache: dict = {}

    def _tables(self, device: torch.device):
        key = ("tables", device)
        if key not in self._cache:
            none_mask = torch.zeros(self.ext_len, dtype=torch.bool, device=device)
            if self.none_rows:
                none_mask[list(self.none_rows)] = True
            self._cache[key] = (
                none_mask,
                torch.tensor(self.none_rows, dtype=torch.long, device=device),
                torch.tensor(self.first, dtype=torch.long, device=device),
            )
        return self._cache[key]

    def _pool(self, ext: torch.Tensor):
        none_mask, none_idx, first = self._tables(ext.device)
        if len(self.none_rows):
            ext = ext.index_fill(self.dim, none_idx, _neg_inf(ext.dtype))
        fn = getattr(F, f"max_pool{self.nd}d")
        y, idx = fn(ext, self.kernel, self.stride, self.c_pad, self.dilation, self.ceil_mode, return_indices=True)
        if y.shape[self.dim] != self.rows:
            raise AssertionError(f"max_pool: local output has {y.shape[self.dim]} rows, expected {self.rows}")
        pre, h, rest = self._split(idx, self.ext_len)
        if len(self.none_rows):
            shape = [1] * y.ndim
            shape[self.dim] = self.rows
            h = torch.where(none_mask[h], first.view(shape).expand_as(h), h)
        return y, pre, h, rest


class AdaptiveMaxPoolOp(_IndexedMaxOp):
    """``adaptive_max_pool{1,2,3}d`` of one rank's shard: every output row's window is stacked to
    a common length ``K`` (padded with ``-inf`` rows after the real ones) so PyTorch's adaptive
    kernel with ``rows`` outputs sees exactly one window per output row, in its own scan order."""

    label = "adaptive_max_pool"

    def __init__(self, in_shape, out_size, with_indices, dim, world, rank) -> None:
        self.nd = len(out_size)
        self.dim, self.in_shape, self.with_indices = dim, tuple(in_shape), with_indices
        lead = len(in_shape) - self.nd
        self.sd = sd = dim - lead
        self.out_shape = tuple(in_shape[:lead]) + tuple(out_size)
        n, n_out = in_shape[dim], out_size[sd]

        def rows_of(o0, o1):
            rows = set()
            for o in range(o0, o1):
                a, b = adaptive_range(o, n, n_out)
                rows.update(range(a, b))
            return tuple(sorted(rows))

        needs = _rows_needs(n_out, world, rows_of)
        self.plan = cached_plan(n, world, rank, needs)
        o0, o1 = chunk_range(n_out, world, rank)
        self.rows, self.ext_len, self.ext_rows = o1 - o0, len(needs[rank]), needs[rank]
        pos = {g: i for i, g in enumerate(self.ext_rows)}
        windows = [range(*adaptive_range(o, n, n_out)) for o in range(o0, o1)]
        self.K = max((len(w) for w in windows), default=1)
        self.stack = tuple(i for w in windows for i in [pos[r] for r in w] + [self.ext_len] * (self.K - len(w)))
        self.out_size = list(out_size)
        self._cache: dict = {}

    def _pool(self, ext: torch.Tensor):
        key = ("stack", ext.device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.stack, dtype=torch.long, device=ext.device)
        stack = self._cache[key]
        pad_row = ext.new_full(_local_shape(ext.shape, self.dim, 1), _neg_inf(ext.dtype))
        stacked = torch.cat([ext, pad_row], self.dim).index_select(self.dim, stack)
        size = list(self.out_size)
        size[self.sd] = self.rows
        y, idx = getattr(F, f"adaptive_max_pool{self.nd}d")(stacked, size, return_indices=True)
        pre, hs, rest = self._split(idx, self.rows * self.K)
        h = stack[hs]
        return y, pre, h, rest


# ---------------------------------------------------------------------------------------------
# Pixel (un)shuffle
# ---------------------------------------------------------------------------------------------


class PixelShuffleOp(RowOp):
    """``pixel_shuffle`` (``shuffle=True``) or ``pixel_unshuffle`` of one rank's shard (H or W)."""

    label = "pixel_shuffle"

    def __init__(self, in_shape, factor, shuffle, dim, world, rank) -> None:
        self.in_shape, self.factor, self.shuffle, self.dim = tuple(in_shape), factor, shuffle, dim
        r = factor
        *lead, c, h, w = in_shape
        if shuffle:
            self.out_shape = (*lead, c // (r * r), h * r, w * r)
        else:
            self.out_shape = (*lead, c * r * r, h // r, w // r)
        n, n_out = in_shape[dim], self.out_shape[dim]
        rows_fn = pixel_shuffle_rows if shuffle else pixel_unshuffle_rows
        needs = _rows_needs(n_out, world, lambda o0, o1: tuple(range(*rows_fn(o0, o1, r))))
        self.plan = cached_plan(n, world, rank, needs)
        self.o0, self.o1 = chunk_range(n_out, world, rank)
        self.e0 = rows_fn(self.o0, self.o1, r)[0]
        self.ext_len = len(needs[rank])

    def _local(self, shape, rows_dim_value) -> list[int]:
        return _local_shape(shape, self.dim, rows_dim_value)

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup):
        ext = halo_gather(x, self.dim, self.plan, group)
        rows = self.o1 - self.o0
        lead = list(x.shape[: x.ndim - 3])
        if rows == 0:
            return x.new_zeros(self._local(lead + list(self.out_shape[-3:]), 0)), None, None
        if self.shuffle:
            z = F.pixel_shuffle(ext, self.factor)
            return z.narrow(self.dim, self.o0 - self.e0 * self.factor, rows).contiguous(), None, None
        return F.pixel_unshuffle(ext, self.factor), None, None

    def backward(self, g: torch.Tensor, saved: object, group: dist.ProcessGroup) -> torch.Tensor:
        rows = self.o1 - self.o0
        lead = list(g.shape[: g.ndim - 3])
        ext_shape = self._local(lead + list(self.in_shape[-3:]), self.ext_len)
        if rows == 0:
            g_ext = g.new_zeros(ext_shape)
        elif self.shuffle:
            z_shape = self._local(lead + list(self.out_shape[-3:]), self.ext_len * self.factor)
            gz = g.new_zeros(z_shape)
            gz.narrow(self.dim, self.o0 - self.e0 * self.factor, rows).copy_(g)
            g_ext = F.pixel_unshuffle(gz, self.factor)
        else:
            g_ext = F.pixel_shuffle(g, self.factor)
        return halo_scatter_add(g_ext.contiguous(), self.dim, self.plan, group)


# ---------------------------------------------------------------------------------------------
# Op construction (cached) and validation
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _cached(cls, *args):
    op = cls(*args)
    op.cache_key = (cls.__name__, args)
    return op


def _meta(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), device="meta", dtype=dtype)


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
        return row_op_ref("AdaptiveAvgPoolOp", (shape, tuple(out_size), dim, world, rank), dim, out_shape)
    single = x.dtype != torch.float64
    ac = bool(align_corners) if mode in _LINEAR + ("bicubic",) else None
    args = (mode, shape, tuple(out_size), tuple(scales), ac, dim, single, world, rank)
    return row_op_ref("InterpOp", args, dim, out_shape)


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
    try:
        meta = F.interpolate(
            _meta(input.shape, input.dtype), size, scale_factor, mode, align_corners, recompute_scale_factor, antialias
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


def _pool_dim(input: torch.Tensor, nd: int, where: str) -> int | None:
    if input.ndim not in (nd + 1, nd + 2):
        return None  # let PyTorch raise its own error
    return spatial_shard_dim(input, nd, where)


def _max_pool(nd, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    where = f"max_pool{nd}d"
    dim = _pool_dim(input, nd, where)
    fn = getattr(F, where)
    if dim is None:
        return fn(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=return_indices)
    k = _ntuple(kernel_size, nd)
    s = _ntuple(stride, nd, k)
    p, d = _ntuple(padding, nd), _ntuple(dilation, nd)
    meta = fn(_meta(input.shape, input.dtype), k, s, p, d, ceil_mode=ceil_mode)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    op = row_op_ref("MaxPoolOp", (tuple(input.shape), k, s, p, d, bool(ceil_mode), True, dim, world, rank), dim,
                    meta.shape, with_indices=True)
    y, idx = apply_row_op(input, op)  # type: ignore[arg-type]
    return (y, idx) if return_indices else y


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool1d``; exact on sharded inputs; indices are global (as on one device)."""
    return _max_pool(1, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool2d``; exact on sharded inputs; indices are global (as on one device)."""
    return _max_pool(2, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool3d``; exact on sharded inputs; indices are global (as on one device)."""
    return _max_pool(3, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _avg_pool(
    nd, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    where = f"avg_pool{nd}d"
    dim = _pool_dim(input, nd, where)
    fn = getattr(F, where)
    extra = {} if nd == 1 else {"divisor_override": divisor_override}
    if dim is None:
        return fn(input, kernel_size, stride, padding, ceil_mode, count_include_pad, **extra)
    k = _ntuple(kernel_size, nd)
    s = _ntuple(stride, nd, k)
    p = _ntuple(padding, nd)
    meta = fn(_meta(input.shape, input.dtype), k, s, p, ceil_mode, count_include_pad, **extra)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    args = (tuple(input.shape), k, s, p, bool(ceil_mode), bool(count_include_pad), divisor_override, dim, world, rank)
    return apply_row_op(input, row_op_ref("AvgPoolOp", args, dim, meta.shape))  # type: ignore[arg-type]


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """``F.avg_pool1d``; exact on sharded inputs."""
    return _avg_pool(1, input, kernel_size, stride, padding, ceil_mode, count_include_pad)


def avg_pool2d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """``F.avg_pool2d``; exact on sharded inputs."""
    return _avg_pool(2, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool3d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """``F.avg_pool3d``; exact on sharded inputs."""
    return _avg_pool(3, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive_size(input: torch.Tensor, output_size, nd: int) -> tuple[int, ...]:
    size = _ntuple(output_size, nd) if not isinstance(output_size, (list, tuple)) else tuple(output_size)
    if len(size) == 1 and nd > 1:
        size = size * nd
    spatial = input.shape[input.ndim - nd :]
    return tuple(int(spatial[i]) if size[i] is None else int(size[i]) for i in range(nd))


def _adaptive_avg(nd, input, output_size):
    where = f"adaptive_avg_pool{nd}d"
    dim = _pool_dim(input, nd, where)
    fn = getattr(F, where)
    if dim is None:
        return fn(input, output_size)
    size = _adaptive_size(input, output_size, nd)
    meta = fn(_meta(input.shape, input.dtype), size)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    if size[dim - (input.ndim - nd)] < world:
        return _pooled_replicate(fn, input, dim, size, nd)
    op = row_op_ref("AdaptiveAvgPoolOp", (tuple(input.shape), size, dim, world, rank), dim, meta.shape)
    return apply_row_op(input, op)  # type: ignore[arg-type]


def _pooled_replicate(fn, input: DTensor, dim: int, size: tuple[int, ...], nd: int) -> DTensor:
    """Adaptive average pooling to fewer rows than ranks (global pooling, SE gates, classifier
    heads): each rank sums its rows' share of every window, one all-reduce of the *pooled* tensor
    finishes it, and the result is ``Replicate`` -- a pooled vector, not a shard most ranks would
    hold empty (which ``flatten`` and broadcasting against the activation would have to gather)."""
    mesh, group, world, rank = domain_info(input)
    n, n_out = input.shape[dim], size[dim - (input.ndim - nd)]
    a0, a1 = chunk_range(n, world, rank)
    x = input.to_local()
    weights = torch.zeros(n_out, a1 - a0, dtype=x.dtype, device=x.device)
    for o in range(n_out):
        s, e = adaptive_range(o, n, n_out)
        if max(s, a0) < min(e, a1):
            weights[o, max(s, a0) - a0 : min(e, a1) - a0] = 1.0 / (e - s)
    part = torch.movedim(torch.movedim(x, dim, -1) @ weights.T, -1, dim)
    pooled = fn(part, size)  # the other dims (rows are already pooled: identity along H)
    with stats.op_label("adaptive_avg_pool"):
        total = comm.sum_over_ranks(pooled, group)
    return wrap_replicate(total, mesh)


def adaptive_avg_pool1d(input, output_size):
    """``F.adaptive_avg_pool1d``; exact on sharded inputs."""
    return _adaptive_avg(1, input, output_size)


def adaptive_avg_pool2d(input, output_size):
    """``F.adaptive_avg_pool2d``; exact on sharded inputs."""
    return _adaptive_avg(2, input, output_size)


def adaptive_avg_pool3d(input, output_size):
    """``F.adaptive_avg_pool3d``; exact on sharded inputs."""
    return _adaptive_avg(3, input, output_size)


def _adaptive_max(nd, input, output_size, return_indices=False):
    where = f"adaptive_max_pool{nd}d"
    dim = _pool_dim(input, nd, where)
    fn = getattr(F, where)
    if dim is None:
        return fn(input, output_size, return_indices)
    size = _adaptive_size(input, output_size, nd)
    meta = fn(_meta(input.shape, input.dtype), size)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    op = row_op_ref("AdaptiveMaxPoolOp", (tuple(input.shape), size, True, dim, world, rank), dim, meta.shape,
                    with_indices=True)
    y, idx = apply_row_op(input, op)  # type: ignore[arg-type]
    return (y, idx) if return_indices else y


def adaptive_max_pool1d(input, output_size, return_indices=False):
    """``F.adaptive_max_pool1d``; exact on sharded inputs; indices are global."""
    return _adaptive_max(1, input, output_size, return_indices)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """``F.adaptive_max_pool2d``; exact on sharded inputs; indices are global."""
    return _adaptive_max(2, input, output_size, return_indices)


def adaptive_max_pool3d(input, output_size, return_indices=False):
    """``F.adaptive_max_pool3d``; exact on sharded inputs; indices are global."""
    return _adaptive_max(3, input, output_size, return_indices)


def _pixel_dim(input: torch.Tensor, where: str) -> int | None:
    """H or W shard dim; None for unsharded / leading-dim sharding (purely local for PyTorch)."""
    if not isinstance(input, DTensor) or input.ndim < 3:
        return None
    dim = spatial_shard_dim(input, 3, where)
    if dim is None:
        return None
    if dim == input.ndim - 3:
        raise UnsupportedShardingError(
            f"{where}: input is sharded on its channel dim {dim}: shard on H (dim {input.ndim - 2}) instead"
        )
    return dim


def _check_unshuffle(shape: Sequence[int], factor: int) -> None:
    """The *global* H and W must be multiples of the factor (any shard sizes are fine)."""
    for d, name in ((len(shape) - 2, "H"), (len(shape) - 1, "W")):
        if shape[d] % factor:
            lo, hi = shape[d] - shape[d] % factor, shape[d] + factor - shape[d] % factor
            raise DomainParallelError(
                f"pixel_unshuffle: global {name}={shape[d]} (dim {d}) is not divisible by downscale_factor="
                f"{factor}: pad or crop {name} to a multiple of {factor} (e.g. {lo} or {hi})"
            )


def _pixel(input: torch.Tensor, factor: int, shuffle: bool):
    where = "pixel_shuffle" if shuffle else "pixel_unshuffle"
    fn = F.pixel_shuffle if shuffle else F.pixel_unshuffle
    dim = _pixel_dim(input, where)
    if dim is None:
        return fn(input, factor)
    if not shuffle:
        _check_unshuffle(input.shape, factor)
    meta = fn(_meta(input.shape, input.dtype), factor)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    op = row_op_ref("PixelShuffleOp", (tuple(input.shape), int(factor), shuffle, dim, world, rank), dim, meta.shape)
    return apply_row_op(input, op)  # type: ignore[arg-type]


def pixel_shuffle(input: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """``F.pixel_shuffle``; exact on inputs sharded on H or W, any shard sizes."""
    return _pixel(input, upscale_factor, True)


def pixel_unshuffle(input: torch.Tensor, downscale_factor: int) -> torch.Tensor:
    """``F.pixel_unshuffle``; exact on inputs sharded on H or W, any shard sizes (the *global*
    H/W must be divisible by the factor, as on one device)."""
    return _pixel(input, downscale_factor, False)


# ---------------------------------------------------------------------------------------------
# Functional path: F.interpolate / pools / pixel shuffle as users call them (torch-function rules)
# ---------------------------------------------------------------------------------------------


def _route(public, nd: int | None, **fixed):
    def rule(func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, DTensor) or not any(isinstance(p, Shard) for p in x.placements):
            return NotImplemented
        if nd is not None and spatial_shard_dim(x, nd, public.__name__) is None and x.ndim in (nd + 1, nd + 2):
            return NotImplemented  # batch-sharded or replicated: PyTorch's own rule
        return public(*args, **{**kwargs, **fixed})

    rule.__qualname__ = f"{public.__name__}_rule"
    return rule


def _register() -> None:
    for cls in (InterpOp, AdaptiveAvgPoolOp, AvgPoolOp, MaxPoolOp, AdaptiveMaxPoolOp, PixelShuffleOp):
        ROW_FACTORIES[cls.__name__] = functools.partial(_cached, cls)
    register(F.interpolate)(_route(interpolate, None))
    for nd in (1, 2, 3):
        # F.max_poolNd dispatches on return_indices; its torch-function call names the dispatcher
        mp = globals()[f"max_pool{nd}d"]
        register(getattr(F, f"max_pool{nd}d"))(_route(mp, nd))
        register(getattr(F, f"max_pool{nd}d_with_indices"))(_route(mp, nd, return_indices=True))
        register(getattr(F, f"avg_pool{nd}d"))(_route(globals()[f"avg_pool{nd}d"], nd))
        register(getattr(F, f"adaptive_avg_pool{nd}d"))(_route(globals()[f"adaptive_avg_pool{nd}d"], nd))
        amp = globals()[f"adaptive_max_pool{nd}d"]
        register(getattr(F, f"adaptive_max_pool{nd}d"))(_route(amp, nd))
        register(getattr(F, f"adaptive_max_pool{nd}d_with_indices"))(_route(amp, nd, return_indices=True))
    register(F.pixel_shuffle)(_route(pixel_shuffle, None))
    register(F.pixel_unshuffle)(_route(pixel_unshuffle, None))


_register()
