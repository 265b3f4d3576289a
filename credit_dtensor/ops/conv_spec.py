"""What a (transposed) convolution is, apart from its tensors, and its geometry along the
sharded dim: output length, the input rows each rank's output chunk reads (output-driven, gaps
between dilated taps excluded) and the resulting halo plan. Pure and cached; no communication.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import DomainParallelError
from ..geometry import (
    chunk_range,
    conv_input_rows,
    conv_out_len,
    conv_transpose_input_rows,
    conv_transpose_out_len,
    same_padding,
    source_row,
    tuple_n,
    window_crosses_shards,
)
from ..halo import HaloPlan, cached_plan

__all__ = [
    "ConvSpec",
    "MODES",
    "conv_spec_from_module",
    "out_len",
    "input_range",
    "needs",
    "plan",
    "halo_rows",
    "needs_halo",
    "conv_out_shape",
    "validate",
]

MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvSpec:
    """Everything about a (transposed) convolution except its tensors, per spatial dim."""

    nd: int
    transposed: bool
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad_lo: tuple[int, ...]
    pad_hi: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int
    mode: str = "zeros"

    @staticmethod
    def make(
        nd: int,
        kernel,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        *,
        transposed: bool = False,
        output_padding=0,
        padding_mode: str = "zeros",
    ) -> ConvSpec:
        kernel = tuple_n(kernel, nd, "kernel_size")
        stride = tuple_n(stride, nd, "stride")
        dilation = tuple_n(dilation, nd, "dilation")
        if isinstance(padding, str):
            if padding == "valid":
                lo = hi = (0,) * nd
            elif padding == "same":
                pairs = [same_padding(k, d) for k, d in zip(kernel, dilation)]
                lo, hi = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
            else:
                raise DomainParallelError(f"padding={padding!r}: expected 'same', 'valid' or integers")
        else:
            lo = hi = tuple_n(padding, nd, "padding")
        if padding_mode not in MODES:
            raise DomainParallelError(f"padding_mode={padding_mode!r} is not one of {MODES}")
        if transposed and padding_mode != "zeros":
            raise DomainParallelError("transposed convolutions only support padding_mode='zeros' (as in PyTorch)")
        return ConvSpec(
            nd,
            transposed,
            kernel,
            stride,
            lo,
            hi,
            dilation,
            tuple_n(output_padding, nd, "output_padding"),
            int(groups),
            padding_mode,
        )

    @property
    def name(self) -> str:
        return f"conv{'_transpose' if self.transposed else ''}{self.nd}d"


def conv_spec_from_module(m: torch.nn.Module, output_padding=None) -> ConvSpec:
    """The :class:`ConvSpec` of an ``nn.ConvNd`` / ``nn.ConvTransposeNd`` module."""
    nd = len(m.kernel_size)
    return ConvSpec.make(
        nd,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        transposed=m.transposed,
        output_padding=m.output_padding if output_padding is None else output_padding,
        padding_mode=m.padding_mode,
    )


# ---------------------------------------------------------------------------------------------
# Geometry along the sharded dim (pure, cached)
# ---------------------------------------------------------------------------------------------


def out_len(spec: ConvSpec, i: int, n: int) -> int:
    k, s, d = spec.kernel[i], spec.stride[i], spec.dilation[i]
    if spec.transposed:
        return conv_transpose_out_len(n, k, s, spec.pad_lo[i], d, spec.output_padding[i])
    return conv_out_len(n, k, s, spec.pad_lo[i], spec.pad_hi[i], d)


def input_range(spec: ConvSpec, i: int, n: int, o0: int, o1: int) -> tuple[int, int]:
    k, s, d = spec.kernel[i], spec.stride[i], spec.dilation[i]
    if spec.transposed:
        return conv_transpose_input_rows(o0, o1, n, k, s, spec.pad_lo[i], d)
    return conv_input_rows(o0, o1, k, s, spec.pad_lo[i], d)


def _read_rows(spec: ConvSpec, i: int, o0: int, o1: int, a: int, b: int) -> set[int]:
    """The (virtual) input rows in ``[a, b)`` that output rows ``[o0, o1)`` actually read: with
    dilation or stride > kernel the range has gaps, which are never fetched (zeros locally)."""
    k, s, d, lo = spec.kernel[i], spec.stride[i], spec.dilation[i], spec.pad_lo[i]
    if not spec.transposed:
        return {o * s - lo + t * d for o in range(o0, o1) for t in range(k)}
    read = set()
    for g in range(a, b):  # input row g feeds outputs g*s - lo + t*d
        if any(o0 <= g * s - lo + t * d < o1 for t in range(k)):
            read.add(g)
    return read


@functools.lru_cache(maxsize=4096)
def needs(spec: ConvSpec, i: int, n: int, world: int) -> tuple[tuple[int | None, ...], ...]:
    n_out = out_len(spec, i, n)
    mode = spec.mode
    rows = []
    for r in range(world):
        o0, o1 = chunk_range(n_out, world, r)
        a, b = input_range(spec, i, n, o0, o1)
        read = _read_rows(spec, i, o0, o1, a, b)
        rows.append(tuple(source_row(g, n, mode) if g in read else None for g in range(a, b)))
    return tuple(rows)


def plan(spec: ConvSpec, i: int, n: int, world: int, rank: int) -> HaloPlan:
    return cached_plan(n, world, rank, needs(spec, i, n, world))


def halo_rows(spec: ConvSpec, i: int, n: int, world: int, rank: int) -> int:
    """Rows ``rank`` receives from other ranks for spatial dim ``i`` of global length ``n``."""
    return plan(spec, i, n, world, rank).recv_rows


def needs_halo(spec: ConvSpec, i: int = 0) -> bool:
    """Whether outputs can read input rows of other shards along spatial dim ``i``.

    False only when every output row reads rows of one stride block and there is no padding
    (1x1 convs, patch embeddings with kernel <= stride); such convs still communicate nothing
    when shards are stride-aligned, and the plan finds the few rows otherwise.
    """
    hi = spec.output_padding[i] if spec.transposed else spec.pad_hi[i]
    return window_crosses_shards(spec.kernel[i], spec.stride[i], spec.dilation[i], spec.pad_lo[i], hi)


def conv_out_shape(spec: ConvSpec, x_shape: tuple[int, ...], out_channels: int) -> tuple[int, ...]:
    """Global output shape for a batched input shape."""
    spatial = x_shape[-spec.nd :]
    return (x_shape[0], out_channels, *(out_len(spec, i, n) for i, n in enumerate(spatial)))


def validate(spec: ConvSpec, x_shape: tuple[int, ...], where: str) -> None:
    spatial = x_shape[-spec.nd :]
    for i, n in enumerate(spatial):
        if out_len(spec, i, n) <= 0:
            raise DomainParallelError(
                f"{where}: spatial dim {i} of size {n} is too small for kernel {spec.kernel[i]} "
                f"(dilation {spec.dilation[i]}, padding {spec.pad_lo[i]}+{spec.pad_hi[i]}): PyTorch rejects this too"
            )
        if spec.mode == "reflect" and max(spec.pad_lo[i], spec.pad_hi[i]) >= n:
            raise DomainParallelError(
                f"{where}: reflect padding {max(spec.pad_lo[i], spec.pad_hi[i])} must be < input size {n} "
                "on spatial dim {i} (as in F.pad)"
            )
        if spec.mode == "circular" and max(spec.pad_lo[i], spec.pad_hi[i]) > n:
            raise DomainParallelError(
                f"{where}: circular padding {max(spec.pad_lo[i], spec.pad_hi[i])} must be <= input size {n} on spatial dim {i}"
            )
        if spec.transposed and spec.output_padding[i] >= max(spec.stride[i], spec.dilation[i]):
            raise DomainParallelError(
                f"{where}: output_padding {spec.output_padding[i]} must be smaller than stride or dilation "
                f"({spec.stride[i]}, {spec.dilation[i]}) on spatial dim {i}"
            )
