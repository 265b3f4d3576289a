"""Static check of a model's windowed layers against a shard height, before anything runs.

:func:`validate_sharding_constraints` reads the H down-sampling before each windowed layer from
the model's strides (in registration order) and warns where windows would straddle shards.
:func:`credit_dtensor.audit.plan` traces the real forward and is exact; this needs no input.
"""

from __future__ import annotations

from fractions import Fraction

from torch import nn

from .errors import DomainParallelError
from .geometry.window import local_rows_fit
from .nn.local import DomainParallelShardLocal, shard_local, window_height
from .ops.family import families

__all__ = ["validate_sharding_constraints"]


def _h_scale(mod: nn.Module) -> Fraction:
    """How much a module divides H by (stride along H); <1 for up-sampling modules. Each family
    that rescales H says so in its descriptor (``FAMILY.converts(..., h_scale=...)``)."""
    for fam in families():
        fam.load_converters()
        f = fam.h_scale(mod) if fam.h_scale is not None else None
        if f is not None:
            return f
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


def needs_whole_windows(mod: nn.Module) -> bool:
    """Whether ``mod`` runs shard-local (declared with :func:`credit_dtensor.shard_local`, or
    already converted so): only then must every shard hold whole windows. Other windowed modules
    split H through the reshape rules, which re-chunk to whole windows on any shard sizes."""
    from .converters import converter_for

    if isinstance(mod, DomainParallelShardLocal):
        return True
    conv = converter_for(mod)
    return conv is not None and conv.factory in (shard_local, DomainParallelShardLocal) and conv.applies(mod)


def validate_sharding_constraints(
    model: nn.Module, local_h: int, window_sizes: list[int] | tuple[int, ...] | None = None
) -> list[str]:
    """Warnings (strings) for windowed layers whose windows would straddle shards.

    ``local_h`` is the input rows per rank. The H down-sampling before each layer is read from the
    model's strides (strided convs/pools, transposed convs, Upsample, pixel (un)shuffle) in
    registration order; windowed layers are those with a ``window_size`` attribute that run
    shard-local (:func:`needs_whole_windows`; the others re-chunk through the reshape rules). With
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
        shard_local_paths = {path for path, mod in model.named_modules() if needs_whole_windows(mod)}
        checks = [(path, wh, f) for path, wh, f in windows if path in shard_local_paths]
    for where, wh, f in checks:
        h = Fraction(local_h) / f
        if h.denominator != 1:
            warnings.append(
                f"{where}: local H {local_h} is not divisible by the down-sampling x{f} before it: "
                f"shards would split output rows; use local H divisible by {f.numerator}"
            )
            continue
        h = int(h)
        problem = local_rows_fit(h, wh)  # the arithmetic of shard_local's check and of plan
        if problem is not None:
            problem = problem.replace(f"local H {h}", f"local H {h} (= {local_h} / x{f})", 1)
            fix = f"use fewer domain ranks (local H >= {wh * f})" if h < wh else f"choose local H divisible by {wh * f}"
            warnings.append(f"{where}: {problem}; {fix}")
    return warnings
