"""The one communication primitive of the spatial ops: a differentiable gather of arbitrary
global rows along the sharded dim, from whichever ranks own them.

A rank's *extended* input is a list of row references (global source row, or ``None`` for a zero
row); every op rule derives those lists from pure geometry (:mod:`.geometry`) for *all* ranks, so
each rank knows what to send and what to receive without asking. Rows are sent once per
(source, destination) pair, in one batched P2P round; duplicates (e.g. a reflected row that is
also a real row) are resolved locally. Backward is the exact adjoint: gradient rows travel back to
their owners and are added there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import comm
from .geometry import chunk_offsets, owner_of

__all__ = [
    "HaloPlan",
    "make_plan",
    "gather_rows",
    "halo_gather",
    "halo_scatter_add",
    "assemble",
    "disassemble",
    "send_index",
    "row_shape",
]

Refs = tuple["int | None", ...]


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive extended rows read from one source buffer.

    ``source``: -1 own shard, -2 zeros, else index into ``HaloPlan.recvs``; ``start`` is the first
    row in that source buffer (unused for zeros); ``length`` the run length.
    """

    source: int
    start: int
    length: int


@dataclass(frozen=True)
class HaloPlan:
    """What one rank sends, receives and assembles for one gather. Built by :func:`make_plan`."""

    n: int  # global length of the sharded dim
    rank: int
    world: int
    local_len: int
    ext_len: int
    sends: tuple[tuple[int, tuple[int, ...]], ...]  # (dst rank, local row indices), sorted unique
    recvs: tuple[tuple[int, tuple[int, ...]], ...]  # (src rank, global rows), sorted unique
    segments: tuple[_Segment, ...]

    @property
    def recv_rows(self) -> int:
        return sum(len(r) for _, r in self.recvs)

    @property
    def send_rows(self) -> int:
        return sum(len(r) for _, r in self.sends)

    @property
    def is_local(self) -> bool:
        """No communication in either direction."""
        return not self.sends and not self.recvs

    @property
    def is_identity(self) -> bool:
        """The extended input is exactly the local shard."""
        return (
            len(self.segments) == 1
            and self.segments[0] == _Segment(-1, 0, self.local_len)
            or (self.ext_len == 0 and self.local_len == 0)
        )


def make_plan(n: int, world: int, rank: int, needs: Sequence[Refs]) -> HaloPlan:
    """Build ``rank``'s plan from every rank's row references ``needs[r]`` (global rows or None)."""
    offs = chunk_offsets(n, world)
    lo = offs[rank]
    # what each rank needs from each other rank (unique, sorted global rows)
    wanted: list[dict[int, set[int]]] = []
    for r in range(world):
        per_src: dict[int, set[int]] = {}
        for g in needs[r]:
            if g is None:
                continue
            if not 0 <= g < n:
                raise ValueError(f"rank {r} references row {g} outside [0, {n})")
            src = owner_of(g, n, world)
            if src != r:
                per_src.setdefault(src, set()).add(g)
        wanted.append(per_src)
    recvs = tuple((src, tuple(sorted(rows))) for src, rows in sorted(wanted[rank].items()))
    sends = tuple(
        (dst, tuple(g - lo for g in sorted(wanted[dst][rank])))
        for dst in range(world)
        if dst != rank and rank in wanted[dst]
    )
    # segments: runs of the extended rows that are contiguous in one source buffer
    where: dict[int, tuple[int, int]] = {}
    for i, (_, rows) in enumerate(recvs):
        for j, g in enumerate(rows):
            where[g] = (i, j)
    segs: list[_Segment] = []
    for g in needs[rank]:
        if g is None:
            src, pos = -2, 0
        elif lo <= g < offs[rank + 1]:
            src, pos = -1, g - lo
        else:
            src, pos = where[g]
        if segs:
            last = segs[-1]
            if last.source == src and (src == -2 or last.start + last.length == pos):
                segs[-1] = _Segment(src, last.start, last.length + 1)
                continue
        segs.append(_Segment(src, pos, 1))
    return HaloPlan(
        n=n,
        rank=rank,
        world=world,
        local_len=offs[rank + 1] - lo,
        ext_len=len(needs[rank]),
        sends=sends,
        recvs=recvs,
        segments=tuple(segs),
    )


@functools.lru_cache(maxsize=4096)
def cached_plan(n: int, world: int, rank: int, needs: tuple[Refs, ...]) -> HaloPlan:
    return make_plan(n, world, rank, needs)


_INDEX: dict[tuple[int, torch.device], tuple[HaloPlan, list[torch.Tensor]]] = {}


def send_index(plan: HaloPlan, device: torch.device) -> list[torch.Tensor]:
    """The local row indices of each of ``plan.sends`` as int64 tensors on ``device``, built once per
    (plan, device): plans are cached, so a layer reuses its index tensors on every call. Keyed by the
    plan's identity (hashing a plan hashes its row lists); the entry keeps the plan alive so the id
    cannot be reused. Read-only: callers only index with them."""
    key = (id(plan), device)
    hit = _INDEX.get(key)
    if hit is None or hit[0] is not plan:
        if len(_INDEX) >= 4096:
            _INDEX.clear()
        hit = _INDEX[key] = (plan, [torch.tensor(rows, dtype=torch.int64, device=device) for _, rows in plan.sends])
    return hit[1]


