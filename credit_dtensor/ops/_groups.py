"""Process groups by name, for custom ops (whose arguments must be ints, strings and tensors).

A domain mesh's group is registered under its ``group_name`` the first time an op runs on it; the
op's implementation looks it up again. Only the name travels through the op (and through a
compiled graph), so the same compiled graph serves every rank.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["name_of", "resolve"]

_BY_NAME: dict[str, dist.ProcessGroup] = {}


def name_of(mesh: DeviceMesh) -> str:
    group = mesh.get_group()
    name = group.group_name
    if name not in _BY_NAME:
        _BY_NAME[name] = group
    return name


def resolve(name: str) -> dist.ProcessGroup:
    group = _BY_NAME.get(name)
    if group is None:  # e.g. a graph compiled in another process: ask c10d
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _BY_NAME[name] = _resolve_process_group(name)
    return group
