"""The gather guard: no activation is all-gathered behind the user's back.

PyTorch's DTensor falls back to re-laying an H-sharded tensor out as ``Replicate`` (an all-gather
of the whole activation on every rank) whenever it has no sharded strategy for an op -- exact,
but the memory saving of domain parallelism is gone and nothing says so. While credit_dtensor's
torch-function rules run an op on DTensors (and during ``backward()`` of a DTensor), a small
``TorchDispatchMode`` watches for all-gather collectives and applies the policy:

* ``warn`` (default): one :class:`ImplicitGatherWarning` per op and call site, naming the op, the
  module path (inside a converted model), the bytes gathered and the fix;
* ``raise``: :class:`ImplicitGatherError` *before* the collective runs; DTensor's layout decisions
  depend only on global metadata, so every rank raises at the same op and none is left blocked;
* ``allow``: nothing.

Set it with ``CREDIT_DTENSOR_GATHER=warn|raise|allow`` or ``credit_dtensor.gather_policy("raise")``
(also a context manager). Explicit gathers the user asks for (``gather_tensor``, ``full_tensor()``,
``redistribute``) are never flagged: they run outside any op. Not watched: code inside
``torch.compile`` regions (the collectives are traced into the graph, not dispatched).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import partials
from .errors import DomainParallelError

T = TypeVar("T")

__all__ = [
    "ImplicitGatherWarning",
    "ImplicitGatherError",
    "GatherEvent",
    "gather_policy",
    "record_gathers",
    "watch",
    "register_module_paths",
    "module_path",
]

POLICIES = ("warn", "raise", "allow")
ENV = "CREDIT_DTENSOR_GATHER"


class ImplicitGatherWarning(UserWarning):
    """An H-sharded activation was all-gathered inside an op (exact, but the memory saving is lost)."""


class ImplicitGatherError(DomainParallelError):
    """Raised (on every rank) instead of an implicit activation all-gather under policy ``raise``."""


@dataclass(frozen=True)
class GatherEvent:
    op: str
    module: str | None
    call_site: str | None
    nbytes: int
    local_shape: tuple[int, ...]
    phase: str  # "forward" or "backward"

    def describe(self) -> str:
        where = f"{self.module}: " if self.module else ""
        site = f" (at {self.call_site})" if self.call_site else ""
        return (
            f"{where}{self.op} all-gathered an H-sharded activation in {self.phase}: {self.nbytes:,} bytes "
            f"(local shard {self.local_shape}) now replicated on every rank{site}"
        )


def _env_policy() -> str:
    value = os.environ.get(ENV, "warn").strip().lower() or "warn"
    if value not in POLICIES:
        raise DomainParallelError(f"{ENV}={value!r} is not one of {POLICIES}: set it to warn, raise or allow")
    return value


# policy: resolved lazily so a bad env value raises where it is used; dtensor_dispatch: whether any op
# has reached DTensor's own dispatch (then backwards may hold DTensor's redistributions: watch them)
_state: dict = {"policy": None, "dtensor_dispatch": False}
_tls = threading.local()
_warned: set[tuple[str, str | None]] = set()


def _policy() -> str:
    if _state["policy"] is None:
        _state["policy"] = _env_policy()
    return _state["policy"]  # type: ignore[return-value]


class gather_policy:  # noqa: N801 - used like a function
    """Get or set the gather-guard policy.

    ``gather_policy()`` returns the current policy; ``gather_policy("raise")`` sets it (process-wide)
    and returns a context manager that restores the previous one on exit, so both
    ``credit_dtensor.gather_policy("raise")`` and ``with credit_dtensor.gather_policy("allow"): ...``
    work.
    """

    def __new__(cls, policy: str | None = None):  # type: ignore[misc]
        if policy is None:
            return _policy()
        return super().__new__(cls)

    def __init__(self, policy: str | None = None) -> None:
        value = str(policy).strip().lower()
        if value not in POLICIES:
            raise DomainParallelError(f"gather_policy({policy!r}): expected one of {POLICIES}")
        self.previous = _policy()
        self.policy = value
        _state["policy"] = value

    def __enter__(self) -> gather_policy:
        return self

    def __exit__(self, *exc: object) -> None:
        _state["policy"] = self.previous

    def __repr__(self) -> str:
        return f"gather_policy({self.policy!r})"


def _recorders() -> list[list[GatherEvent]]:
    if not hasattr(_tls, "recorders"):
        _tls.recorders = []
    return _tls.recorders


@contextlib.contextmanager
def record_gathers() -> Iterator[list[GatherEvent]]:
    """Collect every implicit gather inside the block (whatever the policy); used by ``check``."""
    events: list[GatherEvent] = []
    _recorders().append(events)
    try:
        yield events
    finally:
        _recorders().remove(events)


# --- where: module path and user call site ------------------------------------------------------

_PATHS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def register_module_paths(model: nn.Module, root_name: str | None = None) -> None:
    """Remember every submodule's qualified name (the converter calls this) for messages."""
    root = root_name or type(model).__name__
    for name, mod in model.named_modules():
        _PATHS.setdefault(mod, f"{name} ({type(mod).__name__})" if name else root)


