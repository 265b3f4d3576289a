"""Local computation of one rank's (transposed) convolution on its *extended* shard (the halo
rows already gathered), forward and backward, with explicit adjoints and no autograd: the
custom op (:mod:`.conv`) runs these on plain local tensors.

The sharded dim is computed with padding 0 (its padding rows are in the extended shard); the
other spatial dims keep their own padding (modes other than zeros by index maps, asymmetric
``'same'`` by an explicit pad). Transposed convolutions compute the full local output of the
extended rows and crop this rank's output chunk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..geometry import chunk_range, source_row
from .conv_spec import ConvSpec, input_range, out_len

__all__ = ["LocalConv", "local_setup", "local_forward", "local_backward"]

aten = torch.ops.aten


@dataclass(frozen=True)
class LocalConv:
    """How to run the local op for one rank: padding of the *other* spatial dims, crops."""

    spec: ConvSpec
    sd: int  # index of the sharded spatial dim
    conv_padding: tuple[int, ...]  # padding passed to aten.convolution
    explicit: tuple[tuple[int, tuple[int, ...]], ...]  # (spatial idx, source index list) pads done by index_select
    const_pad: tuple[int, ...] | None  # F.pad-style list for asymmetric zero padding of other dims
    out_rows: int  # this rank's output rows along the sharded dim
    ext_rows: int
    # transposed only: offset of the wanted rows in the local full output
    t_offset: int = 0


@functools.lru_cache(maxsize=4096)
def local_setup(spec: ConvSpec, sd: int, spatial: tuple[int, ...], world: int, rank: int) -> LocalConv:
    n = spatial[sd]
    o0, o1 = chunk_range(out_len(spec, sd, n), world, rank)
    a, b = input_range(spec, sd, n, o0, o1)
    conv_padding = [0] * spec.nd
    explicit = []
    const = [0] * (2 * spec.nd)
    need_const = False
    for i in range(spec.nd):
        if i == sd:
            continue
        lo, hi = spec.pad_lo[i], spec.pad_hi[i]
        if spec.transposed or (spec.mode == "zeros" and lo == hi):
            conv_padding[i] = lo
        elif spec.mode == "zeros":
            # asymmetric 'same' on an unsharded dim: pad explicitly (F.pad order: last dim first)
            j = spec.nd - 1 - i
            const[2 * j], const[2 * j + 1] = lo, hi
            need_const = True
        else:
            idx = tuple(source_row(g, spatial[i], spec.mode) for g in range(-lo, spatial[i] + hi))
            explicit.append((i, idx))
    t_offset = 0
    if spec.transposed and b > a:
        t_offset = o0 + spec.pad_lo[sd] - a * spec.stride[sd]
    return LocalConv(
        spec, sd, tuple(conv_padding), tuple(explicit), tuple(const) if need_const else None, o1 - o0, b - a, t_offset
    )


def _pad_other(x: torch.Tensor, loc: LocalConv) -> torch.Tensor:
    lead = x.ndim - loc.spec.nd
    for i, idx in loc.explicit:
        x = x.index_select(lead + i, torch.tensor(idx, device=x.device))
    if loc.const_pad is not None:
        x = torch.nn.functional.pad(x, loc.const_pad)
    return x


def _unpad_other(g: torch.Tensor, loc: LocalConv, ext_shape: torch.Size) -> torch.Tensor:
    lead = g.ndim - loc.spec.nd
    if loc.const_pad is not None:
        for j in range(loc.spec.nd):
            lo, hi = loc.const_pad[2 * j], loc.const_pad[2 * j + 1]
            if lo or hi:
                dim = g.ndim - 1 - j
                g = g.narrow(dim, lo, g.shape[dim] - lo - hi)
    for i, idx in reversed(loc.explicit):
        dim = lead + i
        shape = list(g.shape)
        shape[dim] = ext_shape[dim]
        out = g.new_zeros(shape)
        out.index_add_(dim, torch.tensor(idx, device=g.device), g)
        g = out
    return g


def _tconv_args(loc: LocalConv) -> tuple[list[int], list[int]]:
    spec = loc.spec
    pad = [0 if i == loc.sd else spec.pad_lo[i] for i in range(spec.nd)]
    opad = [0 if i == loc.sd else spec.output_padding[i] for i in range(spec.nd)]
    return pad, opad


def _crop_rows(full: torch.Tensor, dim: int, offset: int, rows: int) -> torch.Tensor:
    """Rows ``[offset, offset + rows)`` of ``full`` along ``dim``, zero where out of range."""
    n = full.shape[dim]
    lo, hi = max(offset, 0), min(offset + rows, n)
    if lo == offset and hi == offset + rows:
        return full.narrow(dim, offset, rows)
    shape = list(full.shape)
    shape[dim] = rows
    out = full.new_zeros(shape)
    if hi > lo:
        out.narrow(dim, lo - offset, hi - lo).copy_(full.narrow(dim, lo, hi - lo))
    return out


def _uncrop_rows(g: torch.Tensor, dim: int, offset: int, full_rows: int) -> torch.Tensor:
    """Adjoint of :func:`_crop_rows`."""
    rows = g.shape[dim]
    shape = list(g.shape)
    shape[dim] = full_rows
    out = g.new_zeros(shape)
    lo, hi = max(offset, 0), min(offset + rows, full_rows)
    if hi > lo:
        out.narrow(dim, lo, hi - lo).copy_(g.narrow(dim, lo - offset, hi - lo))
    return out


def _out_local_shape(ext: torch.Tensor, loc: LocalConv, out_channels: int) -> list[int]:
    spec = loc.spec
    lead = ext.ndim - spec.nd
    spatial = []
    for i in range(spec.nd):
        if i == loc.sd:
            spatial.append(loc.out_rows)
        else:
            n = ext.shape[lead + i]
            spatial.append(out_len(spec, i, n))
    return [ext.shape[0], out_channels, *spatial]


def local_forward(ext: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, loc: LocalConv) -> torch.Tensor:
    spec = loc.spec
    dim = ext.ndim - spec.nd + loc.sd
    out_channels = w.shape[1] * spec.groups if spec.transposed else w.shape[0]
    if loc.out_rows == 0 or loc.ext_rows == 0:
        y = ext.new_zeros(_out_local_shape(ext, loc, out_channels))
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * spec.nd))
        return y
    if not spec.transposed:
        xp = _pad_other(ext, loc)
        return aten.convolution(
            xp, w, b, list(spec.stride), list(loc.conv_padding), list(spec.dilation), False, [0] * spec.nd, spec.groups
        )
    pad, opad = _tconv_args(loc)
    full = aten.convolution(ext, w, None, list(spec.stride), pad, list(spec.dilation), True, opad, spec.groups)
    y = _crop_rows(full, dim, loc.t_offset, loc.out_rows)
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * spec.nd))
    return y


def local_backward(
    gy: torch.Tensor, ext: torch.Tensor, w: torch.Tensor, has_bias: bool, loc: LocalConv, mask: tuple[bool, bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    spec = loc.spec
    dim = ext.ndim - spec.nd + loc.sd
    sum_dims = [0, *range(2, gy.ndim)]
    gb = gy.sum(sum_dims) if (has_bias and mask[2]) else None
    if loc.out_rows == 0 or loc.ext_rows == 0:
        gx = torch.zeros_like(ext) if mask[0] else None
        gw = torch.zeros_like(w) if mask[1] else None
        return gx, gw, gb
    if not spec.transposed:
        xp = _pad_other(ext, loc)
        gxp, gw, _ = aten.convolution_backward(
            gy,
            xp,
            w,
            None,
            list(spec.stride),
            list(loc.conv_padding),
            list(spec.dilation),
            False,
            [0] * spec.nd,
            spec.groups,
            [mask[0], mask[1], False],
        )
        gx = _unpad_other(gxp, loc, ext.shape) if mask[0] else None
        return gx, gw, gb
    pad, opad = _tconv_args(loc)
    full_rows = (loc.ext_rows - 1) * spec.stride[loc.sd] + spec.dilation[loc.sd] * (spec.kernel[loc.sd] - 1) + 1
    gfull = _uncrop_rows(gy, dim, loc.t_offset, full_rows)
    gx, gw, _ = aten.convolution_backward(
        gfull,
        ext,
        w,
        None,
        list(spec.stride),
        pad,
        list(spec.dilation),
        True,
        opad,
        spec.groups,
        [mask[0], mask[1], False],
    )
    return gx, gw, gb
