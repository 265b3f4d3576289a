"""Sharding rules for parameter-side ops that PyTorch 2.13's DTensor lacks.

Parametrizations such as weight norm run on the (Replicate) parameters before every forward; their
backward receives a ``Partial`` weight gradient from our conv rules. Declaring the all-Replicate
strategy lets DTensor reduce that gradient once (Partial -> Replicate) and run the op locally,
which is exact because every rank holds the same parameters.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate

from .family import family

aten = torch.ops.aten

__all__ = ["REPLICATED_PARAM_OPS"]

FAMILY = family("params", "parameter-side ops DTensor lacks (weight norm): all-Replicate strategies; DDP refused")


@FAMILY.sharding(aten._weight_norm_interface.default)
def _weight_norm_sharding(v, g, dim=0):
    return [([Replicate(), Replicate()], [Replicate(), Replicate(), None])]


@FAMILY.sharding(aten._weight_norm_interface_backward.default)
def _weight_norm_backward_sharding(grad_w, saved_v, saved_g, saved_norms, dim):
    return [([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), Replicate(), None])]


REPLICATED_PARAM_OPS = tuple(FAMILY.aten)


def _refuse_ddp(*args, **kwargs):
    from ..errors import UnsupportedShardingError

    raise UnsupportedShardingError(
        "torch.nn.parallel.DistributedDataParallel over a domain-parallel model: its parameters are DTensors on "
        "the domain mesh, which DDP cannot broadcast or all-reduce. Fix: use credit_dtensor.parallelize(model, "
        "manager) (FSDP2 on the data-parallel mesh dim), or parallelize(model, manager, fsdp=False) and "
        "credit_dtensor.parallelize.reduce_gradients(model) after each backward"
    )


# DDP's first collective on the parameters (its initial broadcast): a clear error instead of
# "c10d.broadcast_.default does not have a sharding strategy registered"
if hasattr(torch.ops, "c10d") and hasattr(torch.ops.c10d, "broadcast_"):
    FAMILY.sharding(torch.ops.c10d.broadcast_.default)(_refuse_ddp)