_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
_STDLIB = os.path.dirname(os.__file__)


def _frames() -> Iterator:
    f = sys._getframe(1)
    while f is not None:
        yield f
        f = f.f_back


def innermost_module(pick: Callable[[nn.Module], T | None]) -> tuple[nn.Module, T] | None:
    """``(module, pick(module))`` for the innermost module on the Python stack (a ``forward`` or
    a method of it running) for which ``pick`` is not ``None``: the one stack walk of the package."""
    for f in _frames():
        obj = f.f_locals.get("self")
        if isinstance(obj, nn.Module):
            value = pick(obj)
            if value is not None:
                return obj, value
    return None


def module_path() -> str | None:
    """The innermost converted module whose ``forward`` is on the Python stack."""
    found = innermost_module(_PATHS.get)
    return None if found is None else found[1]


def _user_frame() -> tuple[str, int] | None:
    """(file, line) of the innermost frame outside torch, credit_dtensor and the standard library."""
    for f in _frames():
        fn = os.path.abspath(f.f_code.co_filename)
        if not fn.startswith(_SKIP_DIRS) and not fn.startswith(_STDLIB):
            return fn, f.f_lineno
    return None


# --- detection -----------------------------------------------------------------------------------


_GATHER: dict[object, bool] = {}


def _is_gather(func: object) -> bool:
    hit = _GATHER.get(func)
    if hit is None:
        hit = _GATHER[func] = "all_gather_into_tensor" in str(func)
    return hit


def _hint(op: str) -> str:
    base = op.split(".")[-1]
    if base in ("__getitem__", "narrow", "index_select", "roll", "flip", "cumsum", "cumprod"):
        return "credit_dtensor moves only the needed rows for supported cases; for others gather explicitly"
    return (
        "use an op credit_dtensor has a rule for (docs/patterns.md), declare the enclosing module "
        "shard-local (credit_dtensor.shard_local) if it only mixes rows within a shard, or gather explicitly "
        "with credit_dtensor.gather_tensor where a full tensor is really needed"
    )


def _report(op: str, nbytes: int, local_shape: tuple[int, ...], phase: str) -> None:
    frame = _user_frame()
    event = GatherEvent(op, module_path(), f"{frame[0]}:{frame[1]}" if frame else None, nbytes, local_shape, phase)
    for rec in _recorders():
        rec.append(event)
    policy = _policy()
    if policy == "raise":
        raise ImplicitGatherError(
            f"{event.describe()}. Fix: {_hint(op)}. (gather guard policy 'raise': "
            f"set {ENV}=warn or credit_dtensor.gather_policy('warn') to only warn)"
        )
    if policy == "warn":
        key = (op, event.call_site)
        if key not in _warned:
            _warned.add(key)
            message = (
                f"{event.describe()}. Fix: {_hint(op)}. Set {ENV}=raise to make this an error, or allow to silence it."
            )
            filename, lineno = frame if frame else ("credit_dtensor", 0)
            warnings.warn_explicit(message, ImplicitGatherWarning, filename, lineno)


_CORRUPT = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default}


