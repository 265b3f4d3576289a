"""One exception family, so callers can catch every domain-parallel misuse at once.

Messages name the place (module path or function), the constraint that was violated and
the way out, e.g. ``"encoder.0 (Conv2d): local H=2 < halo 3 on rank 2: use fewer domain ranks"``.
"""

from __future__ import annotations


class DomainParallelError(ValueError):
    """A configuration that credit_dtensor cannot run exactly, or a misuse of its API."""


class UnsupportedShardingError(DomainParallelError):
    """An input is sharded in a way an op rule cannot handle exactly (e.g. channels)."""


class MeshMismatchError(DomainParallelError):
    """Tensors of one op (or a module and its input) live on different device meshes."""
