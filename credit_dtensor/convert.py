"""Convert a plain PyTorch model into a domain-parallel one, in place.

``convert_to_domain_parallel(model, manager)`` walks the module tree once and

1. applies ``custom_converters`` first (their results are used as returned, never revisited);
2. turns every remaining parameter and buffer into a ``Replicate`` DTensor on the domain mesh
   (broadcast from domain rank 0; tied parameters stay tied). Running statistics of BatchNorm /
   InstanceNorm stay plain: their wrappers update them identically on every rank;
3. swaps each module that has a wrapper and needs one (halo convolutions, normalizations, padding,
   resampling, Linear layers, shard-local modules...) for its wrapper -- in place, so
   ``state_dict`` keys do not change;
4. installs ``state_dict`` hooks so a checkpoint moves freely between the plain and the converted
   model: ``state_dict()`` returns plain tensors for domain-``Replicate`` values, and
   ``load_state_dict`` accepts plain tensors (every rank loads the same file, as usual).

Which module gets which wrapper comes from the converter registry (:mod:`.converters`, every op
family contributes to it); users add their own types with :func:`register_converter`
(process-wide) or ``custom_converters`` (one call). :func:`validate_sharding_constraints`
(:mod:`.constraints`) checks windowed layers against a shard height statically.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn.modules.batchnorm import _NormBase

from . import guard, intercept, rebind
from .constraints import validate_sharding_constraints
from .converters import (
    Converter,
    converter_for,
    lookup,
    register_converter,
    registered_converters,
)
from .dtensor import wrap_replicate
from .errors import DomainParallelError, MeshMismatchError
from .mesh import DomainParallelManager
from .nn._base import DomainParallelModule
from .nn.local import window_height

__all__ = [
    "convert_to_domain_parallel",
    "validate_sharding_constraints",
    "register_converter",
    "converter_for",
    "registered_converters",
    "Converter",
    "window_height",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Checks done before anything is modified
# ---------------------------------------------------------------------------------------------


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise DomainParallelError(
            f"{where}: expected an nn.Module, got {type(model).__name__}: pass the model (build it first if you "
            "have a factory); tensors are sharded with credit_dtensor.shard_tensor, not converted"
        )


def _mesh(manager: Any) -> DeviceMesh:
    if isinstance(manager, DomainParallelManager):
        manager.check_open("convert_to_domain_parallel")
        return manager.domain_mesh
    if isinstance(manager, DeviceMesh) and manager.ndim == 1:
        return manager
    raise DomainParallelError(
        f"convert_to_domain_parallel: expected a DomainParallelManager (or its 1-D domain mesh), got {manager!r}"
    )


def _conv_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            yield name, mod


def _check_shard_dim(model: nn.Module, shard_dim: int) -> None:
    """Only H is supported: dim -2 of (B, C, H, W) / (B, C, T, H, W), the only spatial dim of 1-D convs.
    A model whose field is 2-D or 3-D checks those convs only: a 1-D conv there runs over another
    tensor (timm's ECA attention convolves the pooled channel vector), whose layout says nothing of H."""
    if not isinstance(shard_dim, int):
        raise DomainParallelError(f"convert_to_domain_parallel: shard_dim={shard_dim!r} must be an integer (-2 = H)")
    convs = list(_conv_modules(model))
    field = [(name, conv) for name, conv in convs if len(conv.kernel_size) > 1]
    for name, conv in field or convs:
        nd = len(conv.kernel_size)
        allowed = (-1, 2) if nd == 1 else (-2, nd)
        if shard_dim not in allowed:
            raise DomainParallelError(
                f"convert_to_domain_parallel: shard_dim={shard_dim} is not H for {name or 'the model'} "
                f"({type(conv).__name__}, input dims {'(B, C, L)' if nd == 1 else '(B, C, ..., H, W)'}): "
                f"H is dim {allowed[0]} ({allowed[1]} counted from the front); the wrappers shard H only: "
                f"pass shard_dim=-2 (or transpose the data so that the split axis is H)"
            )
    if shard_dim not in (-2, -1, 2, 3):
        raise DomainParallelError(
            f"convert_to_domain_parallel: shard_dim={shard_dim} is not the H dim of a weather tensor: pass shard_dim=-2"
        )


def _check_mesh_and_types(model: nn.Module, mesh: DeviceMesh) -> None:
    for name, mod in model.named_modules():
        label = name or type(model).__name__
        if isinstance(mod, DomainParallelModule) and mod._dp_mesh != mesh:
            raise MeshMismatchError(
                f"convert_to_domain_parallel: {label} ({type(mod).__name__}) is already domain-parallel on mesh "
                f"{mod._dp_mesh}, not on {mesh}: convert a fresh copy of the plain model with this manager"
            )
        if isinstance(mod, nn.SyncBatchNorm):
            raise DomainParallelError(
                f"convert_to_domain_parallel: {label} is nn.SyncBatchNorm, which has no domain-parallel wrapper: "
                "convert it back to nn.BatchNorm2d (domain-parallel BatchNorm already reduces over the domain)"
            )
        tensors = list(mod._parameters.items()) + list(mod._buffers.items())
        for pname, t in tensors:
            if (
                isinstance(t, DTensor)
                and t.device_mesh != mesh
                and "domain" not in (t.device_mesh.mesh_dim_names or ())
            ):
                raise MeshMismatchError(
                    f"convert_to_domain_parallel: {label}.{pname} is a DTensor on mesh {t.device_mesh}, not on "
                    f"the domain mesh {mesh}: the model is already distributed elsewhere; convert the plain model"
                )
            if t is not None and not isinstance(t, DTensor) and t.device.type != mesh.device_type:
                raise DomainParallelError(
                    f"convert_to_domain_parallel: {label}.{pname} is on {t.device.type!r} but the mesh is "
                    f"{mesh.device_type!r}: move the model with .to({mesh.device_type!r}) before converting"
                )


def _normalize_custom(custom: Mapping[type, Callable] | None, manager: Any) -> dict[type, Callable]:
    if custom is None:
        return {}
    if not isinstance(custom, Mapping):
        raise DomainParallelError(
            "convert_to_domain_parallel: custom_converters must be a {module type: callable} dict"
        )
    out: dict[type, Callable] = {}
    for t, fn in custom.items():
        if not isinstance(t, type) or not issubclass(t, nn.Module):
            raise DomainParallelError(
                f"convert_to_domain_parallel: custom_converters key {t!r} is not an nn.Module type"
            )
        if not callable(fn):
            raise DomainParallelError(f"convert_to_domain_parallel: custom converter for {t.__name__} is not callable")
        out[t] = _bind_manager(fn, manager)
    return out


def _bind_manager(fn: Callable, manager: Any) -> Callable[[nn.Module], Any]:
    """Accept ``fn(module)`` (the original API) and ``fn(module, manager)`` (like the wrapper classes)."""
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        takes_manager = len(params) >= 2 or isinstance(fn, type) and issubclass(fn, DomainParallelModule)
    except (TypeError, ValueError):
        takes_manager = False
    return (lambda m: fn(m, manager)) if takes_manager else fn


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------


def _replace_module(parent: nn.Module, name: str, *modules: nn.Module | None) -> None:
    """Replace the submodule at dotted path ``name`` (relative to ``parent``) by the new module.

    Accepts the original signature ``(parent, name, old_module, new_module)`` as well as
    ``(parent, name, new_module)``.
    """
    if len(modules) not in (1, 2):
        raise TypeError("_replace_module(parent, name, [old_module,] new_module)")
    new = modules[-1]
    *path, last = name.split(".")
    owner = parent
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, last, new)


