"""View semantics for the slices and reshapes the rules return.

On one device ``v = y[:, :, 2:9]`` is a *view*: ``v.mul_(2)`` changes ``y``, and a later in-place
change of ``y`` shows in ``v``. A slice along H of an H-sharded tensor cannot be a view (its rows
are re-chunked over the ranks: :func:`credit_dtensor.ops.move.row_map`), and a slice along another
dim or a reshape that runs on the local tensor shares memory but not autograd history. Without care
both are silently wrong: ``v.mul_(2)`` leaves ``y`` unchanged (or its gradient wrong), and ``v``
keeps old values after ``y`` changes.

So every such result is *tracked* with its base and the way to write it back:

* an in-place op on a tracked result writes it back into its base (``base[idx] = v``, through
  :func:`credit_dtensor.ops.assign.assign`; recursively for a slice of a slice), which gives
  PyTorch's values and gradients. ``y[:, :, 2:9] += 1`` (read the slice, add in place, assign) then
  writes once: the final ``__setitem__`` sees the write already done and skips it;
* using a tracked result after its base changed in place raises a
  :class:`~credit_dtensor.DomainParallelError` naming the fix (take the slice after the change),
  where one device would have shown the change: never a stale value. Results that share memory with
  their base see the new values; for them only a gradient would be wrong, so only code that records
  gradients is refused.

Tracking is a weak table (nothing is kept alive; a result whose base is gone is no longer tracked)
consulted by the rules mode only while it is non-empty. Inside ``torch.compile`` regions nothing
is tracked.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import intercept
from ..errors import DomainParallelError

__all__ = ["track", "already_written", "tracked"]


@dataclass
class _Record:
    base: weakref.ref
    key: Any  # the index (slices) or the reshape target, compared by :func:`_same_key`
    write: Callable[[DTensor, DTensor], None]  # write the result back into its base
    shares_memory: bool
    base_version: int
    version: int


class _WeakIdMap:
    """``{tensor: record}`` by identity, holding the tensors weakly (``WeakKeyDictionary`` compares
    keys with ``==``, which is elementwise for tensors)."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref, _Record]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, t: object) -> bool:
        return self.get(t) is not None

    def get(self, t: object) -> _Record | None:
        hit = self._data.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def __setitem__(self, t: DTensor, rec: _Record) -> None:
        key = id(t)
        data = self._data

        def gone(_ref: weakref.ref, key: int = key) -> None:
            entry = data.get(key)
            if entry is not None and entry[0] is _ref:
                del data[key]

        data[key] = (weakref.ref(t, gone), rec)

    def __delitem__(self, t: object) -> None:
        self._data.pop(id(t), None)


_TRACKED = _WeakIdMap()

_IOPS = {
    "__iadd__",
    "__isub__",
    "__imul__",
    "__itruediv__",
    "__ifloordiv__",
    "__imod__",
    "__ipow__",
    "__iand__",
    "__ior__",
    "__ixor__",
    "__ilshift__",
    "__irshift__",
    "__imatmul__",
    "__setitem__",
}
_INPLACE_CACHE: dict[Any, bool] = {}


def _is_inplace(func: Any, args: tuple, kwargs: dict) -> bool:
    hit = _INPLACE_CACHE.get(func)
    if hit is None:
        name = getattr(func, "__name__", "") or ""
        hit = _INPLACE_CACHE[func] = name in _IOPS or (name.endswith("_") and not name.startswith("_"))
    if hit:
        return True
    if getattr(func, "__module__", "") == "torch.nn.functional":
        from .pointwise import _is_inplace as f_inplace

        return f_inplace(func, args, kwargs)
    return False


def tracked() -> int:
    """How many results are tracked now (tests, diagnostics)."""
    return len(_TRACKED)


def track(result: Any, base: DTensor, key: Any, write: Callable[[DTensor, DTensor], None], shares_memory: bool) -> Any:
    """Remember that ``result`` (a DTensor, or a tuple/list of them) reads ``base`` like a view."""
    if torch.compiler.is_compiling():
        return result
    items = result if isinstance(result, (tuple, list)) else (result,)
    for i, r in enumerate(items):
        if isinstance(r, DTensor) and r is not base:
            k = (key, i) if isinstance(result, (tuple, list)) else key
            w = (lambda b, v, _w=write, _i=i: _w(b, v, _i)) if isinstance(result, (tuple, list)) else write
            _TRACKED[r] = _Record(weakref.ref(base), k, w, shares_memory, base._version, r._version)
    return result


def _same_key(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_key(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def already_written(base: DTensor, key: Any, value: Any) -> bool:
    """Whether ``base[key] = value`` would write what is there already: ``value`` is a tracked read of
    ``base[key]`` (or was written back after an in-place change) and neither changed since."""
    rec = _TRACKED.get(value) if isinstance(value, DTensor) else None
    return (
        rec is not None
        and rec.base() is base
        and _same_key(rec.key, key)
        and rec.version == value._version
        and rec.base_version == base._version
    )


def _records_grad(rec: _Record, t: DTensor, base: DTensor) -> bool:
    return torch.is_grad_enabled() and (t.requires_grad or base.requires_grad)


def _stale_message(t: DTensor) -> str:
    from .. import guard

    path = guard.module_path()
    head = f"{path}: " if path else ""
    return (
        f"{head}a slice or reshape of an H-sharded tensor {tuple(t.shape)} is used after its base was changed in "
        "place. On one device it is a view and would show the change; here the rows of a slice along H are a copy "
        "(they move between ranks), and a local view does not carry the base's new autograd history. Fix: take the "
        "slice / reshape after the in-place change (or .clone() it before, if the old values are wanted)"
    )


def _live(t: Any) -> tuple[Any, DTensor] | None:
    """``(record, base)`` of a tracked result whose base is alive (a dead base's record is dropped)."""
    rec = _TRACKED.get(t) if isinstance(t, DTensor) else None
    if rec is None:
        return None
    base = rec.base()
    if base is None:
        del _TRACKED[t]
        return None
    return rec, base


def _before(func: Any, args: tuple, kwargs: dict) -> None:
    """Refuse a tracked result whose base changed in place since it was taken."""
    for a in (*args, *kwargs.values()):
        cands = a if isinstance(a, (list, tuple)) else (a,)
        for t in cands:
            live = _live(t)
            if live is None:
                continue
            rec, base = live
            if base._version != rec.base_version and (not rec.shares_memory or _records_grad(rec, t, base)):
                raise DomainParallelError(_stale_message(t))


def _write_back(t: DTensor) -> None:
    """After an in-place change of ``t``: write it into its base (and the base into its own ...)."""
    while True:
        live = _live(t)
        if live is None:
            return
        rec, base = live
        if rec.shares_memory and not _records_grad(rec, t, base):
            rec.version, rec.base_version = t._version, base._version  # memory is shared: values are there
            return
        rec.write(base, t)
        rec.version, rec.base_version = t._version, base._version
        t = base


def _after(func: Any, args: tuple, kwargs: dict) -> None:
    if not args or not isinstance(args[0], DTensor) or args[0] not in _TRACKED:
        return
    if _is_inplace(func, args, kwargs):
        _write_back(args[0])


class _Hooks:
    """What the rules mode calls around every call while something is tracked."""

    @staticmethod
    def active() -> bool:
        return not torch.compiler.is_compiling() and bool(_TRACKED)

    before = staticmethod(_before)
    after = staticmethod(_after)


intercept.set_alias_hooks(_Hooks)
