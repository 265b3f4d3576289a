"""All communication of credit_dtensor lives here: one batched point-to-point exchange and a
sum all-reduce, each counted in :mod:`.stats`. Nothing else in the package calls
``torch.distributed`` send/recv/collectives directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import stats

__all__ = ["exchange", "all_reduce_sum", "nbytes"]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def exchange(
    sends: Sequence[tuple[int, torch.Tensor]],
    recv_shapes: Sequence[tuple[int, torch.Size | tuple[int, ...]]],
    group: dist.ProcessGroup,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """One batched round of point-to-point messages on ``group``.

    ``sends``: ``(peer group rank, tensor)``; ``recv_shapes``: ``(peer group rank, shape)``.
    Both sides derive their lists from the same pure plan, so no sizes are exchanged. Empty
    messages are skipped on both sides. Returns the received tensors in ``recv_shapes`` order.
    """
    ops: list[dist.P2POp] = []
    out: list[torch.Tensor] = []
    sent = recv = 0
    for peer, shape in recv_shapes:
        buf = torch.empty(shape, dtype=dtype, device=device)
        out.append(buf)
        if buf.numel():
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
            recv += nbytes(buf)
    payload = []
    for peer, t in sends:
        if t.numel():
            t = t.contiguous()
            payload.append(t)  # keep alive until the requests complete
            ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group))
            sent += nbytes(t)
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    stats.record(sent, recv, messages=sum(1 for _, t in sends if t.numel()))
    return out


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """In-place sum all-reduce (returns ``t``); a no-op on a single-rank group."""
    if dist.get_world_size(group) == 1:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    stats.record(nbytes(t), nbytes(t), collectives=1)
    return t


def broadcast_object(obj: object, src: int, group: dist.ProcessGroup) -> object:
    """Broadcast a small picklable object from group rank ``src`` (metadata only)."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group)
    return box[0]
