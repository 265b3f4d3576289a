"""Process groups by name, for custom ops (whose arguments must be ints, strings and tensors).

The registry lives in :mod:`credit_dtensor.comm` (all communication does); only the name travels
through an op (and through a compiled graph), so the same compiled graph serves every rank.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..comm import group_name, resolve_group

__all__ = ["name_of", "resolve"]


def name_of(mesh: DeviceMesh) -> str:
    return group_name(mesh.get_group())


def resolve(name: str) -> dist.ProcessGroup:
    return resolve_group(name)
