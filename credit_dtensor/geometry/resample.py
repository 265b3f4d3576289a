"""Pure arithmetic of resampling along one axis: for every output row, the input rows it reads
and their weights -- interpolation (nearest, nearest-exact, linear, cubic, area), pooling (max,
avg, adaptive) and pixel (un)shuffle.

Why reproduce PyTorch's formulas bit for bit: a sharded op must pick the same source rows as the
single-device kernel, and for ``nearest`` a one-ulp difference in the scale flips a row. The
kernels compute the scale in ``float`` for nearest modes (even for float64 tensors), in the op's
math type (``float`` for float/half/bfloat16, ``double`` for double) for linear/cubic, and floor
the source coordinate after rounding it to ``float`` (``floorf``). ``single=True`` selects float32
arithmetic (numpy scalars, one rounding per operation as in C++); the unit tests compare these
maps with PyTorch's own kernels.

A *tap* is ``(input row, weight)``; an output row is the weighted sum of its taps. Every mode is
separable (it acts on each spatial axis independently), so the taps of the sharded axis plus
PyTorch's own kernel on the other axes reproduce the single-device result.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from . import chunk_offsets

__all__ = [
    "Tap",
    "INTERP_MODES",
    "interp_taps",
    "nearest_source",
    "nearest_exact_source",
    "nearest_uses_shortcuts",
    "linear_taps",
    "cubic_taps",
    "adaptive_range",
    "area_taps",
    "pool_out_len",
    "pool_window",
    "pool_first_real",
    "avg_pool_taps",
    "pixel_shuffle_rows",
    "pixel_unshuffle_rows",
    "taps_rows",
]

Tap = tuple[int, float]
INTERP_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "bicubic", "area")
CUBIC_A = -0.75


def _fma(a: float, b: float, c: float) -> float:
    """``a * b + c`` rounded once (what the compiled kernels' fused multiply-add computes)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def _t(single: bool) -> type:
    return np.float32 if single else np.float64


def _scale_value(scale: float | None, n_in: int, n_out: int, T: type):
    """``compute_scales_value``: the user's scale factor wins (as ``1/scale``) when given."""
    if scale is not None and scale > 0:
        return T(1.0 / scale)
    return T(n_in) / T(n_out)


def _area_scale(n_in: int, n_out: int, align_corners: bool, scale: float | None, T: type):
    """``area_pixel_compute_scale``."""
    if align_corners:
        return T(n_in - 1) / T(n_out - 1) if n_out > 1 else T(0)
    return _scale_value(scale, n_in, n_out, T)


def _area_source(scale, o: int, align_corners: bool, cubic: bool, T: type):
    """``area_pixel_compute_source_index``; ``scale * (o + 0.5) - 0.5`` is evaluated in double
    (``o + 0.5`` is a double in C++) and rounded to ``T`` once."""
    if align_corners:
        return scale * T(o)
    src = T(_fma(float(scale), o + 0.5, -0.5))
    return T(0) if (not cubic and src < 0) else src


def _guard(real, n: int, T: type) -> tuple[int, object]:
    """``guard_index_and_lambda``: floor after rounding to float (``floorf``), clamp the weight."""
    idx = min(int(math.floor(np.float32(real))), n - 1)
    lam = min(max(real - T(idx), T(0)), T(1))
    return idx, lam


def nearest_source(o: int, n_in: int, n_out: int, scale: float | None = None, special: bool = True) -> int:
    """Input row of output row ``o`` for ``mode='nearest'``: ``floorf(o * scale)``.

    ``special``: PyTorch's ``nearest_idx`` shortcuts ``out == in`` (identity) and ``out == 2*in``
    (``o >> 1``), which differ from the formula when the user's ``scale_factor`` disagrees with
    ``out / in`` (e.g. 3 rows at 2.2). The CPU kernels of torch 2.13 take them in the 2-D forward
    and in every backward, not in the 1-D/3-D forward (contiguous inputs) -- see
    :func:`nearest_uses_shortcuts`.
    """
    if special and n_out == n_in:
        return o
    if special and n_out == 2 * n_in:
        return o >> 1
    s = _scale_value(scale, n_in, n_out, np.float32)
    return min(int(math.floor(np.float32(o) * s)), n_in - 1)


def nearest_is_local(n_in: int, scale: float, world: int) -> bool:
    """Whether ``mode='nearest'`` at ``scale`` along a dim of ``n_in`` rows chunked over ``world``
    ranks maps every rank's ``torch.chunk`` output rows onto exactly its own input rows, so each
    rank may upsample its rows alone: an integer power-of-two scale (``1 / scale`` exact in float32,
    so the kernel's ``floorf(o / scale)`` is ``o >> log2(scale)`` on any offset) and output chunks
    that are the input chunks times the scale (not e.g. 7 rows over 3 ranks at 2x), none of them empty."""
    if scale != int(scale) or int(scale) < 1 or int(scale) & (int(scale) - 1):
        return False
    s, offs = int(scale), chunk_offsets(n_in, world)
    if any(a == b for a, b in zip(offs, offs[1:])):
        return False  # an empty shard: PyTorch's kernel rejects empty inputs
    return chunk_offsets(n_in * s, world) == [o * s for o in offs]


def nearest_uses_shortcuts(nd: int, backward: bool) -> bool:
    """Whether PyTorch's CPU nearest kernel for an ``nd``-D input takes the ``nearest_idx``
    shortcuts (measured on torch 2.13, contiguous inputs)."""
    return backward or nd == 2


def nearest_exact_source(o: int, n_in: int, n_out: int, scale: float | None = None) -> int:
    """Input row of output row ``o`` for ``mode='nearest-exact'``: ``floorf((o + 0.5) * scale)``."""
    s = _scale_value(scale, n_in, n_out, np.float32)
    return min(int(math.floor(np.float32((o + 0.5) * float(s)))), n_in - 1)


def linear_taps(o: int, n_in: int, n_out: int, align_corners: bool, scale: float | None, single: bool) -> list[Tap]:
    """Two taps of (bi/tri)linear interpolation (``compute_source_index_and_lambda``)."""
    if n_out == n_in:
        return [(o, 1.0)]
    T = _t(single)
    s = _area_scale(n_in, n_out, align_corners, scale, T)
    real = _area_source(s, o, align_corners, False, T)
    i0, lam1 = _guard(real, n_in, T)
    i1 = i0 + (1 if i0 < n_in - 1 else 0)
    return [(i0, float(T(1) - lam1)), (i1, float(lam1))]


def _cubic_coefficients(t, T: type) -> list[float]:
    """``get_cubic_upsample_coefficients`` (A = -0.75), with the multiply-adds the compiled CPU
    kernel fuses (measured bit-exact on x86-64; other builds may differ by an ulp)."""
    A = T(CUBIC_A)

    def fma(a, b, c):
        return T(_fma(float(a), float(b), float(c)))

    def conv1(x):  # ((A + 2) * x - (A + 3)) * x * x + 1
        return T(fma(A + T(2), x, -(A + T(3))) * x) * x + T(1)

    def conv2(x):  # ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
        return T(fma(fma(A, x, -(T(5) * A)), x, T(8) * A) * x) - T(4) * A

    x2 = T(1) - t
    return [float(conv2(t + T(1))), float(conv1(t)), float(conv1(x2)), float(conv2(x2 + T(1)))]


def cubic_taps(o: int, n_in: int, n_out: int, align_corners: bool, scale: float | None, single: bool) -> list[Tap]:
    """Four taps of bicubic interpolation (A = -0.75), indices clamped to the axis."""
    T = _t(single)
    s = _area_scale(n_in, n_out, align_corners, scale, T)
    real = _area_source(s, o, align_corners, True, T)
    idx, t = _guard(real, n_in, T)
    coeffs = _cubic_coefficients(t, T)
    return [(min(max(idx - 1 + j, 0), n_in - 1), coeffs[j]) for j in range(4)]


def adaptive_range(o: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Input rows ``[floor(o*n/out), ceil((o+1)*n/out))`` of adaptive pooling output row ``o``."""
    return (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)


def area_taps(o: int, n_in: int, n_out: int) -> list[Tap]:
    """``mode='area'`` == adaptive average pooling."""
    a, b = adaptive_range(o, n_in, n_out)
    return [(r, 1.0 / (b - a)) for r in range(a, b)]


def interp_taps(
    mode: str,
    o: int,
    n_in: int,
    n_out: int,
    align_corners: bool | None,
    scale: float | None,
    single: bool,
    special: bool = True,
) -> list[Tap]:
    """Taps of output row ``o`` along one axis for any ``F.interpolate`` mode (``special``: see
    :func:`nearest_source`)."""
    if mode == "nearest":
        return [(nearest_source(o, n_in, n_out, scale, special), 1.0)]
    if mode == "nearest-exact":
        return [(nearest_exact_source(o, n_in, n_out, scale), 1.0)]
    if mode in ("linear", "bilinear", "trilinear"):
        return linear_taps(o, n_in, n_out, bool(align_corners), scale, single)
    if mode == "bicubic":
        return cubic_taps(o, n_in, n_out, bool(align_corners), scale, single)
    if mode == "area":
        return area_taps(o, n_in, n_out)
    raise ValueError(f"unknown interpolation mode {mode!r}; expected one of {INTERP_MODES}")


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


def pool_out_len(n: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """``pooling_output_shape``: with ``ceil_mode`` the last window must start inside the input or
    the left padding."""
    out = (n + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= n + pad:
        out -= 1
    return out


def pool_window(o: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> list[int]:
    """Virtual rows (``< 0`` or ``>= n`` are padding) of window ``o``."""
    start = o * stride - pad
    return [start + j * dilation for j in range(kernel)]


def pool_first_real(o: int, n: int, kernel: int, stride: int, pad: int, dilation: int) -> int | None:
    """First real row of max-pool window ``o``: where PyTorch's index starts (``None``: no real row)."""
    for r in pool_window(o, kernel, stride, pad, dilation):
        if 0 <= r < n:
            return r
    return None


def avg_pool_taps(
    o: int, n: int, kernel: int, stride: int, pad: int, count_include_pad: bool, divisor: int | None
) -> tuple[list[Tap], int]:
    """Rows of avg-pool window ``o`` with weight 1 and the divisor along this axis.

    Window ``[o*s - p, min(o*s - p + k, n + p))`` (so ceil-mode overhang beyond the right padding
    does not count), real rows clipped to ``[0, n)``; the divisor is ``divisor`` (override), the
    padded window size (``count_include_pad``) or the real row count.
    """
    start = o * stride - pad
    end = min(start + kernel, n + pad)
    size = end - start
    a, b = max(start, 0), min(end, n)
    rows = [(r, 1.0) for r in range(a, b)]
    if divisor is not None:
        return rows, divisor
    return rows, size if count_include_pad else max(b - a, 0)


# ---------------------------------------------------------------------------------------------
# Pixel (un)shuffle and rank-level helpers
# ---------------------------------------------------------------------------------------------


def pixel_shuffle_rows(out_start: int, out_stop: int, factor: int) -> tuple[int, int]:
    """Input rows ``[a, b)`` of ``pixel_shuffle`` output rows ``[out_start, out_stop)``."""
    if out_stop <= out_start:
        return 0, 0
    return out_start // factor, (out_stop - 1) // factor + 1


def pixel_unshuffle_rows(out_start: int, out_stop: int, factor: int) -> tuple[int, int]:
    """Input rows ``[a, b)`` of ``pixel_unshuffle`` output rows ``[out_start, out_stop)``."""
    if out_stop <= out_start:
        return 0, 0
    return out_start * factor, out_stop * factor


def taps_rows(taps: list[list[Tap]]) -> tuple[int, ...]:
    """Sorted unique input rows read with a nonzero weight by a block of output rows."""
    return tuple(sorted({r for row in taps for r, w in row if w != 0.0}))
