"""Clear errors for ops that mix rows across shards and have no exact rule yet.

Without these, PyTorch answers with its own messages ("aten.im2col.default does not have a
sharding strategy", "got mixed torch.Tensor and DTensor", "Cannot flatten unevenly sharded
tensor") or silently all-gathers. Each refusal names the op, the module (inside a converted
model), why the op cannot run shard-locally, and what to do instead. The same decision is taken
on every rank (it depends only on placements and shapes), so no rank is left waiting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..dtensor import domain_shard_dim, is_domain_replicate
from ..errors import UnsupportedShardingError
from ..guard import _op_name, module_path
from .family import Signature, family, input_of

FAMILY = family("refuse", "ops with no exact rule yet, refused with the fix instead of PyTorch's gather or error")

__all__ = ["refuse"]


def refuse(func: Callable, why: str, fix: str) -> UnsupportedShardingError:
    where = module_path()
    prefix = f"{where}: " if where else ""
    return UnsupportedShardingError(f"{prefix}{_op_name(func)} on an H-sharded tensor: {why}. Fix: {fix}")


FAMILY.refuses_modules(
    {
        torch.nn.Unfold: "F.unfold is refused on H shards: use a strided conv for patch embedding",
        torch.nn.Fold: "F.fold is refused on H shards",
    }
)

_GATHER_FIX = (
    "gather the activation explicitly (credit_dtensor.gather_tensor) before this op and re-shard after it "
    "(credit_dtensor.shard_tensor), or run the model with domain size 1 for this part"
)


def refusing(why: str, fix: str) -> Callable:
    """A rule that refuses calls whose input is H-sharded with ``why`` and ``fix`` (and leaves the
    others to PyTorch)."""

    def rule(func, a):
        if domain_shard_dim(a.get("input")) is None:
            return NotImplemented
        raise refuse(func, why, fix)

    return rule


_INPUT = Signature(("input",))
FAMILY.rule(
    F.unfold, F.fold, h="refused", note="patches flatten (H, W) into one dim", name="unfold_rule", signature=_INPUT
)(
    refusing(
        "its output flattens every (H, W) patch position into one dim, which no H-sharding can describe",
        "express the patch extraction as a convolution (e.g. nn.Conv2d with stride = kernel for patch embedding, "
        "which credit_dtensor runs exactly), or " + _GATHER_FIX,
    )
)
FAMILY.rule(
    F.grid_sample,
    h="refused",
    note="any output pixel may sample any input row",
    name="grid_sample_rule",
    signature=_INPUT,
)(
    refusing(
        "each output pixel may sample any input row, so the rows it needs are only known from the grid's values",
        _GATHER_FIX,
    )
)


def _host_rule(func, args, kwargs):
    """``x.numpy()`` / ``x.tolist()``: a ``Replicate`` DTensor's local value is the whole tensor;
    an H-sharded one holds only this rank's rows (PyTorch says "not supported for tensor subclasses")."""
    x = input_of(args, {})
    if is_domain_replicate(x):
        return func(x.to_local(), *args[1:], **kwargs)
    if domain_shard_dim(x) is None:
        return NotImplemented
    name = getattr(func, "__name__", "numpy")
    raise refuse(
        func,
        f"each rank holds only its own rows of the {tuple(x.shape)} tensor",
        f"credit_dtensor.gather_tensor(x).{name}() (or x.full_tensor().{name}()) for the whole tensor on every "
        f"rank, or x.to_local().{name}() for this rank's rows",
    )


FAMILY.rule(torch.Tensor.numpy, torch.Tensor.tolist, h="refused", note="a rank holds only its rows")(_host_rule)

FAMILY.rule(
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.argwhere,
    torch.Tensor.argwhere,
    h="refused",
    note="the output's length depends on every rank's values",
    name="data_dependent_rule",
    signature=_INPUT,
)(
    refusing(
        "its output's length depends on the values of every rank's rows, which no H-sharding can describe",
        "keep the shape with a mask, e.g. torch.where(mask, x, 0).sum() / mask.sum() for a masked mean "
        "(exact on shards), or " + _GATHER_FIX,
    )
)


def _allclose_rule(func, a):
    """``torch.allclose`` as ``isclose(...).all()`` through the pointwise and reduction rules (DTensor
    raised a bare "aten.allclose.default"): the same bool on every rank."""
    x, other = a.get("input"), a.get("other")
    if domain_shard_dim(x) is None and domain_shard_dim(other) is None:
        return NotImplemented
    from .. import intercept

    with intercept.scoped():
        close = torch.isclose(x, other, rtol=a["rtol"], atol=a["atol"], equal_nan=a["equal_nan"])
        return bool(close.all().full_tensor())


FAMILY.rule(
    torch.allclose,
    torch.Tensor.allclose,
    h="reduce",
    note="isclose, then all over the ranks",
    signature=Signature(
        ("input", "other", "rtol", "atol", "equal_nan"), {"rtol": 1e-5, "atol": 1e-8, "equal_nan": False}
    ),
)(_allclose_rule)
