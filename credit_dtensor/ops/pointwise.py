"""Ops that never mix rows across shards, run on each rank's own rows.

Pointwise functions (every torch / ``Tensor`` / ``F`` function whose aten op carries PyTorch's
``pointwise`` tag, plus the operators) and ops along a dim other than the sharded one (softmax,
cumsum, sort ... over channels or W) are exact on the local rows whatever the shard sizes. DTensor
runs them through its sharding propagation, which replicates (all-gathers) shards smaller than the
mesh (``is_tensor_shardable``), refuses plain-tensor operands, and for some ops has no strategy at
all (``hardswish_backward``). Running the op's own torch function on local tensors avoids all
three; the backward is then plain autograd on local tensors. Operands are aligned with
:func:`credit_dtensor.dtensor.align_operand` (full operands sliced to the local rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .. import intercept
from ..dtensor import (
    align_operand,
    as_dtensor,
    domain_shard_dim,
    first_sharded,
    global_stride,
    is_domain_replicate,
    local_of,
    wrap_replicate,
    wrap_shard,
)
from ..errors import DomainParallelError
from . import fold
from .family import family, input_of

__all__ = ["POINTWISE", "local_apply", "wrap_outputs"]

FAMILY = family("pointwise", "elementwise ops and activations: local rows; full operands cut to the local rows")

_RANDOM = ("rand", "bernoulli", "normal", "dropout", "uniform", "exponential", "geometric", "cauchy", "poisson")
_NOT_ELEMENTWISE = {"equal", "max", "min"}  # bool result / reductions (max/min: see ops.reduce)
_OPERATORS = {
    "__add__": "add",
    "__radd__": "add",
    "__sub__": "sub",
    "__rsub__": "rsub",
    "__mul__": "mul",
    "__rmul__": "mul",
    "__truediv__": "div",
    "__rtruediv__": "div",
    "__floordiv__": "floor_divide",
    "__rfloordiv__": "floor_divide",
    "__mod__": "remainder",
    "__rmod__": "remainder",
    "__pow__": "pow",
    "__rpow__": "pow",
    "__neg__": "neg",
    "__abs__": "abs",
    "__and__": "bitwise_and",
    "__or__": "bitwise_or",
    "__xor__": "bitwise_xor",
    "__invert__": "bitwise_not",
    "__eq__": "eq",
    "__ne__": "ne",
    "__lt__": "lt",
    "__le__": "le",
    "__gt__": "gt",
    "__ge__": "ge",
    "__lshift__": "bitwise_left_shift",
    "__rshift__": "bitwise_right_shift",
}
_F_ALIASES = {"logsigmoid": "log_sigmoid", "relu6": "hardtanh", "softsign": None, "tanhshrink": None}


def _is_pointwise_aten(name: str | None) -> bool:
    if not name or name in _NOT_ELEMENTWISE or any(r in name for r in _RANDOM):
        return False
    try:
        packet = getattr(torch.ops.aten, name)
        return any(torch.Tag.pointwise in getattr(packet, ov).tags for ov in packet.overloads())
    except (AttributeError, RuntimeError):
        return False


def _enumerate_pointwise() -> list[Callable]:
    """Every public, out-of-place torch function whose aten op is tagged pointwise."""
    found: list[Callable] = []
    for ns in (torch, torch.special):
        for name in dir(ns):
            if not name.startswith("_") and not name.endswith("_") and _is_pointwise_aten(name):
                found.append(getattr(ns, name))
    for name in dir(torch.Tensor):
        if not name.startswith("_") and not name.endswith("_") and _is_pointwise_aten(name):
            found.append(getattr(torch.Tensor, name))
    for name, aten_name in _OPERATORS.items():
        if hasattr(torch.Tensor, name) and _is_pointwise_aten(aten_name):
            found.append(getattr(torch.Tensor, name))
    for name in dir(F):
        if name.startswith("_") or name.endswith("_") or not callable(getattr(F, name)):
            continue
        if _is_pointwise_aten(_F_ALIASES.get(name, name)) and "dropout" not in name:
            found.append(getattr(F, name))
    for fn in (F.hardswish, F.silu, F.mish, F.gelu, F.logsigmoid, F.softplus, F.elu, F.leaky_relu):
        found.append(fn)
    return list(dict.fromkeys(found))


POINTWISE: tuple[Callable, ...] = tuple(_enumerate_pointwise())


def _inplace_positions() -> dict[Callable, int]:
    """``F.relu(x, inplace=True)`` & co.: the position of the ``inplace`` parameter, per function."""
    import inspect

    found = {}
    for fn in POINTWISE:
        if getattr(fn, "__module__", "") != "torch.nn.functional":
            continue
        try:
            names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if "inplace" in names:
            found[fn] = names.index("inplace")
    return found


_INPLACE = _inplace_positions()


def _is_inplace(func: Callable, args: tuple, kwargs: dict) -> bool:
    pos = _INPLACE.get(func)
    if pos is None:
        return False
    return bool(kwargs.get("inplace", args[pos] if len(args) > pos else False))


def wrap_outputs(out: Any, ref: DTensor, out_dim_of: Callable[[torch.Tensor], int | None]) -> Any:
    """Wrap local tensor outputs as ``Shard`` DTensors (global size of the sharded dim = ``ref``'s);
    raises ``ValueError`` if an output does not keep the local rows (not a row-local op)."""
    mesh = ref.device_mesh
    d = domain_shard_dim(ref)
    n, rows = ref.shape[d], ref._local_tensor.shape[d]

    def wrap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or isinstance(t, DTensor):
            return t
        od = out_dim_of(t)
        if od is None or t.ndim <= od or t.shape[od] != rows:
            raise ValueError("output does not keep the sharded rows")
        shape = list(t.shape)
        shape[od] = n
        return wrap_shard(t, mesh, od, shape)

    if isinstance(out, tuple) and hasattr(out, "_fields"):  # torch.return_types.*
        return type(out)(tuple(wrap(t) for t in out))
    if isinstance(out, (tuple, list)):
        return type(out)(wrap(t) for t in out)
    return wrap(out)


def _tensors(args: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(b for b in a if isinstance(b, torch.Tensor))
    return out


def _inplace_rule(func, args, kwargs):
    """``F.hardswish(x, inplace=True)`` & co. on a sharded DTensor: the out-of-place rule, then one
    in-place ``copy_`` of the result into ``x`` by DTensor (same placement: local). Computing in
    place on the local shard would modify a view that autograd forbids, and DTensor's own in-place
    path has no backward strategy for some of these (``hardswish_backward``). The rule runs on a clone
    of ``x`` (as PyTorch's autograd keeps the original input of an in-place op whose backward
    needs it), so the ``copy_`` cannot change what backward reads."""
    x = input_of(args, kwargs)
    if not isinstance(x, DTensor):
        return NotImplemented
    pos = _INPLACE[func]
    if "inplace" in kwargs or len(args) <= pos:
        args, kwargs = args, {**kwargs, "inplace": False}
    else:
        args = (*args[:pos], False, *args[pos + 1 :])
    carry = fold.carried(x)
    with intercept.suspended():  # the backward of silu/hardswish/elu reads the input: keep it intact
        xc = x.clone()
    args, kwargs = ((xc, *args[1:]), kwargs) if args else (args, {**kwargs, "input": xc})
    y = _pointwise_rule(func, args, kwargs)
    if y is NotImplemented or not isinstance(y, DTensor) or y.placements != x.placements or y.shape != x.shape:
        return NotImplemented
    with intercept.suspended():  # DTensor's copy_ (Shard -> same Shard: local), recorded by autograd
        x.copy_(y)
    if not torch.compiler.is_compiling():
        intercept.bump_local_version(x)
    if carry is not None:  # x now holds func(xc): so do the rows it carries
        fold.propagate([(xc, carry)], func, args, kwargs, x)
    return x


def _widened_rows(tensors: list[torch.Tensor], out_shape: torch.Size) -> dict[int, DTensor]:
    """Operands sharded on a dim of one global row that the op broadcasts against more rows
    (``t - t[:, :, :1]``, ``torch.where(t[:, :, :1] > 0, t, -t)``): ``{id(operand): the row
    replicated}`` (broadcast from its owner, :func:`~.move.single_row_replicated`); DTensor
    all-gathered it. Empty when there is none (the usual case)."""
    moved = {}
    for t in tensors:
        d = domain_shard_dim(t)
        if d is not None and t.shape[d] == 1 and out_shape[len(out_shape) - t.ndim + d] > 1:
            from .move import single_row_replicated

            moved[id(t)] = single_row_replicated(t)
    return moved


def align_shardings(tensors: list[torch.Tensor], out_ndim: int) -> dict[int, DTensor]:
    """Operands sharded on *different* dims of the broadcast result (a residual add of an attention
    output laid out on its batch of groups and an H-sharded input): ``{id(operand): re-laid-out
    operand}`` so that all share one sharded dim -- the H-like one (``out_ndim - 2``) when an
    operand has it, else the first operand's -- each moved by one all-to-all instead of DTensor's
    all-gather. Empty when they agree (the usual case)."""
    sharded = [t for t in tensors if domain_shard_dim(t) is not None]
    if len(sharded) < 2:
        return {}
    dims = [out_ndim - t.ndim + domain_shard_dim(t) for t in sharded]
    if len(set(dims)) == 1:
        return {}
    target = out_ndim - 2 if out_ndim - 2 in dims else dims[0]
    sizes = {d: t.shape[d - (out_ndim - t.ndim)] for t, d in zip(sharded, dims)}
    from .relayout import reshard

    moved = {}
    for t, d in zip(sharded, dims):
        td = target - (out_ndim - t.ndim)
        if d == target or td < 0 or t.shape[td] != sizes[target] or t.device_mesh != sharded[0].device_mesh:
            continue
        moved[id(t)] = reshard(t, td)
    return moved


def _substitute(args: tuple, moved: dict[int, DTensor]) -> tuple:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)) and any(id(b) in moved for b in a):
            out.append(type(a)(moved.get(id(b), b) for b in a))
        else:
            out.append(moved.get(id(a), a))
    return tuple(out)


def _same_spec(args: tuple, kwargs: dict) -> DTensor | None:
    """The common operand when every tensor operand is a DTensor of one spec (mesh, placements,
    shape), sharded once, the rest Python scalars: the op is then its own torch function on the
    local tensors (:func:`_local_fast`). ``None`` otherwise."""
    ref = None
    for a in args:
        if isinstance(a, DTensor):
            if ref is None:
                ref = a
                if len(a.placements) != 1 or not a.placements[0].is_shard():
                    return None
            elif a.device_mesh is not ref.device_mesh or a.placements != ref.placements or a.shape != ref.shape:
                return None
        elif not isinstance(a, (int, float, bool)):
            return None
    if ref is None or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return None
    return ref


def _local_fast(func, args: tuple, kwargs: dict, ref: DTensor) -> Any:
    """The usual pointwise call (``relu(x)``, ``a + b`` of one layout): the op on the local tensors,
    wrapped back on ``ref``'s placement; a few microseconds of plumbing instead of DTensor's
    sharding propagation (several times the op's own host time on small shards). Backward is plain
    autograd on the local tensors."""
    out = func(*(local_of(a) if isinstance(a, DTensor) else a for a in args), **kwargs)
    if isinstance(out, torch.Tensor) and out.shape == ref._local_tensor.shape:
        res = as_dtensor(out, ref.device_mesh, ref.placements, ref.shape, global_stride(out, ref.shape))
        carries = fold.carries_of(args)
        if carries:  # a norm's borrowed halo rows ride along (ops.fold)
            fold.propagate(carries, func, args, kwargs, res)
        return res
    try:
        return wrap_outputs(out, ref, lambda t: t.ndim - ref.ndim + domain_shard_dim(ref))
    except ValueError:
        return NotImplemented


def _pointwise_rule(func, args, kwargs):
    """The op on local rows, operands aligned; no ``out=``, no ``inplace=True`` (the callers':
    :func:`_local_rule`, :func:`_inplace_rule`)."""
    ref = _same_spec(args, kwargs)
    if ref is not None:
        return _local_fast(func, args, kwargs, ref)
    tensors = _tensors((*args, *kwargs.values()))
    ref = first_sharded(*tensors)
    if ref is None:
        return _replicated_pointwise(func, args, kwargs, tensors)
    try:
        out_shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        return NotImplemented  # let PyTorch raise its own error
    out_ndim = len(out_shape)
    moved = _widened_rows(tensors, out_shape)  # a one-row operand first: it then shards no dim
    moved.update(align_shardings([moved.get(id(t), t) for t in tensors] if moved else tensors, out_ndim))
    if moved:
        args = _substitute(args, moved)
        kwargs = {k: _substitute((v,), moved)[0] for k, v in kwargs.items()}
        tensors = _tensors((*args, *kwargs.values()))
        ref = first_sharded(*tensors)
    if ref is None:  # every sharded operand was a single row, now replicated
        return _replicated_pointwise(func, args, kwargs, tensors)
    if func in _PROMOTING:
        args = tuple(_promoted(a, ref) for a in args)
        kwargs = {k: _promoted(v, ref) for k, v in kwargs.items()}
    ref_dim = domain_shard_dim(ref)
    where = getattr(func, "__name__", str(func))

    def align(a: Any) -> Any:
        if isinstance(a, (list, tuple)) and any(isinstance(b, torch.Tensor) for b in a):
            return type(a)(align(b) for b in a)
        return align_operand(a, ref, ref_dim, out_ndim, where)

    try:
        largs = tuple(align(a) for a in args)
        lkwargs = {k: align(v) for k, v in kwargs.items()}
    except DomainParallelError:
        return NotImplemented  # operands DTensor cannot combine either: its own error message
    out = func(*largs, **lkwargs)
    try:
        return wrap_outputs(out, ref, lambda t: t.ndim - out_ndim + (out_ndim - ref.ndim + ref_dim))
    except ValueError:
        return NotImplemented


#: arithmetic that computes in the promoted dtype of its operands (each upcast exactly first)
_PROMOTING = frozenset(
    (
        *(getattr(torch.Tensor, n) for n in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__")),
        *(getattr(torch.Tensor, n) for n in ("__truediv__", "__rtruediv__", "add", "sub", "mul", "div")),
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.true_divide,
        torch.maximum,
        torch.minimum,
    )
)


def _promoted(a: Any, ref: DTensor) -> Any:
    """A full (plain or ``Replicate``) floating operand of lower precision than the sharded ``ref``,
    upcast to ``ref``'s dtype before it is cut to the local rows. PyTorch computes in the promoted
    dtype anyway (the upcast is exact, the forward unchanged); the point is the gradient: on one
    device the operand's gradient is reduced over the broadcast rows in the promoted dtype and
    rounded once. Cut first, each rank would round its partial sum to the operand's dtype and the
    ranks would add rounded partials (an fp32 position bias added to fp64 logits, as in Camulator:
    its gradient ~1e-7 relative off, then amplified by the cancelling position-bias MLP). Upcast
    first, the partials are summed over the ranks in the promoted dtype and rounded once, by the
    upcast's backward, as on one device."""
    if not isinstance(a, torch.Tensor) or not a.requires_grad or domain_shard_dim(a) is not None:
        return a
    dtype = ref.dtype
    if (
        a.dtype == dtype
        or not a.dtype.is_floating_point
        or not dtype.is_floating_point
        or torch.promote_types(a.dtype, dtype) != dtype
    ):
        return a
    if isinstance(a, DTensor):
        if not is_domain_replicate(a) or a.device_mesh != ref.device_mesh:
            return a
        # the upcast on the local value, re-wrapped: the Partial gradient is reduced by the wrap's
        # backward (to Replicate, in the promoted dtype), then cast once; an upcast of the DTensor
        # itself would carry the Partial through the cast and reduce the rounded partials
        with intercept.suspended():
            return wrap_replicate(a.to_local().to(dtype), a.device_mesh)
    return a.to(dtype)


def _replicated_pointwise(func, args, kwargs, tensors):
    """Every DTensor operand ``Replicate`` on one 1-D mesh (a pooled gate, a statistic): compute on
    the local values (identical on every rank) -- some ops (``hardsigmoid_backward``) have no DTensor
    strategy at all. Gradients stay ``Replicate``: every rank computes the same full gradient."""
    dts = [t for t in tensors if isinstance(t, DTensor)]
    mesh = dts[0].device_mesh
    if any(t.device_mesh != mesh or not is_domain_replicate(t) for t in dts):
        return NotImplemented

    def local(a: Any) -> Any:
        if isinstance(a, DTensor):
            return a.to_local()
        if isinstance(a, (list, tuple)) and any(isinstance(b, DTensor) for b in a):
            return type(a)(local(b) for b in a)
        return a

    out = func(*(local(a) for a in args), **{k: local(v) for k, v in kwargs.items()})

    def wrap(t: Any) -> Any:
        return wrap_replicate(t, mesh) if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t

    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(tuple(wrap(t) for t in out))
    return type(out)(wrap(t) for t in out) if isinstance(out, (tuple, list)) else wrap(out)


def _local_rule(func, args, kwargs):
    """Every call but ``inplace=True`` and ``out=``, outside the gather guard: operands aligned to
    the local rows (one all-to-all where two are sharded on different dims), the op on local
    tensors, no DTensor dispatch; ``NotImplemented`` hands the call to DTensor (watched)."""
    if kwargs.get("out") is not None or _is_inplace(func, args, kwargs):
        return NotImplemented
    return _pointwise_rule(func, args, kwargs)


def _inplace_entry(func, args, kwargs):
    """``F.relu(x, inplace=True)`` & co.: DTensor's own ``clone``/``copy_`` of one layout (watched)."""
    return _inplace_rule(func, args, kwargs) if _is_inplace(func, args, kwargs) else NotImplemented


FAMILY.rule(POINTWISE, h="local", unwatched=True)(_local_rule)
FAMILY.rule(POINTWISE, h="local", note="inplace=True: the op, then one copy_ into the input")(_inplace_entry)


def _expand_target(func: Callable, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The sizes an ``expand`` / ``expand_as`` / ``broadcast_to`` call asks for (``-1``: keep)."""
    rest = args[1:]
    if func is torch.Tensor.expand_as:
        other = rest[0] if rest else kwargs.get("other")
        return None if other is None else tuple(other.shape)
    if func is torch.Tensor.expand and len(rest) != 1:
        return tuple(rest) if rest else tuple(kwargs.get("size", ()))
    size = rest[0] if rest else kwargs.get("size")
    return None if size is None else tuple(size)


def _expand_rule(func, args, kwargs):
    """``t[:, :, 3:4].expand_as(t)`` & co.: the sharded dim has one global row (on one rank) and
    the call widens it, so the row is broadcast from its owner first (as for ``t - t[:, :, 3:4]``),
    then expanded on every rank. DTensor's own view rule raised ``RuntimeError: 2`` there, and its
    redistribution all-gathered."""
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    sd = domain_shard_dim(x)
    target = _expand_target(func, args, kwargs) if sd is not None and x.shape[sd] == 1 else None
    if target is None or len(target) < x.ndim or target[len(target) - x.ndim + sd] in (-1, 1):
        return NotImplemented
    from .move import single_row_replicated

    xr = single_row_replicated(x)
    return func(xr, *args[1:], **kwargs) if args else func(**{**kwargs, "input": xr})


FAMILY.rule(
    torch.Tensor.expand,
    torch.Tensor.expand_as,
    torch.broadcast_to,
    torch.Tensor.broadcast_to,
    h="relayout",
    note="a sharded dim of one global row widened: the row broadcast from its owner (Replicate), then expanded",
)(_expand_rule)


def local_apply(func: Callable, args: tuple, kwargs: dict, x: DTensor, out_dim: int, empty_rows: bool = False) -> Any:
    """``func`` on ``x``'s local tensor (first argument), outputs sharded on ``out_dim``.
    ``empty_rows``: a shard without rows (``torch.chunk`` leaves some: H=4 over 3 ranks) goes
    through with one zero row that is dropped after, for kernels that refuse empty inputs (MKL's
    FFTs, pooling); ``func`` must keep the rows on ``out_dim``."""
    local = local_of(x)
    pad = empty_rows and local.shape[out_dim] == 0
    if pad:
        shape = list(local.shape)
        shape[out_dim] = 1
        local = torch.cat([local, local.new_zeros(shape)], out_dim)
    args = (local, *args[1:]) if args and args[0] is x else args
    kwargs = {k: (local if v is x else v) for k, v in kwargs.items()}
    out = func(*args, **kwargs)
    if pad:
        out = type(out)(t.narrow(out_dim, 0, 0) for t in out) if isinstance(out, tuple) else out.narrow(out_dim, 0, 0)
    return wrap_outputs(out, x, lambda t: out_dim)


# the families that build on this module, registered with it (same order as before the split)
from . import dimwise as _dimwise  # noqa: E402,F401
from . import inplace_methods as _inplace_methods  # noqa: E402,F401
from . import linear as _linear  # noqa: E402,F401
