"""Exact attention over tokens sharded across the domain ranks, without gathering activations.

``F.scaled_dot_product_attention(q, k, v)`` with ``q``, ``k``, ``v`` sharded on their token dim
(dim -2 of ``(*batch, heads, tokens, E)``; tokens may be H, or H*W flattened) needs every key
for every query. DTensor all-gathers them. Here the exchange is DeepSpeed-Ulysses style:

1. the leading dims are cut into *units* (one unit = one batch entry x one key/value head, with
   its ``G`` query heads under grouped-query attention), ``P = prod(k.shape[:-2])`` of them,
   split over the ranks in balanced contiguous blocks (``P // N`` or one more; with fewer units
   than ranks some ranks get none and only pass data through);
2. one all-to-all moves from token-sharding to unit-sharding: each rank receives *all* tokens of
   q, k and v for its units (one collective for the three);
3. the rank runs PyTorch's own attention on its units (masks, ``is_causal``, ``scale``, GQA mean
   what they mean on one device, since each unit sees every token);
4. one all-to-all moves the output back to token-sharding (``torch.chunk`` of the tokens, the
   placement DTensor expects).

The two exchanges are pure data movement, each an opaque custom op (:mod:`.opaque`) whose backward
is the other one; the attention between them is PyTorch's own under ordinary autograd (its fused
kernels, its backward, nothing recomputed). So backward moves the output gradient to units and
``dq``, ``dk``, ``dv`` back in one all-to-all. Each rank sends about ``(1 - 1/N)`` of its own share
of q, k, v and out per direction and holds ``O(P/N * tokens * E)``: memory per rank
``O(activation / N)`` when there are at least ``N`` units (with fewer, ranks without a unit hold
nothing and the others hold whole units: ring attention, not implemented, would split the tokens
of one unit too). ``torch.compile(fullgraph=True)`` sees two opaque nodes around the attention.

Key/value that are *not* sharded (a plain or ``Replicate`` context) need no communication: each
rank attends from its own query rows (``is_causal`` uses the rows' global offset), and their
gradient comes back ``Partial`` (exact).

``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, :mod:`.attention_mha`) over
token-sharded queries runs its projections on the local rows (a Linear never mixes tokens), the
core above, and the output projection locally; ``need_weights=True`` returns the weights sharded on their query dim.
Refused with a clear error: ``dropout_p > 0`` (the dropout mask comes from one RNG stream over the
whole score matrix on one device), ``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``,
and masks sharded over ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from ..dtensor import align_operand, domain_shard_dim, full_operand, wrap_shard
from ..errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from ..geometry import chunk_offsets, chunk_sizes
from .family import Signature, family
from .refuse import refuse
from .ulysses import _row_attention, _unit_attention, unit_sizes

FAMILY = family("attention", "scaled_dot_product_attention over H tokens: Ulysses all-to-all (heads to ranks)")

__all__ = ["scaled_dot_product_attention", "unit_sizes"]

# ---------------------------------------------------------------------------------------------
# DTensor side: checks, then local tensors through the all-to-all rules of .ulysses
# ---------------------------------------------------------------------------------------------


def _kind(t: Any, token_dim_from_end: int, mesh: DeviceMesh, where: str, name: str) -> str:
    """``"sharded"`` (on its token dim), ``"full"`` (plain tensor / Replicate) or ``"none"``."""
    if t is None:
        return "none"
    if not isinstance(t, DTensor):
        return "full"
    if t.device_mesh != mesh:
        raise MeshMismatchError(
            f"{where}: {name} lives on mesh {t.device_mesh} but the query on {mesh}: shard every operand "
            "with the same manager"
        )
    d = domain_shard_dim(t)
    if d is not None and d % t.ndim == t.ndim - token_dim_from_end:
        return "sharded"
    if all(isinstance(p, Replicate) for p in t.placements):
        return "full"
    raise UnsupportedShardingError(
        f"{where}: {name} has placements {t.placements} (shape {tuple(t.shape)}) while the query is sharded on "
        "its token dim; shard key and value on their token dim too (or pass them plain/Replicate)"
    )


def _check_mask(t: Any, mesh: DeviceMesh, where: str, name: str, allow_token_shard: bool) -> None:
    """Masks are plain tensors or Replicate DTensors (or, next to full keys, sharded like the query)."""
    if not isinstance(t, DTensor):
        return
    if t.device_mesh != mesh:
        raise MeshMismatchError(
            f"{where}: {name} lives on mesh {t.device_mesh} but the query on {mesh}: "
            "use the same manager for every operand"
        )
    d = domain_shard_dim(t)
    if all(isinstance(p, Replicate) for p in t.placements) or (
        allow_token_shard and d is not None and d % t.ndim == t.ndim - 2
    ):
        return
    raise UnsupportedShardingError(
        f"{where}: {name} has placements {t.placements}; every rank needs the whole mask for the heads it "
        "attends: pass it as a plain tensor or a Replicate DTensor"
    )


def _meta(t: Any) -> Any:
    return torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t


def _meta_key(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), a.dtype)
    hash(a)  # a non-hashable argument: no key, no cache
    return a


_CHECKED: dict[tuple, Any] = {}


def _check_like_torch(func, args: Sequence[Any], kwargs: dict) -> Any:
    """Run PyTorch's own function on meta tensors of the global shapes: its errors, on every rank
    alike, and the global output shapes (skipped while compiling). A passing check is remembered by
    the arguments' shapes, dtypes and other values: the meta kernels of attention run PyTorch's
    Python decompositions, several milliseconds per call, and a model repeats the same shapes."""
    if torch.compiler.is_compiling():
        return None
    try:
        key = (func, tuple(_meta_key(a) for a in args), tuple((k, _meta_key(v)) for k, v in kwargs.items()))
    except TypeError:
        key = None
    hit = _CHECKED.get(key) if key is not None else None
    if hit is None:
        hit = func(*[_meta(a) for a in args], **{k: _meta(v) for k, v in kwargs.items()})
        if key is not None:
            if len(_CHECKED) >= 1024:
                _CHECKED.clear()
            _CHECKED[key] = hit
    return hit


def _check_local_rows(local: torch.Tensor, dim: int, n: int, world: int, rank: int, where: str) -> None:
    if local.shape[dim] != chunk_sizes(n, world)[rank]:
        raise DomainParallelError(
            f"{where}: rank {rank} holds {local.shape[dim]} of {n} tokens, not the torch.chunk share "
            f"{chunk_sizes(n, world)[rank]} that Shard placements mean; re-shard with credit_dtensor.shard_tensor"
        )


def _dropout_error(func, p: float) -> UnsupportedShardingError:
    return refuse(
        func,
        f"dropout_p={p} over tokens that span shards: on one device the dropout mask is drawn from one RNG "
        "stream over the whole score matrix, which the ranks cannot reproduce, so the result would differ",
        "use dropout_p=0.0 for attention over sharded tokens (e.g. dropout on the attention output instead), "
        "or attend within windows inside one shard (credit_dtensor.shard_local)",
    )


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> DTensor:
    """``F.scaled_dot_product_attention`` with ``query`` sharded on its token dim (dim -2), exact."""
    func = F.scaled_dot_product_attention
    where = "F.scaled_dot_product_attention"
    mesh = query.device_mesh
    if dropout_p > 0.0:
        raise _dropout_error(func, dropout_p)
    kk = _kind(key, 2, mesh, where, "key")
    vk = _kind(value, 2, mesh, where, "value")
    if kk != vk:
        raise UnsupportedShardingError(
            f"{where}: key is {kk} and value is {vk} across the domain ranks; shard both on their token dim "
            "or pass both plain/Replicate"
        )
    _check_mask(attn_mask, mesh, where, "attn_mask", allow_token_shard=kk == "full")
    out_meta = _check_like_torch(
        func,
        (query, key, value),
        {"attn_mask": attn_mask, "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa},
    )
    tdim = query.ndim - 2
    world, rank = mesh.size(), mesh.get_local_rank()
    q_l = query.to_local()
    _check_local_rows(q_l, tdim, query.shape[tdim], world, rank, where)
    out_shape = (*query.shape[:-1], value.shape[-1])
    if out_meta is not None and tuple(out_meta.shape) != out_shape:
        raise UnsupportedShardingError(
            f"{where}: broadcasting between query {tuple(query.shape)}, key {tuple(key.shape)}, value "
            f"{tuple(value.shape)} and attn_mask is not supported over sharded tokens; give them equal batch dims"
        )
    if kk == "sharded":
        k_lead, q_lead = tuple(key.shape[:-2]), tuple(query.shape[:-2])
        grouped = (
            enable_gqa
            and len(k_lead) == len(q_lead) > 0
            and k_lead[:-1] == q_lead[:-1]
            and k_lead[-1] > 0
            and q_lead[-1] % k_lead[-1] == 0
        )
        if (k_lead != q_lead and not grouped) or tuple(value.shape[:-1]) != tuple(key.shape[:-1]):
            raise UnsupportedShardingError(
                f"{where}: query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must "
                "have equal batch dims (heads: equal, or grouped with enable_gqa) over sharded tokens"
            )
        k_l, v_l = key.to_local(), value.to_local()
        _check_local_rows(k_l, key.ndim - 2, key.shape[-2], world, rank, where)
        mask = full_operand(attn_mask, mesh) if attn_mask is not None else None
        if mask is not None and mask.ndim > query.ndim:
            raise UnsupportedShardingError(f"{where}: attn_mask has more dims than the query")
        out, _ = _unit_attention(
            q_l, k_l, v_l, mask, mesh, query.shape, key.shape, value.shape, is_causal, scale, weights=False
        )
    else:
        k_l, v_l = full_operand(key, mesh), full_operand(value, mesh)
        mask = None
        if attn_mask is not None:
            mask = align_operand(attn_mask, query, tdim, max(query.ndim, attn_mask.ndim), where)
        row0 = chunk_offsets(query.shape[tdim], world)[rank]
        out, _ = _row_attention(q_l, k_l, v_l, mask, row0, is_causal, scale, False, enable_gqa)
    return wrap_shard(out, mesh, tdim, out_shape)


_SDPA_ARGS = Signature(
    ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
)


def _token_sharded(t: Any, token_dim: int) -> bool:
    d = domain_shard_dim(t)
    return d is not None and d % t.ndim == token_dim % t.ndim


def _batch_sharded_attention(a: dict) -> Any:
    """q, k, v sharded alike on a leading (batch, head or group) dim: every rank attends within its
    own batches, PyTorch's own attention on the local tensors (DTensor's decomposition mis-views
    non-contiguous locals). ``None`` when the operands are not laid out like that."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    d = domain_shard_dim(q)
    if d is None or d >= q.ndim - 2:
        return None
    for t in (k, v):
        if not isinstance(t, DTensor) or domain_shard_dim(t) is None:
            return None
        if t.ndim - domain_shard_dim(t) != q.ndim - d or t.shape[domain_shard_dim(t)] != q.shape[d]:
            return None
    if a["dropout_p"]:
        return None
    lm = None
    if mask is not None:
        lm = align_operand(mask, q, d, max(q.ndim, mask.ndim), "scaled_dot_product_attention")
    kw = {"attn_mask": lm, "is_causal": a["is_causal"], "scale": a["scale"]}
    if a["enable_gqa"]:
        kw["enable_gqa"] = True
    out = F.scaled_dot_product_attention(q.to_local(), k.to_local(), v.to_local(), **kw)
    shape = list(q.shape[:-1]) + [v.shape[-1]]
    return wrap_shard(out, q.device_mesh, d, shape)


@FAMILY.rule(F.scaled_dot_product_attention, h="relayout", signature=_SDPA_ARGS)
def _sdpa_rule(func, a):
    q = a["query"]
    if not isinstance(q, DTensor) or q.ndim < 2:
        return NotImplemented
    if not _token_sharded(q, -2):
        out = _batch_sharded_attention(a)
        return NotImplemented if out is None else out
    return scaled_dot_product_attention(**a)
