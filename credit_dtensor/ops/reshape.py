"""Reshapes of H-sharded tensors: ``view`` / ``reshape`` / ``flatten`` / ``unflatten`` /
``view_as`` / ``reshape_as`` (and so every einops ``rearrange`` pattern, which is a reshape, a
permute and a reshape).

PyTorch 2.13's DTensor all-gathers a view that splits or merges an evenly sharded dim and refuses
an unevenly sharded one ("Cannot unflatten unevenly sharded tensor"). The rule here
(:func:`credit_dtensor.geometry.window.view_plan`) shards the result on the outermost dim of the
group the sharded dim is reshaped with, and

* reshapes locally when each rank's elements already are that dim's ``torch.chunk`` shard
  (window split ``H -> (H/w, w)`` when every shard holds whole windows, uneven ones included:
  H=40, w=8 over 3 ranks after re-chunking holds 2, 2, 1 windows; reshapes that do not touch H);
* re-chunks otherwise, when the sharded dim is the outermost of its group (each rank's elements
  are one contiguous run): only the rows that change owner move, in one batched exchange, then
  the reshape is local (window split on shards that cut windows, window reverse back to
  ``torch.chunk`` of H, ``(H, W) -> H*W`` tokens);
* when the sharded dim is merged *under* a larger dim, no rank would hold a ``torch.chunk``
  shard: the shards move first, onto a dim outside the merged group (window partition's
  ``view(-1, w, w, C)`` merging ``(B, nH, nW)``, sharded on ``C`` meanwhile) or else onto the
  group's outermost dim (``flatten(1)`` of ``(B, C, H, W)`` before a dense head: sharded on ``C``,
  each rank's elements are one run of ``C*H*W``); one all-to-all, nothing gathered;
* raises a :class:`~credit_dtensor.DomainParallelError` when neither has ``world`` entries. The
  message names the module, the window, the valid domain sizes and the fix (declare the
  window-attention module shard-local). Nothing is gathered silently.

``permute`` / ``transpose`` / ``movedim`` / ``squeeze`` / ``unsqueeze`` keep every rank's rows and
are left to DTensor, which handles them locally for any shard sizes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import guard, intercept
from ..dtensor import domain_shard_dim, wrap_shard
from ..errors import DomainParallelError
from ..geometry import chunk_range
from ..geometry.window import ViewPlan, valid_domain_sizes, view_groups, view_plan, window_height
from . import alias
from .family import family, input_of
from .rechunk import repartition_local
from .relayout import best_free_dim, reshard

FAMILY = family("reshape", "view/reshape/flatten/unflatten that split or merge H: re-chunked to whole windows")

__all__ = ["FUNCS", "target_shape", "reshape_sharded"]

FUNCS = (
    torch.Tensor.view,
    torch.Tensor.reshape,
    torch.reshape,
    torch.Tensor.flatten,
    torch.flatten,
    torch.Tensor.unflatten,
    torch.unflatten,
    torch.Tensor.view_as,
    torch.Tensor.reshape_as,
)


def _ints(shape: Any) -> list[int] | None:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = shape[0]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        return None  # view(dtype), symbolic or named sizes: PyTorch's own path
    return list(shape)


def _infer(shape: list[int], numel: int) -> list[int] | None:
    """Resolve one ``-1`` like PyTorch; ``None`` where PyTorch would raise (its error, not ours)."""
    if shape.count(-1) > 1 or any(s < -1 for s in shape):
        return None
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or numel % known:
            return None
        shape = [numel // known if s == -1 else s for s in shape]
    return shape if math.prod(shape) == numel else None


def target_shape(func: Any, args: tuple, kwargs: dict) -> tuple[list[int], bool] | None:
    """The global result shape of a reshape call and whether it is a ``view`` (aliasing)."""
    x = input_of(args, kwargs)
    rest = args[1:]
    shape: Any
    if func in (torch.Tensor.view, torch.Tensor.reshape, torch.reshape):
        shape = rest if rest else (kwargs.get("shape", kwargs.get("size")),)
        if shape == (None,):
            return None
        shape = _ints(shape)
    elif func in (torch.Tensor.view_as, torch.Tensor.reshape_as):
        other = rest[0] if rest else kwargs.get("other")
        shape = list(other.shape) if isinstance(other, torch.Tensor) else None
    elif func in (torch.Tensor.flatten, torch.flatten):
        names = ("start_dim", "end_dim")
        vals = list(rest) + [kwargs[k] for k in names[len(rest) :] if k in kwargs]
        start, end = (vals + [0, -1][len(vals) :])[:2]
        if not isinstance(start, int) or not isinstance(end, int) or x.ndim == 0:
            return None
        start, end = start % x.ndim, end % x.ndim
        if start > end:
            return None
        s = list(x.shape)
        shape = s[:start] + [math.prod(s[start : end + 1])] + s[end + 1 :]
    elif func in (torch.Tensor.unflatten, torch.unflatten):
        vals = list(rest) + [kwargs[k] for k in ("dim", "sizes")[len(rest) :] if k in kwargs]
        if len(vals) != 2 or not isinstance(vals[0], int):
            return None
        dim, sizes = vals[0] % x.ndim, _ints((vals[1],))
        if sizes is None:
            return None
        sizes = _infer(sizes, x.shape[dim])
        if sizes is None:
            return None
        shape = list(x.shape[:dim]) + sizes + list(x.shape[dim + 1 :])
    else:
        return None
    if shape is None:
        return None
    shape = _infer(shape, x.numel())
    return (shape, func is torch.Tensor.view) if shape is not None else None


def reshape_sharded(x: Any, shape: list[int], view: bool = False, func: Any = None) -> Any:
    """``x`` (sharded on one dim of a 1-D mesh) reshaped to ``shape``; see the module docstring."""
    sd = domain_shard_dim(x)
    mesh = x.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    plan = view_plan(tuple(x.shape), shape, sd, world)
    if plan is None:
        return NotImplemented
    if plan.kind == "unsupported":
        k = _intermediate_dim(tuple(x.shape), plan, world)
        outer = _group_outer_dim(tuple(x.shape), plan, world) if k is None else None
        if outer is not None:
            # flatten(1) of (B, C, H, W) for a dense head: the shards move onto C (one all-to-all), so each
            # rank's elements are one contiguous run of the merged dim, re-chunked by the plan below
            return reshape_sharded(reshard(x, outer), shape, view, func)
        if k is None:
            where = guard._op_name(func) if func is not None else "reshape"
            raise DomainParallelError(_message(where, tuple(x.shape), shape, plan, world))
        # the merge runs where the merged dims are whole: shard another dim for it, then the result's
        # merged dim (each element moves at most twice; nothing is gathered)
        y = reshape_sharded(reshard(x, k), shape, view, func)
        return reshard(y, plan.out_dim)
    local = x.to_local()
    a, b = chunk_range(shape[plan.out_dim], world, rank)
    local_shape = list(shape)
    local_shape[plan.out_dim] = b - a
    if plan.kind == "local":
        y = local.view(local_shape) if view else local.reshape(local_shape)
    else:
        held = plan.in_units[rank + 1] - plan.in_units[rank]
        units = local.reshape([*local.shape[: plan.start], held, plan.unit, *local.shape[plan.stop :]])
        y = repartition_local(units, mesh, plan.start, plan.in_units, plan.out_units).reshape(local_shape)
    out = wrap_shard(y, mesh, plan.out_dim, shape)
    return _spread(out, tuple(x.shape), shape, plan, world)


def _intermediate_dim(in_shape: tuple[int, ...], plan: ViewPlan, world: int) -> int | None:
    """A dim outside the reshaped group ``[plan.start, plan.stop)`` with at least ``world`` entries
    (the largest) to hold the shards while the group is merged; ``None`` without one."""
    cands = [d for d in range(len(in_shape)) if not plan.start <= d < plan.stop and in_shape[d] >= world]
    return best_free_dim(in_shape, cands, world) if cands else None


def _group_outer_dim(in_shape: tuple[int, ...], plan: ViewPlan, world: int) -> int | None:
    """The outermost dim of more than one entry among those the sharded dim is merged under, when
    it has at least ``world`` entries: sharded there, every rank holds a contiguous run of the
    merged dim. ``None`` otherwise."""
    outer = [d for d in range(plan.start, plan.in_dim) if in_shape[d] > 1]
    return outer[0] if outer and in_shape[outer[0]] >= world else None


def _spread(out: Any, in_shape: tuple[int, ...], shape: list[int], plan: ViewPlan, world: int) -> Any:
    """CrossFormer's long-distance grouping splits H into ``(window, groups)`` with a small window
    (2 rows on 4 ranks), then merges the groups into a leading batch dim: the result stays sharded
    on the untouched window dim, on at most half of the ranks. When a reshape leaves the shards on
    such a dim and makes a leading batch dim of at least ``world`` entries out of several dims, the
    shards move onto that batch dim (one all-to-all), so the attention over the groups is balanced.
    Splits and merges of the sharded dim itself are left as they are (window partitions keep whole
    windows per shard)."""
    d = plan.out_dim
    if world == 1 or d == 0 or 2 * shape[d] > world or plan.out_group != (d,) or shape[0] < world:
        return out
    groups = view_groups(in_shape, shape)
    lead = next((gi for gi, go in groups or [] if go and go[0] == 0), None)
    if lead is None or len(lead) < 2:
        return out
    return reshard(out, 0)


@FAMILY.rule(*FUNCS, h="relayout")
def _reshape_rule(func, args, kwargs):
    x = input_of(args, kwargs)
    if domain_shard_dim(x) is None:
        return NotImplemented
    target = target_shape(func, args, kwargs)
    if target is None:
        return NotImplemented
    out = reshape_sharded(x, target[0], target[1], func)
    if out is NotImplemented or out is x or torch.compiler.is_compiling():
        return out
    shares = out.to_local().data_ptr() == x.to_local().data_ptr() or out.to_local().numel() == 0
    return alias.track(out, x, ("reshape", tuple(x.shape)), _reshape_back, shares_memory=shares)


def _reshape_back(base: Any, value: Any) -> None:
    """Write a reshaped view back into its base (view semantics, :mod:`.alias`)."""
    back = reshape_sharded(value, list(base.shape))
    with intercept.suspended():
        base.copy_(back)


# --- the error for merges that cannot stay sharded ----------------------------------------------------


def _window_module() -> tuple[nn.Module, int] | None:
    """The innermost module on the call stack that has a window (``window_size``)."""

    def height(m: nn.Module) -> int | None:
        w = window_height(m)
        return w if w is not None and w > 1 else None

    return guard.innermost_module(height)


def _message(where: str, in_shape: tuple[int, ...], out_shape: list[int], plan: ViewPlan, world: int) -> str:
    path = guard.module_path() or "(outside a converted module)"
    n = in_shape[plan.in_dim]
    found = _window_module()
    head = (
        f"{path}: {where} {tuple(in_shape)} -> {tuple(out_shape)} on a tensor sharded on dim {plan.in_dim}: "
        f"{plan.reason} (as in window partition's view(-1, w, w, C), which merges (B, nH, nW)). "
    )
    fix = (
        "Fix: declare the module that merges them shard-local (credit_dtensor.shard_local, e.g. "
        "convert_to_domain_parallel(model, manager, custom_converters={YourWindowAttention: credit_dtensor.shard_local})"
        " or register_converter(YourWindowAttention, credit_dtensor.shard_local)): its windows then lie inside one "
        "shard and the merge runs on each rank's own windows. "
    )
    if found is not None:
        mod, w = found
        h = n * w if w in in_shape[plan.in_dim + 1 :] else n
        sizes = valid_domain_sizes(h, w, max(8, world))
        fix += (
            f"That needs every shard to hold whole windows of {w} rows ({type(mod).__name__}.window_size): "
            f"for H={h}, domain sizes {sizes} (this run: {world}). "
        )
    fix += (
        "On other domain sizes, split H into windows through the rules first (x.view(B, H // w, w, ...) outside "
        "the shard-local module re-chunks to whole windows on any shard sizes) and merge batch and window "
        "dims inside it (docs/patterns.md, 'Window reshapes')."
    )
    return head + fix
