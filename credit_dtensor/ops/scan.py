"""Prefix scans along the sharded dim: ``cumsum``, ``cumprod`` and ``logcumsumexp`` exact over H.

Each rank scans its own rows; every row then adds the sum of all earlier shards (``cumprod``:
times their product; ``logcumsumexp``: log-plus their log-sum-exp). Only one row per
rank crosses ranks (each rank's total, one all-reduce of ``world`` rows), never the activation. The
backward is the reverse scan: the local reverse cumsum plus the gradient totals of all later
shards (the all-reduce's adjoint). Along any other dim the scan is local.

This family is the worked example of ``docs/design.md`` ("adding an op family").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ..comm import sum_over_ranks
from ..dtensor import _SumGradOverRanks, domain_shard_dim, wrap_shard
from .family import Signature, family
from .pointwise import local_apply

FAMILY = family(
    "scan", "prefix scans (cumsum, cumprod, logcumsumexp) along H: a local scan plus the totals of the earlier shards"
)

__all__ = ["cumsum_over_shards", "scan_over_shards"]


def _earlier_totals(total: torch.Tensor, group: Any, world: int, rank: int) -> torch.Tensor:
    """Every rank's ``total`` (one row each) on every rank, stacked in rank order (one all-reduce;
    the gradient of each total sums over the ranks that read it)."""
    slots = torch.stack([total if r == rank else torch.zeros_like(total) for r in range(world)])
    every = sum_over_ranks(slots, group)
    if world > 1 and every.requires_grad:
        every = _SumGradOverRanks.apply(every, group)
    return every


#: per scan: the local scan, a shard's total (``dtype``: the scan's), the earlier shards' totals
#: folded into one, and how that prefix joins each row
_SCANS: dict[str, tuple[Callable, Callable, Callable, Callable]] = {
    "cumsum": (torch.cumsum, lambda t, d, dt: t.sum(d, keepdim=True, dtype=dt), lambda e: e.sum(0), torch.add),
    "cumprod": (torch.cumprod, lambda t, d, dt: t.prod(d, keepdim=True, dtype=dt), lambda e: e.prod(0), torch.mul),
    "logcumsumexp": (
        torch.logcumsumexp,
        lambda t, d, dt: t.logsumexp(d, keepdim=True),
        lambda e: e.logsumexp(0),
        torch.logaddexp,
    ),
}
_KIND = {
    torch.cumsum: "cumsum",
    torch.Tensor.cumsum: "cumsum",
    torch.cumprod: "cumprod",
    torch.Tensor.cumprod: "cumprod",
    torch.logcumsumexp: "logcumsumexp",
    torch.Tensor.logcumsumexp: "logcumsumexp",
}


def scan_over_shards(x: DTensor, sd: int, kind: str, dtype: torch.dtype | None = None) -> DTensor:
    """``torch.<kind>(x, sd)`` of a DTensor sharded on ``sd``: each rank scans its rows and joins
    the earlier shards' totals (an empty shard's total is the identity: 0, 1 or -inf)."""
    scan, total, fold, combine = _SCANS[kind]
    mesh = x.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    local = x.to_local() if dtype is None else x.to_local().to(dtype)
    scanned = scan(local, sd)
    every = _earlier_totals(total(local, sd, scanned.dtype), mesh.get_group(), world, rank)
    return wrap_shard(combine(scanned, fold(every[:rank])), mesh, sd, x.shape)


def cumsum_over_shards(x: DTensor, sd: int, dtype: torch.dtype | None = None) -> DTensor:
    """``torch.cumsum(x, sd, dtype=dtype)`` of a DTensor sharded on ``sd``."""
    return scan_over_shards(x, sd, "cumsum", dtype)


@FAMILY.rule(
    tuple(_KIND),
    h="reduce",
    note="local scan plus (times, log-plus) the totals of the earlier shards (one all-reduce of one row per rank)",
    signature=Signature(("input", "dim"), {"dtype": None}),
)
def _scan_rule(func: Any, a: Any) -> Any:
    """``cumsum``/``cumprod``/``logcumsumexp`` along H (:func:`scan_over_shards`); along other dims
    local (``cumprod``/``logcumsumexp`` there are the dimwise family's, asked first)."""
    x, dim = a.get("input"), a.get("dim")
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(dim, int) or a.get("out") is not None or a.has_other(x):
        return NotImplemented
    if dim % x.ndim != sd:
        return local_apply(func, a.args, a.kwargs, x, sd)
    return scan_over_shards(x, sd, _KIND[func], a["dtype"])
