"""Exact losses on H-sharded predictions and targets, through the functional API as users write it.

PyTorch's DTensor returns ``Partial(avg)`` for ``F.mse_loss`` (and friends) on ``Shard(H)``: the
average of per-rank means, wrong when shards differ, and its backward scales the gradient by the
number of ranks. Here each rank computes PyTorch's own *elementwise* loss (``reduction='none'``,
so every option -- ``beta``, ``delta``, ``pos_weight``, ``log_target``, ``eps``, ``full``,
``label_smoothing`` ... -- means exactly what it means on one device) on its rows, and only the
per-rank sums (and, for class-weighted means, the per-rank weight sums) cross ranks:
``mean = global sum / global denominator``. Operands may be sharded like the prediction, or full
(plain or ``Replicate``: each rank uses its rows, e.g. a latitude weight of shape ``(1, 1, H, 1)``).
Results are ``Replicate``; ``reduction='none'`` stays ``Shard(H)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .. import comm, stats
from ..dtensor import align_operand, domain_shard_dim, first_sharded, full_operand, wrap_replicate, wrap_shard
from ..errors import DomainParallelError, UnsupportedShardingError
from ..geometry import chunk_range
from .family import Signature, family

FAMILY = family("loss", "losses with mean/sum reductions over uneven shards: local sums, one all-reduce")

__all__ = ["ELEMENTWISE_LOSSES"]

#: loss -> the names of its tensor arguments that broadcast against the prediction
ELEMENTWISE_LOSSES: dict[Callable, tuple[str, ...]] = {
    F.mse_loss: ("input", "target", "weight"),
    F.l1_loss: ("input", "target", "weight"),
    F.smooth_l1_loss: ("input", "target"),
    F.huber_loss: ("input", "target", "weight"),
    F.binary_cross_entropy: ("input", "target", "weight"),
    F.binary_cross_entropy_with_logits: ("input", "target", "weight", "pos_weight"),
    F.kl_div: ("input", "target"),
    F.gaussian_nll_loss: ("input", "target", "var"),
    F.poisson_nll_loss: ("input", "target"),
    F.soft_margin_loss: ("input", "target"),
}


#: every loss's signature, bound once per call (:class:`.family.Signature`)
_SIGNATURES: dict[Callable, Signature] = {
    f: Signature.of(f) for f in (*ELEMENTWISE_LOSSES, F.cross_entropy, F.nll_loss)
}


def _reduction(a: dict[str, Any]) -> str:
    if a.get("size_average") is not None or a.get("reduce") is not None:
        from torch.nn import _reduction as legacy

        return legacy.legacy_get_string(a.get("size_average"), a.get("reduce"), emit_warning=False)
    return a.get("reduction", "mean")


def _total(t: torch.Tensor, ref: DTensor) -> torch.Tensor:
    with stats.op_label("loss"):
        return comm.sum_over_ranks(t, ref.device_mesh.get_group())


def _finish(
    local: torch.Tensor,
    reduction: str,
    ref: DTensor,
    out_dim: int,
    out_shape: tuple[int, ...],
    denominator: float | torch.Tensor,
    where: str,
) -> DTensor:
    if reduction == "none":
        return wrap_shard(local, ref.device_mesh, out_dim, out_shape)
    total = _total(local.sum(), ref)
    if reduction == "sum":
        return wrap_replicate(total, ref.device_mesh)
    if reduction in ("mean", "batchmean"):
        return wrap_replicate(total / denominator, ref.device_mesh)
    raise DomainParallelError(f"{where}: reduction={reduction!r} is not one of 'none', 'mean', 'sum'")


def _elementwise_rule(func, a):
    names = ELEMENTWISE_LOSSES[func]
    ref = first_sharded(*(a.get(n) for n in names))
    if ref is None:
        return NotImplemented
    where = f"F.{func.__name__}"
    reduction = _reduction(a)
    if func is F.gaussian_nll_loss and isinstance(a["var"], torch.Tensor):
        inp, var = a["input"], a["var"]
        if var.ndim == inp.ndim - 1 and tuple(var.shape) == tuple(inp.shape[:-1]):
            a["var"] = var.unsqueeze(-1)  # PyTorch's homoscedastic form: one variance per last-dim vector
    shapes = [tuple(a[n].shape) for n in names[:2] if isinstance(a.get(n), torch.Tensor)]
    out_shape = tuple(torch.broadcast_shapes(*shapes))
    if func is F.gaussian_nll_loss:
        out_shape = tuple(a["input"].shape)
    ref_dim = domain_shard_dim(ref)
    out_dim = len(out_shape) - ref.ndim + ref_dim
    for n in names:
        a[n] = align_operand(a.get(n), ref, ref_dim, len(out_shape), where)
    for legacy in ("size_average", "reduce"):
        a.pop(legacy, None)
    a["reduction"] = "none"
    local = func(**a)
    if reduction == "batchmean":
        return _finish(local, reduction, ref, out_dim, out_shape, out_shape[0] if out_shape else 1, where)
    return _finish(local, reduction, ref, out_dim, out_shape, math.prod(out_shape), where)


for _f in ELEMENTWISE_LOSSES:
    FAMILY.rule(_f, h="reduce", signature=_SIGNATURES[_f])(_elementwise_rule)


# --- cross entropy / nll (class dim = 1, spatial targets) -------------------------------------------------


def _align_target(t: Any, ref: DTensor, ref_dim: int, class_dim: int, where: str) -> torch.Tensor:
    """Class-index target (input without the class dim) as this rank's local target."""
    mesh = ref.device_mesh
    t_dim = ref_dim - 1 if ref_dim > class_dim else ref_dim
    n = ref.shape[ref_dim]
    if isinstance(t, DTensor):
        d = domain_shard_dim(t)
        if d is not None:
            if d != t_dim or t.shape[d] != n:
                raise UnsupportedShardingError(
                    f"{where}: target of shape {tuple(t.shape)} is sharded on dim {d}, but the input "
                    f"{tuple(ref.shape)} on dim {ref_dim}: shard the target on dim {t_dim} (its H)"
                )
            return t.to_local()
        t = t.to_local()
    if t.ndim <= t_dim or t.shape[t_dim] != n:
        raise DomainParallelError(
            f"{where}: target of shape {tuple(t.shape)} does not match the input {tuple(ref.shape)} along "
            f"the sharded dim: PyTorch rejects this too"
        )
    a, b = chunk_range(n, mesh.size(), mesh.get_local_rank())
    return t.narrow(t_dim, a, b - a)


