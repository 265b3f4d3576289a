"""Prefix sums along the sharded dim: ``torch.cumsum`` / ``Tensor.cumsum`` exact over H.

Each rank scans its own rows; every row then adds the sum of all earlier shards. Only one row per
rank crosses ranks (each rank's total, one all-reduce of ``world`` rows), never the activation. The
backward is the reverse scan: the local reverse cumsum plus the gradient totals of all later
shards (the all-reduce's adjoint). Along any other dim the scan is local.

This family is the worked example of ``docs/design.md`` ("adding an op family").
"""

from __future__ import annotations

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

__all__ = ["cumsum_over_shards"]


def _earlier_totals(total: torch.Tensor, group: Any, world: int, rank: int) -> torch.Tensor:
    """Every rank's ``total`` (one row each) on every rank, stacked in rank order (one all-reduce;
    the gradient of each total sums over the ranks that read it)."""
    slots = torch.stack([total if r == rank else torch.zeros_like(total) for r in range(world)])
    every = sum_over_ranks(slots, group)
    if world > 1 and every.requires_grad:
        every = _SumGradOverRanks.apply(every, group)
    return every


def cumsum_over_shards(x: DTensor, sd: int, dtype: torch.dtype | None = None) -> DTensor:
    """``torch.cumsum(x, sd, dtype=dtype)`` of a DTensor sharded on ``sd``."""
    mesh = x.device_mesh
    group = mesh.get_group()
    world, rank = mesh.size(), mesh.get_local_rank()
    local = x.to_local() if dtype is None else x.to_local().to(dtype)
    scanned = local.cumsum(sd)
    total = local.sum(sd, keepdim=True, dtype=scanned.dtype)  # an empty shard adds zeros
    return wrap_shard(scanned + _earlier_totals(total, group, world, rank)[:rank].sum(0), mesh, sd, x.shape)


@FAMILY.rule(
    torch.cumsum,
    torch.Tensor.cumsum,
    h="reduce",
    note="local scan plus the totals of the earlier shards (one all-reduce of one row per rank)",
    signature=Signature(("input", "dim"), {"dtype": None}),
)
def _cumsum_rule(func: Any, a: Any) -> Any:
    x, dim, dtype = a.get("input"), a.get("dim"), a["dtype"]
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(dim, int) or a.get("out") is not None:
        return NotImplemented
    if any(isinstance(v, DTensor) and v is not x for v in (*a.args, *a.kwargs.values())):
        return NotImplemented
    if dim % x.ndim != sd:
        return local_apply(func, a.args, a.kwargs, x, sd)
    return cumsum_over_shards(x, sd, dtype)


@FAMILY.rule(
    torch.cumprod,
    torch.Tensor.cumprod,
    torch.logcumsumexp,
    torch.Tensor.logcumsumexp,
    h="reduce",
    note="along H: a local scan times (log-plus) the totals of the earlier shards (one all-reduce of one row per rank)",
    signature=Signature(("input", "dim"), {"dtype": None}),
)
def _scan_rule(func: Any, a: Any) -> Any:
    """``cumprod``: each row times the product of the earlier shards' products; ``logcumsumexp``:
    each row log-plus the log-sum-exp of the earlier shards. Only one row per rank crosses ranks.
    Along other dims the dimwise family runs them locally (asked first)."""
    x, dim = a.get("input"), a.get("dim")
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(dim, int) or dim % x.ndim != sd or a.get("out") is not None:
        return NotImplemented
    if any(isinstance(v, DTensor) and v is not x for v in (*a.args, *a.kwargs.values())):
        return NotImplemented
    mesh = x.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    local = x.to_local()
    dtype = a["dtype"] if func in (torch.cumprod, torch.Tensor.cumprod) else None
    if dtype is not None:
        local = local.to(dtype)
    if func in (torch.cumprod, torch.Tensor.cumprod):
        scanned = local.cumprod(sd)
        total = local.prod(sd, keepdim=True)  # an empty shard multiplies by one
        prefix = _earlier_totals(total, mesh.get_group(), world, rank)[:rank].prod(0)
        return wrap_shard(scanned * prefix, mesh, sd, x.shape)
    scanned = local.logcumsumexp(sd)
    total = local.logsumexp(sd, keepdim=True)  # an empty shard adds -inf
    prefix = _earlier_totals(total, mesh.get_group(), world, rank)[:rank].logsumexp(0)
    return wrap_shard(torch.logaddexp(scanned, prefix), mesh, sd, x.shape)
