"""``F.multi_head_attention_forward`` (so ``nn.MultiheadAttention``) over token-sharded queries.

The projections run on the local rows (a Linear never mixes tokens), the attention core is
:func:`credit_dtensor.ops.attention.scaled_dot_product_attention`'s (Ulysses all-to-all when the
keys are sharded too, row-local when they are plain or ``Replicate``), and the output projection
runs locally; ``need_weights=True`` returns the weights sharded on their query dim. Refused with a
clear error: ``dropout_p > 0`` in training, ``bias_k``/``bias_v``, ``add_zero_attn``,
``static_k``/``static_v``, and masks sharded over ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from ..dtensor import full_operand, wrap_shard
from ..errors import MeshMismatchError, UnsupportedShardingError
from ..geometry import chunk_offsets
from .attention import (
    _check_like_torch,
    _check_local_rows,
    _check_mask,
    _dropout_error,
    _kind,
    _token_sharded,
)
from .family import Signature, family
from .refuse import refuse
from .ulysses import _row_attention, _unit_attention

FAMILY = family("attention_mha", "nn.MultiheadAttention / F.multi_head_attention_forward over H tokens")

__all__ = ["multi_head_attention_forward"]


_MHA_ARGS = (
    "query",
    "key",
    "value",
    "embed_dim_to_check",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
    "dropout_p",
    "out_proj_weight",
    "out_proj_bias",
    "training",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "use_separate_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "static_k",
    "static_v",
    "average_attn_weights",
    "is_causal",
)
_MHA_DEFAULTS = {
    "training": True,
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "use_separate_proj_weight": False,
    "q_proj_weight": None,
    "k_proj_weight": None,
    "v_proj_weight": None,
    "static_k": None,
    "static_v": None,
    "average_attn_weights": True,
    "is_causal": False,
}


def _param(t: Any, mesh: DeviceMesh, where: str, name: str) -> Any:
    if t is None:
        return None
    if isinstance(t, DTensor):
        if t.device_mesh != mesh:
            raise MeshMismatchError(
                f"{where}: {name} lives on mesh {t.device_mesh} but the query on {mesh}: "
                "convert the module with the manager that shards its input"
            )
        if not all(isinstance(p, Replicate) for p in t.placements):
            raise UnsupportedShardingError(f"{where}: {name} must be Replicate (or a plain tensor), got {t.placements}")
    return full_operand(t, mesh)


def _canonical(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = masked out) as an additive float mask, as ``F._canonical_mask`` does."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _project(q, k, v, a: dict, mesh: DeviceMesh, where: str, same_qkv: bool, same_kv: bool):
    """The in-projection on local token rows (a Linear never mixes tokens), as torch packs it."""
    e = a["embed_dim_to_check"]
    b = _param(a["in_proj_bias"], mesh, where, "in_proj_bias")
    bq = bk = bv = None
    if b is not None:
        bq, bk, bv = b.chunk(3)
    if a["use_separate_proj_weight"]:
        wq = _param(a["q_proj_weight"], mesh, where, "q_proj_weight")
        wk = _param(a["k_proj_weight"], mesh, where, "k_proj_weight")
        wv = _param(a["v_proj_weight"], mesh, where, "v_proj_weight")
        return F.linear(q, wq, bq), F.linear(k, wk, bk), F.linear(v, wv, bv)
    w = _param(a["in_proj_weight"], mesh, where, "in_proj_weight")
    if same_qkv:
        proj = F.linear(q, w, b).unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        return proj[0], proj[1], proj[2]
    wq, wkv = w.split([e, 2 * e])
    bkv = None if b is None else b[e:]
    qp = F.linear(q, wq, bq)
    if same_kv:
        kv = F.linear(k, wkv, bkv).unflatten(-1, (2, e)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        return qp, kv[0], kv[1]
    wk, wv = wkv.chunk(2)
    return qp, F.linear(k, wk, bk), F.linear(v, wv, bv)


def multi_head_attention_forward(**a: Any) -> tuple[DTensor, DTensor | None]:
    """``F.multi_head_attention_forward`` with ``query`` sharded on its token dim (dim 0), exact."""
    func = F.multi_head_attention_forward
    where = "F.multi_head_attention_forward"
    query, key, value = a["query"], a["key"], a["value"]
    mesh = query.device_mesh
    for opt, bad in (
        ("bias_k", a["bias_k"] is not None),
        ("bias_v", a["bias_v"] is not None),
        ("add_zero_attn", bool(a["add_zero_attn"])),
        ("static_k", a["static_k"] is not None),
        ("static_v", a["static_v"] is not None),
    ):
        if bad:
            raise refuse(
                func,
                f"option {opt} is not supported over tokens that span shards (it appends a key/value token "
                "outside every shard)",
                f"build nn.MultiheadAttention without {'add_bias_kv' if opt.startswith('bias') else opt}, or "
                "attend within windows inside one shard (credit_dtensor.shard_local)",
            )
    if a["training"] and a["dropout_p"] > 0.0:
        raise _dropout_error(func, a["dropout_p"])
    kk = _kind(key, 3 if key.ndim == 3 else 2, mesh, where, "key")
    vk = _kind(value, 3 if value.ndim == 3 else 2, mesh, where, "value")
    if kk != vk:
        raise UnsupportedShardingError(
            f"{where}: key is {kk} and value is {vk} across the domain ranks; shard both on their token dim "
            "or pass both plain/Replicate"
        )
    for name in ("attn_mask", "key_padding_mask"):
        _check_mask(a[name], mesh, where, name, allow_token_shard=False)
    names = [n for n in _MHA_ARGS if n not in _MHA_DEFAULTS]
    meta = _check_like_torch(func, [a[n] for n in names], {n: a[n] for n in _MHA_DEFAULTS})
    batched = query.ndim == 3
    world, rank = mesh.size(), mesh.get_local_rank()
    e, h = a["embed_dim_to_check"], a["num_heads"]
    hd = e // h
    L, S = query.shape[0], key.shape[0]
    n = query.shape[1] if batched else 1
    q_l = query.to_local()
    _check_local_rows(q_l, 0, L, world, rank, where)
    sharded = kk == "sharded"
    if sharded:
        k_l, v_l = key.to_local(), value.to_local()
        _check_local_rows(k_l, 0, S, world, rank, where)
        if value is key:
            v_l = k_l
    else:
        k_l = full_operand(key, mesh)
        v_l = k_l if value is key else full_operand(value, mesh)
    if not batched:
        q_l, k_l, v_l = q_l.unsqueeze(1), k_l.unsqueeze(1), v_l.unsqueeze(1)
    qp, kp, vp = _project(q_l, k_l, v_l, a, mesh, where, query is key and key is value, key is value)
    # masks as torch merges them: additive, broadcast to (N, H, L, S)
    kpm = a["key_padding_mask"]
    attn_mask, need_weights = a["attn_mask"], bool(a["need_weights"])
    causal = bool(a["is_causal"]) and kpm is None and not need_weights
    mask = None
    if not causal:
        if attn_mask is not None:
            m = _canonical(full_operand(attn_mask, mesh), qp.dtype)
            mask = m.view(1, 1, L, S) if m.ndim == 2 else m.view(n, h, L, S)
        if kpm is not None:
            kp_m = _canonical(full_operand(kpm, mesh), qp.dtype).view(n, 1, 1, S)
            mask = kp_m if mask is None else mask + kp_m
    lq, ls = q_l.shape[0], k_l.shape[0]
    qh = qp.reshape(lq, n, h, hd).permute(1, 2, 0, 3)
    kh = kp.reshape(ls, n, h, hd).permute(1, 2, 0, 3)
    vh = vp.reshape(ls, n, h, hd).permute(1, 2, 0, 3)
    if sharded:
        out, w = _unit_attention(
            qh, kh, vh, mask, mesh, (n, h, L, hd), (n, h, S, hd), (n, h, S, hd), causal, None, need_weights
        )
    else:
        row0 = chunk_offsets(L, world)[rank]
        if mask is not None and mask.shape[-2] != 1:
            mask = mask.narrow(-2, row0, lq)
        out, w = _row_attention(qh, kh, vh, mask, row0, causal, None, need_weights, False)
    out = out.permute(2, 0, 1, 3).reshape(lq, n, e)
    out = F.linear(
        out,
        _param(a["out_proj_weight"], mesh, where, "out_proj_weight"),
        _param(a["out_proj_bias"], mesh, where, "out_proj_bias"),
    )
    if not batched:
        out = out.squeeze(1)
    out_shape = (L, n, out.shape[-1]) if batched else (L, out.shape[-1])
    if meta is not None and tuple(meta[0].shape) != out_shape:
        raise AssertionError(f"{where}: sharded output shape {out_shape} != PyTorch's {tuple(meta[0].shape)}")
    result = wrap_shard(out, mesh, 0, out_shape)
    if not need_weights:
        return result, None
    if a["average_attn_weights"]:
        w = w.mean(dim=1)
    if not batched:
        w = w.squeeze(0)
    w_shape = list(w.shape)
    w_dim = w.ndim - 2
    w_shape[w_dim] = L
    return result, wrap_shard(w, mesh, w_dim, w_shape)


@FAMILY.rule(F.multi_head_attention_forward, h="relayout", signature=Signature(_MHA_ARGS, _MHA_DEFAULTS))
def _mha_rule(func, a):
    q = a["query"]
    if not isinstance(q, DTensor) or q.ndim not in (2, 3) or not _token_sharded(q, 0):
        return NotImplemented
    return multi_head_attention_forward(**a)
