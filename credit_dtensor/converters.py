"""The converter registry: which wrapper converts which torch module class.

Every op family contributes without editing this file: each ``credit_dtensor/nn/<family>.py``
exposes ``*_WRAPPERS`` (a dict, or pairs, ``{torch class: wrapper factory}``) and optionally a
predicate (``needs_conversion`` or its family name, e.g. ``module_needs_halo``) saying whether a
given instance needs its wrapper; families are discovered on each call, so a family that lands
later is picked up. Users add their own types with :func:`register_converter` (process-wide).
:func:`credit_dtensor.convert.convert_to_domain_parallel` and :func:`credit_dtensor.audit.plan`
read it through :func:`converter_for`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import DomainParallelError
from .nn._base import DomainParallelModule

__all__ = [
    "Converter",
    "register_converter",
    "converter_for",
    "registered_converters",
    "lookup",
]

logger = logging.getLogger(__name__)

#: Names a family module may give its "does this instance need the wrapper?" predicate.
PREDICATE_NAMES = ("needs_conversion", "module_needs_halo", "needs_distributed_norm", "needs_domain_parallel")
#: Preferred lookup order of families for the same torch class (most specific type wins first).
FAMILY_ORDER = ("conv", "norm", "pad", "resample", "local")


@dataclass(frozen=True)
class Converter:
    """How to convert instances of ``torch_type``: ``factory(module, manager) -> module``;
    ``needs(module)`` (``None``: always) says whether an instance needs it at all."""

    torch_type: type
    factory: Callable[..., nn.Module]
    needs: Callable[[nn.Module], bool] | None = None
    family: str = "custom"

    def applies(self, module: nn.Module) -> bool:
        return self.needs is None or bool(self.needs(module))


_USER: dict[type, Converter] = {}
_FAMILIES: dict[str, dict[type, Converter]] = {}


def register_converter(
    torch_type: type,
    factory: Callable[..., nn.Module],
    *,
    needs: Callable[[nn.Module], bool] | None = None,
    family: str = "custom",
) -> None:
    """Convert every instance of ``torch_type`` (and subclasses) with ``factory(module, manager)``.

    Registered converters take precedence over the built-in families for the same class. E.g.
    ``register_converter(WindowAttention, shard_local)`` declares a module shard-local.
    """
    if not isinstance(torch_type, type) or not issubclass(torch_type, nn.Module):
        raise DomainParallelError(f"register_converter: {torch_type!r} is not an nn.Module subclass")
    if not callable(factory):
        raise DomainParallelError(f"register_converter({torch_type.__name__}): factory {factory!r} is not callable")
    _USER[torch_type] = Converter(torch_type, factory, needs, family)


def _family_table(mod: Any, family: str) -> dict[type, Converter]:
    """``{torch class: Converter}`` from a family module's ``*_WRAPPERS`` (or, if it has none, from
    the ``DomainParallelModule`` classes it defines)."""
    needs = next((getattr(mod, n) for n in PREDICATE_NAMES if callable(getattr(mod, n, None))), None)
    pairs: list[tuple[type, Any]] = []
    for name in sorted(vars(mod)):
        if name == "WRAPPERS" or name.endswith("_WRAPPERS"):
            table = getattr(mod, name)
            items = table.items() if isinstance(table, Mapping) else table
            try:
                pairs += [(t, f) for t, f in items]
            except (TypeError, ValueError):
                logger.warning("credit_dtensor.nn.%s.%s is not a {type: wrapper} table; ignored", family, name)
    if not pairs:  # no table: derive one from the wrapper classes themselves
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, DomainParallelModule)
                and obj.__module__ == mod.__name__
                and obj.wraps is not nn.Module
            ):
                pairs.append((obj.wraps, obj))
    return {t: Converter(t, f, needs, family) for t, f in pairs if isinstance(t, type)}


def _load_families() -> None:
    """Import every ``credit_dtensor.nn`` family not loaded yet (a broken one is an import error)."""
    import credit_dtensor.nn as nn_pkg

    for info in pkgutil.iter_modules(nn_pkg.__path__):
        name = info.name
        if name.startswith("_") or name in _FAMILIES:
            continue
        mod = importlib.import_module(f"{nn_pkg.__name__}.{name}")
        _FAMILIES[name] = _family_table(mod, name)


def registered_converters() -> dict[type, Converter]:
    """Every known ``{torch class: Converter}`` (families, then user registrations on top)."""
    _load_families()
    out: dict[type, Converter] = {}
    for fam in sorted(_FAMILIES, key=lambda f: FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER)):
        for t, c in _FAMILIES[fam].items():
            out.setdefault(t, c)
    out.update(_USER)
    return out


def lookup(module: nn.Module, table: Mapping[type, Any]) -> Any:
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def converter_for(module: nn.Module) -> Converter | None:
    """The converter for ``module``'s class (most specific registered base class), or ``None``.
    Already converted modules return ``None``."""
    if isinstance(module, DomainParallelModule):
        return None
    return lookup(module, registered_converters())
