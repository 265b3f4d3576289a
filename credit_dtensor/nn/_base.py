"""Shared machinery of the DTensor-aware module wrappers.

A wrapper does not nest the user's module (that would rename ``state_dict`` keys); it *becomes*
the module: the instance's class is swapped, in place, for a subclass of both our wrapper class
and the module's own class (e.g. ``ParametrizedConv2d`` under weight/spectral parametrizations).
So parameter and buffer names, forward pre-hooks, parametrizations and ``isinstance(m,
nn.Conv2d)`` all keep working; only the computation is replaced. Parameters become ``Replicate``
DTensors on the domain mesh; their gradients come back ``Partial`` and are reduced once, by
FSDP2 or by the optimizer's first use (DTensor redistributes lazily).

Usage (every wrapper class): ``DomainParallelConv2d(conv, manager)`` returns ``conv`` itself,
now domain-parallel.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from .. import intercept, rebind
from ..errors import DomainParallelError, MeshMismatchError
from ..mesh import DomainParallelManager
from ..sharding import shard_tensor

__all__ = [
    "DomainParallelModule",
    "replicate_parameters",
    "domain_mesh_of",
    "module_label",
    "wrapper_class",
    "wrapper_for",
    "wrapper_names",
]

M = TypeVar("M", bound=nn.Module)

_CLASS_CACHE: dict[tuple[type, type], type] = {}


def domain_mesh_of(manager: DomainParallelManager | DeviceMesh) -> DeviceMesh:
    return manager.domain_mesh if isinstance(manager, DomainParallelManager) else manager


def module_label(module: nn.Module) -> str:
    name = getattr(module, "_dp_name", None)
    return f"{name} ({type(module).__name__})" if name else type(module).__name__


def replicate_parameters(module: nn.Module, mesh: DeviceMesh, *, recurse: bool = True) -> None:
    """Turn every plain parameter of ``module`` into a ``Replicate`` DTensor parameter on ``mesh``.

    Values are broadcast from domain rank 0 once (so replicas agree even if ranks initialised
    differently). Parameters that are already DTensors must live on ``mesh`` (or on a 2-D mesh
    whose ``domain`` dim it is, as under FSDP2).
    """
    mods = module.modules() if recurse else [module]
    for mod in mods:
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if isinstance(p, DTensor):
                if p.device_mesh != mesh and "domain" not in (p.device_mesh.mesh_dim_names or ()):
                    raise MeshMismatchError(
                        f"{module_label(mod)}.{name} is a DTensor on {p.device_mesh}, not on the domain mesh "
                        f"{mesh}: convert the model with the manager whose mesh holds its parameters"
                    )
                continue
            if p.device.type != mesh.device_type:
                raise DomainParallelError(
                    f"{module_label(mod)}.{name} is on {p.device.type!r} but the mesh is {mesh.device_type!r}: "
                    f"move the model with .to({mesh.device_type!r}) before converting"
                )
            dt = distribute_tensor(p.detach(), mesh, [Replicate()])
            mod._parameters[name] = new = nn.Parameter(dt, requires_grad=p.requires_grad)
            rebind.record(p, new)


def replicate_buffers(module: nn.Module, mesh: DeviceMesh) -> None:
    """Turn floating-point buffers (e.g. spectral norm's power-iteration vectors) into Replicate
    DTensors, so parametrizations mixing them with Replicate parameters stay DTensor-only in
    forward and backward. Integer buffers (counters) stay plain."""
    for mod in module.modules():
        for name, b in list(mod._buffers.items()):
            if b is None or isinstance(b, DTensor) or not b.is_floating_point():
                continue
            mod._buffers[name] = distribute_tensor(b, mesh, [Replicate()])


class DomainParallelModule:
    """Mixin of every wrapper. Instances carry ``_dp_mesh`` (the domain :class:`DeviceMesh`)."""

    _dp_mesh: DeviceMesh
    #: The wrapped torch class (``nn.Conv2d`` ...); the module must be an instance of it.
    wraps: type[nn.Module] = nn.Module
    #: Also make floating buffers Replicate DTensors (parameter-side buffers only; not running stats).
    replicate_buffers: bool = False

    def __new__(cls, module: nn.Module | None = None, manager: Any = None, *args: Any, **kwargs: Any):
        if module is None:  # copy/deepcopy/pickle path
            return super().__new__(cls)
        return cls.wrap(module, manager, *args, **kwargs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the instance is already initialised
        pass

    @classmethod
    def wrap(cls, module: M, manager: DomainParallelManager | DeviceMesh, **options: Any) -> M:
        """Make ``module`` domain-parallel in place and return it."""
        if isinstance(module, DomainParallelModule):
            if module._dp_mesh != domain_mesh_of(manager):
                raise MeshMismatchError(
                    f"{module_label(module)} is already domain-parallel on another mesh: convert a fresh copy"
                )
            return module
        if not isinstance(module, cls.wraps):
            raise DomainParallelError(f"{cls.__name__} wraps {cls.wraps.__name__}, got {type(module).__name__}")
        mesh = domain_mesh_of(manager)
        base = type(module)
        key = (cls, base)
        new_cls = _CLASS_CACHE.get(key)
        if new_cls is None:
            name = cls.__name__ if base is cls.wraps else f"{cls.__name__}_{base.__name__}"
            new_cls = type(name, (cls, base), {"__module__": __name__, "__qualname__": name})
            _CLASS_CACHE[key] = new_cls
            setattr(sys.modules[__name__], name, new_cls)  # picklable by reference
        replicate_parameters(module, mesh)
        if cls.replicate_buffers:
            replicate_buffers(module, mesh)
        module.__class__ = new_cls
        module._dp_mesh = mesh
        for k, v in options.items():
            setattr(module, f"_dp_{k}", v)
        return module

    # --- helpers for forwards ---------------------------------------------------------------
    def _dp_input(self, x: torch.Tensor, default_dim: int) -> DTensor:
        """A plain tensor is sharded on ``default_dim``; a DTensor must live on our mesh."""
        mesh = self._dp_mesh
        intercept.ensure_enabled()  # a converted model run on a new thread
        if not dist.is_initialized():
            raise DomainParallelError(
                f"{module_label(self)}: the process group of this converted model is gone (DomainParallelManager."
                "close() or torch.distributed.destroy_process_group() ran): create a new DomainParallelManager and "
                "convert a fresh copy of the model (convert_to_domain_parallel), and call close() only at the end"
            )
        if isinstance(x, DTensor):
            if x.device_mesh != mesh:
                raise MeshMismatchError(
                    f"{module_label(self)}: input lives on mesh {x.device_mesh} but the module on {mesh}: "
                    "shard inputs with the same manager that converted the model"
                )
            return x
        return shard_tensor(x, mesh, default_dim)

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, domain={self._dp_mesh.size()}" if base else f"domain={self._dp_mesh.size()}"


def wrapper_class(mixin: type, torch_cls: type, module: str, *, name: str = "", doc: str = "", **attrs: Any) -> type:
    """The wrapper class of ``torch_cls``: ``mixin`` (the family's forward) over it, named ``name``
    (default ``DomainParallel<torch class>``) in ``module`` (bind it there under that name, so it
    pickles by reference); ``attrs`` are class attributes (options of the family's mixin)."""
    name = name or f"DomainParallel{torch_cls.__name__}"
    body = {"wraps": torch_cls, "__module__": module, "__qualname__": name, "__doc__": doc or mixin.__doc__}
    return type(name, (mixin, torch_cls), {**body, **attrs})


def h_entry(v: Any) -> Any:
    """The H entry of a module's per-dim argument (stride, scale): the second-to-last of a tuple
    (``(H, W)``, ``(T, H, W)``), the only one of a 1-D or scalar argument."""
    if isinstance(v, (tuple, list)):
        return v[-2] if len(v) >= 2 else v[0]
    return v


def wrapper_for(module: nn.Module, table: dict[type, type]) -> type | None:
    """The wrapper class for ``module`` from a family's ``{torch class: wrapper}`` table (first
    match, so more specific classes come first); ``None`` if none or already converted."""
    if isinstance(module, DomainParallelModule):
        return None
    return next((w for t, w in table.items() if isinstance(module, t)), None)


def wrapper_names(table: dict[type, type]) -> list[str]:
    """The names of a family's wrapper classes (for its ``__all__``)."""
    return [w.__name__ for w in table.values()]
