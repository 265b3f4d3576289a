"""Window partition / reverse and the shifted-window mask, shared by the Swin-style models.

The partition is written the way Swin writes it (``view`` into windows, ``permute``), stopping one
step short of merging the batch with the window counts: ``(B, H, W, C) -> (B, nH, nW, wh, ww, C)``.
On an H-sharded tensor that split runs through credit_dtensor's reshape rules (local when every
shard holds whole windows, otherwise only the rows that change owner move: 2, 2, 1 windows over
3 ranks for 5 window rows), and the tensor stays sharded on the window-row count ``nH``. The
attention module that merges ``(B, nH, nW)`` into one batch of windows is then row-local along
``nH``: it is declared shard-local (each rank attends inside its own windows). On one device all
of this is plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["window_partition", "window_reverse", "shift_regions", "region_mask", "WindowCore"]


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """``(B, H, W, C) -> (B, H/wh, W/ww, wh, ww, C)`` (windows on dims 1-2)."""
    b, h, w, c = x.shape
    return x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)


def window_reverse(windows: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nH, nW, wh, ww, C) -> (B, nH*wh, nW*ww, C)``."""
    b, nh, nw, wh, ww, c = windows.shape
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(b, nh * wh, nw * ww, c)


def shift_regions(h: int, w: int, window: tuple[int, int], shift: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """Swin's region map of a cyclically shifted grid, ``(B, H, W, 1)`` laid on ``like``'s grid.

    Regions (Swin's ``img_mask``): rows ``[0, H-wh)``, ``[H-wh, H-sh)``, ``[H-sh, H)``, the same
    for columns; tokens of one window attend to each other only within a region. The map is
    computed in full (it is small) and added to zeros shaped like ``like[..., :1]``, so it takes
    ``like``'s layout (an H-sharded ``like`` gives each rank its own rows).
    """
    img = torch.zeros(1, h, w, 1, dtype=like.dtype, device=like.device)
    cnt = 0
    for hs in (slice(0, h - window[0]), slice(h - window[0], h - shift[0]), slice(h - shift[0], h)):
        for ws in (slice(0, w - window[1]), slice(w - window[1], w - shift[1]), slice(w - shift[1], w)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    return torch.zeros_like(like[..., :1]) + img


def region_mask(regions: torch.Tensor, neg: float = -100.0) -> torch.Tensor:
    """``(N, L)`` region ids of N windows -> ``(N, L, L)`` additive mask (``neg`` across regions)."""
    return (regions[:, None, :] != regions[:, :, None]).to(regions.dtype) * neg


class WindowCore(nn.Module):
    """Attention over windows ``(B, nH, nW, wh, ww, C)`` (and optional region ids ``(B, nH, nW, wh,
    ww, 1)``): merges ``(B, nH, nW)`` into one batch of windows, calls :meth:`attend` on
    ``(N, wh*ww, C)`` tokens, and splits the batch again. Subclasses implement ``attend``.

    Row-local along ``nH`` (each window is one index of it), so the models declare their cores
    shard-local (``block`` 1: the window rows were already brought together by the partition)."""

    def __init__(self, window: tuple[int, int]) -> None:
        super().__init__()
        self.window = tuple(window)  # not ``window_size``: the input is already partitioned

    def attend(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, windows: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        b, nh, nw, wh, ww, c = windows.shape
        if (wh, ww) != self.window:
            raise ValueError(
                f"{type(self).__name__}: got windows of {wh}x{ww} tokens, expected {self.window[0]}x{self.window[1]} "
                "(the input must be window_partition's output, sharded on the window-count dim)"
            )
        t = windows.reshape(b * nh * nw, wh * ww, c)
        mask = None if regions is None else region_mask(regions.reshape(b * nh * nw, wh * ww))
        return self.attend(t, mask).view(b, nh, nw, wh, ww, c)
