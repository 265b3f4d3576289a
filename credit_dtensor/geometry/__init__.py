"""Pure index arithmetic for H-sharded tensors. No torch.distributed, no tensors.

Everything here answers "which global rows?" questions so that it can be unit-tested without
processes and so that every rank computes the same communication plan without talking.

Conventions: a *row* is an index along the sharded dim. Shards follow ``torch.chunk`` (the rule
DTensor's ``Shard`` uses): chunk size ``ceil(n / world)``, trailing ranks may be short or empty.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "chunk_sizes",
    "chunk_offsets",
    "chunk_range",
    "owner_of",
    "PAD_MODES",
    "source_row",
    "conv_out_len",
    "conv_input_rows",
    "conv_transpose_out_len",
    "conv_transpose_input_rows",
    "same_padding",
    "window_crosses_shards",
]

PAD_MODES = ("zeros", "constant", "reflect", "replicate", "circular")


def chunk_sizes(n: int, world: int) -> list[int]:
    """Sizes of ``torch.chunk(range(n), world)`` padded with zeros to ``world`` entries.

    >>> chunk_sizes(10, 4), chunk_sizes(9, 4), chunk_sizes(5, 4)
    ([3, 3, 3, 1], [3, 3, 3, 0], [2, 2, 1, 0])
    """
    if world < 1 or n < 0:
        raise ValueError(f"chunk_sizes(n={n}, world={world})")
    size = -(-n // world) if n else 0
    return [max(0, min(size, n - r * size)) for r in range(world)]


def chunk_offsets(n: int, world: int) -> list[int]:
    """Global index of each rank's first row (``world + 1`` entries, last is ``n``)."""
    offs = [0]
    for s in chunk_sizes(n, world):
        offs.append(offs[-1] + s)
    return offs


def chunk_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Half-open global range ``[start, stop)`` held by ``rank``."""
    offs = chunk_offsets(n, world)
    return offs[rank], offs[rank + 1]


def owner_of(row: int, n: int, world: int) -> int:
    """Rank that holds global ``row`` (``0 <= row < n``)."""
    if not 0 <= row < n:
        raise ValueError(f"row {row} outside [0, {n})")
    size = -(-n // world)
    return row // size


def source_row(row: int, n: int, mode: str) -> int | None:
    """Map a (possibly virtual, out-of-range) row to the real row it reads, ``None`` for a zero.

    Matches ``F.pad`` semantics: reflect mirrors without repeating the edge, replicate clamps,
    circular wraps around the *global* axis (so the last rank feeds the first).
    """
    if 0 <= row < n:
        return row
    if mode in ("zeros", "constant"):
        return None
    if n == 0:
        raise ValueError("cannot pad an empty axis")
    if mode == "replicate":
        return min(max(row, 0), n - 1)
    if mode == "circular":
        return row % n
    if mode == "reflect":
        if n == 1:
            raise ValueError("reflect padding needs at least 2 rows")
        period = 2 * (n - 1)
        r = row % period
        return r if r < n else period - r
    raise ValueError(f"unknown padding mode {mode!r}; expected one of {PAD_MODES}")


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------


def same_padding(kernel: int, dilation: int) -> tuple[int, int]:
    """PyTorch's ``padding='same'`` split along one dim: left = total // 2, right = the rest."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def window_crosses_shards(kernel: int, stride: int, dilation: int, pad_lo: int, pad_hi: int) -> bool:
    """Whether a sliding window along one dim (a convolution's, a pooling's) can read input rows of
    another shard: not when every output row reads rows of one stride block and nothing is padded
    (kernel span <= stride; for a transposed conv ``pad_hi`` is its output padding)."""
    return dilation * (kernel - 1) + 1 > stride or pad_lo != 0 or pad_hi != 0


def conv_out_len(n: int, kernel: int, stride: int, pad_lo: int, pad_hi: int, dilation: int) -> int:
    """Output length of a convolution along one dim (may be <= 0 for invalid configs)."""
    return (n + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def conv_input_rows(
    out_start: int, out_stop: int, kernel: int, stride: int, pad_lo: int, dilation: int
) -> tuple[int, int]:
    """Global input rows ``[a, b)`` (may extend into the padding, i.e. < 0 or >= n) that output
    rows ``[out_start, out_stop)`` read. Empty output -> empty range ``(0, 0)``.
    """
    if out_stop <= out_start:
        return 0, 0
    a = out_start * stride - pad_lo
    b = (out_stop - 1) * stride + dilation * (kernel - 1) + 1 - pad_lo
    return a, b


def conv_transpose_out_len(n: int, kernel: int, stride: int, padding: int, dilation: int, output_padding: int) -> int:
    """Output length of a transposed convolution along one dim."""
    return (n - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def conv_transpose_input_rows(
    out_start: int, out_stop: int, n: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[int, int]:
    """Global input rows ``[a, b)`` (clipped to ``[0, n)``) that contribute to output rows
    ``[out_start, out_stop)`` of a transposed conv. ``a >= b`` means no input row contributes
    (possible when ``kernel * dilation < stride``, or in the ``output_padding`` tail).

    Input row ``i`` writes un-cropped output rows ``u = i*stride + j*dilation`` (``0 <= j < k``);
    output row ``o`` is ``u = o + padding``.
    """
    if out_stop <= out_start or n == 0:
        return 0, 0
    span = dilation * (kernel - 1)
    u0, u1 = out_start + padding, out_stop - 1 + padding
    a = max(0, -((span - u0) // stride))  # ceil((u0 - span) / stride)
    b = min(n - 1, u1 // stride) + 1
    if a >= b:
        return 0, 0
    return a, b


def tuple_n(value: int | Sequence[int], n: int, name: str = "value") -> tuple[int, ...]:
    """Expand an int to an n-tuple (PyTorch's ``_ntuple``) and validate a sequence's length."""
    if isinstance(value, int):
        return (value,) * n
    t = tuple(int(v) for v in value)
    if len(t) == 1:
        return t * n
    if len(t) != n:
        raise ValueError(f"{name} must have {n} entries, got {t}")
    return t
