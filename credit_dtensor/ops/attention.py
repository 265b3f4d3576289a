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

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from .. import comm, stats
from ..dtensor import align_operand, domain_shard_dim, full_operand, wrap_shard
from ..errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from ..geometry import chunk_offsets, chunk_sizes
from ..intercept import register
from . import _groups, opaque
from .refuse import refuse

__all__ = ["scaled_dot_product_attention", "unit_sizes"]

LABEL = "attention"


def unit_sizes(units: int, world: int) -> list[int]:
    """Balanced contiguous split of ``units`` (batch x key/value heads) over ``world`` ranks."""
    base, extra = divmod(units, world)
    return [base + (r < extra) for r in range(world)]


def _offsets(sizes: Sequence[int]) -> list[int]:
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    return offs


# ---------------------------------------------------------------------------------------------
# Geometry and the two all-to-alls (local tensors)
# ---------------------------------------------------------------------------------------------


class _Geometry:
    """One call's global shapes, split over ``world`` ranks, from the rule key's primitives."""

    def __init__(self, q_shape, k_shape, v_shape, world: int, rank: int) -> None:
        self.q_shape, self.k_shape, self.v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
        self.world, self.rank = world, rank
        self.lead = self.q_shape[:-2]
        self.L, self.E = self.q_shape[-2], self.q_shape[-1]
        self.S, self.Ev = self.k_shape[-2], self.v_shape[-1]
        self.P = math.prod(self.k_shape[:-2])
        self.G = math.prod(self.lead) // max(self.P, 1) if self.P else 1
        self.units = unit_sizes(self.P, world)
        self.uoff = _offsets(self.units)
        self.n = self.units[rank]
        self.l_sizes, self.l_offs = chunk_sizes(self.L, world), chunk_offsets(self.L, world)
        self.s_sizes, self.s_offs = chunk_sizes(self.S, world), chunk_offsets(self.S, world)

    # token-space (P, G, T_me, W) <-> unit-space (n, G, T, W); one spec (G, sizes, offsets, W) per tensor
    def spec(self, which: str) -> tuple[int, list[int], list[int], int]:
        return {
            "q": (self.G, self.l_sizes, self.l_offs, self.E),
            "k": (1, self.s_sizes, self.s_offs, self.E),
            "v": (1, self.s_sizes, self.s_offs, self.Ev),
            "o": (self.G, self.l_sizes, self.l_offs, self.Ev),
            "w": (self.G, self.l_sizes, self.l_offs, self.S),
        }[which]

    def to_units(self, tensors: Sequence[torch.Tensor], which: Sequence[str], group: str) -> list[torch.Tensor]:
        """Token-sharded ``(P, G, T_me, W)`` -> this rank's units with every token ``(n, G, T, W)``."""
        if not tensors:
            return []
        specs = [self.spec(w) for w in which]
        sends = [[t[self.uoff[s] : self.uoff[s + 1]] for t in tensors] for s in range(self.world)]
        recv = [sum(self.n * g * sizes[r] * w for g, sizes, _, w in specs) for r in range(self.world)]
        ref = tensors[0]
        with stats.op_label(LABEL):
            got = comm.all_to_all(sends, recv, _groups.resolve(group), dtype=ref.dtype, device=ref.device)
        out: list[list[torch.Tensor]] = [[] for _ in tensors]
        for r, flat in enumerate(got):
            pos = 0
            for i, (g, sizes, _, w) in enumerate(specs):
                numel = self.n * g * sizes[r] * w
                out[i].append(flat[pos : pos + numel].view(self.n, g, sizes[r], w))
                pos += numel
        return [torch.cat(parts, 2) for parts in out]

    def to_tokens(self, tensors: Sequence[torch.Tensor], which: Sequence[str], group: str) -> list[torch.Tensor]:
        """Adjoint of :meth:`to_units`: ``(n, G, T, W)`` -> ``(P, G, T_me, W)``."""
        if not tensors:
            return []
        specs = [self.spec(w) for w in which]
        sends = [
            [t[:, :, offs[r] : offs[r + 1]] for t, (_, _, offs, _) in zip(tensors, specs)] for r in range(self.world)
        ]
        recv = [sum(self.units[s] * g * sizes[self.rank] * w for g, sizes, _, w in specs) for s in range(self.world)]
        ref = tensors[0]
        with stats.op_label(LABEL):
            got = comm.all_to_all(sends, recv, _groups.resolve(group), dtype=ref.dtype, device=ref.device)
        out: list[list[torch.Tensor]] = [[] for _ in tensors]
        for s, flat in enumerate(got):
            pos = 0
            for i, (g, sizes, _, w) in enumerate(specs):
                numel = self.units[s] * g * sizes[self.rank] * w
                out[i].append(flat[pos : pos + numel].view(self.units[s], g, sizes[self.rank], w))
                pos += numel
        return [torch.cat(parts, 0) for parts in out]

    def local_q_shape(self, width: int | None = None) -> tuple[int, ...]:
        return (*self.lead, self.l_sizes[self.rank], self.E if width is None else width)


