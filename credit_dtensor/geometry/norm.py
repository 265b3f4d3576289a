"""Pure arithmetic of distributed normalization: which dims a norm reduces over and how many
elements each rank contributes to one statistic. No torch.distributed, no tensors.

Every normalization here is viewed in one *canonical* 3-D layout ``(P, Q, R)``: statistics are
indexed by ``Q`` and reduce over ``P`` and ``R``.

- group norm (and instance norm = ``groups == C``): ``(N, C, *S) -> (1, N*G, C/G * prod(S))``
- batch norm: ``(N, C, *S) -> (N, C, prod(S))``
- layer norm over the last ``k`` dims: ``(*L, *K) -> (1, prod(L), prod(K))``

The counts are global per statistic, so uneven and empty shards need no special case: a rank
contributes ``count // size[dim] * local_size`` elements (zero on an empty shard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import chunk_sizes

__all__ = ["NORM_KINDS", "NormLayout"]

NORM_KINDS = ("group", "batch", "layer")


@dataclass(frozen=True)
class NormLayout:
    """Geometry of one normalization call on a tensor of global ``shape``.

    ``groups`` is used by ``"group"``; ``norm_ndim`` (``len(normalized_shape)``) by ``"layer"``.
    """

    kind: str
    shape: tuple[int, ...]
    groups: int = 1
    norm_ndim: int = 0

    def __post_init__(self) -> None:
        nd = len(self.shape)
        if self.kind not in NORM_KINDS:
            raise ValueError(f"unknown norm kind {self.kind!r}; expected one of {NORM_KINDS}")
        if self.kind == "group":
            if nd < 2 or self.groups < 1 or self.shape[1] % self.groups:
                raise ValueError(
                    f"group norm: {self.shape[1] if nd > 1 else '?'} channels not divisible by {self.groups} groups"
                )
        if self.kind == "batch" and nd < 2:
            raise ValueError(f"batch norm needs (N, C, ...), got shape {self.shape}")
        if self.kind == "layer" and not 1 <= self.norm_ndim <= nd:
            raise ValueError(f"layer norm over {self.norm_ndim} trailing dims of a {nd}-D tensor")

    @property
    def channel_dim(self) -> int | None:
        """The dim whose sharding breaks the statistics (channels of group/batch norm)."""
        return None if self.kind == "layer" else 1

    def reduce_dims(self) -> tuple[int, ...]:
        """Dims of the natural layout that one statistic reduces over."""
        nd = len(self.shape)
        if self.kind == "group":
            return tuple(range(1, nd))
        if self.kind == "batch":
            return (0, *range(2, nd))
        return tuple(range(nd - self.norm_ndim, nd))

    def num_stats(self) -> int:
        """Number of statistics (``Q`` of the canonical layout) for the global shape."""
        return self.canonical(self.shape)[1]

    def count(self) -> int:
        """Elements per statistic (global)."""
        p, _, r = self.canonical(self.shape)
        return p * r

    def canonical(self, local_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``(P, Q, R)`` for a tensor of ``local_shape`` (a shard of ``shape``)."""
        s = tuple(local_shape)
        if self.kind == "group":
            return 1, s[0] * self.groups, s[1] // self.groups * math.prod(s[2:])
        if self.kind == "batch":
            return s[0], s[1], math.prod(s[2:])
        k = len(s) - self.norm_ndim
        return 1, math.prod(s[:k]), math.prod(s[k:])

    def stats_shape(self) -> tuple[int, ...]:
        """Shape of the mean/rstd outputs of PyTorch's ``native_*_norm`` kernel for this call."""
        if self.kind == "group":
            return (self.shape[0], self.groups)
        if self.kind == "batch":
            return (self.shape[1],)
        k = len(self.shape) - self.norm_ndim
        return (*self.shape[:k], *([1] * self.norm_ndim))

    def rank_counts(self, dim: int, world: int) -> list[int] | None:
        """Elements each rank contributes to every statistic when sharded on ``dim``.

        ``None`` when ``dim`` is not reduced over: statistics are then purely local.
        """
        if dim not in self.reduce_dims():
            return None
        n = self.shape[dim]
        per = self.count() // n if n else 0
        return [per * s for s in chunk_sizes(n, world)]
