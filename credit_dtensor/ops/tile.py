"""``x.repeat`` (tiling) and ``torch.tensor_split`` along the sharded dim, as row maps of
:mod:`.move`: each rank fetches only the rows of its output chunk that other ranks own (DTensor
all-gathered the activation for both). Along any other dim they run on the local rows."""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ..dtensor import domain_shard_dim
from .family import family
from .move import _track_slices, row_map
from .pointwise import local_apply

FAMILY = family("move")

__all__: list[str] = []


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@FAMILY.rule(torch.Tensor.repeat, h="relayout")
def _repeat_rule(func, args, kwargs):
    """``x.repeat(1, 1, r, 1)``: output row ``j`` of the sharded dim is input row ``j % n`` (a row
    map); the other dims tile on each rank's rows. Extra leading repeats, zero repeats and
    PyTorch's own errors are left to DTensor."""
    if kwargs or len(args) < 2:
        return NotImplemented
    x = args[0]
    reps = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
    sd = domain_shard_dim(x)
    if sd is None or len(reps) != x.ndim or not all(_int(r) and r >= 1 for r in reps):
        return NotImplemented
    n, r = x.shape[sd], reps[sd]
    y = row_map(x, list(range(n)) * r) if r > 1 else x
    other = list(reps)
    other[sd] = 1
    if r > 1 and all(v == 1 for v in other):
        return y
    return local_apply(lambda t: t.repeat(*other), (y,), {}, y, sd, empty_rows=True)


_SPEC_NAMES = ("indices_or_sections", "sections", "indices", "tensor_indices_or_sections")


@FAMILY.rule(torch.tensor_split, torch.Tensor.tensor_split, h="relayout")
def _tensor_split_rule(func, args, kwargs):
    """``torch.tensor_split(x, k_or_indices, dim=H)``: each piece is the rows ``x[a:b]`` along H
    (``k`` sections: the first ``n % k`` one row longer; indices past the end give empty pieces),
    fetched as a row map and tracked as a view of ``x``, as ``split``'s pieces are. Negative or
    decreasing indices and other dims go to DTensor (which runs the other dims locally)."""
    x = args[0] if args else kwargs.get("input")
    spec = args[1] if len(args) > 1 else next((kwargs[k] for k in _SPEC_NAMES if k in kwargs), None)
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    sd = domain_shard_dim(x)
    if sd is None or not _int(dim) or dim % x.ndim != sd:
        return NotImplemented
    if isinstance(spec, torch.Tensor) and not isinstance(spec, DTensor) and spec.ndim <= 1:
        spec = spec.tolist()
    n = x.shape[sd]
    if _int(spec):
        if spec < 1:
            return NotImplemented
        q, extra = divmod(n, spec)
        sizes = [q + 1] * extra + [q] * (spec - extra)
        cuts = list(accumulate(sizes, initial=0))
    elif isinstance(spec, (list, tuple)) and all(_int(i) and i >= 0 for i in spec):
        cuts = [0, *(min(i, n) for i in spec), n]
        if any(b < a for a, b in zip(cuts, cuts[1:])):
            return NotImplemented
    else:
        return NotImplemented
    pieces = [(a, None, b - a) for a, b in zip(cuts, cuts[1:])]
    out = tuple(row_map(x, list(range(a, a + m))) for a, _, m in pieces)
    return _track_slices(out, x, sd, pieces, False)
