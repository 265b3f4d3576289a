"""Optimizers built before conversion keep training the model.

Converting a module turns each plain parameter into a ``Replicate`` DTensor parameter, and FSDP2's
``fully_shard`` turns those into sharded ones: new parameter objects (``torch.utils.swap_tensors``
cannot turn a ``Parameter`` into a DTensor in place: DTensor has slots). An optimizer built before
either step holds the old objects: ``opt.step()`` ran and the model never changed, silently.

Every replacement is recorded (:func:`record`), and right after it every live optimizer that holds
a replaced parameter is rebound (:func:`rebind_optimizers`): its ``param_groups`` point at the new
parameters and its per-parameter state moves with them (state tensors shaped like the parameter are
laid out like it: ``Replicate`` or FSDP2's shard; scalars such as Adam's ``step`` stay). A global
optimizer step pre-hook does the same for any optimizer the scan missed, before its first step.
A log line says what was rebound.
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["record", "rebind", "rebind_optimizers", "replacement_of"]

logger = logging.getLogger(__name__)

#: id(old) -> (weakref to old, weakref to new)
_REPLACED: dict[int, tuple[weakref.ref, weakref.ref]] = {}
_HOOK: list[Any] = []


def _forget(key: int) -> None:
    _REPLACED.pop(key, None)


def record(old: torch.Tensor, new: torch.Tensor) -> None:
    """Remember that ``new`` replaces the parameter ``old`` (ties: record each old object once)."""
    if old is new:
        return
    key = id(old)
    _REPLACED[key] = (weakref.ref(old, lambda _r, key=key: _forget(key)), weakref.ref(new))
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HOOK.append(register_optimizer_step_pre_hook(_pre_step))


def replacement_of(p: torch.Tensor) -> torch.Tensor | None:
    """The parameter that finally replaces ``p`` (following chains), or ``None``."""
    seen = 0
    out = None
    while True:
        hit = _REPLACED.get(id(p))
        if hit is None or hit[0]() is not p:
            return out
        new = hit[1]()
        if new is None:
            return out
        out = p = new
        seen += 1
        if seen > 16:  # a cycle would be a bug: stop rather than spin
            return out


def _move_state(value: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """A state tensor laid out like the new parameter when it is shaped like the parameter."""
    if not isinstance(value, torch.Tensor) or not isinstance(new, DTensor):
        return value
    if tuple(value.shape) != tuple(old.shape) or value.ndim == 0:
        return value
    if isinstance(value, DTensor):
        if value.device_mesh == new.device_mesh and value.placements == new.placements:
            return value
        value = value.full_tensor()  # laid out like the old parameter (Replicate: no communication)
    return distribute_tensor(value.detach(), new.device_mesh, new.placements)


def rebind(optimizer: torch.optim.Optimizer) -> int:
    """Point ``optimizer`` at the parameters that replaced the ones it holds (state moved along);
    returns how many it rebound."""
    if not _REPLACED:
        return 0
    count = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            new = replacement_of(p)
            if new is None:
                continue
            params[i] = new
            state = optimizer.state.pop(p, None)
            if state is not None:
                optimizer.state[new] = {k: _move_state(v, p, new) for k, v in state.items()}
            count += 1
    if count:
        logger.warning(
            "%s: %d parameter(s) it was built with were replaced by domain-parallel conversion or FSDP2 "
            "(convert_to_domain_parallel / parallelize make new parameter objects); rebound to the new ones, "
            "state moved along. Build optimizers after conversion to skip this step.",
            type(optimizer).__name__,
            count,
        )
    return count


def rebind_optimizers() -> int:
    """Rebind every live optimizer (found by a scan of the garbage collector's objects)."""
    if not _REPLACED:
        return 0
    total = 0
    for obj in gc.get_objects():
        try:
            is_opt = isinstance(obj, torch.optim.Optimizer)
        except ReferenceError:  # a weakref.proxy whose object is gone
            continue
        if is_opt:
            total += rebind(obj)
    return total


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    rebind(optimizer)
