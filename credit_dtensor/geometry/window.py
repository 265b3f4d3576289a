"""Window and reshape arithmetic for H-sharded tensors. No torch.distributed, no tensors.

Two questions, answered once here for the runtime rules (:mod:`credit_dtensor.ops.reshape`,
the shard-local check of :mod:`credit_dtensor.nn.local`), the audit (:func:`credit_dtensor.plan`)
and :func:`credit_dtensor.validate_sharding_constraints`:

* **Window fit** (:func:`block_fits`, :func:`window_fit`): do the ``torch.chunk`` shards of ``n``
  rows hold whole windows of ``block`` rows? Then a window split ``H -> (H/w, w)`` is a local view
  and a shard-local window module sees only whole windows. Otherwise the split re-chunks: rank
  ``r`` gets rows ``[w*a_r, w*b_r)`` with ``[a_r, b_r)`` the ``torch.chunk`` range of the window
  count (H=40, w=8 over 3 ranks: windows 2, 2, 1), moving only the rows that change owner.
* **Reshapes** (:func:`view_plan`): for ``view``/``reshape``/``flatten``/``unflatten`` of a tensor
  sharded on one dim, which output dim is sharded, and whether each rank's elements already form
  that dim's ``torch.chunk`` shard (local), need re-chunking (contiguous runs change owner, as in a
  halo exchange), or cannot be a ``torch.chunk`` shard at all (the sharded dim merged *under* a
  larger dim, e.g. ``(B, nH, nW) -> B*nH*nW``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from . import chunk_offsets, chunk_sizes

__all__ = [
    "window_height",
    "block_fits",
    "valid_domain_sizes",
    "WindowFit",
    "window_fit",
    "local_rows_fit",
    "view_groups",
    "ViewPlan",
    "view_plan",
    "overlaps",
    "moved_units",
    "Repartition",
    "repartition",
]


# --- window fit ----------------------------------------------------------------------------------


def block_fits(n: int, world: int, block: int) -> bool:
    """Whether every ``torch.chunk`` shard of ``n`` rows starts and ends on a multiple of ``block``.

    >>> block_fits(32, 2, 8), block_fits(40, 3, 8), block_fits(10, 3, 2)
    (True, False, True)
    """
    if block <= 1:
        return True
    return all(s % block == 0 for s in chunk_sizes(n, world))


def valid_domain_sizes(n: int, block: int, max_domain: int = 8) -> list[int]:
    """Domain sizes ``1..max_domain`` whose shards of ``n`` rows hold whole windows of ``block``."""
    return [d for d in range(1, max(1, max_domain) + 1) if block_fits(n, d, block)]


class WindowFit(NamedTuple):
    """How windows of ``block`` rows sit on the ``torch.chunk`` shards of ``n`` rows."""

    n: int
    world: int
    block: int
    divisible: bool  # n is a multiple of block (else PyTorch's own view fails)
    aligned: bool  # every shard holds whole windows (block_fits): window views are local
    windows: tuple[int, ...]  # windows per rank after the split (torch.chunk of the window count)
    rows: tuple[tuple[int, int], ...]  # rows [start, stop) rank r holds after the split
    moved: tuple[int, ...]  # rows each rank receives to get there (0 when aligned)

    def describe(self) -> str:
        if not self.divisible:
            return f"H={self.n} is not a multiple of the window height {self.block}"
        w = ", ".join(map(str, self.windows))
        if self.aligned:
            return f"shards hold whole windows of {self.block} rows ({w} windows per rank): local"
        return (
            f"shards {chunk_sizes(self.n, self.world)} of H={self.n} split windows of {self.block} rows: re-chunked "
            f"to {w} windows per rank ({sum(self.moved)} rows change owner)"
        )


def window_fit(n: int, world: int, block: int) -> WindowFit:
    """:class:`WindowFit` of windows of ``block`` rows over ``n`` rows split ``torch.chunk``-wise."""
    block = max(1, int(block))
    divisible = n % block == 0
    count = n // block
    w_offs = chunk_offsets(count, world)
    rows = tuple((block * w_offs[r], block * w_offs[r + 1]) for r in range(world))
    offs = chunk_offsets(n, world)
    own = [(offs[r], offs[r + 1]) for r in range(world)]
    moved = tuple((b - a) - _overlap((a, b), own[r]) for r, (a, b) in enumerate(rows)) if divisible else (0,) * world
    return WindowFit(
        n,
        world,
        block,
        divisible,
        divisible and block_fits(n, world, block),
        tuple(w_offs[r + 1] - w_offs[r] for r in range(world)),
        rows,
        moved,
    )


def local_rows_fit(local_h: int, block: int) -> str | None:
    """Why ``local_h`` rows per shard do not hold whole windows of ``block`` rows (``None``: they do).
    The per-shard form of :func:`block_fits` used by ``validate_sharding_constraints``."""
    if block_fits(local_h, 1, block):
        return None
    if local_h < block:
        return f"local H {local_h} is smaller than the window height {block}: windows span several shards"
    return f"local H {local_h} is not divisible by the window height {block}: a window would straddle two shards"


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


# --- reshapes --------------------------------------------------------------------------------------


def view_groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Minimal groups ``(input dims, output dims)`` of non-1 dims covering the same elements (a
    view reshapes each group on its own); ``None`` if the element counts differ or a dim is 0."""
    if any(s == 0 for s in (*in_shape, *out_shape)) or math.prod(in_shape) != math.prod(out_shape):
        return None
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, go = [ins[i]], [outs[j]]
        pi, po = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                if i == len(ins):
                    return None
                gi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            else:
                if j == len(outs):
                    return None
                go.append(outs[j])
                po *= out_shape[outs[j]]
                j += 1
        groups.append((gi, go))
    return groups if i == len(ins) and j == len(outs) else None