def _refuse_builtin_conv(func: object, args: tuple) -> None:
    """PyTorch's own DTensor convolution on a spatially sharded input returns a silently corrupt
    result; reaching it means a conv ran below credit_dtensor's rules (e.g. inside a composite
    function): refuse rather than be wrong."""
    x = args[1] if func is torch.ops.aten.convolution_backward.default else args[0]
    if isinstance(x, DTensor) and any(getattr(p, "dim", 0) >= 2 for p in x.placements if p.is_shard()):
        raise DomainParallelError(
            f"{module_path() or 'a convolution'}: {func} reached PyTorch's DTensor rule with an input sharded on a "
            f"spatial dim ({x.placements}), whose result is silently wrong: call F.conv*/the module directly "
            "(credit_dtensor's rule intercepts those), not from inside another function that PyTorch runs"
        )


def _records_grad(args: tuple, kwargs: dict | None) -> bool:
    """Whether an op on these arguments is recorded by autograd (grad mode on, a DTensor input that
    requires grad) with a sharded operand: only then can DTensor's own backward of it gather.

    An op whose DTensor operands are all ``Replicate`` (or ``Partial``) -- a position-bias MLP on a
    replicated offset table -- gets its gradients from credit_dtensor's rules as ``Partial``
    (:func:`credit_dtensor.dtensor.local_replicated`) or from DTensor ops that are themselves
    recorded here; no shard reaches its backward, so it cannot all-gather an activation there."""
    if not torch.is_grad_enabled():
        return False
    grad = sharded = False
    for a in (*args, *(kwargs or {}).values()):
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, DTensor):
                grad = grad or b.requires_grad
                sharded = sharded or any(p.is_shard() for p in b.placements)
    return grad and sharded


#: ops whose backward DTensor runs by mapping the gradient's placements (a dim reordering; adding or
#: dropping a size-1 dim: CREDIT's ``x.squeeze(2)`` of the time dim; ``qkv.unbind(0)`` and
#: ``torch.stack``, whose backwards stack and unbind) or unchanged (a copy, an in-place ``relu``'s
#: ``copy_``, a dtype cast): reaching DTensor's autograd with one never leads to a gather in backward
_REORDERS = frozenset(
    (
        torch.ops.aten.permute.default,
        torch.ops.aten.transpose.int,
        torch.ops.aten.t.default,
        torch.ops.aten.squeeze.default,
        torch.ops.aten.squeeze.dim,
        torch.ops.aten.squeeze.dims,
        torch.ops.aten.unsqueeze.default,
        torch.ops.aten.unbind.int,
        torch.ops.aten.stack.default,
        torch.ops.aten.clone.default,
        torch.ops.aten.copy_.default,
        torch.ops.aten._to_copy.default,
    )
)


def _elementwise_alike(func: object, args: tuple) -> bool:
    """A pointwise op whose DTensor operands all have one shape and one placement (``out += x`` of
    a residual block): its backward is pointwise on gradients of that layout, with nothing to
    reduce or redistribute."""
    if torch.Tag.pointwise not in getattr(func, "tags", ()):
        return False
    spec = None
    for a in args:
        if isinstance(a, DTensor):
            if spec is None:
                spec = (a.shape, a.placements)
            elif (a.shape, a.placements) != spec:
                return False
        elif isinstance(a, torch.Tensor) and a.dim() > 0:
            return False
    return spec is not None


class _Detector(TorchDispatchMode):
    def __init__(self, func: object, phase: str) -> None:
        super().__init__()
        self.func, self.phase = func, phase

    @property
    def op(self) -> str:  # named only when something is reported
        return _op_name(self.func)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        for t in types:
            if issubclass(t, DTensor):
                if (
                    not _state["dtensor_dispatch"]
                    and not getattr(_tls, "trusted", False)
                    and func not in _REORDERS
                    and not _elementwise_alike(func, args)
                    and _records_grad(args, kwargs)
                ):
                    if self.phase == "backward":
                        _state["dtensor_dispatch"] = True  # a double-backward graph holds DTensor's node
                    else:
                        _tls.pending = True  # armed by settle() if the call's result is in a graph
                if func in _CORRUPT:
                    _refuse_builtin_conv(func, args)
                if self.phase == "forward" and partials.unsafe(func, args, kwargs):
                    args, kwargs = partials.replicated(args, kwargs, func)  # see credit_dtensor.partials
                    with _Detector(self.func, self.phase):  # this mode is off in its own handler
                        return func(*args, **(kwargs or {}))
                return NotImplemented  # let DTensor desugar the op; its collectives come back here
        if _is_gather(func) and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            world = args[1] if len(args) > 1 and isinstance(args[1], int) else 1
            _report(self.op, t.numel() * t.element_size() * world, tuple(t.shape), self.phase)
        return func(*args, **(kwargs or {}))


