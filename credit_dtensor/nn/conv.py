"""Domain-parallel (transposed) convolution modules.

``DomainParallelConv2d(conv, manager)`` turns ``conv`` itself into a module that accepts a plain
tensor (sharded on H here) or an H-sharded DTensor and returns an H-sharded DTensor, exact for
every configuration ``nn.Conv2d`` accepts. Weight/bias keep their names; hooks and
parametrizations (weight norm, spectral norm) still run because only ``_conv_forward`` /
``forward`` is replaced.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from ..ops.conv import FAMILY, ConvSpec, conv, conv_spec_from_module, module_spec, needs_halo
from ._base import DomainParallelModule, h_entry, wrapper_class, wrapper_names


def _params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Evaluate (possibly parametrized) weight and bias. Parametrizations may mix the Replicate
    parameters with plain buffers (spectral norm's power-iteration vectors): the rules mode takes
    those as replicated, which they are, since every rank runs the same update. Outside a
    compiled region the DTensor implicit-replication context covers direct aten calls too."""
    if torch.compiler.is_compiling():
        return module.weight, module.bias
    with implicit_replication():
        return module.weight, module.bias


class _DomainParallelConvNd(DomainParallelModule):
    _shard_dim: int = -2  # of the batched input; conv1d shards its only spatial dim
    replicate_buffers = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = _params(self)
        return self._conv_forward(input, weight, bias)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = self._dp_input(input, self._shard_dim)
        if not isinstance(x, DTensor):
            return super()._conv_forward(x, weight, bias)  # type: ignore[misc]
        return conv(x, weight, bias, module_spec(self))


class _DomainParallelConvTransposeNd(DomainParallelModule):
    _shard_dim: int = -2
    replicate_buffers = True

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        x = self._dp_input(input, self._shard_dim)
        nd = len(self.kernel_size)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, nd, self.dilation
        )
        weight, bias = _params(self)
        return conv(x, weight, bias, module_spec(self, output_padding=output_padding))


def _conv_wrapper(mixin: type, torch_cls: type) -> type:
    attrs = {"_shard_dim": -1} if torch_cls.__name__.endswith("1d") else {}  # 1-D: the only spatial dim
    return wrapper_class(mixin, torch_cls, __name__, **attrs)


DomainParallelConv1d, DomainParallelConv2d, DomainParallelConv3d = (
    _conv_wrapper(_DomainParallelConvNd, t) for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
)
DomainParallelConvTranspose1d, DomainParallelConvTranspose2d, DomainParallelConvTranspose3d = (
    _conv_wrapper(_DomainParallelConvTransposeNd, t)
    for t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
)


#: torch class -> wrapper class (subclasses first, so ConvTranspose is not matched as Conv).
CONV_WRAPPERS: dict[type[nn.Module], type[DomainParallelModule]] = {
    nn.ConvTranspose1d: DomainParallelConvTranspose1d,
    nn.ConvTranspose2d: DomainParallelConvTranspose2d,
    nn.ConvTranspose3d: DomainParallelConvTranspose3d,
    nn.Conv1d: DomainParallelConv1d,
    nn.Conv2d: DomainParallelConv2d,
    nn.Conv3d: DomainParallelConv3d,
}


def module_needs_halo(module: nn.Module, spatial_index: int | None = None) -> bool:
    """Whether a conv module's outputs read rows of neighbouring shards along the sharded dim
    (the second-to-last spatial dim for 2-D/3-D convs, the only one for 1-D)."""
    spec: ConvSpec = conv_spec_from_module(module)
    i = spatial_index if spatial_index is not None else max(spec.nd - 2, 0)
    return needs_halo(spec, i)


def conv_h_scale(module: nn.Module) -> Fraction | None:
    """How much a conv divides H by: its stride, or 1/stride for a transposed conv."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return Fraction(1, int(h_entry(module.stride)))
    if isinstance(module, nn.modules.conv._ConvNd):
        return Fraction(int(h_entry(module.stride)))
    return None


FAMILY.converts(CONV_WRAPPERS, needs=module_needs_halo, h_scale=conv_h_scale)

__all__ = [*wrapper_names(CONV_WRAPPERS), "CONV_WRAPPERS", "module_needs_halo"]
