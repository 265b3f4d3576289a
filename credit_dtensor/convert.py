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

Which module gets which wrapper comes from a registry that every op family contributes to
without editing this file: each ``credit_dtensor/nn/<family>.py`` exposes ``*_WRAPPERS`` (a dict,
or pairs, ``{torch class: wrapper factory}``) and optionally a predicate (``needs_conversion`` or
its family name, e.g. ``module_needs_halo``) saying whether a given instance needs its wrapper;
families are discovered on each call, so a family that lands later is picked up. Users add
their own types with :func:`register_converter` (process-wide) or ``custom_converters`` (one call).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn.modules.batchnorm import _NormBase

from . import guard
from .errors import DomainParallelError, MeshMismatchError
from .mesh import DomainParallelManager
from .nn._base import DomainParallelModule

__all__ = [
    "convert_to_domain_parallel",
    "validate_sharding_constraints",
    "register_converter",
    "converter_for",
    "registered_converters",
    "Converter",
    "family_errors",
    "window_height",
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
_FAMILY_ERRORS: dict[str, str] = {}


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
    """Import every ``credit_dtensor.nn`` family not loaded yet (a broken one is logged, skipped)."""
    import credit_dtensor.nn as nn_pkg

    for info in pkgutil.iter_modules(nn_pkg.__path__):
        name = info.name
        if name.startswith("_") or name in _FAMILIES:
            continue
        try:
            mod = importlib.import_module(f"{nn_pkg.__name__}.{name}")
        except Exception as exc:  # noqa: BLE001 - one half-written family must not break conversion
            if name not in _FAMILY_ERRORS:
                logger.warning(
                    "credit_dtensor.nn.%s could not be imported (%s: %s); its modules stay unconverted",
                    name,
                    type(exc).__name__,
                    exc,
                )
            _FAMILY_ERRORS[name] = f"{type(exc).__name__}: {exc}"
            continue
        _FAMILY_ERRORS.pop(name, None)
        _FAMILIES[name] = _family_table(mod, name)


def family_errors() -> dict[str, str]:
    """Families that failed to import: ``{name: error}`` (reported by ``plan``)."""
    _load_families()
    return dict(_FAMILY_ERRORS)


def registered_converters() -> dict[type, Converter]:
    """Every known ``{torch class: Converter}`` (families, then user registrations on top)."""
    _load_families()
    out: dict[type, Converter] = {}
    for fam in sorted(_FAMILIES, key=lambda f: FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER)):
        for t, c in _FAMILIES[fam].items():
            out.setdefault(t, c)
    out.update(_USER)
    return out


def _lookup(module: nn.Module, table: Mapping[type, Any]) -> Any:
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def converter_for(module: nn.Module) -> Converter | None:
    """The converter for ``module``'s class (most specific registered base class), or ``None``.
    Already converted modules return ``None``."""
    if isinstance(module, DomainParallelModule):
        return None
    return _lookup(module, registered_converters())


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
    """Only H is supported: dim -2 of (B, C, H, W) / (B, C, T, H, W), the only spatial dim of 1-D convs."""
    if not isinstance(shard_dim, int):
        raise DomainParallelError(f"convert_to_domain_parallel: shard_dim={shard_dim!r} must be an integer (-2 = H)")
    for name, conv in _conv_modules(model):
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
        fn = _lookup(mod, custom)
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
                v = v.to(device=cur.to_local().device)
                state_dict[key] = DTensor.from_local(
                    v, cur.device_mesh, [Replicate()], run_check=False, shape=v.shape, stride=v.stride()
                )


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
    _check_shard_dim(model, shard_dim)
    _check_mesh_and_types(model, mesh)
    custom = _normalize_custom(custom_converters, manager)
    _load_families()

    model, frozen, custom_counts = _apply_custom(model, custom)
    replicated = _replicate_state(model, mesh, frozen)
    counts = _apply_wrappers(model, manager, frozen)
    _install_state_dict_hooks(model, frozen)
    guard.register_module_paths(model)

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


# ---------------------------------------------------------------------------------------------
# validate_sharding_constraints (static: strides read from the model)
# ---------------------------------------------------------------------------------------------


def window_height(module: nn.Module) -> int | None:
    """H extent of a module's window (``window_size`` or any ``*window_size`` attribute; an int
    means square windows, a tuple ``(..., h, w)``), else ``None``."""
    names = ["window_size"] + sorted(n for n in vars(module) if n.endswith("window_size") and n != "window_size")
    for n in names:
        ws = getattr(module, n, None)
        if isinstance(ws, int) and ws > 0:
            return ws
        if isinstance(ws, (tuple, list)) and ws and all(isinstance(v, int) for v in ws):
            return int(ws[-2]) if len(ws) >= 2 else int(ws[0])
    return None