def _op_name(func: object) -> str:
    """A readable name for a torch function: ``torch.roll``, ``Tensor.view``, ``F.pad``, ``aten.add.Tensor``."""
    if isinstance(func, torch._ops.OpOverload):
        return str(func)
    name = getattr(func, "__name__", None) or str(func)
    qual = getattr(func, "__qualname__", "") or ""
    mod = getattr(func, "__module__", None) or ""
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if qual.startswith(("TensorBase.", "Tensor.", "_TensorBase.")):
        return f"Tensor.{name}"
    if mod.startswith("torch.linalg") or qual.startswith("_LinAlg"):
        return f"torch.linalg.{name}"
    return f"torch.{name}"


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """DTensor's own dispatch of an op whose backward cannot gather (a pointwise op on operands of
    one spec, see ``ops.pointwise``): still watched, but it does not count as "reached DTensor's
    autograd", so backward stays unwatched (and free) as for credit_dtensor's own rules."""
    old = getattr(_tls, "trusted", False)
    _tls.trusted = True
    try:
        yield
    finally:
        _tls.trusted = old


@contextlib.contextmanager
def watch(func: object, phase: str = "forward") -> Iterator[None]:
    """Apply the gather policy to collectives dispatched inside the block (not nested).

    A backward is watched only once some op of this process has gone through DTensor's own
    dispatch with autograd recording and a sharded operand, other than one whose backward maps
    placements (``_REORDERS``, same-layout pointwise ops), and its call's result is in a graph
    (:func:`settle`; seen by a forward watch, which every policy installs: it also reduces the
    ``Partial`` operands DTensor would mishandle, :mod:`.partials`): before that, every node of any autograd graph that can meet a shard is one of
    credit_dtensor's rules, DTensor's ``to_local``/``from_local`` or such an op, whose backwards communicate
    only halo rows and statistics, so a backward of a fully converted model pays nothing for the
    guard (a dispatch mode costs every op of the backward a Python call).
    """
    if torch.compiler.is_compiling() or (phase == "backward" and not _state["dtensor_dispatch"]):
        yield
        return
    if getattr(_tls, "watching", False) or (_policy() == "allow" and not _recorders() and phase == "backward"):
        yield
        return
    _tls.watching = True
    _tls.pending = False
    try:
        with _Detector(func, phase):
            yield
    finally:
        _tls.watching = False


def _in_graph(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_in_graph(v) for v in value)
    if isinstance(value, dict):
        return any(_in_graph(v) for v in value.values())
    return False


def pending() -> bool:
    """Whether the last watched forward call ran one of DTensor's own recorded ops (see :func:`settle`)."""
    return getattr(_tls, "pending", False)


def settle(out: object, written: object = None) -> None:
    """After a watched forward call returned ``out`` (and wrote into ``written``, for an in-place
    call): arm the backward watch if one of DTensor's own ops recorded by autograd ran in it and
    its result is in an autograd graph. ``torch.ones_like(y)``, ``x > 0`` or ``x.new_zeros(...)``
    on a tensor that requires grad reach DTensor's dispatch with a sharded operand that requires
    grad, but nothing of them is differentiated: arming on them made every later backward pay the
    dispatch mode (twice the host time of a conv's or a BatchNorm's fwd+bwd)."""
    if getattr(_tls, "pending", False):
        _tls.pending = False
        if _in_graph(out) or _in_graph(written):
            _state["dtensor_dispatch"] = True
