"""A Swin Transformer network (shifted windows), written as plain PyTorch on channels-last
``(B, H, W, C)`` tokens, H = latitude sharded (dim 1).

Faithful to Swin's block: ``x + attn(norm(x))`` with, for the shifted block, ``torch.roll`` by
``-window/2`` along H and W, the window partition, window attention with a learned relative
position bias table and the shifted-window mask (Swin's ``img_mask`` regions), the window
reverse and the roll back; then ``x + mlp(norm(x))``. Around it: patch embedding
(``Conv2d(k=p, stride=p)``), Swin's patch merging (``x[:, 0::2, 0::2]`` ... concatenated,
``LayerNorm``, ``Linear(4C, 2C)``) and a ``Linear`` head.

Domain parallelism: the roll moves only the shifted rows between ranks, the partition's split
of H into windows and the reverse's merge run through the reshape rules (re-chunked to whole
windows when the shards cut windows), the strided slicing of patch merging moves only the rows
that change owner; only :class:`SwinWindowAttention` (which merges the batch with the window
counts) is declared shard-local, and it only ever sees whole windows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..convert import register_converter
from ..nn.local import shard_local
from ._windows import WindowCore, shift_regions, window_partition, window_reverse

__all__ = ["SwinWindowAttention", "SwinBlock", "PatchMerging", "SwinNet", "relative_position_index"]


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """``(L, L)`` index into a ``((2wh-1)(2ww-1), heads)`` table for tokens of one window (Swin's)."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


class SwinWindowAttention(WindowCore):
    """Multi-head self-attention inside windows, with Swin's relative position bias."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int]) -> None:
        super().__init__(window)
        wh, ww = self.window
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn((2 * wh - 1) * (2 * ww - 1), heads))
        self.register_buffer("relative_position_index", relative_position_index(wh, ww), persistent=False)

    def attend(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, length, c = tokens.shape
        q, k, v = self.qkv(tokens).reshape(n, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.view(length, length, -1).permute(2, 0, 1)
        if mask is not None:
            attn = attn + mask[:, None]
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(n, length, c))


class SwinBlock(nn.Module):
    """One Swin block on ``(B, H, W, C)``; ``shift`` > 0 makes it the shifted-window block."""

    def __init__(self, dim: int, heads: int, window_size: int, shift: int = 0, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinWindowAttention(dim, heads, (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, s = self.window_size, self.shift
        t = self.norm1(x)
        regions = None
        if s:
            t = torch.roll(t, shifts=(-s, -s), dims=(1, 2))
            regions = window_partition(shift_regions(h, w, (ws, ws), (s, s), t), ws, ws)
        t = window_reverse(self.attn(window_partition(t, ws, ws), regions))
        if s:
            t = torch.roll(t, shifts=(s, s), dims=(1, 2))
        x = x + t
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Swin's 2x2 patch merging: ``(B, H, W, C) -> (B, H/2, W/2, 2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
        x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], -1)))


class SwinNet(nn.Module):
    """``(B, C, H, W) -> (B, out, H/(2p), W/(2p))``: patch embedding, a regular and a shifted Swin
    block, patch merging, a ``Linear`` head. H/p and W/p must be multiples of ``window_size``."""

    def __init__(
        self, channels: int = 3, dim: int = 8, heads: int = 2, window_size: int = 4, patch: int = 2, out: int = 3
    ) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(
            SwinBlock(dim, heads, window_size), SwinBlock(dim, heads, window_size, window_size // 2)
        )
        self.merge = PatchMerging(dim)
        self.head = nn.Linear(2 * dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).permute(0, 2, 3, 1)
        t = self.merge(self.blocks(t))
        return self.head(t).permute(0, 3, 1, 2)


register_converter(SwinWindowAttention, shard_local, family="models")
