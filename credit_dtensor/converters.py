"""The converter registry: which wrapper converts which torch module class.

The built-in tables come from the op-family descriptors (:mod:`credit_dtensor.ops.family`): a
family names its wrapper module (``nn=``), and that module declares its table explicitly with
``FAMILY.converts({torch class: wrapper}, needs=predicate)``. Users add their own types with
:func:`register_converter` (process-wide), which takes precedence.
:func:`credit_dtensor.convert.convert_to_domain_parallel` and :func:`credit_dtensor.audit.plan`
read it through :func:`converter_for`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import DomainParallelError
from .nn._base import DomainParallelModule
from .ops.family import families

__all__ = [
    "Converter",
    "register_converter",
    "converter_for",
    "registered_converters",
    "lookup",
    "redefined",
]


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


def registered_converters() -> dict[type, Converter]:
    """Every known ``{torch class: Converter}`` (families in their registration order, the first
    family to claim a class keeps it; user registrations on top)."""
    out: dict[type, Converter] = {}
    for fam in families():
        for t, (factory, needs) in fam.load_converters().items():
            out.setdefault(t, Converter(t, factory, needs, fam.name))
    out.update(_USER)
    return out


def lookup(module: nn.Module, table: Mapping[type, Any]) -> Any:
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


#: methods a subclass may redefine without changing what its forward computes
_BENIGN = frozenset(
    (
        "__init__",
        "__repr__",
        "__setstate__",
        "__getstate__",
        "__init_subclass__",
        "extra_repr",
        "reset_parameters",
        "reset_running_stats",
        "_load_from_state_dict",
        "_save_to_state_dict",
    )
)


def redefined(module: nn.Module) -> list[str]:
    """The methods of its torch class (``forward`` and what its hierarchy below ``nn.Module``
    defines) that ``module``'s own classes, those before the first ``torch.nn`` class of its MRO,
    redefine: timm's ``BatchNormAct2d.forward`` or ``Conv2dSame.forward``, a ``_conv_forward`` that
    standardizes the weight. A built-in wrapper's forward replaces the torch class's and would
    silently skip them, so such a module is not wrapped: its own forward runs, and the op rules
    make each torch call in it exact."""
    mro = type(module).__mro__
    base = next(k for k in mro if k.__module__.startswith("torch."))
    own = {n for k in base.__mro__ if issubclass(k, nn.Module) and k is not nn.Module for n in vars(k)}
    own.add("forward")
    out: list[str] = []
    for klass in mro[: mro.index(base)]:
        for name, v in vars(klass).items():
            method = callable(v) or isinstance(v, (staticmethod, classmethod, property))
            if method and name in own and name not in _BENIGN and name not in out:
                out.append(name)
    return out


def converter_for(module: nn.Module) -> Converter | None:
    """The converter for ``module``'s class (most specific registered base class), or ``None``.
    Already converted modules return ``None``, and so do subclasses that redefine a method of the
    built-in family's torch class (:func:`redefined`); user registrations apply to every subclass."""
    if isinstance(module, DomainParallelModule):
        return None
    conv = lookup(module, registered_converters())
    if conv is not None and conv.torch_type not in _USER and redefined(module):
        return None
    return conv
