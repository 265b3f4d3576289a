"""Ops that re-chunk whole runs of rows between ranks: window-aligned layouts and reshapes
(:func:`repartition_local`), rows a rank reads but does not own (:func:`fetch_rows`), and
``Tensor.unfold`` (sliding windows) along the sharded dim. Split out of :mod:`.move`, which
re-exports the two functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import stats
from ..comm import exchange
from ..dtensor import domain_shard_dim, wrap_shard
from ..geometry import chunk_range
from ..geometry.window import repartition as repartition_plan
from ..halo import cached_plan, halo_gather, halo_scatter_add
from . import _groups, opaque
from ._rows import domain_info
from .family import family
from .pointwise import local_apply

FAMILY = family("move")

__all__ = ["fetch_rows", "repartition_local"]


def _with(shape: list[int], dim: int, n: int) -> list[int]:
    s = list(shape)
    s[dim] = n
    return s


# --- re-chunking: contiguous runs change owner (window-aligned layouts, reshapes) ---------------------


class _Repartition:
    """One rank's re-chunking along ``dim`` from ``in_units`` to ``out_units`` ownership (both
    ``world + 1`` offsets of the same total), as an opaque custom-op rule. Each run moves once, in
    one batched exchange; backward is the reverse re-chunking (a permutation's adjoint is its
    inverse). Pure geometry: :func:`credit_dtensor.geometry.window.repartition`."""

    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    differentiable_outputs = (0,)

    def __init__(self, dim: int, in_units: tuple, out_units: tuple, group: str, world: int, rank: int) -> None:
        self.dim, self.group, self.rank = dim, group, rank
        self.fwd = repartition_plan(in_units, out_units, rank)
        self.bwd = repartition_plan(out_units, in_units, rank)

    def _move(self, x: torch.Tensor, plan: Any) -> torch.Tensor:
        x = x.contiguous()
        sends = [(dst, x.narrow(self.dim, a, c)) for dst, a, c in plan.sends]
        shapes = [(s, _with(list(x.shape), self.dim, c)) for s, _, c in plan.pieces if s != self.rank]
        received = exchange(sends, shapes, _groups.resolve(self.group), dtype=x.dtype, device=x.device)
        pieces, k = [], 0
        for s, a, c in plan.pieces:
            if s == self.rank:
                pieces.append(x.narrow(self.dim, a, c))
            else:
                pieces.append(received[k])
                k += 1
        if not pieces:
            return x.new_zeros(_with(list(x.shape), self.dim, 0))
        return torch.cat(pieces, self.dim) if len(pieces) > 1 else pieces[0].clone()

    def forward(self, inputs: list) -> list[torch.Tensor]:
        with stats.op_label("reshape"):
            return [self._move(inputs[0], self.fwd)]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        if grads[0] is None:
            return [None]
        with stats.op_label("reshape"):
            return [self._move(grads[0], self.bwd)]

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        return [inputs[0].new_empty(_with(list(inputs[0].shape), self.dim, self.fwd.out_len))]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        return [grads[0].new_empty(_with(list(grads[0].shape), self.dim, self.fwd.in_len))]


@opaque.builder("repartition")
def _build_repartition(dim: int, in_units: tuple, out_units: tuple, group: str, world: int, rank: int) -> _Repartition:
    return _Repartition(dim, in_units, out_units, group, world, rank)


class _FetchRows:
    """Rank ``r`` receives global rows ``needs[r]`` (any rows, in any order) of a ``torch.chunk``-
    sharded tensor of ``n`` rows along ``dim`` (local tensors; one batched exchange, only rows owned
    elsewhere move); backward sends the gradient rows back and adds them."""

    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    differentiable_outputs = (0,)

    def __init__(self, dim: int, n: int, needs: tuple, group: str, world: int, rank: int) -> None:
        self.dim, self.group = dim, group
        self.plan = cached_plan(n, world, rank, needs)
        self.count = len(needs[rank])
        self.local_rows = chunk_range(n, world, rank)

    def forward(self, inputs: list) -> list[torch.Tensor]:
        with stats.op_label("assign"):
            ext = halo_gather(inputs[0].contiguous(), self.dim, self.plan, _groups.resolve(self.group))
        return [ext.clone() if ext is inputs[0] else ext]

    def backward(self, saved: list, grads: list, needs: list) -> list:
        with stats.op_label("assign"):
            return [halo_scatter_add(grads[0].contiguous(), self.dim, self.plan, _groups.resolve(self.group))]

    def fake_forward(self, inputs: list) -> list[torch.Tensor]:
        return [inputs[0].new_empty(_with(list(inputs[0].shape), self.dim, self.count))]

    def fake_backward(self, saved: list, grads: list, needs: list) -> list:
        a, b = self.local_rows
        return [grads[0].new_empty(_with(list(grads[0].shape), self.dim, b - a))]


@opaque.builder("fetch_rows")
def _build_fetch_rows(dim: int, n: int, needs: tuple, group: str, world: int, rank: int) -> _FetchRows:
    return _FetchRows(dim, n, needs, group, world, rank)


def fetch_rows(local: torch.Tensor, mesh: Any, dim: int, n: int, needs: Sequence[Sequence[int]]) -> torch.Tensor:
    """This rank's rows ``needs[rank]`` of a tensor sharded ``torch.chunk``-wise (``n`` rows along
    ``dim``; ``local`` is this rank's shard), gathered from their owners (differentiable; every rank
    of the mesh calls it with the same ``needs``)."""
    needs = tuple(tuple(int(r) for r in rows) for rows in needs)
    world, rank = mesh.size(), mesh.get_local_rank()
    key = opaque.make_key("fetch_rows", dim, n, needs, _groups.name_of(mesh), world, rank)
    return opaque.apply(key, [local])[0]


def repartition_local(
    local: torch.Tensor, mesh: Any, dim: int, in_units: Sequence[int], out_units: Sequence[int]
) -> torch.Tensor:
    """Re-chunk plain local tensors along ``dim``: rank ``r`` holds global rows
    ``[in_units[r], in_units[r+1])`` and gets ``[out_units[r], out_units[r+1])`` (differentiable,
    compile-friendly; every rank of the mesh must call it). Only rows that change owner move.
    Unlike :func:`row_map`, neither layout has to be ``torch.chunk`` (e.g. window-aligned rows)."""
    in_units, out_units = tuple(int(v) for v in in_units), tuple(int(v) for v in out_units)
    if in_units == out_units:
        return local
    world, rank = mesh.size(), mesh.get_local_rank()
    key = opaque.make_key("repartition", dim, in_units, out_units, _groups.name_of(mesh), world, rank)
    return opaque.apply(key, [local])[0]


# --- Tensor.unfold: sliding windows along a dim ----------------------------------------------------------------


@FAMILY.rule(torch.Tensor.unfold, h="halo")
def _unfold_rule(func, args, kwargs):
    """``x.unfold(dim, size, step)``: window ``i`` holds rows ``[i*step, i*step + size)`` and becomes
    a new last dim. Along the sharded dim each rank owns a ``torch.chunk`` slice of the windows and
    fetches the few rows its last windows reach into (a halo: ``size - step`` rows); along any other
    dim it is local (DTensor has no rule for it)."""
    x = args[0]
    names = ("dimension", "size", "step")
    vals = dict(zip(names, args[1:]))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    sd = domain_shard_dim(x)
    if sd is None or not all(isinstance(vals.get(k), int) for k in names):
        return NotImplemented
    dim, size, step = vals["dimension"] % max(x.ndim, 1), vals["size"], vals["step"]
    n = x.shape[dim]
    if size < 0 or step <= 0 or size > n:
        return NotImplemented  # PyTorch's own error
    if dim != sd:  # the windows overlap in memory: no DTensor stride describes them, so a copy
        return local_apply(lambda t, *a: t.unfold(*a).contiguous(), (x, dim, size, step), {}, x, sd)
    windows = (n - size) // step + 1
    mesh, _, world, rank = domain_info(x)
    needs = []
    for r in range(world):
        w0, w1 = chunk_range(windows, world, r)
        needs.append(tuple(range(w0 * step, (w1 - 1) * step + size)) if w1 > w0 else ())
    ext = fetch_rows(x.to_local(), mesh, sd, n, needs)
    w0, w1 = chunk_range(windows, world, rank)
    # the windows overlap in memory: no DTensor stride describes them, so a copy; a rank without
    # windows keeps its (empty) rows in the graph, so its backward joins the exchange too
    local = (ext.unfold(sd, size, step) if w1 > w0 else ext.unsqueeze(-1).expand(*ext.shape, size)).contiguous()
    shape = [*x.shape[:sd], windows, *x.shape[sd + 1 :], size]
    return wrap_shard(local, mesh, sd, shape)


# --- repeat_interleave: each row repeated, along the sharded dim a re-chunked nearest upsampling ------------------


@FAMILY.rule(torch.repeat_interleave, torch.Tensor.repeat_interleave, h="halo")
def _repeat_interleave_rule(func, args, kwargs):
    """``x.repeat_interleave(r, dim)`` with an int ``r`` (nearest upsampling written by hand): along
    any other dim local; along the sharded dim output row ``j`` is input row ``j // r``, so each rank
    fetches the input rows its ``torch.chunk`` slice of the ``r * n`` output rows reads (its own,
    and at most one row of a neighbour per edge) and repeats them. DTensor's rule refused uneven
    shards ("Cannot flatten unevenly sharded tensor")."""
    names = ("input", "repeats", "dim", "output_size")
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    x, r, dim = vals.get("input"), vals.get("repeats"), vals.get("dim")
    sd = domain_shard_dim(x)
    if sd is None or not isinstance(r, int) or isinstance(r, bool) or not isinstance(dim, int) or r < 0:
        return NotImplemented  # tensor repeats, the flattening dim=None, PyTorch's own errors
    if set(kwargs) - set(names) or len(args) > len(names):
        return NotImplemented
    dim %= x.ndim
    if dim != sd:
        return local_apply(lambda t: t.repeat_interleave(r, dim), (x,), {}, x, sd, empty_rows=True)
    n, total = x.shape[sd], x.shape[sd] * r
    mesh, _, world, rank = domain_info(x)
    needs = []
    for q in range(world):
        o0, o1 = chunk_range(total, world, q)
        needs.append(tuple(range(o0 // r, (o1 - 1) // r + 1)) if o1 > o0 else ())
    ext = fetch_rows(x.to_local(), mesh, sd, n, needs)
    o0, o1 = chunk_range(total, world, rank)
    local = ext.repeat_interleave(r, sd)
    local = local.narrow(sd, o0 - (o0 // r) * r, o1 - o0) if o1 > o0 else local.narrow(sd, 0, 0)
    return wrap_shard(local.contiguous(), mesh, sd, _with(list(x.shape), sd, total))