def _label(path: str, model: nn.Module) -> str:
    return path or type(model).__name__


def _apply_custom(model: nn.Module, custom: dict[type, Callable]) -> tuple[nn.Module, set[int], Counter]:
    """Phase 1: custom converters, top-down; converted subtrees are frozen (never revisited)."""
    frozen: set[int] = set()
    counts: Counter = Counter()

    def convert_one(mod: nn.Module, path: str) -> nn.Module | None:
        if getattr(mod, "_dp_custom", False) or isinstance(mod, DomainParallelModule):
            return None
        fn = lookup(mod, custom)
        if fn is None:
            return None
        new = fn(mod)
        if not isinstance(new, nn.Module):
            raise DomainParallelError(
                f"convert_to_domain_parallel: the custom converter for {_label(path, model)} ({type(mod).__name__}) "
                f"returned {type(new).__name__}, not an nn.Module: return the converted module"
            )
        new._dp_custom = True
        counts[f"{type(mod).__name__} (custom)"] += 1
        return new

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if id(child) in frozen:
                continue
            new = convert_one(child, path)
            if new is None:
                if getattr(child, "_dp_custom", False):
                    frozen.add(id(child))
                else:
                    visit(child, path)
                continue
            if new is not child:
                _replace_module(parent, name, new)
            frozen.add(id(new))

    root = convert_one(model, "")
    if root is not None:
        return root, {id(root)}, counts
    if getattr(model, "_dp_custom", False):
        return model, {id(model)}, counts
    visit(model, "")
    return model, frozen, counts


