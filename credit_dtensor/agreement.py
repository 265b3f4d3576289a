"""Rank agreement: every domain rank must shard the *same* full tensor.

``shard_tensor`` without ``src`` slices locally, so if ranks pass different tensors the pieces are
silently stitched into a sample that never existed; if they pass different shapes, gloo crashes
(SIGABRT) at the first collective that disagrees. One tiny all-gather of per-tensor metadata
(shape, dtype, shard dim; and with ``verify`` a content checksum) lets every rank see every other
rank's view and raise the *same* :class:`DomainParallelError`, naming the ranks and the difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh

from . import comm
from .errors import DomainParallelError

__all__ = ["VERIFY_ENV", "check_agreement", "checksum"]

VERIFY_ENV = "CREDIT_DTENSOR_VERIFY"
MAX_DIMS = 8
ROWS = 16  # tensors described one by one; the rest are folded into the last row
_SLOTS = 4 + MAX_DIMS + 2  # ndim, shard dim, dtype, verify flag, shape..., checksum (2)
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]
_CHUNK = 1 << 24


def checksum(x: torch.Tensor) -> tuple[int, int]:
    """Two exact integer checksums of the bytes of ``x`` (position-weighted, so swaps are seen)."""
    b = x.detach().contiguous().reshape(-1).view(torch.uint8)
    s1 = s2 = 0
    for start in range(0, b.numel(), _CHUNK):
        part = b[start : start + _CHUNK].to(torch.int64)
        w = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.int64) % 8191 + 1
        s1 += int(part.sum())
        s2 = (s2 + int((part * w).sum())) % (1 << 61)
    return s1, s2


def _row(x: torch.Tensor, dim: int, verify: bool) -> list[int]:
    dtype = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    shape = list(x.shape[:MAX_DIMS]) + [-1] * (MAX_DIMS - min(x.ndim, MAX_DIMS))
    sums = list(checksum(x)) if verify else [0, 0]
    return [x.ndim, dim, dtype, int(verify), *shape, *sums]


def _fold(rows: list[list[int]]) -> list[int]:
    acc = [0] * _SLOTS
    for r in rows:
        acc = [(a * 1000003 + v) % (1 << 61) for a, v in zip(acc, r)]
    acc[3] = rows[0][3]
    return acc


def _describe(row: Sequence[int]) -> str:
    ndim, dim, dtype = row[0], row[1], row[2]
    if ndim < 0:
        return "no tensor"
    shape = tuple(row[4 : 4 + min(ndim, MAX_DIMS)])
    name = str(_DTYPES[dtype]).replace("torch.", "") if dtype < len(_DTYPES) else "other dtype"
    return f"shape {shape} {name}, sharded on dim {dim}"


def check_agreement(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    dims: int | Sequence[int],
    mesh: DeviceMesh,
    where: str,
    *,
    verify: bool = False,
) -> None:
    """Raise on every rank unless all domain ranks pass the same shapes/dtypes (and content if ``verify``)."""
    if mesh.size() == 1:
        return
    if isinstance(tensors, torch.Tensor):
        tensors, dims = [tensors], [dims]  # type: ignore[list-item]
    rows = [_row(t, d, verify) for t, d in zip(tensors, dims)]  # type: ignore[arg-type]
    if len(rows) > ROWS:
        rows = rows[: ROWS - 1] + [_fold(rows[ROWS - 1 :])]
    rows += [[-1] * _SLOTS] * (ROWS - len(rows))
    device = torch.device(mesh.device_type) if mesh.device_type == "cpu" else tensors[0].device
    meta = torch.tensor(rows, dtype=torch.int64, device=device)
    all_rows = comm.all_gather_small(meta, mesh.get_group()).cpu().tolist()  # (world, ROWS, SLOTS)
    world = len(all_rows)
    for i in range(ROWS):
        views = [all_rows[r][i] for r in range(world)]
        layout = [v[:3] + v[4 : 4 + MAX_DIMS] for v in views]
        differ = [r for r in range(world) if layout[r] != layout[0]]
        what = f"tensor {i}" if len(tensors) > 1 else "the tensor"
        if differ:
            r = differ[0]
            raise DomainParallelError(
                f"{where}: domain ranks disagree on {what}: rank 0 passed {_describe(views[0])}, rank {r} passed "
                f"{_describe(views[r])} (ranks differing from rank 0: {differ}). Every rank of a domain group "
                "must pass the same full tensor (or use src= to scatter from one rank)"
            )
        if all(v[3] for v in views):
            differ = [r for r in range(world) if views[r][-2:] != views[0][-2:]]
            if differ:
                raise DomainParallelError(
                    f"{where}: the content of {what} ({_describe(views[0])}) differs between domain rank 0 and "
                    f"rank(s) {differ}: every rank must pass the same full sample. Usual causes: unseeded randomness "
                    "(seed every rank identically, torch.manual_seed(seed), before making data) or a data sampler "
                    "that gives each domain rank its own samples (shard the dataset over the dp mesh dimension "
                    "only: DistributedSampler(ds, num_replicas=manager.dp_world_size, rank=manager.dp_rank))"
                )
