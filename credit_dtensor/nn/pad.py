"""Domain-parallel padding modules: ``ZeroPad*``, ``ConstantPad*``, ``ReflectionPad*``,
``ReplicationPad*`` and ``CircularPad*`` (1-D/2-D/3-D).

``DomainParallelReflectionPad(module, manager)`` turns the module itself into one that accepts a
plain tensor (sharded here on H: dim -2, or the only spatial dim of a 3-D input) or a sharded
DTensor and returns the padded tensor as a ``Shard`` DTensor re-chunked by ``torch.chunk`` of the
padded length (see :func:`credit_dtensor.ops.pad.pad`). A following ``Conv2d(padding=0)`` then
consumes it directly, which is how ``nn.Sequential(nn.ZeroPad2d(p), nn.Conv2d(..., padding=0))``
stays exact.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.padding import _CircularPadNd, _ConstantPadNd, _ReflectionPadNd, _ReplicationPadNd

from ..ops.pad import FAMILY, pad
from ._base import DomainParallelModule, wrapper_class, wrapper_for, wrapper_names


def default_shard_dim(x: torch.Tensor) -> int:
    """Where a plain input is sharded: H (dim -2) for 4-D/5-D inputs, the last dim for 1-D/3-D."""
    return -2 if x.ndim >= 4 else -1


class _DomainParallelPadNd(DomainParallelModule):
    """Padding (``_mode``) of a plain input sharded on H, or of a sharded DTensor, re-chunked."""

    _mode = "constant"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self._dp_input(input, default_shard_dim(input))
        value = getattr(self, "value", None) if self._mode == "constant" else None
        return pad(x, list(self.padding), self._mode, value)


#: torch base class -> wrapper class (match with ``isinstance``): one wrapper per padding mode.
PAD_WRAPPERS: dict[type[nn.Module], type[DomainParallelModule]] = {
    base: wrapper_class(_DomainParallelPadNd, base, __name__, name=f"DomainParallel{base.__name__[1:-2]}", _mode=mode)
    for base, mode in (
        (_ConstantPadNd, "constant"),  # ZeroPad1d/2d/3d and ConstantPad1d/2d/3d (any value)
        (_ReflectionPadNd, "reflect"),
        (_ReplicationPadNd, "replicate"),
        (_CircularPadNd, "circular"),
    )
}
DomainParallelConstantPad, DomainParallelReflectionPad, DomainParallelReplicationPad, DomainParallelCircularPad = (
    PAD_WRAPPERS.values()
)


def pad_wrapper_for(module: nn.Module) -> type[DomainParallelModule] | None:
    """The wrapper class for a padding module (None if it is not one)."""
    return wrapper_for(module, PAD_WRAPPERS)


def needs_domain_parallel(module: nn.Module) -> bool:
    """True for every padding module: on a sharded input it must re-chunk the output (and fetch
    remote rows when it pads the sharded dim), which PyTorch's DTensor rules do not do exactly."""
    return pad_wrapper_for(module) is not None


FAMILY.converts(PAD_WRAPPERS, needs=needs_domain_parallel)

__all__ = [
    *wrapper_names(PAD_WRAPPERS),
    "PAD_WRAPPERS",
    "needs_domain_parallel",
    "pad_wrapper_for",
    "default_shard_dim",
]
