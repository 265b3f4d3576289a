"""Names of CREDIT's original ``credit.domain_parallel`` module, with the same meaning.

As in the original: a conv needs a halo when its kernel is larger than 1 along H; a transposed
conv when its kernel is larger than its stride along H (H is kernel index 0 for 2-D, 1 for 3-D).
These are the original's coarse answers, kept bit-for-bit so callers see no change; our rules do
not depend on them: every conv runs through the exact output-driven rule, which sends exactly
the rows needed (nothing for a 1x1 conv or a stride-aligned patch embedding).
:func:`credit_dtensor.nn.conv.module_needs_halo` is the finer, padding- and dilation-aware test.
"""

from __future__ import annotations

from torch import nn

__all__ = ["_needs_halo_conv2d", "_needs_halo_conv3d", "_needs_halo_conv_transpose2d", "_needs_halo_conv_transpose3d"]


def _h(value: int | tuple[int, ...], index: int) -> int:
    return value if isinstance(value, int) else value[index]


def _needs_halo_conv2d(module: nn.Conv2d) -> bool:
    """Kernel > 1 along H."""
    return _h(module.kernel_size, 0) > 1


def _needs_halo_conv3d(module: nn.Conv3d) -> bool:
    """Kernel > 1 along H (index 1 of (T, H, W))."""
    return _h(module.kernel_size, 1) > 1


def _needs_halo_conv_transpose2d(module: nn.ConvTranspose2d) -> bool:
    """Kernel > stride along H (overlapping output windows)."""
    return _h(module.kernel_size, 0) > _h(module.stride, 0)


def _needs_halo_conv_transpose3d(module: nn.ConvTranspose3d) -> bool:
    """Kernel > stride along H (index 1 of (T, H, W))."""
    return _h(module.kernel_size, 1) > _h(module.stride, 1)
