"""Domain-parallel resampling modules: ``Upsample`` (and ``UpsamplingNearest2d`` /
``UpsamplingBilinear2d``), ``MaxPool*``, ``AvgPool*``, ``AdaptiveAvgPool*``, ``AdaptiveMaxPool*``,
``PixelShuffle`` and ``PixelUnshuffle``.

``DomainParallelMaxPool(pool, manager)`` turns ``pool`` itself into a module that accepts a plain
tensor (sharded here on H: dim -2, or the only spatial dim of a 3-D input) or a sharded DTensor
and returns a DTensor sharded on the same dim, re-chunked by ``torch.chunk`` of the output
length (see :mod:`credit_dtensor.ops.resample`). ``return_indices=True`` returns global indices.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from ..ops import resample as R
from ._base import DomainParallelModule, h_entry, wrapper_for, wrapper_names
from .pad import default_shard_dim


def _pool_nd(module: nn.Module) -> int:
    for nd in (1, 2, 3):
        for prefix in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool"):
            if isinstance(module, getattr(nn, f"{prefix}{nd}d")):
                return nd
    raise TypeError(f"{type(module).__name__} is not a 1-D/2-D/3-D pooling module")


class _Wrapper(DomainParallelModule):
    def _input(self, input: torch.Tensor):
        return self._dp_input(input, default_shard_dim(input))


class DomainParallelUpsample(_Wrapper, nn.Upsample):
    """``nn.Upsample`` and its subclasses (``UpsamplingNearest2d``, ``UpsamplingBilinear2d``)."""

    wraps = nn.Upsample

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return R.interpolate(
            self._input(input),
            self.size,
            self.scale_factor,
            self.mode,
            self.align_corners,
            recompute_scale_factor=self.recompute_scale_factor,
        )


class DomainParallelMaxPool(_Wrapper, _MaxPoolNd):
    """``MaxPool1d/2d/3d`` (indices, when returned, are global as on one device)."""

    wraps = _MaxPoolNd

    def forward(self, input: torch.Tensor):
        fn = getattr(R, f"max_pool{_pool_nd(self)}d")
        return fn(
            self._input(input),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )


class DomainParallelAvgPool(_Wrapper, _AvgPoolNd):
    """``AvgPool1d/2d/3d`` (count_include_pad, divisor_override, ceil_mode)."""

    wraps = _AvgPoolNd

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        nd = _pool_nd(self)
        args = [self._input(input), self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad]
        if nd > 1:
            args.append(self.divisor_override)
        return getattr(R, f"avg_pool{nd}d")(*args)


class DomainParallelAdaptiveAvgPool(_Wrapper, _AdaptiveAvgPoolNd):
    wraps = _AdaptiveAvgPoolNd

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return getattr(R, f"adaptive_avg_pool{_pool_nd(self)}d")(self._input(input), self.output_size)


class DomainParallelAdaptiveMaxPool(_Wrapper, _AdaptiveMaxPoolNd):
    wraps = _AdaptiveMaxPoolNd

    def forward(self, input: torch.Tensor):
        fn = getattr(R, f"adaptive_max_pool{_pool_nd(self)}d")
        return fn(self._input(input), self.output_size, self.return_indices)


class DomainParallelPixelShuffle(_Wrapper, nn.PixelShuffle):
    wraps = nn.PixelShuffle

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return R.pixel_shuffle(self._dp_input(input, -2), self.upscale_factor)


class DomainParallelPixelUnshuffle(_Wrapper, nn.PixelUnshuffle):
    wraps = nn.PixelUnshuffle

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return R.pixel_unshuffle(self._dp_input(input, -2), self.downscale_factor)


#: torch (base) class -> wrapper class (match with ``isinstance``).
RESAMPLE_WRAPPERS: dict[type[nn.Module], type[DomainParallelModule]] = {
    nn.Upsample: DomainParallelUpsample,
    _MaxPoolNd: DomainParallelMaxPool,
    _AvgPoolNd: DomainParallelAvgPool,
    _AdaptiveAvgPoolNd: DomainParallelAdaptiveAvgPool,
    _AdaptiveMaxPoolNd: DomainParallelAdaptiveMaxPool,
    nn.PixelShuffle: DomainParallelPixelShuffle,
    nn.PixelUnshuffle: DomainParallelPixelUnshuffle,
}


def resample_wrapper_for(module: nn.Module) -> type[DomainParallelModule] | None:
    """The wrapper class for a resampling module (None if it is not one, or already wrapped)."""
    return wrapper_for(module, RESAMPLE_WRAPPERS)


def needs_domain_parallel(module: nn.Module) -> bool:
    """True for every resampling module: each mixes rows along the sharded spatial dim (and must
    re-chunk its output), which PyTorch's DTensor rules do by all-gathering or not at all."""
    return resample_wrapper_for(module) is not None


def resample_h_scale(module: nn.Module) -> Fraction | None:
    """How much a pooling or resampling module divides H by (< 1: up-sampling)."""
    if isinstance(module, (_MaxPoolNd, _AvgPoolNd)):
        s = module.stride if module.stride is not None else module.kernel_size
        return Fraction(int(h_entry(s)))
    if isinstance(module, nn.Upsample) and module.scale_factor is not None:
        return 1 / Fraction(h_entry(module.scale_factor)).limit_denominator(1000)
    if isinstance(module, nn.PixelShuffle):
        return Fraction(1, module.upscale_factor)
    if isinstance(module, nn.PixelUnshuffle):
        return Fraction(module.downscale_factor)
    return None


R.FAMILY.converts(RESAMPLE_WRAPPERS, needs=needs_domain_parallel, h_scale=resample_h_scale)

__all__ = [*wrapper_names(RESAMPLE_WRAPPERS), "RESAMPLE_WRAPPERS", "resample_wrapper_for", "needs_domain_parallel"]
