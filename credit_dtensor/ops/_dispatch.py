"""Routing of aten ops on DTensors to our exact rules.

DTensor consults ``DTensor._op_dispatcher._custom_op_handlers`` (a private dict; context
parallel rebinds it, so we only ever mutate it in place) before its sharding propagation. For
each aten op we install one dispatcher that asks our rules in order; a rule returns
``NotImplemented`` when the call is not its business (e.g. the input is Replicate or batch
sharded), and then PyTorch's own handler -- or its default propagation -- runs as before.

This is what makes ``F.conv2d(x_sharded_on_H, w)`` exact instead of PyTorch 2.13's silently
corrupt result, and what turns a silent activation all-gather into our statistics-only rule.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

__all__ = ["register_rule", "registered_ops", "spatial_shard_dims"]

Rule = Callable[[torch._ops.OpOverload, tuple, dict], object]

_RULES: dict[torch._ops.OpOverload, list[Rule]] = {}
_ORIGINAL: dict[torch._ops.OpOverload, Rule | None] = {}
_lock = threading.RLock()


def _table() -> dict:
    return DTensor._op_dispatcher._custom_op_handlers


def _fallback(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> object:
    original = _ORIGINAL.get(op)
    if original is not None:
        return original(op, args, kwargs)
    # No PyTorch handler: run DTensor's default propagation by stepping out of the table.
    with _lock:
        table = _table()
        ours = table.pop(op)
        try:
            return op(*args, **kwargs)
        finally:
            table[op] = ours


def _make_dispatcher(op: torch._ops.OpOverload) -> Rule:
    def dispatch(op_call: torch._ops.OpOverload, args: tuple, kwargs: dict) -> object:
        for rule in _RULES[op]:
            out = rule(op_call, args, kwargs)
            if out is not NotImplemented:
                return out
        return _fallback(op_call, args, kwargs)

    dispatch.__credit_dtensor__ = True  # type: ignore[attr-defined]
    return dispatch


def register_rule(op: torch._ops.OpOverload, rule: Rule) -> None:
    """Ask ``rule`` first whenever ``op`` runs on DTensors (idempotent per rule)."""
    with _lock:
        table = _table()
        if op not in _RULES:
            _RULES[op] = []
            current = table.get(op)
            _ORIGINAL[op] = None if getattr(current, "__credit_dtensor__", False) else current
        if not getattr(table.get(op), "__credit_dtensor__", False):
            table[op] = _make_dispatcher(op)  # (re)install, e.g. after someone rebound the table
        if rule not in _RULES[op]:
            _RULES[op].append(rule)


def registered_ops() -> dict[str, list[str]]:
    """``{aten op name: [rule names]}`` for ``credit-dtensor info``."""
    return {str(op): [getattr(r, "__qualname__", repr(r)) for r in rules] for op, rules in _RULES.items()}


def spatial_shard_dims(t: object, first_spatial: int = 2) -> list[int]:
    """The tensor dims ``>= first_spatial`` that a DTensor is sharded on (empty for plain tensors)."""
    if not isinstance(t, DTensor):
        return []
    from torch.distributed.tensor import Shard

    return [p.dim for p in t.placements if isinstance(p, Shard) and p.dim >= first_spatial]
