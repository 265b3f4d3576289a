"""A UNet with a ResNet-18-style encoder and BatchNorm: the shape of CREDIT's ``SegmentationModel``
(``segmentation_models_pytorch`` Unet, resnet18 encoder), written here for benchmarks and tests.

Encoder: a 3x3 stem and four stages of two basic residual blocks (3x3 conv, BatchNorm, ReLU; a
strided 1x1 conv + BatchNorm shortcut where the shape changes), each later stage halving H and W
and doubling the width. Decoder: per stage, nearest 2x upsampling, concatenation with the skip,
two 3x3 conv + BatchNorm + ReLU. A 1x1 head. Every op that mixes across H is a 3x3 convolution
(a 1-row halo) or BatchNorm (statistics over the whole field), as in the real model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResUNet", "resunet"]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with BatchNorm and a residual (projected when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResUNet(nn.Module):
    """``(B, in_channels, H, W) -> (B, out_channels, H, W)``; H and W divisible by 8."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = _conv_bn_relu(in_channels, widths[0])
        self.stages = nn.ModuleList()
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            self.stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.decoders = nn.ModuleList()
        for skip in reversed(widths[:-1]):
            self.decoders.append(nn.Sequential(_conv_bn_relu(cin + skip, skip), _conv_bn_relu(skip, skip)))
            cin = skip
        self.head = nn.Conv2d(cin, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        for dec, skip in zip(self.decoders, reversed(skips[:-1])):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = dec(torch.cat([x, skip], 1))
        return self.head(x)


def resunet(in_channels: int = 3, out_channels: int = 3, width: int = 16) -> ResUNet:
    return ResUNet(in_channels, out_channels, width)
