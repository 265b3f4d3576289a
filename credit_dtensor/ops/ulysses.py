"""The all-to-all (Ulysses) core of attention over sharded tokens: tokens -> head/batch units and
back as opaque custom-op rules, the attention of each rank's units, and the row-local attention
against full keys. Split out of :mod:`.attention` (the public rules) and shared with
:mod:`.attention_mha`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from .. import comm, stats
from ..geometry import chunk_offsets, chunk_sizes
from . import _groups, opaque

__all__ = ["unit_sizes"]

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
        shapes = [[(self.n, g, sizes[r], w) for g, sizes, _, w in specs] for r in range(self.world)]
        return self._swap(tensors, sends, shapes, group, 2)

    def to_tokens(self, tensors: Sequence[torch.Tensor], which: Sequence[str], group: str) -> list[torch.Tensor]:
        """Adjoint of :meth:`to_units`: ``(n, G, T, W)`` -> ``(P, G, T_me, W)``."""
        if not tensors:
            return []
        specs = [self.spec(w) for w in which]
        sends = [
            [t[:, :, offs[r] : offs[r + 1]] for t, (_, _, offs, _) in zip(tensors, specs)] for r in range(self.world)
        ]
        shapes = [[(self.units[s], g, sizes[self.rank], w) for g, sizes, _, w in specs] for s in range(self.world)]
        return self._swap(tensors, sends, shapes, group, 0)

    def _swap(self, tensors, sends, shapes, group: str, cat_dim: int) -> list[torch.Tensor]:
        """One all-to-all of ``sends``; the flat piece from rank ``r`` holds one block per tensor, of
        shape ``shapes[r][i]``; the blocks of each tensor are concatenated along ``cat_dim``."""
        recv = [sum(math.prod(shape) for shape in shapes[r]) for r in range(self.world)]
        ref = tensors[0]
        with stats.op_label(LABEL):
            got = comm.all_to_all(sends, recv, _groups.resolve(group), dtype=ref.dtype, device=ref.device)
        out: list[list[torch.Tensor]] = [[] for _ in tensors]
        for r, flat in enumerate(got):
            pos = 0
            for i, shape in enumerate(shapes[r]):
                numel = math.prod(shape)
                out[i].append(flat[pos : pos + numel].view(shape))
                pos += numel
        return [torch.cat(parts, cat_dim) for parts in out]

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
