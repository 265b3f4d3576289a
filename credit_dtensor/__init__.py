"""credit_dtensor: exact domain (spatial) parallelism for PyTorch on H-sharded DTensors.

Public API only; see docs/index.md.
"""

from __future__ import annotations

from .errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from .mesh import DomainParallelManager, get_domain_parallel_manager, initialize_domain_parallel
from .sharding import gather_tensor, shard_batch, shard_tensor
from .stats import comm_stats
from . import ops as _ops  # noqa: F401
from .ops import conv as _conv_rules  # noqa: F401  (registers the aten.convolution rules)
from .ops import params as _param_rules  # noqa: F401
from .ops import _register_all

_register_all()
from .nn.conv import (
    DomainParallelConv1d,
    DomainParallelConv2d,
    DomainParallelConv3d,
    DomainParallelConvTranspose1d,
    DomainParallelConvTranspose2d,
    DomainParallelConvTranspose3d,
)
from .compat import (
    _needs_halo_conv2d,
    _needs_halo_conv3d,
    _needs_halo_conv_transpose2d,
    _needs_halo_conv_transpose3d,
)

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
    "DomainParallelConv1d",
    "DomainParallelConv2d",
    "DomainParallelConv3d",
    "DomainParallelConvTranspose1d",
    "DomainParallelConvTranspose2d",
    "DomainParallelConvTranspose3d",
    "_needs_halo_conv2d",
    "_needs_halo_conv3d",
    "_needs_halo_conv_transpose2d",
    "_needs_halo_conv_transpose3d",
    "__version__",
]
