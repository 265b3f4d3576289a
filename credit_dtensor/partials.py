"""Partial placements that PyTorch's own DTensor rules mishandle: reduce them before such an op.

A reduction over the sharded dim that DTensor runs itself leaves a ``Partial`` result (a per-rank
piece, summed when read). DTensor then treats some ops on it as linear when they are not, and its
answer is silently wrong (torch 2.13-2.14, found by running user programs against one device):

* ``torch.linalg.matrix_norm(x).sum()``: the Frobenius norm over (H, W) comes back as a
  ``_NormPartial``, and ``sum`` keeps that placement, so reading it takes the norm of the per-rank
  sums instead of the sum of the norms;
* ``F.cosine_embedding_loss`` of flattened fields: ``1 - cos`` on a ``Partial`` cosine adds the
  ``1`` on every rank.

Only the gather guard's dispatch mode sees the aten ops DTensor runs inside such a call, so it asks
:func:`unsafe` before each one (forward only) and, when needed, hands DTensor the operands reduced
to ``Replicate`` (:func:`replicated`: one all-reduce of a reduced tensor, never an all-gather).
Ops that are linear in a plain ``Partial(sum)`` operand (sums, means, scaling by a number, sums of
two partials) and views keep DTensor's own lazy handling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import Partial

__all__ = ["unsafe", "replicated"]

aten = torch.ops.aten

#: a Partial passes through these as it is (a view or a copy of the per-rank pieces)
_VIEWS = frozenset(
    (
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.permute.default,
        aten.transpose.int,
        aten.t.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.expand.default,
        aten.clone.default,
        aten.alias.default,
        aten.detach.default,
        aten._to_copy.default,
        aten.slice.Tensor,
        aten.select.int,
    )
)
#: linear in their (single) Partial(sum) operand; each set also holds the in-place forms, as linear
#: (an optimizer's momentum buffer cloned from a ``Partial`` gradient: ``buf.mul_(momentum).add_(grad)``)
_LINEAR = frozenset(
    (
        *(aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.neg.default, aten.mul.Scalar),
        *(aten.mul_.Scalar, aten.neg_.default, aten.zero_.default),
    )
)
#: linear when the other operand is a number (scaling)
_SCALED = frozenset(
    (aten.mul.Tensor, aten.div.Tensor, aten.div.Scalar, aten.mul_.Tensor, aten.div_.Tensor, aten.div_.Scalar)
)
#: linear when every operand is a Partial(sum) DTensor (a sum of per-rank pieces)
_SUMS = frozenset((aten.add.Tensor, aten.sub.Tensor, aten.add_.Tensor, aten.sub_.Tensor))
_WRITES_FIRST: dict[Any, bool] = {}


def _writes_first(func: Any) -> bool:
    """Whether ``func`` writes into its first argument (an in-place op)."""
    hit = _WRITES_FIRST.get(func)
    if hit is None:
        schema = getattr(func, "_schema", None)
        first = schema.arguments[0] if schema is not None and schema.arguments else None
        info = first.alias_info if first is not None else None
        hit = _WRITES_FIRST[func] = bool(info is not None and info.is_write)
    return hit


def _dtensors(args: tuple, kwargs: dict | None) -> list[DTensor]:
    out = []
    for a in (*args, *(kwargs or {}).values()):
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, DTensor):
                out.append(b)
    return out


def _is_partial(x: DTensor) -> bool:
    return any(p.is_partial() for p in x.placements)


def _plain_sum(x: DTensor) -> bool:
    return all(type(p) is Partial and p.reduce_op == "sum" for p in x.placements if p.is_partial())


def unsafe(func: Any, args: tuple, kwargs: dict | None) -> bool:
    """Whether DTensor's rule for ``func`` may mishandle a ``Partial`` operand of this call."""
    tensors = _dtensors(args, kwargs)
    partial = [t for t in tensors if _is_partial(t)]
    if not partial or func in _VIEWS:
        return False
    if not all(_plain_sum(t) for t in partial):
        return True  # a norm's or a max's partial: only views keep it
    if func in _LINEAR:
        return len(tensors) > 1
    if func in _SCALED:
        other = [a for a in args[1:2] if not isinstance(a, (int, float, bool))]
        return bool(other) or len(tensors) > 1 or args[0] is not partial[0]
    if func in _SUMS:
        plain = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, (torch.Tensor, int, float, complex))]
        return len(partial) != len(plain) or (kwargs or {}).get("alpha", 1) != 1
    return True


def _reduced(x: Any) -> Any:
    if isinstance(x, DTensor) and _is_partial(x):
        return x.redistribute(x.device_mesh, [Replicate() if p.is_partial() else p for p in x.placements])
    return x


def replicated(args: tuple, kwargs: dict | None, func: Any = None) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with every ``Partial`` DTensor reduced (``Replicate`` on those mesh dims).

    The target of an in-place ``func`` is reduced *in place* (its local values become the sum,
    its placement ``Replicate``: what reading it gave before): handing the op a reduced copy would
    drop the write (an optimizer's momentum buffer that never moved)."""

    def each(a: Any) -> Any:
        if isinstance(a, (list, tuple)):
            return type(a)(_reduced(b) for b in a)
        return _reduced(a)

    first = args[0] if args else None
    if func is not None and isinstance(first, DTensor) and _is_partial(first) and _writes_first(func):
        _reduce_in_place(first, func)
        return (first, *(each(a) for a in args[1:])), {k: each(v) for k, v in (kwargs or {}).items()}
    return tuple(each(a) for a in args), {k: each(v) for k, v in (kwargs or {}).items()}


def _reduce_in_place(x: DTensor, func: Any) -> None:
    if x.requires_grad:
        from .errors import DomainParallelError

        raise DomainParallelError(
            f"{func}: an in-place op on a tensor holding per-rank partial sums (a reduction over the "
            "sharded dim that DTensor ran itself) that requires grad; reduce it first: "
            "x = x.redistribute(x.device_mesh, [Replicate()]) or x.full_tensor(), then write"
        )
    full = _reduced(x)
    with torch.no_grad():
        x._local_tensor.copy_(full._local_tensor)
    x._spec = full._spec
