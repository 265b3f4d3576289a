"""Ops along one dim that is not the sharded one (softmax, cumprod, sort ... over channels or W):
local rows; (log-)softmax / softmin along the sharded dim from per-row statistics over the ranks.
Split out of :mod:`.pointwise` and registered with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..dtensor import domain_shard_dim, wrap_shard
from .family import Signature, family
from .pointwise import local_apply

FAMILY = family("dimwise", "softmax, cumprod, sort ... along one dim: local along other dims, softmax over H exact")

__all__ = ["DIMWISE"]


# --- ops along one dim that is not the sharded one ------------------------------------------------------

#: ops along one dim: local along any dim but the sharded one
DIMWISE: tuple[Callable, ...] = (
    F.softmax,
    F.log_softmax,
    F.softmin,
    F.normalize,
    F.glu,
    torch.softmax,
    torch.log_softmax,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    torch.cumprod,
    torch.Tensor.cumprod,
    torch.logcumsumexp,
    torch.Tensor.logcumsumexp,
    torch.cummax,
    torch.cummin,
    torch.sort,
    torch.Tensor.sort,
    torch.argsort,
    torch.Tensor.argsort,
)
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}
#: the ones exact along the sharded dim (from per-row statistics)
_SOFTMAXES = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, F.softmin, *_LOG_SOFTMAX})


def _signature(func: Callable) -> Signature:
    """``F.*`` from their own signatures (``F.softmax(input, dim, _stacklevel, dtype)``); the torch
    and Tensor forms take ``(input, dim, dtype)`` (softmaxes) or ``(input, dim, ...)``."""
    if getattr(func, "__module__", "") == "torch.nn.functional":
        return Signature.of(func, strict=False)
    return Signature(("input", "dim", "dtype") if func in _SOFTMAXES else ("input", "dim"), {"dtype": None})


def _dimwise_rule(func, a):
    args, kwargs = a.args, a.kwargs
    x, dim = a.get("input"), a.get("dim")
    sd = domain_shard_dim(x)
    if sd is None or any(isinstance(v, DTensor) for v in (*args[1:], *kwargs.values())):
        return NotImplemented
    if not isinstance(dim, int):
        return NotImplemented  # implicit-dim softmax (deprecated) or named dims: PyTorch's own path
    if dim % x.ndim == sd:
        if func in _SOFTMAXES:
            return _softmax_over_shards(func, x, sd, a.get("dtype"))
        return NotImplemented  # along the sharded dim: another rule, or the gather guard
    try:
        return local_apply(func, args, kwargs, x, sd)
    except ValueError:
        return NotImplemented


_SIGNATURES = {f: _signature(f) for f in DIMWISE}
FAMILY.rule(_SOFTMAXES, h="stats", note="along H from per-row statistics over the ranks", signature=_SIGNATURES)(
    _dimwise_rule
)
FAMILY.rule(
    [f for f in DIMWISE if f not in _SOFTMAXES], h="gathers", note="local along other dims", signature=_SIGNATURES
)(_dimwise_rule)
FAMILY.unsupported(torch.topk, torch.Tensor.topk, note="along H")


def _softmax_over_shards(func: Callable, x: DTensor, sd: int, dtype: Any) -> DTensor:
    """(log-)softmax / softmin along the sharded dim (attention over tokens that span the ranks, e.g.
    linear attention's ``k.softmax(dim=-1)``): the global max (one all-reduce, no gradient: it cancels)
    and the global sum of ``exp`` (one all-reduce whose backward sums the per-rank gradients) of
    each row; only those per-row statistics cross ranks, never the activation."""
    from ..comm import all_reduce, sum_over_ranks
    from ..dtensor import _SumGradOverRanks

    mesh = x.device_mesh
    group = mesh.get_group()
    local = x.to_local()
    if dtype is not None:
        local = local.to(dtype)
    if func is F.softmin:
        local = -local
    acc = torch.float32 if local.dtype in (torch.float16, torch.bfloat16) else local.dtype
    z = local.to(acc)
    part = (
        z.detach().amax(sd, keepdim=True)
        if z.shape[sd]
        else z.new_full([*z.shape[:sd], 1, *z.shape[sd + 1 :]], -torch.inf)
    )
    m = all_reduce(part, group, "max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    total = sum_over_ranks(e.sum(sd, keepdim=True), group)
    if mesh.size() > 1:
        total = _SumGradOverRanks.apply(total, group)  # used by each rank's rows: gradients summed
    out = (z - m) - torch.log(total) if func in _LOG_SOFTMAX else e / total
    return wrap_shard(out.to(local.dtype), mesh, sd, x.shape)


# --- triangles of the last two dims -------------------------------------------------------------------


@FAMILY.rule(
    torch.tril,
    torch.triu,
    torch.Tensor.tril,
    torch.Tensor.triu,
    h="local",
    note="each rank's rows, the diagonal shifted by the rows' global offset",
    signature=Signature(("input", "diagonal"), {"diagonal": 0}),
)
def _triangle_rule(func: Any, a: Any) -> Any:
    """``tril``/``triu`` keep ``(i, j)`` by ``j - i`` against ``diagonal``: on a shard of the row dim
    (or the column dim) starting at global row (column) ``o``, the same with ``diagonal + o``
    (``diagonal - o``); sharded on a leading dim they are local as they are."""
    from ..geometry import chunk_range

    x, k = a.get("input"), a["diagonal"]
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(k, int) or x.ndim < 2 or a.get("out") is not None:
        return NotImplemented
    if a.has_other(x):
        return NotImplemented
    mesh = x.device_mesh
    offset = chunk_range(x.shape[sd], mesh.size(), mesh.get_local_rank())[0]
    shift = offset if sd == x.ndim - 2 else (-offset if sd == x.ndim - 1 else 0)
    op = torch.tril if func in (torch.tril, torch.Tensor.tril) else torch.triu
    return local_apply(lambda t: op(t, k + shift), (x,), {}, x, sd)