def _modules_outside(model: nn.Module, frozen: set[int]) -> Iterator[nn.Module]:
    seen: set[int] = set()

    def walk(mod: nn.Module) -> Iterator[nn.Module]:
        if id(mod) in frozen or id(mod) in seen:
            return
        seen.add(id(mod))
        yield mod
        for child in mod.children():
            yield from walk(child)

    yield from walk(model)


def _replicate_state(model: nn.Module, mesh: DeviceMesh, frozen: set[int]) -> int:
    """Phase 2: every plain parameter/buffer -> Replicate DTensor (ties kept). Returns the count."""
    memo: dict[int, torch.Tensor] = {}
    count = 0
    for mod in _modules_outside(model, frozen):
        for name, p in list(mod._parameters.items()):
            if p is None or isinstance(p, DTensor):
                continue
            new = memo.get(id(p))
            if new is None:
                new = nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()]), requires_grad=p.requires_grad)
                memo[id(p)] = new
                rebind.record(p, new)
                count += 1
            mod._parameters[name] = new
        if isinstance(mod, _NormBase):  # running stats: plain, updated identically by the norm wrappers
            continue
        for name, b in list(mod._buffers.items()):
            if b is None or isinstance(b, DTensor):
                continue
            new = memo.get(id(b))
            if new is None:
                new = distribute_tensor(b, mesh, [Replicate()])
                memo[id(b)] = new
            mod._buffers[name] = new
    return count


