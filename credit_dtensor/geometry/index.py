"""Index arithmetic for assignments and selections along a sharded dim. No torch, no tensors.

An index (``x[idx]``) is first expanded to one entry per input dim (:func:`expand_index`), with
``None`` entries for new axes; the sharded dim's entry decides which global rows are written or
read, and :func:`local_selection` maps them to the rows this rank owns plus the positions of those
rows in the selection (which part of a value tensor this rank needs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = ["Entry", "expand_index", "LocalSelection", "local_selection", "result_position", "owner_runs"]


class Entry(NamedTuple):
    """One index entry: ``kind`` is ``"none"`` (new axis), ``"int"``, ``"slice"``, ``"tensor"`` (an
    integer index tensor) or ``"mask"`` (a boolean tensor covering ``ndim`` dims); ``dim``: the first
    input dim it consumes (for ``"none"``: the input dim that follows)."""

    kind: str
    value: Any
    dim: int
    ndim: int  # input dims consumed: 0 for "none", k for a k-dim mask, 1 otherwise


def expand_index(idx: Any, ndim: int, classify: Any) -> list[Entry] | None:
    """``idx`` as one :class:`Entry` per consumed dim (plus new axes), ``Ellipsis`` expanded.

    ``classify(item)`` returns ``(kind, dims consumed)`` for a tensor item (``("mask", k)`` or
    ``("tensor", 1)``) and ``None`` for anything it does not know; ``None`` is returned where the
    index is not understood (PyTorch's own path, or an error, decides)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    kinds: list[tuple[str, Any, int]] = []
    for it in items:
        if it is None:
            kinds.append(("none", None, 0))
        elif it is Ellipsis:
            kinds.append(("ellipsis", None, 0))
        elif isinstance(it, bool):
            return None  # x[True]: a new axis of size 1 or 0
        elif isinstance(it, int):
            kinds.append(("int", it, 1))
        elif isinstance(it, slice):
            if not all(
                v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (it.start, it.stop, it.step)
            ):
                return None
            kinds.append(("slice", it, 1))
        else:
            c = classify(it)
            if c is None:
                return None
            kinds.append((c[0], it, c[1]))
    if sum(1 for k in kinds if k[0] == "ellipsis") > 1:
        return None
    consumed = sum(k[2] for k in kinds)
    if consumed > ndim:
        return None
    out: list[Entry] = []
    d = 0
    seen_ellipsis = False
    for kind, value, k in kinds:
        if kind == "ellipsis":
            seen_ellipsis = True
            for _ in range(ndim - consumed):
                out.append(Entry("slice", slice(None), d, 1))
                d += 1
            continue
        out.append(Entry(kind, value, d, k))
        d += k
    if not seen_ellipsis:
        while d < ndim:
            out.append(Entry("slice", slice(None), d, 1))
            d += 1
    return out


def result_position(entries: Sequence[Entry], target: int, adv_ndim: int = 1) -> int | None:
    """Where the result dim produced by entry ``target`` sits in the indexing result (the first of
    the broadcast dims for an advanced entry), following PyTorch's rule: advanced entries (tensors,
    masks) that stand next to each other put their ``adv_ndim`` broadcast dims where the first of
    them is; separated ones put them first. ``None`` when the entry produces no dim (an int).

    >>> E = Entry
    >>> result_position([E("slice", None, 0, 1), E("int", 3, 1, 1), E("slice", None, 2, 1)], 2)
    1
    >>> result_position([E("tensor", None, 0, 1), E("slice", None, 1, 1), E("tensor", None, 2, 1)], 1, 2)
    2
    """
    adv = [i for i, e in enumerate(entries) if e.kind in ("tensor", "mask")]
    adjacent = not adv or adv == list(range(adv[0], adv[-1] + 1))
    if entries[target].kind == "int":
        return None
    if adv and not adjacent and entries[target].kind in ("tensor", "mask"):
        return 0
    pos = adv_ndim if adv and not adjacent else 0
    placed = False
    for i, e in enumerate(entries):
        if i == target:
            return pos
        if e.kind in ("slice", "none"):
            pos += 1
        elif e.kind in ("tensor", "mask") and adjacent and not placed:
            pos += adv_ndim
            placed = True
    return pos


class LocalSelection(NamedTuple):
    """The global rows an entry selects along the sharded dim, restricted to this rank's rows."""

    rows: tuple[int, ...]  # every selected global row, in selection order
    positions: tuple[int, ...]  # positions (in ``rows``) of the rows this rank owns, increasing
    local_rows: tuple[int, ...]  # those rows as local indices (row - first owned row)


def local_selection(rows: Sequence[int], lo: int, hi: int) -> LocalSelection:
    """Restrict the selected global ``rows`` to the rank that owns ``[lo, hi)``."""
    pos = tuple(k for k, r in enumerate(rows) if lo <= r < hi)
    return LocalSelection(tuple(rows), pos, tuple(rows[k] - lo for k in pos))


def owner_runs(positions_per_rank: Sequence[Sequence[int]]) -> list[int] | None:
    """Offsets ``[p_0, ..., p_N]`` when every rank's positions are one contiguous run and the runs
    follow each other in rank order (a slice with a positive step), else ``None``."""
    offs = [0]
    for pos in positions_per_rank:
        if pos and (list(pos) != list(range(pos[0], pos[0] + len(pos))) or pos[0] != offs[-1]):
            return None
        offs.append(offs[-1] + len(pos))
    return offs
