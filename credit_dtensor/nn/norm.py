"""Domain-parallel normalization modules: exact GroupNorm / InstanceNorm / BatchNorm / LayerNorm on
H-sharded activations, communicating only statistics (see :mod:`credit_dtensor.ops.norm`).

Each wrapper *becomes* the user's module (class swap, see :mod:`._base`): parameter and buffer
names are unchanged, parameters become ``Replicate`` DTensors, running statistics stay plain
tensors that every domain rank updates identically. ``needs_distributed_norm`` tells the model
converter which modules must be swapped.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..dtensor import wrap_replicate
from ..ops import norm as ops
from ..sharding import h_dim_of
from ._base import DomainParallelModule, module_label, wrapper_class, wrapper_for, wrapper_names


def _default_dim(ndim: int) -> int | None:
    """Where a plain (full) input is sharded: H of (N,C,H,W)/(N,C,T,H,W), L of (N,C,L); else none."""
    return {3: 2, 4: 2, 5: 3}.get(ndim)


class _NormMixin(DomainParallelModule):
    def _dp_norm_input(self, x: torch.Tensor, dim: int | None) -> DTensor:
        """A DTensor (checked to be on our mesh), or a plain full tensor sharded on ``dim`` (replicated
        when the input has no spatial dim, e.g. (N, C) into BatchNorm1d)."""
        if isinstance(x, DTensor) or dim is not None:
            return self._dp_input(x, dim if dim is not None else 0)
        return wrap_replicate(x, self._dp_mesh)


class DomainParallelGroupNorm(_NormMixin, nn.GroupNorm):
    """``nn.GroupNorm`` with statistics over the whole (sharded) sample."""

    wraps = nn.GroupNorm

    def forward(self, input: torch.Tensor) -> DTensor:  # type: ignore[override]
        x = self._dp_norm_input(input, _default_dim(input.ndim))
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, label=module_label(self))


class _DomainParallelInstanceNorm(_NormMixin):
    """torch's own ``_InstanceNorm.forward`` (checks, unbatched input) around our instance norm."""

    def forward(self, input: torch.Tensor) -> DTensor:  # type: ignore[override]
        nobatch = self._get_no_batch_dim()  # type: ignore[attr-defined]
        d = _default_dim(input.ndim + 1) if input.ndim == nobatch else _default_dim(input.ndim)
        if input.ndim == nobatch and d is not None:
            d -= 1
        return super().forward(self._dp_norm_input(input, d))  # type: ignore[misc]

    def _apply_instance_norm(self, input: DTensor) -> DTensor:
        return ops.instance_norm(
            input,
            self.running_mean,  # type: ignore[attr-defined]
            self.running_var,  # type: ignore[attr-defined]
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            self.training or not self.track_running_stats,  # type: ignore[attr-defined]
            self.momentum if self.momentum is not None else 0.0,  # type: ignore[attr-defined]
            self.eps,  # type: ignore[attr-defined]
            label=module_label(self),
        )


DomainParallelInstanceNorm1d, DomainParallelInstanceNorm2d, DomainParallelInstanceNorm3d = (
    wrapper_class(_DomainParallelInstanceNorm, t, __name__)
    for t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
)


class _DomainParallelBatchNorm(_NormMixin):
    """torch's ``_BatchNorm.forward`` logic (momentum=None cumulative average via
    ``num_batches_tracked``, eval with or without buffers) around our batch norm."""

    def forward(self, input: torch.Tensor) -> DTensor:  # type: ignore[override]
        x = self._dp_norm_input(input, _default_dim(input.ndim))
        self._check_input_dim(x)  # type: ignore[attr-defined]
        factor = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        if self.training and self.track_running_stats:  # type: ignore[attr-defined]
            if self.num_batches_tracked is not None:  # type: ignore[attr-defined]
                self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
                factor = (
                    1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
                    if self.momentum is None  # type: ignore[attr-defined]
                    else self.momentum  # type: ignore[attr-defined]
                )
        use_batch = self.training or (self.running_mean is None and self.running_var is None)  # type: ignore[attr-defined]
        track = not self.training or self.track_running_stats  # type: ignore[attr-defined]
        return ops.batch_norm(
            x,
            self.running_mean if track else None,  # type: ignore[attr-defined]
            self.running_var if track else None,  # type: ignore[attr-defined]
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            use_batch,
            factor,
            self.eps,  # type: ignore[attr-defined]
            label=module_label(self),
        )


DomainParallelBatchNorm1d, DomainParallelBatchNorm2d, DomainParallelBatchNorm3d = (
    wrapper_class(_DomainParallelBatchNorm, t, __name__) for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
)


class DomainParallelLayerNorm(_NormMixin, nn.LayerNorm):
    """``nn.LayerNorm``: exact across ranks when the sharded dim is normalized over, local otherwise."""

    wraps = nn.LayerNorm

    def forward(self, input: torch.Tensor) -> DTensor:  # type: ignore[override]
        x = self._dp_norm_input(input, h_dim_of(input))
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, label=module_label(self))


#: torch class -> wrapper, most specific first (subclasses of these are wrapped too).
NORM_WRAPPERS: dict[type[nn.Module], type[DomainParallelModule]] = {
    nn.GroupNorm: DomainParallelGroupNorm,
    nn.InstanceNorm1d: DomainParallelInstanceNorm1d,
    nn.InstanceNorm2d: DomainParallelInstanceNorm2d,
    nn.InstanceNorm3d: DomainParallelInstanceNorm3d,
    nn.BatchNorm1d: DomainParallelBatchNorm1d,
    nn.BatchNorm2d: DomainParallelBatchNorm2d,
    nn.BatchNorm3d: DomainParallelBatchNorm3d,
    nn.LayerNorm: DomainParallelLayerNorm,
}


def norm_wrapper_for(module: nn.Module) -> type[DomainParallelModule] | None:
    """The wrapper class for ``module`` (``None`` if we have none, e.g. ``nn.SyncBatchNorm``)."""
    return wrapper_for(module, NORM_WRAPPERS)


def needs_distributed_norm(module: nn.Module, *, input_ndim: int | None = None, shard_dim: int | None = None) -> bool:
    """Whether ``module`` computes statistics across the sharded dim (so it must be converted).

    GroupNorm, InstanceNorm and BatchNorm always do (``nn.SyncBatchNorm`` too, but it has no
    wrapper: ``norm_wrapper_for`` returns ``None`` and the converter should refuse it). LayerNorm
    does iff its ``normalized_shape`` covers the sharded dim: exactly decided when ``input_ndim``
    and ``shard_dim`` are given, else assumed for ``len(normalized_shape) >= 2`` (over (H, W) or
    (C, H, W) of a BCHW tensor; a LayerNorm over channels of a channels-last tensor is local).
    Converting a LayerNorm that turns out local is harmless: the wrapper then communicates nothing.
    Already converted modules return ``False``.
    """
    if isinstance(module, DomainParallelModule):
        return False
    if isinstance(module, (nn.GroupNorm, _InstanceNorm, _BatchNorm)):
        return True
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        if input_ndim is not None and shard_dim is not None:
            return shard_dim % input_ndim >= input_ndim - k
        return k >= 2
    return False


ops.FAMILY.converts(NORM_WRAPPERS, needs=needs_distributed_norm)

__all__ = [*wrapper_names(NORM_WRAPPERS), "NORM_WRAPPERS", "needs_distributed_norm", "norm_wrapper_for"]
