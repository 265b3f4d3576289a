"""In-place methods on a sharded tensor: ``x.mul_(v)``, ``x += v``, ``x.copy_(v)`` (part of the
pointwise family, :mod:`.pointwise`; split from it by concern).

Full operands (a plain tensor, a ``Replicate`` DTensor) are cut to ``x``'s rows; a norm's borrowed
halo rows (:mod:`.fold`) follow ops whose tensor operands all carry them (``out += identity``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import intercept
from ..dtensor import domain_shard_dim, full_operand, is_domain_replicate, wrap_shard
from ..geometry import chunk_range
from . import fold
from .family import input_of
from .pointwise import FAMILY, POINTWISE

__all__ = ["INPLACE_METHODS"]


def _inplace_methods() -> tuple[Callable, ...]:
    """``Tensor.foo_`` for every pointwise ``Tensor.foo``, the augmented operators and ``copy_``."""
    found: list[Callable] = [torch.Tensor.copy_]
    for fn in POINTWISE:
        name = getattr(fn, "__name__", "")
        if getattr(fn, "__qualname__", "").startswith(("Tensor.", "TensorBase.", "_TensorBase.")):
            method = getattr(torch.Tensor, f"{name}_", None)
            if method is not None and name not in ("masked_fill",):  # masked_fill_: ops.assign
                found.append(method)
    for op in intercept.AUGMENTED_OPERATORS:
        method = getattr(torch.Tensor, f"__i{op}__", None)
        if method is not None:
            found.append(method)
    return tuple(dict.fromkeys(found))


INPLACE_METHODS = _inplace_methods()


def _inplace_method_rule(func, args, kwargs):
    """An in-place method on a sharded ``x`` with full operands (a plain tensor, a ``Replicate``
    DTensor) that span the sharded dim: each operand is cut to ``x``'s rows and given as a DTensor
    sharded like ``x``, so DTensor runs the op locally in both directions (with a ``Replicate``
    operand its backward all-gathers the operand's gradient) and keeps autograd's own in-place
    bookkeeping; the operand's gradient is summed over the ranks once (``full_operand``)."""
    x = input_of(args, {})
    sd = domain_shard_dim(x)
    if sd is None or kwargs.get("out") is not None:
        return NotImplemented
    mesh = x.device_mesh

    n = x.shape[sd]
    lo, hi = chunk_range(n, mesh.size(), mesh.get_local_rank())

    def shard_like_x(a: Any) -> Any:
        if not isinstance(a, torch.Tensor) or a.ndim == 0 or a.ndim > x.ndim:
            return a
        if isinstance(a, DTensor) and not is_domain_replicate(a):
            ad = domain_shard_dim(a)
            td = sd - (x.ndim - a.ndim)
            if ad is not None and ad == td and a.shape[td] == 1 and n != 1 and a.device_mesh == mesh:
                from .move import single_row_replicated

                a = single_row_replicated(a)  # one row (``x -= x[:, :, :1]``): from its owner, widened below
            elif ad is not None and ad != td and td >= 0 and a.shape[td] == n and a.device_mesh == mesh:
                from .relayout import reshard

                return reshard(a, td)  # sharded on another dim: moved onto x's (an in-place op keeps x's)
            else:
                return a  # sharded like x: DTensor's own rule (same placement: local)
        if isinstance(a, DTensor) and a.device_mesh != mesh:
            return a  # DTensor's own error
        local = full_operand(a, mesh)
        local = local.reshape([1] * (x.ndim - local.ndim) + list(local.shape))
        if local.shape[sd] == 1 and n != 1:  # broadcast along H: materialized as a view (stride 0)
            local = local.expand([n if d == sd else -1 for d in range(x.ndim)])
        elif local.shape[sd] != n:
            return a  # PyTorch's own error
        shape = list(local.shape)
        return wrap_shard(local.narrow(sd, lo, hi - lo), mesh, sd, shape)

    new_args = (x, *(shard_like_x(a) for a in args[1:]))
    new_kwargs = {k: shard_like_x(v) for k, v in kwargs.items()}
    carries = fold.carries_of(args) if fold.carried(x) is not None else []
    with intercept.suspended():
        out = func(*new_args, **new_kwargs)
    pure = _out_of_place(func)
    if carries and pure is not None and out is x and all(a is b for a, b in zip(args, new_args)):
        # ``out += identity`` after ``bn2``: the rows follow (the mode bumps x's version once after this rule)
        fold.propagate(carries, pure, args, kwargs, x, bumps=1)
    return out


def _out_of_place(func: Callable) -> Callable | None:
    """``Tensor.add`` for ``Tensor.add_``, ``Tensor.__add__`` for ``Tensor.__iadd__`` (``None``: ``copy_``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        return getattr(torch.Tensor, "__" + name[3:], None)
    if name.endswith("_") and not name.startswith("_") and name != "copy_":
        return getattr(torch.Tensor, name[:-1], None)
    return None


FAMILY.rule(INPLACE_METHODS, h="local")(_inplace_method_rule)