def row_shape(x: torch.Tensor, dim: int, rows: int) -> tuple[int, ...]:
    shape = list(x.shape)
    shape[dim] = rows
    return tuple(shape)


def halo_gather(x: torch.Tensor, dim: int, plan: HaloPlan, group: dist.ProcessGroup) -> torch.Tensor:
    """Forward: assemble this rank's extended tensor (no autograd; see :func:`gather_rows`)."""
    return halo_gather_start(x, dim, plan, group)()


def own_rows(plan: HaloPlan) -> tuple[int, int, int] | None:
    """``(position in the extended rows, first own row, count)`` of the one run of the extended
    input read from the rank's own shard; ``None`` when there is not exactly one."""
    runs, pos = [], 0
    for seg in plan.segments:
        if seg.source == -1:
            runs.append((pos, seg.start, seg.length))
        pos += seg.length
    return runs[0] if len(runs) == 1 else None


def halo_gather_start(
    x: torch.Tensor, dim: int, plan: HaloPlan, group: dist.ProcessGroup
) -> Callable[[], torch.Tensor]:
    """:func:`halo_gather` with the exchange posted: the returned function waits and assembles
    (a conv computes its interior rows, which need no halo, in between)."""
    if plan.is_local and plan.is_identity:
        return lambda: x
    index = send_index(plan, x.device)
    sends = [(dst, x.index_select(dim, idx)) for (dst, _), idx in zip(plan.sends, index)]
    recv_shapes = [(src, row_shape(x, dim, len(rows))) for src, rows in plan.recvs]
    pending = None if plan.is_local else comm.exchange_start(sends, recv_shapes, group, dtype=x.dtype, device=x.device)
    return lambda: assemble(x, dim, plan, pending.wait() if pending is not None else [])


def assemble(x: torch.Tensor, dim: int, plan: HaloPlan, received: list[torch.Tensor]) -> torch.Tensor:
    """The extended tensor of ``plan`` from the own shard ``x`` and the rows ``received`` from each
    of ``plan.recvs`` (zero rows where the plan says so); differentiable, no communication."""
    if plan.is_identity:
        return x
    pieces = []
    for seg in plan.segments:
        if seg.source == -2:
            pieces.append(x.new_zeros(row_shape(x, dim, seg.length)))
        else:
            buf = x if seg.source == -1 else received[seg.source]
            pieces.append(buf.narrow(dim, seg.start, seg.length))
    if not pieces:
        return x.new_zeros(row_shape(x, dim, 0))
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim)


def disassemble(grad_ext: torch.Tensor, dim: int, plan: HaloPlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Adjoint of :func:`assemble` (no communication): the gradient of the own rows, and of the
    rows received from each of ``plan.recvs`` (fresh tensors)."""
    shape = row_shape(grad_ext, dim, plan.local_len)
    grad = grad_ext.clone() if plan.is_identity else grad_ext.new_zeros(shape)
    back = [grad_ext.new_zeros(row_shape(grad_ext, dim, len(rows))) for _, rows in plan.recvs]
    pos = 0
    for seg in () if plan.is_identity else plan.segments:
        if seg.source != -2:
            dst = grad if seg.source == -1 else back[seg.source]
            dst.narrow(dim, seg.start, seg.length).add_(grad_ext.narrow(dim, pos, seg.length))
        pos += seg.length
    return grad, back


def halo_scatter_add(grad_ext: torch.Tensor, dim: int, plan: HaloPlan, group: dist.ProcessGroup) -> torch.Tensor:
    """Adjoint of :func:`halo_gather`: route each extended row's gradient to its owner and sum."""
    return halo_scatter_add_start(grad_ext, dim, plan, group)()


def halo_scatter_add_start(
    grad_ext: torch.Tensor, dim: int, plan: HaloPlan, group: dist.ProcessGroup
) -> Callable[[], torch.Tensor]:
    """:func:`halo_scatter_add` with the exchange posted: the returned function waits and sums
    (a conv's backward computes its weight gradient in between)."""
    if plan.is_local and plan.is_identity:
        return lambda: grad_ext
    grad, back = disassemble(grad_ext, dim, plan)
    if plan.is_local:
        return lambda: grad
    pending = comm.exchange_start(
        [(src, b) for (src, _), b in zip(plan.recvs, back)],
        [(dst, row_shape(grad_ext, dim, len(rows))) for dst, rows in plan.sends],
        group,
        dtype=grad_ext.dtype,
        device=grad_ext.device,
    )

    def finish() -> torch.Tensor:
        for idx, g in zip(send_index(plan, grad.device), pending.wait()):
            grad.index_add_(dim, idx, g)
        return grad

    return finish


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, plan: HaloPlan, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.plan, ctx.group = dim, plan, group
        out = halo_gather(x, dim, plan, group)
        return out[...] if out is x else out  # an alias with its own strides (view_as re-strides size-1 dims)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return halo_scatter_add(grad.contiguous(), ctx.dim, ctx.plan, ctx.group), None, None, None


def gather_rows(x: torch.Tensor, dim: int, plan: HaloPlan, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable: the extended local tensor described by ``plan`` (rows along ``dim``).

    Every rank of ``group`` must call this with its own plan built from the same ``needs``, even
    ranks with empty shards or empty extended inputs, so that every message has its partner.
    """
    return _GatherRows.apply(x, dim, plan, group)
