"""Torch-function-level routing of calls on DTensors to credit_dtensor's rules.

PyTorch's DTensor is wrong or wasteful for some ops on H-sharded tensors (conv: corrupt; losses:
``Partial(avg)`` over unequal shards; roll/slicing/pad: silent all-gathers), and several of them
are decomposed by PyTorch *before* DTensor sees them (``F.pad(mode="circular")``), so a rule
must see the call as the user wrote it. One :class:`~torch.overrides.TorchFunctionMode` -- the
public mechanism for this -- is installed on a thread by the first ``DomainParallelManager``,
``shard_tensor``/``shard_batch``, ``convert_to_domain_parallel`` or converted-model call there
(or ``credit_dtensor.enable_rules()``, for DTensors built by hand), not by ``import``: code that
never starts a domain-parallel program pays nothing. For a call whose arguments include a DTensor
it asks the rules registered for that function (:func:`register`) in order; a rule returns
``NotImplemented`` when the call is not its business. Calls without DTensors cost one dict lookup
and a scan of the arguments (on top of the mode's own Python call, which PyTorch charges any mode);
metadata calls (``x.shape``, ``x.grad = None``, ``x.size()``) go straight through.

Every DTensor call that no rule takes runs under the gather guard (:mod:`.guard`), as does
``backward()`` on a DTensor, and a plain tensor next to an H-sharded DTensor (a latitude weight, a
land mask) is taken as a full tensor that every rank holds (a ``Replicate`` DTensor, so pointwise
ops slice it to the local rows, and its gradient is exact) instead of refusing with "mixed
torch.Tensor and DTensor".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from . import guard
from .dtensor import first_sharded, has_dtensor, is_domain_replicate, wrap_replicate

__all__ = ["register", "registered_functions", "ensure_enabled", "enabled", "disable", "suspended", "DomainRulesMode"]

Rule = Callable[[Callable, tuple, dict], Any]

_RULES: dict[Any, list[Rule]] = {}
_BACKWARD = {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad}
_tls = threading.local()


def _metadata_functions() -> tuple[dict[Any, bool], dict[Any, bool]]:
    """Tensor property getters and metadata methods (no data, no communication: nothing for a rule
    or the gather guard to see), and the property setters that are as harmless unless they get a
    plain tensor (``x.grad = None``, ``x.requires_grad = True``)."""
    getters: dict[Any, bool] = {}
    setters: dict[Any, bool] = {}
    for name in (
        "shape",
        "ndim",
        "dtype",
        "device",
        "layout",
        "requires_grad",
        "grad",
        "grad_fn",
        "is_leaf",
        "is_cuda",
        "is_cpu",
        "is_meta",
        "is_sparse",
        "is_quantized",
        "is_nested",
        "output_nr",
        "names",
    ):
        attr = getattr(torch.Tensor, name, None)
        if getattr(attr, "__get__", None) is not None:
            getters[attr.__get__] = True
        if name in ("requires_grad", "grad") and getattr(attr, "__set__", None) is not None:
            setters[attr.__set__] = True
    for name in (
        "dim",
        "size",
        "numel",
        "stride",
        "element_size",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "storage_offset",
        "get_device",
    ):
        fn = getattr(torch.Tensor, name, None)
        if fn is not None:
            getters[fn] = True
    return getters, setters


_METADATA, _METADATA_SET = _metadata_functions()


def _is_plain_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and not isinstance(v, DTensor)


_UNWATCHED: set[Rule] = set()


def register(*funcs: Any, unwatched: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: ask ``rule(func, args, kwargs)`` first whenever one of ``funcs`` gets a DTensor.

    ``unwatched``: the rule runs only local ops, DTensor construction and credit_dtensor's own
    messages -- never DTensor's dispatch -- so it cannot gather, and leading unwatched rules run
    outside the gather guard's dispatch mode (which costs every aten op inside a Python call,
    about half of a pointwise call's host time). The primitive under
    :meth:`credit_dtensor.ops.family.OpFamily.rule`, through which every op family registers (so
    its descriptor knows the rule); nothing else calls it."""

    def deco(rule: Rule) -> Rule:
        for f in funcs:
            rules = _RULES.setdefault(f, [])
            if rule not in rules:
                rules.append(rule)
        if unwatched:
            _UNWATCHED.add(rule)
        return rule

    return deco


def registered_functions() -> dict[str, list[str]]:
    """``{function name: [rule names]}`` for ``credit-dtensor info`` and the docs."""
    return {guard._op_name(f): [getattr(r, "__qualname__", repr(r)) for r in rules] for f, rules in _RULES.items()}


def _first_domain_replicate(args: tuple, kwargs: dict) -> DTensor | None:
    for a in (*args, *kwargs.values()):
        if is_domain_replicate(a):
            return a
    return None