def _mask_units(mask: torch.Tensor | None, lead: tuple[int, ...], g: int, u0: int, u1: int) -> torch.Tensor | None:
    """The part of a full mask (broadcastable to ``(*lead, L, S)``) that units ``[u0, u1)`` use, as
    ``(n, G, Lm, Sm)``; a mask without leading dims (or broadcast over them) is returned as is."""
    if mask is None or mask.ndim <= 2:
        return mask
    nl = len(lead)
    m = mask.reshape((1,) * (nl + 2 - mask.ndim) + tuple(mask.shape))
    mlead = m.shape[:nl]
    if all(s == 1 for s in mlead):
        return m.reshape(m.shape[-2:])
    rem = torch.arange(u0 * g, u1 * g, device=m.device)
    index: list[torch.Tensor] = []
    for d in reversed(range(nl)):
        index.append(rem % lead[d] if mlead[d] > 1 else torch.zeros_like(rem))
        rem = rem // lead[d]
    sel = m[tuple(reversed(index))]
    return sel.reshape(u1 - u0, g, *sel.shape[-2:])


def _attend(q, k, v, mask, is_causal: bool, scale: float | None, weights: bool):
    """PyTorch's attention on whole units: ``q (n, G, L, E)``, ``k``/``v (n, 1, S, E)``. With
    ``weights``: the explicit path of ``F.multi_head_attention_forward`` (``G == 1``), returning the
    softmax weights too."""
    if weights:
        qs = q * (math.sqrt(1.0 / q.shape[-1]) if scale is None else scale)
        s = qs @ k.transpose(-2, -1)
        if mask is not None:
            s = s + mask
        p = torch.softmax(s, dim=-1)
        return p @ v, p
    gqa = q.shape[1] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    ), None


class _ToUnitsRule:
    """Token-sharded local ``q``, ``k``, ``v`` -> this rank's units with every token (one all-to-all);
    backward sends the needed gradients back (the adjoint). Pure data movement: the attention
    between the two exchanges is PyTorch's own, under ordinary autograd."""

    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    differentiable_outputs = (0, 1, 2)

    def __init__(self, geo: _Geometry, group: str) -> None:
        self.geo, self.group = geo, group

    def _token_view(self, t: torch.Tensor, which: str) -> torch.Tensor:
        g, sizes, _, w = self.geo.spec(which)
        return t.reshape(self.geo.P, g, sizes[self.geo.rank], w)

    def _local(self, which: str) -> tuple[int, ...]:
        geo = self.geo
        if which == "q":
            return geo.local_q_shape()
        return (*geo.k_shape[:-2], geo.s_sizes[geo.rank], geo.E if which == "k" else geo.Ev)

    def _unit_shape(self, which: str) -> tuple[int, ...]:
        g, _, _, w = self.geo.spec(which)
        return (self.geo.n, g, self.geo.L if which == "q" else self.geo.S, w)

    def forward(self, inputs: list) -> list[torch.Tensor]:
        return self.geo.to_units([self._token_view(t, w) for t, w in zip(inputs, "qkv")], "qkv", self.group)

    def backward(self, saved: list, grads: list, needs: list) -> list:
        which = "".join(w for w, need in zip("qkv", needs) if need)
        back = [grads["qkv".index(w)] for w in which]
        back = [
            torch.zeros(self._unit_shape(w), dtype=self._dtype(grads), device=self._device(grads)) if g is None else g
            for g, w in zip(back, which)
        ]
        moved = dict(zip(which, self.geo.to_tokens(back, which, self.group)))
        return [moved[w].reshape(self._local(w)) if w in moved else None for w in "qkv"]

    @staticmethod
    def _dtype(grads: list) -> torch.dtype:
        return next(g for g in grads if g is not None).dtype

    @staticmethod
    def _device(grads: list) -> torch.device:
        return next(g for g in grads if g is not None).device

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        return [t.new_empty(self._unit_shape(w)) for t, w in zip(inputs, "qkv")]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        ref = next(g for g in grads if g is not None)
        return [ref.new_empty(self._local(w)) if need else None for w, need in zip("qkv", needs)]


