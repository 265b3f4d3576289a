"""A CrossFormer-style encoder (as in CREDIT's ``crossformer``), written as plain PyTorch.

* Cross-embedding layers: several kernels with one stride, each on its own
  ``nn.Sequential(nn.ZeroPad2d(...), nn.Conv2d(..., padding=0))`` branch, concatenated on channels.
* Transformer blocks on channels-last tokens: ``LayerNorm`` over channels, window attention,
  ``Linear`` MLP.
* :class:`WindowAttention` (short-distance attention) attends inside ``(wh, ww)`` windows. Its
  windows lie inside one shard when every shard's H is a multiple of ``wh``, so importing this
  module declares it shard-local (``register_converter(WindowAttention, shard_local)``): its
  forward runs unchanged on each rank's rows. With ``dilate_w=True`` the windows take every
  ``W/ww``-th column (CrossFormer's long-distance attention, along W only): still shard-local.
* :class:`LongDistanceAttention` samples rows *and* columns at an interval (CrossFormer's LDA
  over the whole image): its windows span shards, it is not declared shard-local, and the audit
  flags it (``CrossFormer(lda_over_h=True)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..convert import register_converter
from ..nn.local import shard_local

__all__ = ["CrossEmbed", "WindowAttention", "LongDistanceAttention", "TransformerBlock", "CrossFormer"]


class CrossEmbed(nn.Module):
    """Multi-kernel strided embedding; every branch gives ``floor(H / stride)`` rows."""

    def __init__(self, cin: int, cout: int, kernels: tuple[int, ...], stride: int) -> None:
        super().__init__()
        kernels = tuple(sorted(kernels))
        dims = [cout // 2 ** (i + 1) for i in range(len(kernels) - 1)]
        dims.append(cout - sum(dims))
        branches = []
        for k, d in zip(kernels, dims, strict=True):
            lo, hi = (k - stride) // 2, (k - stride) - (k - stride) // 2
            branches.append(nn.Sequential(nn.ZeroPad2d((lo, hi, lo, hi)), nn.Conv2d(cin, d, k, stride=stride)))
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


def _attend(x: torch.Tensor, qkv: nn.Linear, proj: nn.Linear, heads: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Multi-head self-attention over dim -2 of ``(N, L, C)`` tokens."""
    n, length, c = x.shape
    d = c // heads
    q, k, v = qkv(x).reshape(n, length, 3, heads, d).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * d**-0.5
    if bias is not None:
        attn = attn + bias
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n, length, c)
    return proj(out)


class WindowAttention(nn.Module):
    """Attention inside ``window_size = (wh, ww)`` windows of a ``(B, H, W, C)`` tensor."""

    def __init__(self, dim: int, heads: int, window_size: tuple[int, int], *, dilate_w: bool = False) -> None:
        super().__init__()
        self.heads, self.window_size, self.dilate_w = heads, tuple(window_size), dilate_w
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        length = self.window_size[0] * self.window_size[1]
        self.pos_bias = nn.Parameter(0.02 * torch.randn(heads, length, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        wh, ww = self.window_size
        if self.dilate_w:  # column j joins window j % (w // ww): long-distance along W
            t = x.view(b, h // wh, wh, ww, w // ww, c).permute(0, 1, 4, 2, 3, 5)
        else:
            t = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
        t = t.reshape(-1, wh * ww, c)
        t = _attend(t, self.qkv, self.proj, self.heads, self.pos_bias)
        if self.dilate_w:
            t = t.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 4, 2, 5)
        else:
            t = t.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(b, h, w, c)


class LongDistanceAttention(nn.Module):
    """CrossFormer's LDA: positions ``interval`` apart in H and W attend together (spans shards)."""

    def __init__(self, dim: int, heads: int, interval: int) -> None:
        super().__init__()
        self.heads, self.interval = heads, interval
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        i = self.interval
        t = x.view(b, h // i, i, w // i, i, c).permute(0, 2, 4, 1, 3, 5).reshape(-1, (h // i) * (w // i), c)
        t = _attend(t, self.qkv, self.proj, self.heads, None)
        t = t.view(b, i, i, h // i, w // i, c).permute(0, 3, 1, 4, 2, 5)
        return t.reshape(b, h, w, c)


class TransformerBlock(nn.Module):
    """Pre-norm block on channels-last tokens: ``x + attn(ln(x))``, ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, attn: nn.Module, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    def __init__(self, cin: int, dim: int, kernels: tuple[int, ...], stride: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.embed = CrossEmbed(cin, dim, kernels, stride)
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        return self.blocks(x).permute(0, 3, 1, 2)


class CrossFormer(nn.Module):
    """Two-stage encoder ``(B, C, H, W) -> (B, dims[-1], H/(s0*s1), W/(s0*s1))``.

    Stage ``i`` embeds with ``kernels[i]`` at ``strides[i]``, then runs a short-distance block
    (windows ``windows[i]``) and a W-dilated one. ``lda_over_h=True`` makes the second block of the
    last stage CrossFormer's long-distance attention over H and W (not shard-local: flagged).
    """

    def __init__(
        self,
        channels: int = 3,
        dims: tuple[int, int] = (8, 16),
        heads: tuple[int, int] = (2, 2),
        kernels: tuple[tuple[int, ...], ...] = ((4, 8), (2, 4)),
        strides: tuple[int, int] = (4, 2),
        windows: tuple[tuple[int, int], ...] = ((1, 4), (1, 2)),
        *,
        lda_over_h: bool = False,
    ) -> None:
        super().__init__()
        stages, cin = [], channels
        for i, (dim, nh, ks, s, win) in enumerate(zip(dims, heads, kernels, strides, windows, strict=True)):
            blocks = [
                TransformerBlock(dim, nh, WindowAttention(dim, nh, win)),
                TransformerBlock(
                    dim,
                    nh,
                    LongDistanceAttention(dim, nh, 2)
                    if lda_over_h and i == len(dims) - 1
                    else WindowAttention(dim, nh, win, dilate_w=True),
                ),
            ]
            stages.append(Stage(cin, dim, ks, s, blocks))
            cin = dim
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


register_converter(WindowAttention, shard_local, family="models")
