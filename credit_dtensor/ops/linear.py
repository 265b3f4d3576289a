"""``F.linear`` and ``matmul`` over a dim that is not the sharded one: local rows (or local
batches); everything else with a sharded operand goes to :func:`credit_dtensor.ops.einsum.matmul`.
Split out of :mod:`.pointwise` and registered with it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..dtensor import domain_shard_dim, full_operand, local_of, local_replicated, wrap_replicate
from .family import Signature, family
from .pointwise import wrap_outputs

FAMILY = family(
    "linear",
    "F.linear and matmul: local, or over H with partial sums / re-layout; nn.Linear and shard-local modules",
    nn="credit_dtensor.nn.local",
)

__all__ = ["off_features", "row_parallel"]


# --- linear algebra over a dim that is not the sharded one ---------------------------------------------------


def _replicated_local(t: Any, mesh: Any) -> Any:
    """A weight/bias operand as its local value (DTensor: Replicate only, gradient ``Partial``)."""
    if isinstance(t, DTensor):
        if domain_shard_dim(t) is not None or t.device_mesh != mesh:
            raise ValueError("not a replicated operand")
        return local_replicated(t)
    return full_operand(t, mesh) if isinstance(t, torch.Tensor) else t


def off_features(x: DTensor) -> DTensor | None:
    """``x``, sharded on its last dim (the features a Linear contracts: channels after heads), moved
    onto the largest other dim of at least ``world`` entries (one all-to-all); ``None`` without one
    (a dense head on flattened features: :func:`row_parallel`)."""
    from .relayout import best_free_dim, reshard

    world = x.device_mesh.size()
    k = best_free_dim(x.shape, [d for d in range(x.ndim - 1) if x.shape[d] >= world], world)
    return None if k is None else reshard(x, k)


def row_parallel(x: DTensor, weight: Any, bias: Any) -> Any:
    """``F.linear`` contracting the sharded features with nothing else to shard: each rank multiplies
    its features by its columns of the weight and the products are summed over the ranks once (an
    all-reduce of the output, the least any layout moves); the output is replicated. The weight's
    gradient is each rank's columns (``Partial``), the input's its own features."""
    from .einsum import einsum

    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return NotImplemented  # PyTorch's own error
    y = einsum("...k,nk->...n", [x, weight])
    if y is NotImplemented or bias is None:
        return y
    if isinstance(bias, DTensor):
        return y + bias
    # a plain bias next to the replicated output: every rank adds it in full, as every rank holds its
    # full gradient (DTensor would refuse the mix of a DTensor and a plain tensor)
    return wrap_replicate(local_of(y) + bias, y.device_mesh)


@FAMILY.rule(F.linear, h="local", signature=Signature(("input", "weight", "bias"), {"bias": None}))
def _linear_rule(func, a):
    """``F.linear`` over the last dim of a tensor sharded on another dim (tokens, rows): local rows.
    DTensor's own rule flattens the leading dims and refuses uneven shards."""
    x = a.get("input")
    sd = domain_shard_dim(x)
    if sd is None:
        return NotImplemented
    if sd == x.ndim - 1:  # contracting the sharded dim (channels after heads): move the shards to tokens
        moved = off_features(x)
        if moved is None:  # a dense head on flattened features (VGG's classifier): partial sums
            return row_parallel(x, a.get("weight"), a["bias"])
        x, sd = moved, domain_shard_dim(moved)
    w, b = a.get("weight"), a["bias"]
    try:
        wl, bl = _replicated_local(w, x.device_mesh), _replicated_local(b, x.device_mesh)
    except ValueError:
        return NotImplemented
    return wrap_outputs(F.linear(x.to_local(), wl, bl), x, lambda t: sd)


@FAMILY.rule(
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, h="reduce", signature=Signature(("input", "other"))
)
def _matmul_rule(func, bound):
    """``a @ b`` with ``a`` sharded on a batch or row dim and ``b`` replicated: local rows of ``a``;
    or both sharded on the same batch dim (window attention ``q @ k.transpose(-2, -1)`` with the
    windows sharded): local batches. DTensor's own rule flattens the batch dims and refuses uneven
    shards ("Cannot flatten unevenly sharded tensor"). Everything else with a sharded operand
    (keys from other shards, a contracted sharded dim): :func:`credit_dtensor.ops.einsum.matmul`."""
    a, b = bound.get("input"), bound.get("other")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or bound.get("out") is not None:
        return NotImplemented
    sd = domain_shard_dim(a)
    if sd is not None and a.ndim >= 2 and b.ndim >= 2 and sd < a.ndim - 1:
        sb = domain_shard_dim(b)
        if sb is not None:
            same_batch_dim = sd < a.ndim - 2 and sb < b.ndim - 2 and a.ndim - sd == b.ndim - sb
            if same_batch_dim and a.shape[sd] == b.shape[sb] and a.device_mesh == b.device_mesh:
                out = torch.matmul(a.to_local(), b.to_local())
                return wrap_outputs(out, a, lambda t: t.ndim - a.ndim + sd)
        else:
            try:
                bl = _replicated_local(b, a.device_mesh)
            except ValueError:
                bl = None
            if bl is not None:
                out = torch.matmul(a.to_local(), bl)
                return wrap_outputs(out, a, lambda t: t.ndim - a.ndim + sd)
    if domain_shard_dim(a) is None and domain_shard_dim(b) is None:
        return NotImplemented
    from .einsum import matmul

    return matmul(a, b)
