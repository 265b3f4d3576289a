"""A U-Net with scSE attention gates and a pooled classifier head (as CREDIT's U-Net builds with
segmentation_models_pytorch's ``decoder_attention_type="scse"`` and ``aux_params``), written as
plain PyTorch on ``(B, C, H, W)``, H = latitude sharded (dim 2).

* Every 3x3 conv is preceded by earth padding: ``F.pad(mode="circular")`` on longitude, then
  ``F.pad(mode="reflect")`` on latitude (the conv itself pads nothing);
* encoder: conv blocks (conv, BatchNorm, ReLU) and ``MaxPool2d(2)``; decoder: nearest
  ``F.interpolate(scale_factor=2)``, concatenation with the skip, conv blocks, then an scSE gate:
  channel squeeze-excitation ``x * sigmoid(conv1x1(relu(conv1x1(avgpool(x)))))`` plus spatial
  excitation ``x * sigmoid(conv1x1(x))``;
* segmentation head: 1x1 conv; classification head on the bottleneck: ``AdaptiveAvgPool2d(1)``,
  ``flatten``, ``Linear``. ``forward`` returns ``(field, logits)``.

Domain parallelism: pads, convs, BatchNorm statistics, pooling, interpolation and the gates run
through the exact rules; the pooled vectors (gate and classifier inputs) are small replicated
tensors, the field stays H-sharded. Nothing is shard-local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EarthConv", "SCSEGate", "UNetSCSE"]


class EarthConv(nn.Module):
    """Circular pad on W, reflect pad on H, 3x3 conv (no padding), BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=0, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 0, 0), mode="circular")
        x = F.pad(x, (0, 0, 1, 1), mode="reflect")
        return F.relu(self.norm(self.conv(x)))


class SCSEGate(nn.Module):
    """Concurrent spatial and channel squeeze & excitation."""

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.cse = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )
        self.sse = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cse(x) + x * self.sse(x)


class UNetSCSE(nn.Module):
    """Two-level U-Net; H and W multiples of 4. Returns ``(field (B, out, H, W), logits (B, classes))``."""

    def __init__(self, channels: int = 3, width: int = 4, out: int = 2, classes: int = 3) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = nn.Sequential(EarthConv(channels, w1), EarthConv(w1, w1))
        self.enc2 = nn.Sequential(EarthConv(w1, w2), EarthConv(w2, w2))
        self.bottleneck = nn.Sequential(EarthConv(w2, w3), EarthConv(w3, w3))
        self.pool = nn.MaxPool2d(2)
        self.dec2 = nn.Sequential(EarthConv(w3 + w2, w2), SCSEGate(w2))
        self.dec1 = nn.Sequential(EarthConv(w2 + w1, w1), SCSEGate(w1))
        self.seg_head = nn.Conv2d(w1, out, 1)
        self.cls_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([F.interpolate(b, scale_factor=2, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="nearest"), e1], 1))
        return self.seg_head(d1), self.cls_head(b)