@FAMILY.rule(F.cross_entropy, F.nll_loss, h="reduce", signature=_SIGNATURES)
def _class_rule(func, a):
    x, target = a["input"], a["target"]
    ref_dim = domain_shard_dim(x)
    if ref_dim is None:
        if first_sharded(target) is not None:
            raise UnsupportedShardingError(
                f"F.{func.__name__}: the target is H-sharded but the input is not: shard both with the same manager"
            )
        return NotImplemented
    where = f"F.{func.__name__}"
    class_dim = 0 if x.ndim == 1 else 1
    if ref_dim == class_dim:
        raise UnsupportedShardingError(f"{where}: the input is sharded on its class dim {class_dim}: shard H instead")
    reduction = _reduction(a)
    mesh = x.device_mesh
    weight = a.get("weight")
    a["weight"] = None if weight is None else full_operand(weight, mesh)
    prob = isinstance(target, torch.Tensor) and target.is_floating_point()
    if prob:
        a["target"] = align_operand(target, x, ref_dim, x.ndim, where)
    else:
        a["target"] = _align_target(target, x, ref_dim, class_dim, where)
    a["input"] = x.to_local()
    for legacy in ("size_average", "reduce"):
        a.pop(legacy, None)
    a["reduction"] = "none"
    local = func(**a)
    out_shape = tuple(s for d, s in enumerate(x.shape) if d != class_dim)
    out_dim = ref_dim - 1 if ref_dim > class_dim else ref_dim
    if reduction != "mean":
        return _finish(local, reduction, x, out_dim, out_shape, 1.0, where)
    if prob:
        denominator: float | torch.Tensor = math.prod(out_shape)
    else:
        t = a["target"]
        keep = t != a.get("ignore_index", -100)
        if a["weight"] is not None:
            w = a["weight"].gather(0, t.masked_fill(~keep, 0).flatten()).view(t.shape)
            part = torch.where(keep, w, torch.zeros_like(w)).sum()
        else:
            part = keep.sum().to(local.dtype)
        denominator = _total(part.to(local.dtype), x)
    return _finish(local, reduction, x, out_dim, out_shape, denominator, where)
