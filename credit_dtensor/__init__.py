"""credit_dtensor: exact domain (spatial) parallelism for PyTorch on H-sharded DTensors.

Public API only; see docs/index.md.
"""

from __future__ import annotations

from .errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from .mesh import DomainParallelManager, get_domain_parallel_manager, initialize_domain_parallel
from .sharding import gather_tensor, shard_batch, shard_tensor
from .stats import comm_stats

__version__ = "0.1.0"

__all__ = [
    "DomainParallelError",
    "MeshMismatchError",
    "UnsupportedShardingError",
    "DomainParallelManager",
    "initialize_domain_parallel",
    "get_domain_parallel_manager",
    "shard_tensor",
    "gather_tensor",
    "shard_batch",
    "comm_stats",
    "__version__",
]
