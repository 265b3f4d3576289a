"""A compact CREDIT-style U-Net for the training demo, built only from torch modules the
converter handles.

Every 3x3 convolution pads longitude (W) circularly with ``nn.CircularPad2d`` and latitude (H)
with zeros inside the conv: the globe wraps in longitude but not across the poles. Down-sampling
is a strided conv, up-sampling a ``ConvTranspose2d``, normalization ``GroupNorm``; the net
predicts the tendency (``y = x + net(x)``), as CREDIT's models do. Each child of the root is one
block: the unit for FSDP2 sharding and activation checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DemoNet", "ConvBlock"]


class ConvBlock(nn.Module):
    """CircularPad(W) -> Conv3x3 (zeros on H, optional stride) -> GroupNorm -> SiLU."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, groups: int = 4) -> None:
        super().__init__()
        self.pad = nn.CircularPad2d((1, 1, 0, 0))
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=(1, 0))
        self.norm = nn.GroupNorm(groups, cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(self.pad(x))))


class _Up(nn.Module):
    """ConvTranspose2d(k=2, s=2) -> GroupNorm -> SiLU, then a 3x3 block on [up, skip]."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.norm = nn.GroupNorm(groups, cout)
        self.act = nn.SiLU()
        self.fuse = ConvBlock(2 * cout, cout, groups=groups)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.act(self.norm(self.up(x))), skip], dim=1))


class DemoNet(nn.Module):
    """Two-level U-Net: ``(B, C, H, W) -> (B, C, H, W)``; H and W must be even."""

    def __init__(self, channels: int = 4, width: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.stem = ConvBlock(channels, width, groups=groups)
        self.down = ConvBlock(width, 2 * width, stride=2, groups=groups)
        self.mid = ConvBlock(2 * width, 2 * width, groups=groups)
        self.up = _Up(2 * width, width, groups)
        self.head = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        h = self.mid(self.down(s))
        return x + self.head(self.up(h, s))
