"""Names of CREDIT's original ``credit.domain_parallel`` module, with the same meaning.

``_needs_halo_conv*`` answer "can this layer's output rows read input rows held by another
shard?" for the sharded (H) dim. A layer that needs no halo (1x1, or kernel <= stride with no
padding) still runs through the exact rule; with stride-aligned shards it sends nothing.
"""

from __future__ import annotations

from torch import nn

from .nn.conv import module_needs_halo

__all__ = ["_needs_halo_conv2d", "_needs_halo_conv3d", "_needs_halo_conv_transpose2d", "_needs_halo_conv_transpose3d"]


def _needs_halo_conv2d(module: nn.Conv2d) -> bool:
    return module_needs_halo(module)


def _needs_halo_conv3d(module: nn.Conv3d) -> bool:
    return module_needs_halo(module)


def _needs_halo_conv_transpose2d(module: nn.ConvTranspose2d) -> bool:
    return module_needs_halo(module)


def _needs_halo_conv_transpose3d(module: nn.ConvTranspose3d) -> bool:
    return module_needs_halo(module)
