"""Pure arithmetic of ``F.pad`` along one axis: output length and the source row of every output
row, for every padding mode, including negative pads (cropping).

Why a separate map per mode: ``reflect`` and ``replicate`` read the *original* axis (a negative pad
on the other side only crops), while ``circular`` wraps inside the *cropped* axis -- that is what
PyTorch's ``F.pad`` does (``F.pad(arange(5), (2, -1), "circular")`` is ``[2, 3, 0, 1, 2, 3]``).
A sharded pad is then just "gather these global rows" (:mod:`credit_dtensor.halo`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "PAD_MODES",
    "normalize_pad_mode",
    "split_pad",
    "pad_out_len",
    "pad_source",
    "pad_sources",
    "check_pad",
]

PAD_MODES = ("constant", "reflect", "replicate", "circular")


def normalize_pad_mode(mode: str) -> str:
    """``F.pad`` modes; ``zeros`` (conv's name for it) is accepted as ``constant``."""
    if mode == "zeros":
        return "constant"
    if mode not in PAD_MODES:
        raise ValueError(f"unknown padding mode {mode!r}; expected one of {PAD_MODES}")
    return mode


def split_pad(pad: Sequence[int], ndim: int) -> dict[int, tuple[int, int]]:
    """``F.pad``'s flat ``pad`` (last dim first) as ``{dim: (lo, hi)}`` for an ``ndim``-D tensor.

    >>> split_pad((1, 2, 3, 4), 4)
    {3: (1, 2), 2: (3, 4)}
    """
    pad = [int(p) for p in pad]
    if len(pad) % 2:
        raise ValueError(f"padding length must be even, got {len(pad)}")
    if len(pad) // 2 > ndim:
        raise ValueError(f"padding {tuple(pad)} pads {len(pad) // 2} dims of a {ndim}-D tensor")
    return {ndim - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}


def pad_out_len(n: int, lo: int, hi: int) -> int:
    return n + lo + hi


def _circular_window(n: int, lo: int, hi: int) -> tuple[int, int]:
    """The cropped axis ``[a, b)`` that circular padding wraps around."""
    return max(-lo, 0), n - max(-hi, 0)


def check_pad(n: int, lo: int, hi: int, mode: str) -> None:
    """Raise ``ValueError`` for pads PyTorch rejects (or would compute garbage for)."""
    mode = normalize_pad_mode(mode)
    if pad_out_len(n, lo, hi) < 0 or n + min(lo, 0) + min(hi, 0) < 0:
        raise ValueError(f"padding ({lo}, {hi}) crops more than the {n} rows of the axis")
    if mode == "reflect" and (lo >= n or hi >= n):
        raise ValueError(f"reflect padding ({lo}, {hi}) must be smaller than the axis length {n}")
    if mode == "replicate" and n == 0 and (lo > 0 or hi > 0):
        raise ValueError("replicate padding of an empty axis")
    if mode == "circular":
        a, b = _circular_window(n, lo, hi)
        if max(lo, 0) > b - a or max(hi, 0) > b - a:
            raise ValueError(
                f"circular padding ({lo}, {hi}) wraps around more than once (cropped axis has {max(b - a, 0)} rows)"
            )


def pad_source(o: int, n: int, lo: int, hi: int, mode: str) -> int | None:
    """Input row read by output row ``o`` of ``F.pad`` along one axis (``None``: the constant)."""
    v = o - lo
    if 0 <= v < n:  # output rows never reach the cropped part of the axis
        return v
    if mode in ("constant", "zeros"):
        return None
    if mode == "replicate":
        return min(max(v, 0), n - 1)
    if mode == "reflect":
        period = 2 * (n - 1)
        r = v % period
        return r if r < n else period - r
    if mode == "circular":
        a, b = _circular_window(n, lo, hi)
        return a + (v - a) % (b - a)
    raise ValueError(f"unknown padding mode {mode!r}; expected one of {PAD_MODES}")


def pad_sources(out_start: int, out_stop: int, n: int, lo: int, hi: int, mode: str) -> tuple[int | None, ...]:
    """:func:`pad_source` for the output rows ``[out_start, out_stop)``."""
    mode = normalize_pad_mode(mode)
    return tuple(pad_source(o, n, lo, hi, mode) for o in range(out_start, out_stop))
