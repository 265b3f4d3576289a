"""Exact ``F.pad`` on sharded DTensors: constant (any value), reflect, replicate and circular,
negative pads (cropping) included, on the sharded dim and any other dim.

Along the sharded dim the padded tensor is re-chunked with ``torch.chunk`` of the *padded*
length, and each output row is a source row (:func:`credit_dtensor.geometry.pad.pad_source`) or
the constant: one halo gather fetches exactly the remote rows a rank's output chunk contains
(circular padding on H wraps the last rank's rows to the first). Other dims are padded locally.
The result is an ordinary ``Shard(dim)`` DTensor, so a following convolution with ``padding=0``
consumes it unchanged (this is how the converter handles ``nn.ZeroPad2d`` + ``nn.Conv2d``).

Functional ``F.pad`` (every mode, circular included) on a sharded DTensor is routed here by a
torch-function rule, before PyTorch decomposes circular padding into slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..dtensor import domain_shard_dim
from ..errors import DomainParallelError
from ..geometry.pad import check_pad, normalize_pad_mode, pad_sources, split_pad
from ..halo import cached_plan, halo_gather, halo_scatter_add
from . import fold
from ._autocast import cast_inputs
from ._rows import RowOp, apply_row_op, chunk_needs, domain_info, register_row_ops, row_op_ref
from .family import Signature, family

FAMILY = family(
    "pad",
    "F.pad and padding modules in every mode: halo rows (circular wraps across ranks)",
    nn="credit_dtensor.nn.pad",
)

__all__ = ["pad", "PadOp", "pad_args"]


class PadOp(RowOp):
    """``F.pad`` of one rank's shard. ``pads`` maps dims to ``(lo, hi)``."""

    label = "pad"

    def __init__(
        self,
        in_shape: tuple[int, ...],
        pads: tuple[tuple[int, int, int], ...],
        mode: str,
        value: float,
        dim: int,
        world: int,
        rank: int,
    ) -> None:
        self.mode, self.value, self.dim = mode, float(value), dim
        self.in_shape = tuple(in_shape)
        pmap = {d: (lo, hi) for d, lo, hi in pads}
        out = list(in_shape)
        for d, (lo, hi) in pmap.items():
            check_pad(in_shape[d], lo, hi, mode)
            out[d] += lo + hi
        self.out_shape = tuple(out)
        n = in_shape[dim]
        lo, hi = pmap.get(dim, (0, 0))
        needs = chunk_needs(out[dim], world, lambda o0, o1: pad_sources(o0, o1, n, lo, hi, mode))
        self.plan = cached_plan(n, world, rank, needs)
        self.fill = tuple(i for i, s in enumerate(needs[rank]) if s is None)
        self.other = tuple((d, lo_, hi_) for d, (lo_, hi_) in sorted(pmap.items()) if d != dim and (lo_, hi_) != (0, 0))
        self.maps = (
            {d: pad_sources(0, in_shape[d] + lo_ + hi_, in_shape[d], lo_, hi_, mode) for d, lo_, hi_ in self.other}
            if mode != "constant"
            else {}
        )
        self._idx_cache: dict[tuple, torch.Tensor] = {}

    def _index(self, key: object, values: Sequence[int], device: torch.device) -> torch.Tensor:
        k = (key, device)
        if k not in self._idx_cache:
            self._idx_cache[k] = torch.tensor(list(values), dtype=torch.long, device=device)
        return self._idx_cache[k]

    def _flat_other(self, ndim: int, sign: int) -> list[int]:
        """``F.pad``-style flat list for the non-sharded dims (sharded dim gets ``(0, 0)``)."""
        first = min(d for d, _, _ in self.other)
        flat: list[int] = []
        pmap = {d: (lo, hi) for d, lo, hi in self.other}
        for d in range(ndim - 1, first - 1, -1):
            lo, hi = pmap.get(d, (0, 0))
            flat += [sign * lo, sign * hi]
        return flat

    def _pad_other(self, t: torch.Tensor) -> torch.Tensor:
        if not self.other:
            return t
        if self.mode == "constant":
            return F.pad(t, self._flat_other(t.ndim, 1), value=self.value)
        for d, _, _ in self.other:
            t = t.index_select(d, self._index(d, self.maps[d], t.device))
        return t

    def _unpad_other(self, g: torch.Tensor) -> torch.Tensor:
        if not self.other:
            return g
        if self.mode == "constant":
            return F.pad(g, self._flat_other(g.ndim, -1))
        for d, _, _ in reversed(self.other):
            shape = list(g.shape)
            shape[d] = self.in_shape[d]
            g = g.new_zeros(shape).index_add_(d, self._index(d, self.maps[d], g.device), g)
        return g

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup):
        ext = halo_gather(x, self.dim, self.plan, group)
        if self.fill and self.value != 0.0:
            ext = ext.index_fill(self.dim, self._index("fill", self.fill, ext.device), self.value)
        y = self._pad_other(ext)
        return (y.clone() if y is x else y), None, None

    def backward(self, g: torch.Tensor, saved: object, group: dist.ProcessGroup) -> torch.Tensor:
        g_ext = self._unpad_other(g)
        return halo_scatter_add(g_ext.contiguous(), self.dim, self.plan, group)


