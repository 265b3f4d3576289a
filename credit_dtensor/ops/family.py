"""One descriptor per op family: the single place that says what credit_dtensor knows about an op.

Each ``ops/<family>.py`` declares its :class:`OpFamily` once (``FAMILY = family("conv", ...)``) and
registers every rule through it (``@FAMILY.rule(F.conv2d, h="halo", note=...)``), so the descriptor
holds, per torch function: the rule (which binds the call's arguments when it declares a
signature), what it does to H (for ``plan`` and the docs) and, for refusals, why. The module wrappers of the family (``nn/<family>.py``) add their
``{torch module class: wrapper}`` table with :meth:`OpFamily.converts`; the descriptor names that
module (``nn=``) so the converter imports it explicitly, without ``ops`` importing ``nn``.

Readers: :mod:`credit_dtensor.intercept` (the rules, through :meth:`OpFamily.rule`), the converter
(:mod:`credit_dtensor.converters`), the audit tracker (which function names keep, move or refuse
H) and planner (refused module classes), :func:`credit_dtensor.validate_sharding_constraints`
(each family's H scale of modules), and :mod:`credit_dtensor.catalog`, which ``credit-dtensor
info`` and ``docs/families.md`` print (the page is checked by a test).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from torch.distributed.tensor import DTensor

from ..intercept import register

__all__ = [
    "OpFamily",
    "OpEntry",
    "Signature",
    "Bound",
    "family",
    "families",
    "function_names",
    "input_of",
    "H_EFFECTS",
]

#: What a function does to the sharded dim H, as ``plan`` reports it and the docs list it.
H_EFFECTS = {
    "local": "each rank computes its own rows; no communication",
    "halo": "exact; only the halo rows of the neighbours move",
    "reduce": "exact; per-rank partials, one all-reduce of the reduced tensor",
    "relayout": "exact; only the rows that change owner move (re-chunk or all-to-all)",
    "stats": "exact; per-row statistics reduced over the ranks",
    "random": "exact; each global row draws from its own stream",
    "refused": "raises a DomainParallelError that names the fix",
    "gathers": "no exact rule along H: PyTorch's own rule all-gathers (the gather guard warns or raises)",
    "params": "parameter-side op; runs on the replicated parameters",
}


class Bound(dict):
    """Named arguments of one call (defaults filled in), and the call as written (``args``,
    ``kwargs``) for a rule that hands it on unchanged (PyTorch's own rule, a local apply)."""

    __slots__ = ("args", "kwargs")

    def has_other(self, x: Any, kind: type = DTensor) -> bool:
        """Whether an argument other than ``x`` is a ``kind`` (a second DTensor: not a one-operand
        rule's business)."""
        return any(isinstance(v, kind) and v is not x for v in (*self.args, *self.kwargs.values()))


class Signature:
    """Parameter names (positional order) and defaults of one torch function, read once:
    :meth:`bind` is then plain dict work (``inspect.Signature.bind`` is not traceable by
    ``torch.compile``), the one argument binder of the package."""

    __slots__ = ("names", "defaults", "strict", "name")

    def __init__(
        self, names: Iterable[str], defaults: Mapping[str, Any] | None = None, strict: bool = False, name: str = ""
    ) -> None:
        self.name = name
        self.names = tuple(names)
        self.defaults = dict(defaults or {})
        self.strict = strict

    @classmethod
    def of(cls, func: Callable, strict: bool = True) -> Signature:
        """From a Python function's own signature (``torch.nn.functional``); ``strict``: unknown
        arguments are a ``TypeError``, as calling the function would be."""
        params = inspect.signature(func).parameters
        defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        return cls(params, defaults, strict, getattr(func, "__name__", ""))

    def bind(self, args: tuple, kwargs: dict) -> Bound:
        if self.strict and (len(args) > len(self.names) or any(k not in self.names for k in kwargs)):
            raise TypeError(f"{self.name}() got unexpected arguments")
        bound = Bound(self.defaults)
        bound.update(zip(self.names, args))
        bound.update(kwargs)
        bound.args, bound.kwargs = args, kwargs
        return bound

    def __repr__(self) -> str:
        return f"Signature({', '.join(self.names)})"


@dataclass
class OpEntry:
    """One rule of a family: the torch functions it takes, what it does to H and a one-line note."""

    funcs: tuple[Any, ...]
    rule: Callable | None  # None: recorded without a rule (:meth:`OpFamily.unsupported`)
    h: str
    note: str = ""

    @property
    def names(self) -> list[str]:
        return [_func_name(f) for f in self.funcs]


@dataclass
class OpFamily:
    """The descriptor of one op family (see the module docstring)."""

    name: str
    summary: str = ""
    nn: str | None = None  # module path of its wrappers, e.g. "credit_dtensor.nn.conv"
    entries: list[OpEntry] = field(default_factory=list)
    converters: dict[type, tuple[Callable, Callable | None]] = field(default_factory=dict)
    aten: list[str] = field(default_factory=list)
    h_scale: Callable[[Any], Fraction | None] | None = None  # module -> factor it divides H by
    refused_modules: dict[type, str] = field(default_factory=dict)  # torch module class -> why

    def rule(
        self,
        *funcs: Any,
        h: str,
        note: str = "",
        signature: Signature | Mapping[Any, Signature] | None = None,
        name: str | None = None,
        unwatched: bool = False,
    ) -> Callable[[Callable], Callable]:
        """Decorator: ``rule(func, args, kwargs)`` takes calls of ``funcs`` on DTensors (returning
        ``NotImplemented`` when a call is not its business); ``h`` is its effect on H
        (:data:`H_EFFECTS`), ``note`` what ``plan`` and the docs say of it. With ``signature`` (one,
        or one per function) the call is bound where it enters: ``rule(func, a)`` gets the named
        arguments ``a`` (defaults filled in) and parses nothing itself. ``unwatched``: the rule
        never reaches DTensor's dispatch (see :func:`credit_dtensor.intercept.register`)."""
        if h not in H_EFFECTS:
            raise ValueError(f"{self.name}: unknown H effect {h!r} (one of {', '.join(H_EFFECTS)})")
        if len(funcs) == 1 and isinstance(funcs[0], (Mapping, list, tuple, set, frozenset)):
            funcs = tuple(funcs[0])

        def deco(fn: Callable) -> Callable:
            if name is not None:
                fn.__name__ = fn.__qualname__ = name
            entry = fn if signature is None else _bound(fn, signature)
            register(*funcs, unwatched=unwatched)(entry)
            self.entries.append(OpEntry(tuple(funcs), entry, h, note))
            return entry  # the rule as registered: callable as ``rule(func, args, kwargs)`` everywhere

        return deco

    def unsupported(self, *funcs: Any, note: str = "") -> None:
        """Functions of this family with no exact rule along H (recorded, no rule registered): along
        H, PyTorch's own rule runs under the gather guard; ``plan`` flags them."""
        self.entries.append(OpEntry(tuple(funcs), None, "gathers", note))

    def sharding(self, op: Any) -> Callable[[Callable], Callable]:
        """An aten-level sharding strategy (``torch.distributed.tensor.experimental.register_sharding``)
        for an op DTensor lacks: placements only, no communication (parameter-side ops)."""
        from torch.distributed.tensor.experimental import register_sharding

        def deco(fn: Callable) -> Callable:
            register_sharding(op)(fn)
            self.aten.append(str(op).removesuffix(".default"))
            return fn

        return deco

    def converts(
        self,
        table: Mapping[type, Callable],
        needs: Callable | None = None,
        h_scale: Callable[[Any], Fraction | None] | None = None,
    ) -> None:
        """The family's module wrappers: ``{torch module class: factory(module, manager)}``;
        ``needs(module)`` says whether an instance needs its wrapper (``None``: always);
        ``h_scale(module)`` how much the module divides H by (its stride; ``None``: not one of the
        family's), for the static window check (:func:`credit_dtensor.validate_sharding_constraints`)."""
        for t, f in table.items():
            self.converters[t] = (f, needs)
        if h_scale is not None:
            self.h_scale = h_scale

    def refuses_modules(self, table: Mapping[type, str]) -> None:
        """Module classes of this family with no exact rule (``plan`` flags them with ``why``)."""
        self.refused_modules.update(table)

    def load_converters(self) -> dict[type, tuple[Callable, Callable | None]]:
        """Import the family's wrapper module (declared by ``nn=``) and return its table."""
        if self.nn is not None:
            importlib.import_module(self.nn)
        return self.converters


def input_of(args: tuple, kwargs: dict) -> Any:
    """The first argument of a call (``input=`` / ``self=`` / ``tensor=`` by keyword): the one thing
    a rule over many functions with different signatures (pointwise, random, reshape) binds."""
    if args:
        return args[0]
    for key in ("input", "self", "tensor"):
        if key in kwargs:
            return kwargs[key]
    return None


def _bound(fn: Callable, signature: Signature | Mapping[Any, Signature]) -> Callable:
    """The registered form of a rule that takes bound arguments: ``fn(func, signature.bind(...))``."""
    if isinstance(signature, Signature):

        def rule(func: Any, args: tuple, kwargs: dict) -> Any:
            return fn(func, signature.bind(args, kwargs))

    else:

        def rule(func: Any, args: tuple, kwargs: dict) -> Any:
            return fn(func, signature[func].bind(args, kwargs))

    rule.__name__, rule.__qualname__ = fn.__name__, fn.__qualname__
    return rule


_FAMILIES: dict[str, OpFamily] = {}


def family(name: str, summary: str | None = None, *, nn: str | None = None) -> OpFamily:
    """The descriptor named ``name``, created on first use (a family spread over several modules,
    such as ``resample``, shares one); ``summary`` and ``nn`` are set by the family's main module."""
    fam = _FAMILIES.get(name)
    if fam is None:
        fam = _FAMILIES[name] = OpFamily(name)
    if summary is not None:
        fam.summary = summary
    if nn is not None:
        fam.nn = nn
    return fam


def families() -> list[OpFamily]:
    """Every family, in registration order (importing :mod:`credit_dtensor.ops` registers them)."""
    from . import FAMILIES, _register_all

    _register_all()
    order = {name: i for i, name in enumerate(FAMILIES)}
    return sorted(_FAMILIES.values(), key=lambda f: order.get(f.name, len(order)))


def _func_name(func: Any) -> str:
    """How users write ``func``: ``F.pad``, ``torch.sum``, ``Tensor.sum``, ``torch.linalg.vector_norm``."""
    import torch
    import torch.nn.functional as F

    name = getattr(func, "__name__", None) or str(func)
    for prefix, space in (("F.", F), ("torch.", torch), ("Tensor.", torch.Tensor), ("torch.linalg.", torch.linalg)):
        if getattr(space, name, None) is func:
            return prefix + name
    return getattr(func, "__qualname__", name)


def function_names(*effects: str, families_: Iterable[str] | None = None) -> set[str]:
    """Bare ``__name__`` of every function whose rule has one of ``effects`` (all when empty), for
    name-based readers such as the audit tracker."""
    want = set(families_) if families_ is not None else None
    out: set[str] = set()
    for fam in families():
        if want is not None and fam.name not in want:
            continue
        for e in fam.entries:
            if not effects or e.h in effects:
                out.update(getattr(f, "__name__", "") for f in e.funcs)
    out.discard("")
    return out
