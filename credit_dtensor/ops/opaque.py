"""One pair of ``torch.library`` custom ops that runs any rule's local forward and backward.

A rule that communicates (a halo gather, a statistics all-reduce) cannot be traced by Dynamo:
``torch.compile`` would break the graph at every ``P2POp`` and at side effects inside an
``autograd.Function``. Custom ops are opaque to Dynamo (one node each), so a rule object with an
explicit ``forward`` and adjoint ``backward`` on plain local tensors is wrapped here:

* ``credit_dtensor::rule(inputs, key) -> outputs`` runs ``RULES[key].forward``;
* ``credit_dtensor::rule_backward(saved, grads, needs, key) -> input grads`` runs its backward;

tied with ``register_autograd``. ``key`` is ``"<kind>:<repr of a tuple of primitives>"`` naming the
rule and its whole geometry (global shape, world, rank, group name, parameters); the op rebuilds
(and caches) the rule object from the key alone with the builder registered for ``kind``. So a
traced graph carries only a string, the fake (shape) implementation works while Dynamo traces,
and nothing is registered as a side effect of tracing. Rules declare which inputs/outputs backward
needs (``saved_inputs`` / ``saved_outputs``) so nothing else is kept alive.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from .. import intercept

__all__ = ["OpaqueRule", "builder", "make_key", "rule_of", "apply"]


class OpaqueRule(Protocol):
    key: str
    saved_inputs: tuple[int, ...]
    saved_outputs: tuple[int, ...]
    #: outputs that carry gradients (others are marked non-differentiable)
    differentiable_outputs: tuple[int, ...]

    def forward(self, inputs: list[torch.Tensor | None]) -> list[torch.Tensor]: ...

    def backward(
        self, saved: list[torch.Tensor], grads: list[torch.Tensor | None], needs: list[bool]
    ) -> list[torch.Tensor | None]: ...

    def fake_forward(self, inputs: list[torch.Tensor | None]) -> list[torch.Tensor]: ...

    def fake_backward(
        self, saved: list[torch.Tensor], grads: list[torch.Tensor | None], needs: list[bool]
    ) -> list[torch.Tensor | None]: ...


_BUILDERS: dict[str, Callable[..., Any]] = {}
_SAFE = {"__builtins__": {}, "inf": math.inf, "nan": math.nan}


def builder(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(*args) -> rule`` for keys ``"<kind>:(args...)"``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _BUILDERS[kind] = fn
        return fn

    return deco


def make_key(kind: str, *args: Any) -> str:
    return f"{kind}:{args!r}"


@functools.lru_cache(maxsize=4096)
def rule_of(key: str) -> Any:
    kind, _, rest = key.partition(":")
    return _BUILDERS[kind](*eval(rest, _SAFE))  # noqa: S307 - our own keys: tuples of literals


class _Rules:
    def __getitem__(self, key: str) -> Any:
        return rule_of(key)


RULES = _Rules()


def _no_alias(outs: list[torch.Tensor], inputs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Custom ops may not return their inputs (or views of them): copy those."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    ids = {id(t) for t in inputs if isinstance(t, torch.Tensor)}
    return [o.clone() if (not o.numel() or id(o) in ids or o.untyped_storage().data_ptr() in ptrs) else o for o in outs]


def _split(key: str) -> tuple[str, str]:
    """``"<rule key>@<mask>"``: the mask says which inputs are real (``1``) or absent (``0``).

    Absent inputs travel as empty placeholders: a ``None`` inside a ``Tensor?[]`` argument turns
    off autograd for the whole custom op (measured on torch 2.13)."""
    rule_key, _, mask = key.rpartition("@")
    return rule_key, mask


def _restore(tensors: list[torch.Tensor], mask: str) -> list[torch.Tensor | None]:
    return [t if m == "1" else None for t, m in zip(tensors, mask)]


@torch.library.custom_op("credit_dtensor::rule", mutates_args=())
def rule_op(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    rule_key, mask = _split(key)
    return _no_alias(RULES[rule_key].forward(_restore(list(inputs), mask)), list(inputs))


@rule_op.register_fake
def _rule_fake(inputs, key):
    rule_key, mask = _split(key)
    return RULES[rule_key].fake_forward(_restore(list(inputs), mask))


@torch.library.custom_op("credit_dtensor::rule_backward", mutates_args=())
def rule_backward_op(
    saved: list[torch.Tensor], grads: list[torch.Tensor | None], needs: list[bool], key: str
) -> list[torch.Tensor]:
    """Input gradients (empty where not needed); ``saved`` holds placeholders for absent inputs."""
    out = RULES[_split(key)[0]].backward(_saved(list(saved), key), list(grads), list(needs))
    ref = saved[0] if saved else next(g for g in grads if g is not None)
    res = [g if g is not None else ref.new_empty(0) for g in out]
    return _no_alias(res, list(saved) + [g for g in grads if g is not None])


@rule_backward_op.register_fake
def _rule_backward_fake(saved, grads, needs, key):
    out = RULES[_split(key)[0]].fake_backward(_saved(list(saved), key), list(grads), list(needs))
    ref = next((g for g in grads if g is not None), saved[0] if saved else None)
    return [g if g is not None else ref.new_empty(0) for g in out]


def _saved(saved: list[torch.Tensor], key: str) -> list[torch.Tensor | None]:
    """Saved inputs come first: absent ones back to ``None``."""
    rule_key, mask = _split(key)
    rule = RULES[rule_key]
    n = len(rule.saved_inputs)
    return [None if mask[i] == "0" else t for i, t in zip(rule.saved_inputs, saved[:n])] + saved[n:]


def _save(ctx: Any, rule: Any, inputs: Any, outputs: Any) -> None:
    """What the rule's backward reads (its ``saved_inputs``, then ``saved_outputs``), and its
    non-differentiable outputs marked: the custom op's context and the eager node's alike."""
    ctx.save_for_backward(*[inputs[i] for i in rule.saved_inputs], *[outputs[i] for i in rule.saved_outputs])
    nondiff = [o for i, o in enumerate(outputs) if i not in rule.differentiable_outputs]
    if nondiff:
        ctx.mark_non_differentiable(*nondiff)


def _setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
    tensors, key = inputs
    ctx.key = key
    ctx.n_inputs = len(tensors)
    _save(ctx, RULES[_split(key)[0]], tensors, output)


def _backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple:
    needs = list(ctx.needs_input_grad[0]) if isinstance(ctx.needs_input_grad[0], (list, tuple)) else None
    if needs is None:  # one flag for the whole list: ask for every input's gradient
        needs = [bool(ctx.needs_input_grad[0])] * ctx.n_inputs
    res = rule_backward_op(list(ctx.saved_tensors), list(grads), needs, ctx.key)
    return [g if need and g.numel() or (need and g.ndim) else None for g, need in zip(res, needs)], None


rule_op.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """Eager mode: the rule's forward and backward as one autograd node, with the same saved tensors,
    non-differentiable outputs and gradients as the custom ops, without their dispatch layers (the
    registered-autograd wrappers cost more host time than a small rule's local work). The rule's
    local work runs with the torch-function modes off (:func:`~credit_dtensor.intercept.suspended`):
    it sees plain tensors only."""

    @staticmethod
    def forward(ctx: Any, rule: Any, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        with intercept.suspended():
            outs = _no_alias(rule.forward(list(inputs)), list(inputs))
        ctx.rule = rule
        _save(ctx, rule, inputs, outs)
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:  # type: ignore[override]
        needs = list(ctx.needs_input_grad[1:])
        with intercept.suspended():
            res = ctx.rule.backward(list(ctx.saved_tensors), list(grads), needs)
        return (None, *[g if need else None for g, need in zip(res, needs)])


def apply(key: str, inputs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Run the rule named by ``key`` on local tensors, differentiable: through the custom op when
    compiling (opaque to Dynamo), as one :class:`_Eager` autograd node otherwise. ``None`` inputs
    are allowed."""
    if not torch.compiler.is_compiling():
        return list(_Eager.apply(rule_of(key), *inputs))
    ref = next(t for t in inputs if t is not None)
    mask = "".join("0" if t is None else "1" for t in inputs)
    return rule_op([ref.new_empty(0) if t is None else t for t in inputs], f"{key}@{mask}")
