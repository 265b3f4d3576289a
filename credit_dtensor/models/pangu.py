"""A Pangu-Weather-style 3-D network, written as plain PyTorch, on ``(B, C, Z, H, W)`` tensors
(Z = pressure levels; H = latitude is the sharded axis, dim 3).

* ``nn.ZeroPad3d`` pads H and W up to multiples of the patch size (as Pangu pads its grid);
* patch embedding ``Conv3d(kernel=(2, 4, 4), stride=(2, 4, 4))``;
* Earth blocks on channels-last tokens ``(B, Z, H, W, C)``: ``LayerNorm``, 3-D window attention
  with windows ``(wz, wh, ww)`` (shard-local when every shard holds whole windows: declared on
  import), ``Linear`` MLP, and a depthwise ``Conv3d`` 3x3x3 mixing step (halo along H);
* patch recovery ``ConvTranspose3d(kernel=(2, 4, 4), stride=(2, 4, 4))``, then the padding is
  cropped with a negative ``F.pad`` (exact re-chunking; slicing H would gather).

``shift=True`` shifts the windows with ``torch.roll`` along Z, H and W as Pangu does: rolling
the sharded axis wraps rows across shards, which the audit flags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import register_converter
from ..nn.local import shard_local

__all__ = ["EarthAttention3D", "EarthBlock", "PanguLite"]


class EarthAttention3D(nn.Module):
    """Attention inside ``window_size = (wz, wh, ww)`` windows of ``(B, Z, H, W, C)`` tokens."""

    def __init__(self, dim: int, heads: int, window_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.heads, self.window_size = heads, tuple(window_size)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        n = window_size[0] * window_size[1] * window_size[2]
        self.earth_bias = nn.Parameter(0.02 * torch.randn(heads, n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, z, h, w, c = x.shape
        wz, wh, ww = self.window_size
        t = x.view(b, z // wz, wz, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        t = t.reshape(-1, wz * wh * ww, c)
        n, length, _ = t.shape
        d = c // self.heads
        q, k, v = self.qkv(t).reshape(n, length, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * d**-0.5 + self.earth_bias).softmax(-1)
        t = self.proj((attn @ v).transpose(1, 2).reshape(n, length, c))
        t = t.view(b, z // wz, h // wh, w // ww, wz, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return t.reshape(b, z, h, w, c)


class EarthBlock(nn.Module):
    """``x + attn(ln(x))``, ``x + dwconv(x)``, ``x + mlp(ln(x))`` on ``(B, Z, H, W, C)``."""

    def __init__(self, dim: int, heads: int, window_size: tuple[int, int, int], *, shift: bool = False) -> None:
        super().__init__()
        self.shift = tuple(s // 2 for s in window_size) if shift else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EarthAttention3D(dim, heads, window_size)
        self.mix = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.shift is not None:
            y = torch.roll(y, shifts=tuple(-s for s in self.shift), dims=(1, 2, 3))
        y = self.attn(y)
        if self.shift is not None:
            y = torch.roll(y, shifts=self.shift, dims=(1, 2, 3))
        x = x + y
        x = x + self.mix(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        return x + self.mlp(self.norm2(x))


class PanguLite(nn.Module):
    """``(B, C, Z, H, W) -> (B, C, Z, H, W)`` for a fixed grid ``grid = (Z, H, W)`` (Z even)."""

    def __init__(
        self,
        channels: int = 3,
        grid: tuple[int, int, int] = (2, 32, 16),
        dim: int = 8,
        heads: int = 2,
        window_size: tuple[int, int, int] = (1, 1, 2),
        depth: int = 2,
        *,
        shift: bool = False,
    ) -> None:
        super().__init__()
        z, h, w = grid
        ph, pw = -h % 4, -w % 4
        self.pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2, 0, 0)
        self.pad = nn.ZeroPad3d(self.pads)
        self.embed = nn.Conv3d(channels, dim, (2, 4, 4), stride=(2, 4, 4))
        self.blocks = nn.Sequential(
            *(EarthBlock(dim, heads, window_size, shift=shift and i % 2 == 1) for i in range(depth))
        )
        self.recover = nn.ConvTranspose3d(dim, channels, (2, 4, 4), stride=(2, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(self.pad(x)).permute(0, 2, 3, 4, 1)
        y = self.blocks(y).permute(0, 4, 1, 2, 3)
        y = self.recover(y)
        return x + F.pad(y, tuple(-p for p in self.pads))


register_converter(EarthAttention3D, shard_local, family="models")
