"""credit_dtensor: exact domain (spatial) parallelism for PyTorch on H-sharded DTensors.

Public API only; see docs/index.md. Importing the package registers every op rule with DTensor.
"""

from __future__ import annotations

from . import _torch_versions
from . import intercept as _intercept
from .errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from .guard import ImplicitGatherError, ImplicitGatherWarning, gather_policy
from .mesh import DomainParallelManager, get_domain_parallel_manager, initialize_domain_parallel, rank_layout
from .ops import _register_all
from .sharding import gather_tensor, shard_batch, shard_tensor
from .stats import comm_stats

# isort: split
from .audit import plan
from .check import check
from .compat import (
    _needs_halo_conv2d,
    _needs_halo_conv3d,
    _needs_halo_conv_transpose2d,
    _needs_halo_conv_transpose3d,
)
from .convert import _replace_module, convert_to_domain_parallel, register_converter, validate_sharding_constraints
from .nn.conv import (
    DomainParallelConv1d,
    DomainParallelConv2d,
    DomainParallelConv3d,
    DomainParallelConvTranspose1d,
    DomainParallelConvTranspose2d,
    DomainParallelConvTranspose3d,
)
from .nn.local import DomainParallelLinear, DomainParallelShardLocal, shard_local
from .nn.norm import (
    DomainParallelBatchNorm1d,
    DomainParallelBatchNorm2d,
    DomainParallelBatchNorm3d,
    DomainParallelGroupNorm,
    DomainParallelInstanceNorm1d,
    DomainParallelInstanceNorm2d,
    DomainParallelInstanceNorm3d,
    DomainParallelLayerNorm,
)
from .nn.pad import (
    DomainParallelCircularPad,
    DomainParallelConstantPad,
    DomainParallelReflectionPad,
    DomainParallelReplicationPad,
)
from .nn.resample import (
    DomainParallelAdaptiveAvgPool,
    DomainParallelAdaptiveMaxPool,
    DomainParallelAvgPool,
    DomainParallelMaxPool,
    DomainParallelPixelShuffle,
    DomainParallelPixelUnshuffle,
    DomainParallelUpsample,
)
from .parallelize import parallelize, reduce_gradients

_register_all()
_torch_versions.install()  # DTensor behaviour of torch 2.13 on 2.11/2.12 (no-op on 2.13+)
enable_rules = _intercept.ensure_enabled  # the rules turn on with the first manager/shard/convert on a thread

__version__ = "0.1.0"

__all__ = [
    "DomainParallelError",
    "MeshMismatchError",
    "UnsupportedShardingError",
    "ImplicitGatherError",
    "ImplicitGatherWarning",
    "gather_policy",
    "enable_rules",
    "DomainParallelManager",
    "initialize_domain_parallel",
    "get_domain_parallel_manager",
    "rank_layout",
    "shard_tensor",
    "gather_tensor",
    "shard_batch",
    "comm_stats",
    "convert_to_domain_parallel",
    "validate_sharding_constraints",
    "register_converter",
    "plan",
    "check",
    "parallelize",
    "reduce_gradients",
    "DomainParallelConv1d",
    "DomainParallelConv2d",
    "DomainParallelConv3d",
    "DomainParallelConvTranspose1d",
    "DomainParallelConvTranspose2d",
    "DomainParallelConvTranspose3d",
    "DomainParallelGroupNorm",
    "DomainParallelInstanceNorm1d",
    "DomainParallelInstanceNorm2d",
    "DomainParallelInstanceNorm3d",
    "DomainParallelBatchNorm1d",
    "DomainParallelBatchNorm2d",
    "DomainParallelBatchNorm3d",
    "DomainParallelLayerNorm",
    "DomainParallelConstantPad",
    "DomainParallelReflectionPad",
    "DomainParallelReplicationPad",
    "DomainParallelCircularPad",
    "DomainParallelUpsample",
    "DomainParallelMaxPool",
    "DomainParallelAvgPool",
    "DomainParallelAdaptiveAvgPool",
    "DomainParallelAdaptiveMaxPool",
    "DomainParallelPixelShuffle",
    "DomainParallelPixelUnshuffle",
    "DomainParallelLinear",
    "DomainParallelShardLocal",
    "shard_local",
    "_needs_halo_conv2d",
    "_needs_halo_conv3d",
    "_needs_halo_conv_transpose2d",
    "_needs_halo_conv_transpose3d",
    "_replace_module",
    "__version__",
]
