"""A model that is exact but makes PyTorch's DTensor all-gather an activation (a sort along H,
which has no sharded rule; ``cumsum``/``logcumsumexp`` have one, the scan family): the gather
guard and ``check --fail-on-gather`` must see it."""

from __future__ import annotations

import torch
from torch import nn


class SortOverH(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sort(self.conv(x), dim=2).values)


def build() -> nn.Module:
    return SortOverH()