def _replicate_plain(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Plain tensors (not scalars) next to a DTensor on a 1-D (domain) mesh -- sharded or replicated,
    e.g. a pooled prediction and a plain target -- become ``Replicate`` DTensors."""
    ref = first_sharded(*args, *kwargs.values())
    if ref is None:
        ref = _first_domain_replicate(args, kwargs)
    if ref is None:
        return args, kwargs
    mesh = ref.device_mesh

    def conv(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) and a.ndim > 0:
            return wrap_replicate(a, mesh)
        if isinstance(a, (list, tuple)) and any(isinstance(b, torch.Tensor) and not isinstance(b, DTensor) for b in a):
            return type(a)(conv(b) for b in a)
        return a

    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


class _NoAliasHooks:
    @staticmethod
    def active() -> bool:
        return False


#: view semantics for slices/reshapes the rules return (set by :mod:`credit_dtensor.ops.alias`)
_ALIAS: Any = _NoAliasHooks


def set_alias_hooks(hooks: Any) -> None:
    """Install ``hooks.before(func, args, kwargs)`` / ``hooks.after(func, args, kwargs)``, called
    around every call on DTensors while ``hooks.active()``."""
    global _ALIAS
    _ALIAS = hooks


class DomainRulesMode(TorchFunctionMode):
    """The interception mode (one instance per thread; see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if kwargs is None:
            kwargs = {}
        if _METADATA.get(func) is not None or not has_dtensor(args, kwargs):
            return func(*args, **kwargs)  # metadata, or plain code: no rule, no guard, no alias
        if _METADATA_SET.get(func) is not None and not (len(args) > 1 and _is_plain_tensor(args[1])):
            return func(*args, **kwargs)  # x.grad = None on a DTensor: nothing to replicate
        if _ALIAS.active():
            _ALIAS.before(func, args, kwargs)
            out = _dispatch(func, args, kwargs)
            _ALIAS.after(func, args, kwargs)
        else:
            out = _dispatch(func, args, kwargs)
        if not torch.compiler.is_compiling() and _mutates(func):  # compiled: AOTAutograd functionalizes
            bump_local_version(args[0] if args else kwargs.get("self"), kwargs.get("out"))
        return out


_MUTATES: dict[Any, bool] = {}
_METADATA_METHODS = frozenset(("requires_grad_", "detach_", "share_memory_", "rename_"))  # no data written
#: the augmented assignment operators with an elementwise in-place method (``x += y``: ``__iadd__``)
AUGMENTED_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift")
_INPLACE_OPERATORS = frozenset(f"__i{op}__" for op in (*AUGMENTED_OPERATORS, "matmul")) | {"__setitem__"}


def _mutates(func: Any) -> bool:
    """Whether ``func`` writes into its first argument (``x.mul_(2)``, ``x += y``, ``x[i] = v``,
    ``x.copy_(y)``), by name, memoised per function."""
    hit = _MUTATES.get(func)
    if hit is None:
        name = getattr(func, "__name__", "") or ""
        hit = _MUTATES[func] = (
            name.endswith("_") and not name.startswith("_") and name not in _METADATA_METHODS
        ) or name in _INPLACE_OPERATORS
    return hit


def bump_local_version(*tensors: Any) -> None:
    """Tell autograd that the local tensors of these DTensors were modified in place. DTensor's own
    in-place ops bump only the wrapper's version, but the rules save *local* tensors (views of
    ``_local_tensor``, which share its version counter) for backward, so without this an op that
    saved ``x`` before ``x.mul_(2)`` would silently differentiate the modified values where one
    device raises "modified by an inplace operation". Only nodes that saved the old values see it."""
    for t in tensors:
        if isinstance(t, DTensor):
            torch.autograd.graph.increment_version(t._local_tensor)


def _dispatch(func, args: tuple, kwargs: dict) -> Any:
    """Route one call (the mode is off while this runs): a rule, or DTensor under the gather guard."""
    rules = _RULES.get(func)
    if rules is None and func not in _BACKWARD:
        if not has_dtensor(args, kwargs):
            return func(*args, **kwargs)
        args, kwargs = _replicate_plain(args, kwargs)
        with guard.watch(func):
            out = func(*args, **kwargs)
        _settle(func, args, kwargs, out)
        return out
    if not has_dtensor(args, kwargs):
        return func(*args, **kwargs)
    if func in _BACKWARD:
        with guard.watch(func, "backward"):
            return _backward(func, args, kwargs)
    first = 0
    for rule in rules:  # type: ignore[union-attr]
        if rule not in _UNWATCHED:
            break
        out = rule(func, args, kwargs)
        if out is not NotImplemented:
            return out
        first += 1
    with guard.watch(func):
        for rule in rules[first:]:  # type: ignore[index]
            out = rule(func, args, kwargs)
            if out is not NotImplemented:
                break
        else:
            args, kwargs = _replicate_plain(args, kwargs)
            out = func(*args, **kwargs)
    _settle(func, args, kwargs, out)
    return out


def _settle(func, args: tuple, kwargs: dict, out: Any) -> None:
    """After a watched call: :func:`guard.settle` with what it returned and what an in-place call
    wrote into (its ``out=`` and, by name, its first argument); only when one of DTensor's recorded
    ops ran in it (compiled: no watch, nothing pending)."""
    if torch.compiler.is_compiling() or not guard.pending():
        return
    written = kwargs.get("out")
    if _mutates(func):
        written = (args[0] if args else kwargs.get("self"), written)
    guard.settle(out, written)


def _bind_backward(func, args: tuple, kwargs: dict) -> tuple | None:
    """``(tensors, grad_tensors, retain_graph, create_graph, inputs)`` of a ``Tensor.backward`` /
    ``torch.autograd.backward`` call (``None`` for ``torch.autograd.grad``)."""
    if func is torch.Tensor.backward:
        names = ("self", "gradient", "retain_graph", "create_graph", "inputs")
        a = dict(zip(names, args))
        a.update(kwargs)
        tensors, grads = (a["self"],), (a.get("gradient"),)
    elif func is torch.autograd.backward:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        a = dict(zip(names, args))
        a.update(kwargs)
        t = a["tensors"]
        tensors = (t,) if isinstance(t, torch.Tensor) else tuple(t)
        g = a.get("grad_tensors")
        grads = (g,) if g is None or isinstance(g, torch.Tensor) else tuple(g)
        if len(grads) == 1 and len(tensors) > 1 and grads[0] is None:
            grads = (None,) * len(tensors)
    else:
        return None
    inputs = a.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    create = bool(a.get("create_graph", False))
    retain = a.get("retain_graph")
    return tensors, grads, create if retain is None else bool(retain), create, inputs


def _backward(func, args: tuple, kwargs: dict) -> Any:
    """A backward call, run with the rules mode on the stack: activation checkpointing recomputes
    forwards inside it (``torch.utils.checkpoint(..., use_reentrant=False)`` in a saved-tensor hook),
    and a recomputed forward must take the rules the forward took. A mode's own handler runs with
    the mode popped, so the call goes to autograd's engine entry (``_engine_run_backward``, present
    in torch 2.11-2.14) with a fresh mode pushed; without that entry, PyTorch's own call."""
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    bound = _bind_backward(func, args, kwargs) if run is not None else None
    if bound is None:
        return func(*args, **kwargs)
    tensors, grads, retain, create, inputs = bound
    if len(grads) != len(tensors):
        return func(*args, **kwargs)  # PyTorch's own error
    full = []
    for t, g in zip(tensors, grads):
        if g is None:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = torch.ones_like(t, memory_format=torch.preserve_format)
        full.append(g)
    with scoped():
        run(tensors, tuple(full), retain, create, inputs, allow_unreachable=True, accumulate_grad=True)
    return None


_DISABLE_TORCH_FUNCTION = getattr(torch._C, "DisableTorchFunction", None)


def suspended() -> Any:
    """A context in which no torch-function mode (ours included) sees torch calls: for a rule's own
    plumbing (``to_local``/``from_local``, its custom op on local tensors), which needs neither the
    rules nor the gather guard, to skip a Python handler per call. Eager only: inside a compiled
    region it is a no-op (Dynamo traces the calls as written)."""
    if _DISABLE_TORCH_FUNCTION is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _DISABLE_TORCH_FUNCTION()


def _mode_stack() -> list:
    try:  # no public accessor; only used to avoid pushing inside a user's ``with mode:`` block
        from torch.overrides import _get_current_function_mode_stack

        return list(_get_current_function_mode_stack())
    except Exception:  # noqa: BLE001
        return []


def enabled() -> bool:
    """Whether the rules are installed on the calling thread."""
    return getattr(_tls, "mode", None) is not None


def active() -> bool:
    """Whether a rules mode is on the calling thread's stack right now (it is not while one of its
    own handlers runs, e.g. during ``backward()``)."""
    return any(isinstance(m, DomainRulesMode) for m in _mode_stack())


class scoped:  # noqa: N801 - a context manager used like a function
    """Rules active inside the block, e.g. for code that runs inside ``backward()`` (activation
    checkpointing recomputes forwards there, while the mode is off for the ``backward`` call)."""

    def __enter__(self) -> scoped:
        self.mode = None if active() else DomainRulesMode()
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)


def ensure_enabled() -> None:
    """Install the rules on the calling thread (idempotent; see the module docstring for who calls it).

    The mode is pushed only when no other torch-function mode is active, so that leaving a user's
    ``with SomeMode():`` block never pops ours; a later call outside such a block installs it.
    """
    if enabled() or _mode_stack():
        return
    mode = DomainRulesMode()
    mode.__enter__()
    _tls.mode = mode


def disable() -> None:
    """Remove the thread's rules if their mode is on top of the stack (to get PyTorch's own behaviour)."""
    mode = getattr(_tls, "mode", None)
    stack = _mode_stack()
    if mode is not None and stack and stack[-1] is mode:
        mode.__exit__(None, None, None)
        _tls.mode = None
