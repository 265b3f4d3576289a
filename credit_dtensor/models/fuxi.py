"""A FuXi-style network, written as plain PyTorch: cube embedding of ``(B, C, T, H, W)`` with a
``Conv3d`` over (time, lat, lon) patches, a U-Transformer (strided-conv down block with residual
GroupNorm/SiLU convs, a Swin-V2 stage, transposed-conv up block on the concatenated skip), and a
``Linear`` head whose output is unpatched back to the grid (``reshape`` / ``permute``).

The Swin-V2 stage (channels-last ``(B, H, W, C)``) is Swin-V2's: scaled cosine attention
(``normalize(q) @ normalize(k)^T`` times a learned, clamped logit scale), a continuous relative
position bias (an MLP of log-spaced relative coordinates, ``16 * sigmoid``), post-norm residuals
(``x + norm(attn(x))``, ``x + norm(mlp(x))``), and every second block shifted (``torch.roll``,
Swin's region mask).

Domain parallelism (H sharded): the cube embedding, down/up blocks and norms run through the
conv/norm rules, the window split/merge and the head's unpatching through the reshape rules
(re-chunked where shards cut windows or patches), the rolls move only the shifted rows, and only
the attention over partitioned windows (:class:`SwinV2WindowAttention`) is declared shard-local.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import register_converter
from ..nn.local import shard_local
from ._windows import WindowCore, shift_regions, window_partition, window_reverse
from .swin import relative_position_index

__all__ = ["CubeEmbedding", "SwinV2WindowAttention", "SwinV2Block", "FuXiLite"]


class CubeEmbedding(nn.Module):
    """``Conv3d(kernel=stride=patch)`` then ``LayerNorm`` over channels: ``(B, C, T, H, W) ->
    (B, D, T/pt, H/ph, W/pw)``."""

    def __init__(self, channels: int, dim: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 4, 1)
        return self.norm(x).permute(0, 4, 1, 2, 3)


class ResidualConvs(nn.Module):
    """``x + (conv3x3 -> GroupNorm -> SiLU)(x)``."""

    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(groups, dim), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def log_relative_coords(wh: int, ww: int) -> torch.Tensor:
    """Swin-V2's ``(2wh-1, 2ww-1, 2)`` table: relative offsets scaled to [-8, 8], log-spaced."""
    h = torch.arange(-(wh - 1), wh, dtype=torch.float64) / max(wh - 1, 1)
    w = torch.arange(-(ww - 1), ww, dtype=torch.float64) / max(ww - 1, 1)
    table = torch.stack(torch.meshgrid(h, w, indexing="ij"), -1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


class SwinV2WindowAttention(WindowCore):
    """Scaled cosine attention inside windows with Swin-V2's continuous position bias."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int], cpb_hidden: int = 16) -> None:
        super().__init__(window)
        wh, ww = self.window
        self.heads = heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(), nn.Linear(cpb_hidden, heads, bias=False))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(0.02 * torch.randn(dim))
        self.v_bias = nn.Parameter(0.02 * torch.randn(dim))
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("relative_coords_table", log_relative_coords(wh, ww).float(), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(wh, ww), persistent=False)

    def attend(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, length, c = tokens.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(tokens, self.qkv.weight, bias).reshape(n, length, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table.to(tokens.dtype)).view(-1, self.heads)
        rel = table[self.relative_position_index.reshape(-1)].view(length, length, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(rel)
        if mask is not None:
            attn = attn + mask[:, None]
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(n, length, c))


class SwinV2Block(nn.Module):
    """Swin-V2 block on ``(B, H, W, C)`` (post-norm); ``shift`` > 0: shifted windows."""

    def __init__(self, dim: int, heads: int, window_size: int, shift: int = 0, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.attn = SwinV2WindowAttention(dim, heads, (window_size, window_size))
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, s = self.window_size, self.shift
        regions = None
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
            regions = window_partition(shift_regions(h, w, (ws, ws), (s, s), x), ws, ws)
        x = window_reverse(self.attn(window_partition(x, ws, ws), regions))
        return torch.roll(x, shifts=(s, s), dims=(1, 2)) if s else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self._attn(x))
        return x + self.norm2(self.mlp(x))


class FuXiLite(nn.Module):
    """``(B, C, T, H, W) -> (B, out, H, W)`` with ``T = patch[0]``; ``H / (2 ph)`` and
    ``W / (2 pw)`` multiples of ``window_size``."""

    def __init__(
        self,
        channels: int = 2,
        out: int = 2,
        dim: int = 8,
        heads: int = 2,
        window_size: int = 4,
        patch: tuple[int, int, int] = (2, 4, 4),
        depth: int = 2,
        groups: int = 2,
    ) -> None:
        super().__init__()
        self.patch, self.out = tuple(patch), out
        self.cube_embedding = CubeEmbedding(channels, dim, self.patch)
        self.down = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        self.down_res = ResidualConvs(dim, groups)
        self.layer = nn.Sequential(
            *(SwinV2Block(dim, heads, window_size, (window_size // 2) * (i % 2)) for i in range(depth))
        )
        self.up = nn.ConvTranspose2d(2 * dim, dim, 2, stride=2)
        self.up_res = ResidualConvs(dim, groups)
        self.fc = nn.Linear(dim, out * self.patch[1] * self.patch[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.cube_embedding(x).squeeze(2)  # (B, D, H', W')
        x = self.down_res(self.down(x))
        shortcut = x
        x = self.layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.up_res(self.up(torch.cat([shortcut, x], dim=1)))
        _, _, lat, lon = x.shape
        ph, pw = self.patch[1:]
        x = self.fc(x.permute(0, 2, 3, 1))  # (B, H', W', out * ph * pw)
        x = x.reshape(b, lat, lon, ph, pw, self.out).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, lat * ph, lon * pw, self.out).permute(0, 3, 1, 2)


register_converter(SwinV2WindowAttention, shard_local, family="models")