register_row_ops(PadOp)


def pad_args(
    in_shape: Sequence[int], pad: Sequence[int], mode: str, value: float | None, dim: int, world: int, rank: int
) -> tuple:
    """The arguments of the (cached) :class:`PadOp` for ``F.pad(x, pad, mode, value)`` of a tensor
    of global ``in_shape`` sharded on ``dim``."""
    mode = normalize_pad_mode(mode)
    ndim = len(in_shape)
    try:
        pmap = split_pad(pad, ndim)
    except ValueError as e:
        raise DomainParallelError(
            f"pad(mode={mode!r}, pad={tuple(pad)}) on a tensor of shape {tuple(in_shape)}: {e}"
        ) from e
    pads = tuple((d, lo, hi) for d, (lo, hi) in sorted(pmap.items()))
    return (tuple(in_shape), pads, mode, float(value or 0.0), dim % ndim, world, rank)


def _validate(shape: Sequence[int], pad: Sequence[int], mode: str, value: float | None) -> torch.Size:
    """Single-device validation on a meta tensor (same errors as ``F.pad``); the output shape."""
    return F.pad(torch.empty(tuple(shape), device="meta"), list(pad), mode=mode, value=value).shape


def pad(x: torch.Tensor, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> torch.Tensor:
    """``F.pad`` that is exact for DTensors sharded on any dim of a 1-D (domain) mesh.

    The output is sharded on the same dim and re-chunked by ``torch.chunk`` of the padded length.
    Plain tensors and unsharded DTensors go to ``F.pad``.
    """
    dim = domain_shard_dim(x)
    if dim is None:
        return F.pad(x, list(pad), mode=mode, value=value)
    out_shape = _validate(x.shape, pad, mode, value)
    kind = normalize_pad_mode(mode)
    if kind in ("reflect", "replicate"):  # torch.autocast: fp32 on CPU, as reflection/replication_pad*d
        nd = len(pad) // 2
        (x,) = cast_inputs(f"{'reflection' if kind == 'reflect' else 'replication'}_pad{nd}d", x)
    _, _, world, rank = domain_info(x)  # type: ignore[arg-type]
    args = pad_args(tuple(x.shape), pad, mode, value, dim, world, rank)
    out = apply_row_op(x, row_op_ref("PadOp", args, args[4], out_shape))  # type: ignore[arg-type]
    carry = fold.carried(x)
    if carry is not None and all(d != args[4] or lo == hi == 0 for d, lo, hi in args[1]):  # other dims only: row by row
        fold.transform(carry, lambda r: F.pad(r, list(pad), mode=mode, value=value), out)
    return out


# ---------------------------------------------------------------------------------------------
# Functional path: F.pad as users call it, any mode, any dim (circular included: PyTorch decomposes
# it into slices before DTensor sees it, so only a torch-function rule can route it here)
# ---------------------------------------------------------------------------------------------


@FAMILY.rule(
    F.pad, h="halo", signature=Signature(("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
)
def _pad_rule(func, a):
    x = a.get("input")
    if domain_shard_dim(x) is None:
        return NotImplemented
    return pad(x, a.get("pad"), mode=a["mode"], value=a["value"])
