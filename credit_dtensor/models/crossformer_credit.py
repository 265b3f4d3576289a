"""A CREDIT-style CrossFormer stage (NCAR CREDIT's ``crossformer``), written as plain PyTorch on
``(B, C, H, W)`` tensors, H = latitude sharded (dim 2).

* Earth padding: longitude is periodic (``F.pad(mode="circular")`` on W), latitude is reflected
  (``F.pad(mode="reflect")`` on H); the padding is cropped by slicing at the end.
* Cross-embedding: convolutions with several kernel sizes and one stride, ``padding=(k - s) // 2``,
  concatenated on channels (half the channels to the smallest kernel, a quarter to the next ...).
* Transformer: short-distance attention (windows of ``local_window`` consecutive rows and
  columns), feed-forward, long-distance attention (groups of ``global_window`` x ``global_window``
  tokens taken at a stride of H/g rows and W/g columns), feed-forward, each residual. Attention is
  CrossFormer's: channel ``LayerNorm``, 1x1-conv q/k/v, multi-head attention with a dynamic
  position bias (an MLP of the relative offset), 1x1-conv output; the token regrouping is the
  einops ``rearrange`` of the original written with ``view`` / ``permute`` / ``reshape``.
* A ``ConvTranspose2d`` back to the padded grid, then the crop.

Domain parallelism: pads, cross-embedding convs, norms, feed-forward and the crop run through the
exact rules. Short-distance attention merges the batch with the window counts, so it is declared
shard-local (each shard must hold whole windows: ``plan`` gives the domain sizes). Long-distance
attention groups rows from every shard: its regrouping runs through the reshape rules (the row
stride split keeps the sharded dim outermost) and the attention through
``F.scaled_dot_product_attention`` over token-sharded q/k/v (exact, Ulysses all-to-all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import register_converter
from ..nn.local import shard_local

__all__ = ["ChanLayerNorm", "CrossEmbedLayer", "DynamicPositionBias", "CrossAttention", "CrossFormerStage"]


class ChanLayerNorm(nn.Module):
    """LayerNorm over the channel dim of ``(B, C, H, W)`` (biased variance, as CREDIT's)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.g + self.b


class CrossEmbedLayer(nn.Module):
    """Convolutions of several kernel sizes at one stride, concatenated on channels."""

    def __init__(self, dim_in: int, dim_out: int, kernel_sizes: tuple[int, ...], stride: int = 2) -> None:
        super().__init__()
        kernel_sizes = tuple(sorted(kernel_sizes))
        dims = [dim_out // 2 ** (i + 1) for i in range(len(kernel_sizes) - 1)]
        dims.append(dim_out - sum(dims))
        self.convs = nn.ModuleList(
            nn.Conv2d(dim_in, d, k, stride=stride, padding=(k - stride) // 2) for k, d in zip(kernel_sizes, dims)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class DynamicPositionBias(nn.Module):
    """CrossFormer's dynamic position bias: an MLP from a relative offset (dy, dx) to a bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(2, dim),
            nn.LayerNorm(dim),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.LayerNorm(dim),
            nn.ReLU(),
            nn.Linear(dim, 1),
        )

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.layers(offsets).squeeze(-1)


class CrossAttention(nn.Module):
    """Short- (``attn_type="short"``) or long-distance (``"long"``) attention over ``window_size``
    x ``window_size`` token groups of ``(B, C, H, W)``; returns the update (the block adds it)."""

    def __init__(self, dim: int, attn_type: str, window_size: int, dim_head: int = 4) -> None:
        super().__init__()
        if attn_type not in ("short", "long"):
            raise ValueError(f"attn_type={attn_type!r}: expected 'short' or 'long'")
        self.attn_type, self.window_size = attn_type, window_size
        self.heads, self.dim_head = dim // dim_head, dim_head
        inner = self.heads * dim_head
        self.norm = ChanLayerNorm(dim)
        self.to_qkv = nn.Conv2d(dim, inner * 3, 1, bias=False)
        self.to_out = nn.Conv2d(inner, dim, 1)
        self.dpb = DynamicPositionBias(max(dim // 4, 2))
        pos = torch.arange(window_size)
        grid = torch.stack(torch.meshgrid(pos, pos, indexing="ij")).flatten(1).t()  # (L, 2)
        rel = grid[:, None, :] - grid[None, :, :]  # (L, L, 2) offsets of query i from key j
        self.register_buffer("rel_pos", rel.to(torch.get_default_dtype()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape  # explicit sizes (no -1): a shard may hold no window at all
        s, nh, nw = self.window_size, height // self.window_size, width // self.window_size
        inner = self.heads * self.dim_head
        x = self.norm(x)
        if self.attn_type == "short":  # 'b d (h s1) (w s2) -> (b h w) d s1 s2'
            t = x.view(b, c, nh, s, nw, s).permute(0, 2, 4, 1, 3, 5).reshape(b * nh * nw, c, s, s)
        else:  # 'b d (l1 h) (l2 w) -> (b h w) d l1 l2'
            t = x.view(b, c, s, nh, s, nw).permute(0, 3, 5, 1, 2, 4).reshape(b * nh * nw, c, s, s)
        q, k, v = self.to_qkv(t).chunk(3, dim=1)
        n = t.shape[0]
        # 'b (h d) x y -> b h (x y) d'
        q, k, v = (
            z.view(n, self.heads, self.dim_head, s, s)
            .permute(0, 1, 3, 4, 2)
            .reshape(n, self.heads, s * s, self.dim_head)
            for z in (q, k, v)
        )
        bias = self.dpb(self.rel_pos.to(q.dtype))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # 'b h (x y) d -> b (h d) x y'
        out = out.view(n, self.heads, s, s, self.dim_head).permute(0, 1, 4, 2, 3).reshape(n, inner, s, s)
        out = self.to_out(out)
        if self.attn_type == "short":  # '(b h w) d s1 s2 -> b d (h s1) (w s2)'
            return out.view(b, nh, nw, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)
        # '(b h w) d l1 l2 -> b d (l1 h) (l2 w)'
        return out.view(b, nh, nw, c, s, s).permute(0, 3, 4, 1, 5, 2).reshape(b, c, height, width)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            ChanLayerNorm(dim), nn.Conv2d(dim, dim * mult, 1), nn.GELU(), nn.Conv2d(dim * mult, dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossFormerStage(nn.Module):
    """``(B, C, H, W) -> (B, out, H, W)``: earth padding, cross-embedding (stride 2), one
    short + long distance transformer layer, transposed conv back, crop. ``(H + 2 pad_lat) / 2``
    and ``(W + 2 pad_lon) / 2`` must be multiples of both window sizes."""

    def __init__(
        self,
        channels: int = 3,
        dim: int = 8,
        out: int = 3,
        kernels: tuple[int, ...] = (2, 4, 8),
        local_window: int = 2,
        global_window: int = 2,
        pad_lat: int = 1,
        pad_lon: int = 1,
        dim_head: int = 4,
    ) -> None:
        super().__init__()
        self.pad_lat, self.pad_lon = pad_lat, pad_lon
        self.embed = CrossEmbedLayer(channels, dim, kernels, stride=2)
        self.layers = nn.ModuleList(
            [
                CrossAttention(dim, "short", local_window, dim_head),
                FeedForward(dim),
                CrossAttention(dim, "long", global_window, dim_head),
                FeedForward(dim),
            ]
        )
        self.unembed = nn.ConvTranspose2d(dim, out, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad_lon, self.pad_lon, 0, 0), mode="circular")
        x = F.pad(x, (0, 0, self.pad_lat, self.pad_lat), mode="reflect")
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x) + x
        x = self.unembed(x)
        return x[:, :, self.pad_lat : x.shape[2] - self.pad_lat, self.pad_lon : x.shape[3] - self.pad_lon]


#: short-distance windows lie inside one shard when every shard holds whole windows
register_converter(CrossAttention, shard_local, needs=lambda m: m.attn_type == "short", family="models")
