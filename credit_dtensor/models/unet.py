"""A weather U-Net of the kind used for global forecasting, written as plain PyTorch.

Conventions of the field that matter for domain parallelism (H = latitude is the sharded axis):

* longitude (W) is periodic: every 3x3 convolution is preceded by ``nn.CircularPad2d`` on W;
* latitude (H) is not: the conv pads H with zeros (``padding=(p, 0)``) or, with
  ``h_pad="reflect"``, an ``nn.ReflectionPad2d`` on H feeds an unpadded conv;
* down-sampling by strided 3x3 convs, up-sampling by ``ConvTranspose2d(k=3, s=2, p=1)`` with
  ``output_size`` (odd sizes round-trip) on one level and ``F.interpolate(size=...)`` + 1x1 conv
  on the other; GroupNorm + SiLU everywhere; the output is the input plus a predicted tendency.

``functional_pad=True`` pads longitude with ``F.pad(mode="circular")`` instead of the module: the
same numbers, but PyTorch's DTensor all-gathers the activation for it (the audit flags it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PeriodicConv2d", "ConvBlock", "WeatherUNet"]


class PeriodicConv2d(nn.Module):
    """k x k conv, periodic in longitude (W), zero- or reflect-padded in latitude (H)."""

    def __init__(
        self, cin: int, cout: int, k: int = 3, *, stride: int = 1, h_pad: str = "zeros", functional_pad: bool = False
    ) -> None:
        super().__init__()
        p = k // 2
        self.p = p
        self.functional_pad = functional_pad
        self.wrap = nn.CircularPad2d((p, p, 0, 0))
        if h_pad == "reflect":
            self.hpad: nn.Module = nn.ReflectionPad2d((0, 0, p, p))
            self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=0)
        elif h_pad == "zeros":
            self.hpad = nn.Identity()
            self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=(p, 0))
        else:
            raise ValueError(f"h_pad={h_pad!r}: expected 'zeros' or 'reflect'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.p, self.p, 0, 0), mode="circular") if self.functional_pad else self.wrap(x)
        return self.conv(self.hpad(x))


class ConvBlock(nn.Module):
    """PeriodicConv -> GroupNorm -> SiLU, twice (the first conv may be strided)."""

    def __init__(self, cin: int, cout: int, *, groups: int, stride: int = 1, **conv_kw) -> None:
        super().__init__()
        self.conv1 = PeriodicConv2d(cin, cout, stride=stride, **conv_kw)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = PeriodicConv2d(cout, cout, **conv_kw)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


class WeatherUNet(nn.Module):
    """Three-resolution U-Net ``(B, C, H, W) -> (B, C, H, W)``; any H, W >= 4 (odd sizes too)."""

    def __init__(
        self, channels: int = 3, width: int = 8, groups: int = 2, *, h_pad: str = "zeros", functional_pad: bool = False
    ) -> None:
        super().__init__()
        kw = {"h_pad": h_pad, "functional_pad": functional_pad}
        w1, w2, w3 = width, 2 * width, 4 * width
        self.inc = ConvBlock(channels, w1, groups=groups, **kw)
        self.down1 = ConvBlock(w1, w2, groups=groups, stride=2, **kw)
        self.down2 = ConvBlock(w2, w3, groups=groups, stride=2, **kw)
        self.up1 = nn.ConvTranspose2d(w3, w2, 3, stride=2, padding=1)
        self.dec1 = ConvBlock(2 * w2, w2, groups=groups, **kw)
        self.up2 = nn.Conv2d(w2, w1, 1)
        self.dec2 = ConvBlock(2 * w1, w1, groups=groups, **kw)
        self.head = nn.Conv2d(w1, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.inc(x)
        s2 = self.down1(s1)
        y = self.down2(s2)
        y = self.up1(y, output_size=s2.shape[-2:])
        y = self.dec1(torch.cat([y, s2], dim=1))
        y = F.interpolate(y, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        y = self.dec2(torch.cat([self.up2(y), s1], dim=1))
        return x + self.head(y)
