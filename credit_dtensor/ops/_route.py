"""Table-driven torch-function rules: one rule per op family, one table row per torch function.

A row ``{torch function: (public function, nd, fixed kwargs)}`` sends a call on a sharded DTensor
to the family's public function (same signature as ``torch.nn.functional``) with ``fixed``
merged into its keyword arguments. With ``nd`` (the op's spatial dims) a call whose input is
sharded on a leading (batch) dim is left to PyTorch's own DTensor rule, which is exact there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.distributed.tensor import DTensor

from ..dtensor import is_sharded, spatial_shard_dim
from .family import input_of
from .relayout import to_spatial

__all__ = ["Route", "route_rule"]

#: (public function, spatial dims or None, keyword arguments the torch function implies)
Route = tuple[Callable[..., Any], "int | None", Mapping[str, Any]]


def route_rule(name: str, table: Mapping[Any, Route], per_channel: bool = False) -> Callable:
    """One rule, named ``name`` (``credit-dtensor info`` lists it), for every function of ``table``
    (the family registers it: ``FAMILY.rule(table, h=...)(route_rule(name, table))``).
    ``per_channel``: the ops never mix channels or samples (pooling), so an input sharded on a
    leading dim goes to the public function as it is (which runs each rank's rows)."""

    def rule(func: Any, args: tuple, kwargs: dict) -> Any:
        public, nd, fixed = table[func]
        x = input_of(args, kwargs)
        if per_channel:
            return public(*args, **{**kwargs, **fixed}) if is_sharded(x) else NotImplemented
        moved = False
        if nd is not None and isinstance(x, DTensor):
            x2 = to_spatial(x, nd)  # sharded on channels: back on H first; a partial sum: reduced
            if x2 is not x:
                args, kwargs = ((x2, *args[1:]), kwargs) if args else (args, {**kwargs, "input": x2})
                x, moved = x2, True
        if not is_sharded(x) or (
            nd is not None and x.ndim in (nd + 1, nd + 2) and spatial_shard_dim(x, nd, public.__name__) is None
        ):  # replicated or batch-sharded: PyTorch's own rule (on the re-laid-out input, if any)
            return func(*args, **kwargs) if moved else NotImplemented
        return public(*args, **{**kwargs, **fixed})

    rule.__name__ = rule.__qualname__ = name
    return rule