def _apply_wrappers(model: nn.Module, manager: Any, frozen: set[int]) -> Counter:
    """Phase 3: registry wrappers, top-down; a wrapped module owns its subtree."""
    counts: Counter = Counter()

    def convert_one(mod: nn.Module, path: str) -> bool:
        if isinstance(mod, DomainParallelModule):
            return True
        conv = converter_for(mod)
        if conv is None or not conv.applies(mod):
            return False
        name = type(mod).__name__
        mod._dp_name = _label(path, model)
        out = conv.factory(mod, manager)
        if out is not mod:
            raise DomainParallelError(
                f"convert_to_domain_parallel: the {conv.family} converter for {name} returned a new object; "
                "registry converters must convert in place (use custom_converters to replace modules)"
            )
        counts[name] += 1
        return True

    def visit(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            if id(child) in frozen:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if not convert_one(child, path):
                visit(child, path)

    if id(model) not in frozen and not convert_one(model, ""):
        visit(model, "")
    return counts


def _is_domain_replicate(t: Any) -> bool:
    return isinstance(t, DTensor) and t.device_mesh.ndim == 1 and all(isinstance(p, Replicate) for p in t.placements)


def _state_dict_to_plain(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: domain-``Replicate`` DTensors -> their (full) local tensors."""
    for store in (module._parameters, module._buffers):
        for name in store:
            key = prefix + name
            v = state_dict.get(key)
            if _is_domain_replicate(v) and not isinstance(v, nn.Parameter):
                state_dict[key] = v.to_local()


def _load_plain(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """load_state_dict pre-hook: a plain tensor for a domain-``Replicate`` DTensor becomes one
    (no communication: every rank loads the same checkpoint)."""
    for store in (module._parameters, module._buffers):
        for name, cur in store.items():
            key = prefix + name
            v = state_dict.get(key)
            if _is_domain_replicate(cur) and isinstance(v, torch.Tensor) and not isinstance(v, DTensor):
                state_dict[key] = wrap_replicate(v.to(device=cur.to_local().device), cur.device_mesh)


_state_dict_to_plain._from_public_api = True  # type: ignore[attr-defined]


def _install_state_dict_hooks(model: nn.Module, frozen: set[int]) -> None:
    """Phase 4 (idempotent): hooks on every module that owns domain-Replicate tensors."""
    for mod in _modules_outside(model, frozen):
        if getattr(mod, "_dp_sd_hooks", False):
            continue
        owned = list(mod._parameters.values()) + list(mod._buffers.values())
        if any(_is_domain_replicate(t) for t in owned):
            mod.register_state_dict_post_hook(_state_dict_to_plain)
            mod.register_load_state_dict_pre_hook(_load_plain)
            mod._dp_sd_hooks = True


def convert_to_domain_parallel(
    model: nn.Module,
    manager: DomainParallelManager | DeviceMesh,
    shard_dim: int = -2,
    custom_converters: Mapping[type, Callable[..., nn.Module]] | None = None,
) -> nn.Module:
    """Make ``model`` domain-parallel in place and return it (see the module docstring).

    Args:
        model: a plain model on the mesh's device type (every rank builds the same model).
        manager: the :class:`DomainParallelManager` (or its 1-D domain mesh).
        shard_dim: the sharded activation dim; only H (``-2``) is supported, checked against the
            model's convolutions.
        custom_converters: ``{module type: fn(module) -> module}`` (or ``fn(module, manager)``),
            checked before the built-in wrappers (most specific base class wins); the returned
            module replaces the original and neither it nor its descendants are processed again.

    Raises:
        MeshMismatchError: the model (or part of it) is already distributed on another mesh.
        DomainParallelError: bad ``shard_dim``, a custom converter returning a non-module,
            parameters on another device type, modules without an exact wrapper (SyncBatchNorm).

    Converting twice is a no-op. A per-type count is logged at INFO level and kept in
    ``model._dp_conversion``.
    """
    _check_model(model, "convert_to_domain_parallel")
    mesh = _mesh(manager)
    intercept.ensure_enabled()
    _check_shard_dim(model, shard_dim)
    _check_mesh_and_types(model, mesh)
    custom = _normalize_custom(custom_converters, manager)

    model, frozen, custom_counts = _apply_custom(model, custom)
    replicated = _replicate_state(model, mesh, frozen)
    counts = _apply_wrappers(model, manager, frozen)
    _install_state_dict_hooks(model, frozen)
    guard.register_module_paths(model)
    if replicated:
        rebind.rebind_optimizers()  # optimizers built before conversion train the new parameters

    summary = dict(sorted((counts + custom_counts).items()))
    previous = getattr(model, "_dp_conversion", {}) if isinstance(getattr(model, "_dp_conversion", None), dict) else {}
    total = Counter(previous)
    total.update(summary)
    model._dp_conversion = dict(sorted(total.items()))
    if summary or replicated:
        logger.info(
            "convert_to_domain_parallel: %s; %d parameters made Replicate on the domain mesh (%d ranks)",
            ", ".join(f"{n} {t}" for t, n in summary.items()) or "no module needed a wrapper",
            replicated,
            mesh.size(),
        )
    else:
        logger.info("convert_to_domain_parallel: nothing to do (already converted)")
    return model