class _ToTokensRule:
    """This rank's units ``(n, G, L, W)`` of the output (``"o"``) or of the softmax weights (``"w"``)
    -> token-sharded ``(*lead, L_me, W)``; backward is the adjoint. The weights have their own op, so
    their backward exchange runs only when they are used."""

    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    differentiable_outputs = (0,)

    def __init__(self, geo: _Geometry, group: str, which: str) -> None:
        self.geo, self.group, self.which = geo, group, which
        self.width = geo.spec(which)[3]

    def forward(self, inputs: list) -> list[torch.Tensor]:
        (t,) = self.geo.to_tokens([inputs[0]], self.which, self.group)
        return [t.reshape(self.geo.local_q_shape(self.width))]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        geo = self.geo
        g = grads[0].reshape(geo.P, geo.G, geo.l_sizes[geo.rank], self.width)
        return geo.to_units([g], self.which, self.group)

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        return [inputs[0].new_empty(self.geo.local_q_shape(self.width))]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        geo = self.geo
        return [grads[0].new_empty(geo.n, geo.G, geo.L, self.width)]


@opaque.builder("attn")
def _build_attention(kind, q_shape, k_shape, v_shape, world, rank, group):
    geo = _Geometry(q_shape, k_shape, v_shape, world, rank)
    if kind == "units":
        return _ToUnitsRule(geo, group)
    return _ToTokensRule(geo, group, kind)


def _group_name(mesh: DeviceMesh) -> str:
    """The domain group's name. While Dynamo traces, only read it: registering the group from traced
    code would be replayed after the graph with a fake stand-in of the group (the op's eager
    implementation then resolves the name through c10d)."""
    if torch.compiler.is_compiling():
        return mesh.get_group().group_name
    return _groups.name_of(mesh)


def _unit_attention(
    q, k, v, mask, mesh: DeviceMesh, q_shape, k_shape, v_shape, is_causal: bool, scale: float | None, weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-sharded local ``q``, ``k``, ``v`` (global shapes given), full ``mask``: the local
    output rows (and, with ``weights``, the local rows of the softmax weights)."""
    world, rank, group = mesh.size(), mesh.get_local_rank(), _group_name(mesh)
    geo_args = (tuple(q_shape), tuple(k_shape), tuple(v_shape), world, rank, group)
    qh, kh, vh = opaque.apply(opaque.make_key("attn", "units", *geo_args), [q, k, v])
    p = tuple(q_shape[:-2])
    g = math.prod(p) // max(math.prod(k_shape[:-2]), 1)
    units = unit_sizes(math.prod(k_shape[:-2]), world)
    u0 = sum(units[:rank])
    o, w = _attend(qh, kh, vh, _mask_units(mask, p, g, u0, u0 + units[rank]), is_causal, scale, weights)
    (out,) = opaque.apply(opaque.make_key("attn", "o", *geo_args), [o])
    if not weights:
        return out, None
    (w,) = opaque.apply(opaque.make_key("attn", "w", *geo_args), [w])
    return out, w


def _row_attention(q, k, v, mask, row0: int, is_causal: bool, scale: float | None, weights: bool, gqa: bool):
    """Local query rows (global offset ``row0``) against full keys/values: no communication."""
    if is_causal:  # torch's causal mask is top-left aligned: row i sees keys j <= i
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(row0)
    if weights:
        qs = q * (math.sqrt(1.0 / q.shape[-1]) if scale is None else scale)
        s = qs @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        p = torch.softmax(s, dim=-1)
        return p @ v, p
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa), None


# ---------------------------------------------------------------------------------------------
# DTensor side: checks, then local tensors through the rules above
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


def _check_like_torch(func, args: Sequence[Any], kwargs: dict) -> Any:
    """Run PyTorch's own function on meta tensors of the global shapes: its errors, on every rank
    alike, and the global output shapes (skipped while compiling)."""
    if torch.compiler.is_compiling():
        return None
    return func(*[_meta(a) for a in args], **{k: _meta(v) for k, v in kwargs.items()})


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


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _bind(names: Sequence[str], defaults: dict, args: tuple, kwargs: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


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


@register(F.scaled_dot_product_attention)
def _sdpa_rule(func, args, kwargs):
    a = _bind(_SDPA_ARGS, _SDPA_DEFAULTS, args, kwargs)
    q = a["query"]
    if not isinstance(q, DTensor) or q.ndim < 2:
        return NotImplemented
    if not _token_sharded(q, -2):
        out = _batch_sharded_attention(a)
        return NotImplemented if out is None else out
    return scaled_dot_product_attention(**a)
