"""``torch.einsum`` with H-sharded operands (attention, contractions over channels, reductions).

DTensor decomposes ``einsum`` into permutes, views and ``bmm``: it refuses unevenly sharded
operands ("Cannot flatten unevenly sharded tensor") and mis-views even ones. Here the equation is
read once (:func:`parse`) and the sharded label decides:

* one sharded label ``L`` that the output keeps (``"bchw,c->bhw"``, window attention with the
  windows sharded): each rank computes its rows; full operands that carry ``L`` are cut to the
  local rows; the output is sharded on ``L``;
* one sharded label the output drops (``"bchw,bchw->bc"``, a weighted mean over H): local partial
  sums, summed over the ranks once (a ``Replicate`` result, like a reduction);
* operands sharded on *different* labels (``"b h i d, b h j d -> b h i j"``: queries sharded on
  ``i``, keys on ``j``, as after CrossFormer's long-distance grouping): every one of them is re-laid
  out (:func:`~credit_dtensor.ops.relayout.reshard`, one all-to-all) onto a free label that all of
  them and the output carry (batch, heads, groups: the largest), and the product is local, sharded
  on that label. A later reshape or convolution lays the result out on H again. Without such a
  label it is refused with a :class:`~credit_dtensor.DomainParallelError` naming the fix.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import comm, intercept
from ..dtensor import domain_shard_dim, full_operand, is_domain_replicate, wrap_replicate, wrap_shard
from ..errors import DomainParallelError
from ..geometry import chunk_range
from .family import Signature, family
from .relayout import best_free_dim, reshard

FAMILY = family(
    "einsum", "einsum and bmm contracting over H (partial sums, one all-reduce) or re-laid out for attention"
)

__all__ = ["parse", "einsum"]

_ELLIPSIS_LABELS = "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠ"  # labels for dims under "..." (never in a user's equation)


def parse(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]] | None:
    """Labels per operand dim and of the output, ``...`` expanded to right-aligned pseudo-labels;
    ``None`` when the equation does not match the operands (PyTorch's own error)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None
    ell = 0
    for t, nd in zip(terms, ndims):
        if "..." in t:
            ell = max(ell, nd - (len(t) - 3))
    if ell < 0 or ell > len(_ELLIPSIS_LABELS):
        return None
    ell_labels = list(_ELLIPSIS_LABELS[:ell])
    ins = []
    for t, nd in zip(terms, ndims):
        if "..." in t:
            pre, _, post = t.partition("...")
            k = nd - len(pre) - len(post)
            if k < 0:
                return None
            labels = list(pre) + ell_labels[ell - k :] + list(post)
        else:
            labels = list(t)
        if len(labels) != nd or not all(c.isalpha() for c in labels):
            return None
        ins.append(labels)
    if arrow:
        pre, dots, post = rhs.partition("...")
        out = list(pre) + (ell_labels if dots else []) + list(post)
    else:
        counts = Counter(c for labels in ins for c in labels if c not in ell_labels)
        out = ell_labels + sorted(c for c, n in counts.items() if n == 1)
    return ins, out


def _sizes(ins: list[list[str]], operands: list[torch.Tensor]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for labels, t in zip(ins, operands):
        for c, s in zip(labels, t.shape):
            if s != 1 or c not in sizes:
                sizes[c] = max(sizes.get(c, 1), int(s))
    return sizes


def relayout_ok(size: int, world: int) -> bool:
    """Whether operands may be re-laid out onto a free dim of ``size`` entries over ``world`` ranks.

    Each rank holds ``torch.chunk``'s ``ceil(size / world)`` entries of it afterwards and receives
    their rows from the other ranks: ``ceil(size / world) / size * (1 - 1/world)`` of each operand.
    The bound is twice its share (``2 / world``), the worst case of a dim with ``world`` or more
    entries (``world + 1`` entries: two on the first ranks), so fewer entries than ranks are fine
    when some ranks idle but none receives more than that (2 heads on 3, 4 or 5 ranks, 3 on 6 or 7).
    A dim of one entry would put the whole product on one rank (a gather): never."""
    if size >= world:
        return True
    return size >= 2 and -(-size // world) * (world - 1) <= 2 * size


def min_relayout_size(world: int) -> int:
    """The fewest entries a free dim needs for :func:`relayout_ok` on ``world`` ranks."""
    return next(s for s in range(1, world + 1) if relayout_ok(s, world))


def relayout_domain_sizes(size: int) -> list[int]:
    """The domain sizes (2 and up) on which a free dim of ``size`` entries may take a re-layout."""
    return [n for n in range(2, 2 * size + 2) if relayout_ok(size, n)]


def _refuse(equation: str, why: str) -> DomainParallelError:
    from .. import guard

    path = guard.module_path()
    head = f"{path}: " if path else ""
    return DomainParallelError(
        f"{head}torch.einsum({equation!r}) on H-sharded operands: {why}. Fix: keep a batch-like dim (batch, heads, "
        "windows, groups) in every sharded operand and in the output so the product can be re-laid out onto it, or "
        "gather the operands explicitly (credit_dtensor.gather_tensor) if they are small"
    )


def einsum(equation: str, operands: list[torch.Tensor]) -> Any:
    """``torch.einsum(equation, *operands)`` with at least one operand sharded on a 1-D mesh."""
    parsed = parse(equation, [t.ndim for t in operands])
    if parsed is None:
        return NotImplemented
    ins, out = parsed
    if any(len(set(labels)) != len(labels) for labels in ins) or len(set(out)) != len(out):
        return NotImplemented  # diagonals: DTensor (under the gather guard)
    sharded = [i for i, t in enumerate(operands) if domain_shard_dim(t) is not None]
    ref = operands[sharded[0]]
    mesh = ref.device_mesh
    for t in operands:
        if isinstance(t, DTensor) and t.device_mesh != mesh:
            return NotImplemented  # DTensor's own mesh error
        if isinstance(t, DTensor) and domain_shard_dim(t) is None and not is_domain_replicate(t):
            return NotImplemented
    labels = {ins[i][domain_shard_dim(operands[i])] for i in sharded}
    sizes = _sizes(ins, operands)
    world = mesh.size()
    if len(labels) > 1:
        free = [c for c in out if all(c in ins[i] for i in sharded)]
        pos = {c: k for k, c in enumerate(out)}
        pick = best_free_dim([sizes[c] for c in out], [pos[c] for c in free], world)
        if pick is None:
            raise _refuse(
                equation,
                f"operands are sharded on different labels {sorted(labels)} and no label of the output is "
                "carried by all of them",
            )
        label = out[pick]
        if not relayout_ok(sizes[label], world):
            n = sizes[label]
            load = (
                "put the whole product on one rank (a gather)"
                if n <= 1
                else f"put the whole product on {n} of the {world} ranks, each receiving more than twice its share "
                "of the operands"
            )
            raise _refuse(
                equation,
                f"operands are sharded on different labels {sorted(labels)}; the largest label they all share, "
                f"{label!r}, has {n} entries for {world} ranks: re-laying the operands out onto it would {load} "
                f"(a re-layout needs at least {min_relayout_size(world)} entries on {world} ranks"
                + (f"; with {n}, domain sizes {relayout_domain_sizes(n)} work)" if n > 1 else ")"),
            )
        operands = list(operands)
        for i in sharded:
            operands[i] = reshard(operands[i], ins[i].index(label))
        labels = {label}
    (label,) = labels
    n = sizes[label]
    lo, hi = chunk_range(n, world, mesh.get_local_rank())
    locals_ = []
    with intercept.suspended():
        for labels_i, t in zip(ins, operands):
            if domain_shard_dim(t) is not None:
                if t.shape[labels_i.index(label)] != n:
                    return NotImplemented
                locals_.append(t.to_local())
                continue
            local = full_operand(t, mesh)
            if label in labels_i:
                d = labels_i.index(label)
                if local.shape[d] != 1:
                    local = local.narrow(d, lo, hi - lo)
            locals_.append(local)
        y = torch.einsum(equation, *locals_)
        if label in out:
            d = out.index(label)
            shape = [sizes[c] for c in out]
            return wrap_shard(y, mesh, d, shape)
        return wrap_replicate(comm.sum_over_ranks(y, mesh.get_group()), mesh)


@FAMILY.rule(torch.einsum, h="reduce")
def _einsum_rule(func, args, kwargs):
    if not args or not isinstance(args[0], str):
        return NotImplemented  # sublist format: DTensor's own path
    equation = args[0]
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if not operands or not all(isinstance(t, torch.Tensor) for t in operands):
        return NotImplemented
    if not any(domain_shard_dim(t) is not None for t in operands):
        return NotImplemented
    return einsum(equation, operands)


def _matmul_equation(a_ndim: int, b_ndim: int) -> str | None:
    """``torch.matmul``'s contraction as an einsum equation (batch dims broadcast via ``...``)."""
    if a_ndim == 0 or b_ndim == 0:
        return None
    if a_ndim == 1 and b_ndim == 1:
        return "k,k->"
    if a_ndim == 1:
        return "k,...kj->...j"
    if b_ndim == 1:
        return "...ik,k->...i"
    return "...ik,...kj->...ij"


def matmul(a: torch.Tensor, b: torch.Tensor) -> Any:
    """``a @ b`` with a sharded operand, as :func:`einsum` (re-laid out onto a batch dim when the
    operands are sharded on different dims, e.g. ``q @ k.transpose(-2, -1)`` over shared tokens)."""
    eq = _matmul_equation(a.ndim, b.ndim)
    return NotImplemented if eq is None else einsum(eq, [a, b])


@FAMILY.rule(torch.bmm, torch.Tensor.bmm, h="reduce", signature=Signature(("input", "mat2")))
def _bmm_rule(func, bound):
    a, b = bound.get("input"), bound.get("mat2")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or bound.get("out") is not None:
        return NotImplemented
    if domain_shard_dim(a) is None and domain_shard_dim(b) is None:
        return NotImplemented
    if a.ndim != 3 or b.ndim != 3:
        return NotImplemented  # PyTorch's own error
    return einsum("bik,bkj->bij", [a, b])