def _h_scale(mod: nn.Module) -> Fraction:
    """How much a module divides H by (stride along H); <1 for up-sampling modules."""

    def h_of(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return v[-2] if len(v) >= 2 else v[0]
        return v

    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return Fraction(1, int(h_of(mod.stride)))
    if isinstance(mod, nn.modules.conv._ConvNd):
        return Fraction(int(h_of(mod.stride)))
    if isinstance(mod, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        s = mod.stride if mod.stride is not None else mod.kernel_size
        return Fraction(int(h_of(s)))
    if isinstance(mod, nn.Upsample) and mod.scale_factor is not None:
        return 1 / Fraction(h_of(mod.scale_factor)).limit_denominator(1000)
    if isinstance(mod, nn.PixelShuffle):
        return Fraction(1, mod.upscale_factor)
    if isinstance(mod, nn.PixelUnshuffle):
        return Fraction(mod.downscale_factor)
    return Fraction(1)


def _walk_scales(mod: nn.Module, path: str, f: Fraction, events: list) -> Fraction:
    """Static walk in registration order; returns the H factor after ``mod``. ``events`` gets
    ``("window", path, height, factor)`` and ``("scale", path, None, new factor)``. Children of a
    ``ModuleList``/``ModuleDict`` that each rescale H equally and hold no windows are parallel
    branches (e.g. cross-embedding kernels): they count once."""
    wh = window_height(mod)
    if wh is not None:
        events.append(("window", path, wh, f))
    children = list(mod.named_children())
    if not children:
        g = f * _h_scale(mod)
        if g != f:
            events.append(("scale", path, None, g))
        return g
    if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and len(children) > 1:
        results = []
        for name, child in children:
            sub: list = []
            results.append((_walk_scales(child, f"{path}.{name}" if path else name, f, sub), sub))
        if len({r for r, _ in results}) == 1 and not any(e[0] == "window" for _, sub in results for e in sub):
            events.extend(results[0][1])
            return results[0][0]
    g = f
    for name, child in children:
        g = _walk_scales(child, f"{path}.{name}" if path else name, g, events)
    return g


def validate_sharding_constraints(
    model: nn.Module, local_h: int, window_sizes: list[int] | tuple[int, ...] | None = None
) -> list[str]:
    """Warnings (strings) for windowed layers whose windows would straddle shards.

    ``local_h`` is the input rows per rank. The H down-sampling before each layer is read from the
    model's strides (strided convs/pools, transposed convs, Upsample, pixel (un)shuffle) in
    registration order; windowed layers are those with a ``window_size`` attribute. With
    ``window_sizes`` (the original API), entry ``i`` is the window height of level ``i`` -- the
    resolution after the ``i``-th distinct down-sampling stage (level 0 if the model starts
    windowed before any). This is a static estimate; :func:`credit_dtensor.audit.plan` traces the
    real forward and is exact.
    """
    if not isinstance(local_h, int) or local_h < 1:
        raise DomainParallelError(f"validate_sharding_constraints: local_h={local_h!r} must be a positive integer")
    events: list[tuple[str, str, int | None, Fraction]] = []
    _walk_scales(model, "", Fraction(1), events)
    windows = [(path, wh, f) for kind, path, wh, f in events if kind == "window"]
    warnings: list[str] = []
    if window_sizes is not None:
        levels: list[Fraction] = []
        for f in [f for _, _, f in windows] or [Fraction(1)] + [f for kind, _, _, f in events if kind == "scale"]:
            if f not in levels:
                levels.append(f)
        if len(window_sizes) > len(levels):
            warnings.append(
                f"window_sizes has {len(window_sizes)} levels but the model down-samples H only "
                f"{len(levels)} time(s) ({', '.join(f'x{f}' for f in levels)}): extra entries are ignored"
            )
        checks = [(f"level {i}", int(w), f) for i, (w, f) in enumerate(zip(window_sizes, levels, strict=False))]
    else:
        checks = windows
    for where, wh, f in checks:
        h = Fraction(local_h) / f
        if h.denominator != 1:
            warnings.append(
                f"{where}: local H {local_h} is not divisible by the down-sampling x{f} before it: "
                f"shards would split output rows; use local H divisible by {f.numerator}"
            )
            continue
        h = int(h)
        if h < wh:
            warnings.append(
                f"{where}: local H {h} (= {local_h} / x{f}) is smaller than the window height {wh}: "
                f"windows span several shards; use fewer domain ranks (local H >= {wh * f})"
            )
        elif h % wh:
            warnings.append(
                f"{where}: local H {h} (= {local_h} / x{f}) is not divisible by the window height {wh}: "
                f"a window would straddle two shards; choose local H divisible by {wh * f}"
            )
    return warnings