class ViewPlan(NamedTuple):
    """How a reshape of a tensor sharded on ``in_dim`` runs (see :func:`view_plan`).

    ``kind``: ``"local"`` (each rank reshapes its own elements), ``"rechunk"`` (input dims
    ``[start, stop)`` are flattened into units of ``unit`` elements, rank ``r`` holds units
    ``[in_units[r], in_units[r+1])`` and needs ``[out_units[r], out_units[r+1])``), or
    ``"unsupported"`` (``reason`` says why).
    """

    kind: str
    in_dim: int
    out_dim: int
    start: int = 0
    stop: int = 0
    unit: int = 1
    in_units: tuple[int, ...] = ()
    out_units: tuple[int, ...] = ()
    reason: str = ""
    outer: tuple[int, ...] = ()  # sizes of the dims merged above the sharded one (unsupported)
    out_group: tuple[int, ...] = ()  # the output dims the sharded dim's group becomes

    @property
    def local(self) -> bool:
        return self.kind == "local"


def view_plan(in_shape: Sequence[int], out_shape: Sequence[int], sd: int, world: int) -> ViewPlan | None:
    """Plan the reshape ``in_shape -> out_shape`` of a tensor sharded (``torch.chunk``) on ``sd``.

    The output is sharded on the outermost non-1 dim of the group of dims that the sharded dim is
    reshaped with (DTensor's own convention): ``H -> (H/w, w)`` shards the window count,
    ``(H/w, w) -> H`` and ``(H, W) -> H*W`` shard the merged dim. It is local when each rank's
    elements are exactly that dim's ``torch.chunk`` shard; when the sharded dim is the outermost of
    its group (or all dims above it have size 1) the elements of each rank are one contiguous run,
    so re-chunking moves only the runs that change owner; a sharded dim merged under a larger dim
    (``(B, nH) -> B*nH``) leaves each rank a strided set: unsupported. ``None``: not a reshape
    (element counts differ or a dim is 0: PyTorch's own path decides).
    """
    in_shape, out_shape = [int(s) for s in in_shape], [int(s) for s in out_shape]
    groups = view_groups(in_shape, out_shape)
    if groups is None:
        return None
    n = in_shape[sd]
    if n == 1:
        return _plan_single_row(in_shape, out_shape, sd, world, groups)
    gi, go = next((gi, go) for gi, go in groups if sd in gi)
    od = go[0]
    outer = tuple(in_shape[d] for d in gi if d < sd)
    inner_in = math.prod([in_shape[d] for d in gi if d > sd])
    inner_out = math.prod([out_shape[d] for d in go[1:]])
    start, stop = gi[0], gi[-1] + 1
    if world == 1:
        return ViewPlan("local", sd, od, start, stop, out_group=tuple(go))
    if math.prod(outer) > 1:
        merged = "x".join(map(str, outer))
        return ViewPlan(
            "unsupported",
            sd,
            od,
            start,
            stop,
            reason=(
                f"the sharded dim {sd} (size {n}) is merged under dims of size {merged} into one dim of "
                f"{out_shape[od]}: each rank's elements would be a strided set, not a torch.chunk shard"
            ),
            outer=outer,
            out_group=tuple(go),
        )
    unit = math.gcd(inner_in, inner_out)
    in_units = tuple(o * inner_in // unit for o in chunk_offsets(n, world))
    out_units = tuple(o * inner_out // unit for o in chunk_offsets(out_shape[od], world))
    kind = "local" if in_units == out_units else "rechunk"
    return ViewPlan(kind, sd, od, start, stop, unit, in_units, out_units, out_group=tuple(go))


def _plan_single_row(
    in_shape: list[int], out_shape: list[int], sd: int, world: int, groups: list[tuple[list[int], list[int]]]
) -> ViewPlan | None:
    """A sharded dim of size 1: rank 0 holds the whole tensor. A size-1 output dim is then a valid
    ``torch.chunk`` shard (the one at the same place first): local. Without one, the sharded dim is
    reshaped with the next group of dims (the previous one at the end), re-chunked from rank 0."""
    before = math.prod(in_shape[:sd])
    ones = [d for d, s in enumerate(out_shape) if s == 1]
    if ones:
        same = [d for d in ones if math.prod(out_shape[:d]) == before]
        return ViewPlan("local", sd, (same or ones)[0], 0, len(in_shape))
    if not groups:
        return None  # a 0-d result: PyTorch's own path
    gi, go = next(((gi, go) for gi, go in groups if gi[0] > sd), groups[-1])
    od = go[0]
    start, stop = min(sd, gi[0]), max(sd, gi[-1]) + 1
    if world == 1:
        return ViewPlan("local", sd, od, start, stop)
    unit = math.prod([out_shape[d] for d in go[1:]])
    total = math.prod([in_shape[d] for d in gi]) // unit
    out_units = tuple(chunk_offsets(out_shape[od], world))
    return ViewPlan("rechunk", sd, od, start, stop, unit, (0,) + (total,) * world, out_units)


def overlaps(in_units: Sequence[int], out_units: Sequence[int], rank: int) -> list[tuple[int, int, int]]:
    """``(source rank, first unit, count)`` of rank's output range, in order (the pieces it assembles)."""
    o0, o1 = out_units[rank], out_units[rank + 1]
    out = []
    for s in range(len(in_units) - 1):
        a, b = max(o0, in_units[s]), min(o1, in_units[s + 1])
        if b > a:
            out.append((s, a, b - a))
    return out


def moved_units(in_units: Sequence[int], out_units: Sequence[int], rank: int) -> int:
    """Units rank receives from other ranks when going from ``in_units`` to ``out_units``."""
    return sum(c for s, _, c in overlaps(in_units, out_units, rank) if s != rank)


class Repartition(NamedTuple):
    """One rank's part of a re-chunking: what it sends (``(dst, local start, count)``), and the
    pieces of its output in order (``(src, local start in src's message or own shard, count)``;
    ``src == rank``: its own rows)."""

    sends: tuple[tuple[int, int, int], ...]
    pieces: tuple[tuple[int, int, int], ...]
    in_len: int
    out_len: int


def repartition(in_units: Sequence[int], out_units: Sequence[int], rank: int) -> Repartition:
    """Plan rank's part of moving contiguous runs from ``in_units`` ownership to ``out_units``."""
    world = len(in_units) - 1
    i0 = in_units[rank]
    sends = []
    for dst in range(world):
        if dst == rank:
            continue
        for s, a, c in overlaps(in_units, out_units, dst):
            if s == rank:
                sends.append((dst, a - i0, c))
    pieces = tuple((s, a - (in_units[rank] if s == rank else a), c) for s, a, c in overlaps(in_units, out_units, rank))
    return Repartition(tuple(sends), pieces, in_units[rank + 1] - i0, out_units[rank + 1] - out_units[rank])


def window_height(module: object) -> int | None:
    """H extent of a module's windows (``window_size`` or any ``*window_size`` attribute; an int
    means square windows, a tuple ``(..., h, w)``), else ``None``. The block of :func:`shard_local`
    and the window height that ``plan`` and ``validate_sharding_constraints`` check."""
    names = ["window_size"] + sorted(n for n in vars(module) if n.endswith("window_size") and n != "window_size")
    for n in names:
        ws = getattr(module, n, None)
        if isinstance(ws, int) and ws > 0:
            return ws
        if isinstance(ws, (tuple, list)) and ws and all(isinstance(v, int) for v in ws):
            return int(ws[-2]) if len(ws) >= 2 else int(ws[0])
    return None
