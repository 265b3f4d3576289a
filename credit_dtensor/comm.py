"""All communication of credit_dtensor lives here: one batched point-to-point exchange and a
sum all-reduce, each counted in :mod:`.stats`. Nothing else in the package calls
``torch.distributed`` send/recv/collectives directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import stats

__all__ = [
    "forget_groups",
    "register_group_cache",
    "exchange",
    "all_reduce_sum",
    "all_reduce_sum_start",
    "all_reduce",
    "sum_over_ranks",
    "all_gather_small",
    "all_gather_stats",
    "all_gather_rows",
    "all_to_all",
    "broadcast",
    "broadcast_object",
    "nbytes",
]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class PendingExchange:
    """A posted :func:`exchange_start` round: :meth:`wait` returns the received tensors."""

    def __init__(self, reqs: list, out: list[torch.Tensor], payload: list[torch.Tensor], keep=None) -> None:
        self._reqs, self._out, self._payload, self._keep = reqs, out, payload, keep

    def wait(self) -> list[torch.Tensor]:
        for req in self._reqs:
            req.wait()
        self._reqs, self._payload, self._keep = [], [], None  # the sent tensors may go now
        return self._out


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
    return exchange_start(sends, recv_shapes, group, dtype=dtype, device=device).wait()


def exchange_start(
    sends: Sequence[tuple[int, torch.Tensor]],
    recv_shapes: Sequence[tuple[int, torch.Size | tuple[int, ...]]],
    group: dist.ProcessGroup,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> PendingExchange:
    """:func:`exchange`, posted but not waited on: compute that does not need the messages runs
    while they travel (every rank must post the same rounds in the same order, as for
    :func:`exchange`, and wait before its next collective on ``group``)."""
    pending = _post(sends, recv_shapes, group, dtype, device)
    stats.record(
        sum(nbytes(t) for t in pending._payload),
        sum(nbytes(b) for b in pending._out),
        messages=len(pending._payload),
    )
    return pending


def _post(sends, recv_shapes, group: dist.ProcessGroup, dtype: torch.dtype, device) -> PendingExchange:
    """Post one round (empty messages skipped), uncounted: :func:`exchange_start` counts it as
    messages, :func:`_pair_sum` as the collective it stands for. Receives are posted before sends.
    On gloo each message is its own ``recv``/``send`` on the process group (gloo's are asynchronous,
    so the round cannot deadlock; called on the group directly, as ``dist.irecv``/``isend`` end up
    doing, without their per-call Python checks and rank lookups: 50 instead of 90-130 us of host
    time per round trip): ``batch_isend_irecv``'s coalescing costs more than the message itself there (a
    64-float round trip between two ranks of the 2-core CI box: 510 us batched, 210 us direct;
    measured with a bare loop of each). Other backends (NCCL) get one ``batch_isend_irecv`` group, which
    they need for simultaneous sends and receives between a pair of ranks."""
    mode = _mode(group)
    if mode == "pair" and dtype in _PAIR_DTYPES and getattr(device, "type", device) == "cpu":
        return _post_pair(sends, recv_shapes, group, dtype, device)
    direct = mode != "batch"
    ops: list = []
    out: list[torch.Tensor] = []
    for peer, shape in recv_shapes:
        buf = torch.empty(shape, dtype=dtype, device=device)
        out.append(buf)
        if buf.numel():
            if direct:  # the process group's own call (group ranks): what dist.irecv ends in
                ops.append(group.recv([_real(buf)], peer, 0))
            else:
                ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
    payload = []
    for peer, t in sends:
        if t.numel():
            t = t.contiguous()
            payload.append(t)  # keep alive until the requests complete
            if direct:
                ops.append(group.send([_real(t)], peer, 0))
            else:
                ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group))
    reqs = ops if direct else (dist.batch_isend_irecv(ops) if ops else [])
    return PendingExchange(reqs, out, payload)


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


#: dtypes a two-rank gloo round sends as one all-to-all (gloo has no bool/complex all-to-all; CPU
#: tensors only, as gloo's point-to-point messages)
_PAIR_DTYPES = frozenset(
    (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int32, torch.int64)
)


def _post_pair(sends, recv_shapes, group: dist.ProcessGroup, dtype: torch.dtype, device) -> PendingExchange:
    """A round on a two-rank gloo group as one ``all_to_all_single`` (the messages to each rank
    concatenated in posting order; the receiver cuts them out in its receive order, as the pair's
    point-to-point messages would match). Same bytes, one call instead of a send and a receive,
    and far less latency after compute on the 2-core CPU box: a 2048-float round after 1 ms of
    work takes 0.26 ms (median; mean 0.8) against 1.3 ms (mean 1.8) as a send/receive pair, and a
    ResUNet step at 128x128 drops ~12% (docs/benchmarks.md). Both ranks always call it together:
    between two ranks one's messages are the other's receives, so both rounds are empty or
    neither is. (At three ranks on two cores the all-to-all is slower than the neighbours' pairs,
    and it would make every rank of the group wait for every round, so larger groups keep
    point-to-point messages.)"""
    send_splits, recv_splits = [0, 0], [0, 0]
    payload = []
    for peer, t in sends:
        if t.numel():
            payload.append((peer, t))
            send_splits[peer] += t.numel()
    at = [0, 0]
    for peer, shape in recv_shapes:
        recv_splits[peer] += math.prod(shape)
    out: list[torch.Tensor] = []
    if not payload and not any(recv_splits):
        return PendingExchange([], [torch.empty(s, dtype=dtype, device=device) for _, s in recv_shapes], [])
    flat = [t.reshape(-1) for _, t in sorted(payload, key=lambda pt: pt[0])]  # stable: posting order per rank
    if len(flat) == 1:  # sent as it is, but dense: a column of rows flattens to a strided view
        inp = flat[0].contiguous()
    else:
        inp = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    buf = torch.empty(sum(recv_splits), dtype=dtype, device=device)
    at[1] = recv_splits[0]
    for peer, shape in recv_shapes:
        n = math.prod(shape)
        out.append(buf[at[peer] : at[peer] + n].view(shape))
        at[peer] += n
    # the process group's own call (group ranks), as for point-to-point messages: what
    # dist.all_to_all_single ends in, without its ~30 us of Python checks per round
    work = group.alltoall_base(buf, inp, recv_splits, send_splits, _A2A_OPTS)
    return PendingExchange([work], out, [t for _, t in payload], keep=(inp, buf))


_A2A_OPTS = dist.AllToAllOptions()
_MODE: dict[dist.ProcessGroup, str] = {}


def _mode(group: dist.ProcessGroup) -> str:
    """How ``group`` posts a round: ``pair`` (two gloo ranks: one all-to-all, :func:`_post_pair`),
    ``direct`` (gloo: each message on the process group) or ``batch`` (NCCL: one batched group)."""
    hit = _MODE.get(group)
    if hit is None:
        gloo = dist.get_backend(group) == "gloo"
        hit = _MODE[group] = ("pair" if dist.get_world_size(group) == 2 else "direct") if gloo else "batch"
    return hit


def _direct_p2p(group: dist.ProcessGroup) -> bool:
    """Whether ``group`` posts point-to-point messages one by one or as one all-to-all (gloo) rather
    than batched."""
    return _mode(group) != "batch"


#: sums up to this size between two gloo ranks go as one exchange (see :func:`_pair_sum`): after
#: 1 ms of compute on the 2-core box a 64 KiB swap takes 0.5 ms (median) against gloo's all-reduce's
#: 1.5; at 1 MiB the two are even and at 4 MiB the all-reduce wins (3.9 against 6.4 ms)
PAIR_SUM_MAX_BYTES = 1 << 16  # a norm's statistics, a loss, small reductions: latency-bound


def _pair_sum(t: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """Sum ``t`` in place over a two-rank gloo group with one swap (a round of the pair,
    :func:`_post_pair`), when it is small (a norm's statistics, a loss). Measured on the 2-core CPU
    box: gloo's all-reduce of 64 floats takes 1.7-2 ms, a swap 0.3-0.8 ms; the bytes are the same as the ring's
    (``nbytes(t)`` each way). Both ranks add in rank order (``t0 + t1``), so the result is bitwise
    the same on both, as an all-reduce's is. ``False``: not applicable, use the collective."""
    pending = _pair_sum_start(t, group)
    if pending is None:
        return False
    pending.wait()
    return True


def _pair_sum_start(t: torch.Tensor, group: dist.ProcessGroup) -> PendingSum | None:
    """:func:`_pair_sum` posted, not waited on; ``None``: not applicable."""
    if t.dtype == torch.bool or not _pair_ok(t, group):
        return None
    me, pending = _swap_start(t, group)
    return PendingSum(t, swap=pending, me=me)


def _pair_ok(t: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """A two-rank gloo group and a small ``t``: one swap beats the collective."""
    return _mode(group) == "pair" and nbytes(t) <= PAIR_SUM_MAX_BYTES


def _swap_start(t: torch.Tensor, group: dist.ProcessGroup) -> tuple[int, PendingExchange]:
    """``(my group rank, the posted round)`` of :func:`_swap`."""
    me = group.rank()  # the group's own rank (what dist.get_rank(group) looks up, without its checks)
    return me, _post([(1 - me, t)], [(1 - me, t.shape)], group, t.dtype, t.device)


def _swap(t: torch.Tensor, group: dist.ProcessGroup) -> tuple[int, torch.Tensor]:
    """``(my group rank, the other rank's t)`` on a two-rank group: one uncounted swap."""
    me, pending = _swap_start(t, group)
    (other,) = pending.wait()
    return me, other


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """In-place sum all-reduce (returns ``t``); a no-op on a single-rank group."""
    if dist.get_world_size(group) == 1:
        return t
    if not _pair_sum(t, group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    stats.record(nbytes(t), nbytes(t), collectives=1)
    return t


class PendingSum:
    """A posted :func:`all_reduce_sum_start`: :meth:`wait` completes the in-place sum of ``t``."""

    def __init__(self, t: torch.Tensor, work=None, swap: PendingExchange | None = None, me: int = 0) -> None:
        self.t, self._work, self._swap, self._me = t, work, swap, me

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        elif self._swap is not None:
            (other,) = self._swap.wait()
            self.t.copy_(self.t + other if self._me == 0 else other + self.t)  # rank order: same bits on both
        self._work = self._swap = None
        return self.t


def all_reduce_sum_start(t: torch.Tensor, group: dist.ProcessGroup) -> PendingSum:
    """:func:`all_reduce_sum`, posted but not waited on (a gradient bucket reduced while backward
    goes on). ``t`` must not be touched until :meth:`PendingSum.wait`. Counted like
    :func:`all_reduce_sum`; small tensors between two gloo ranks go as one swap."""
    if dist.get_world_size(group) == 1:
        return PendingSum(t)
    stats.record(nbytes(t), nbytes(t), collectives=1)
    pair = _pair_sum_start(t, group)
    if pair is not None:
        return pair
    return PendingSum(t, work=dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True))


def new_group_like(ranks: Sequence[int]) -> dist.ProcessGroup:
    """A new process group of ``ranks`` on the default backend (every rank must call it, in the same
    order, for every group): traffic that runs concurrently with a step's own collectives (gradient
    buckets in backward) gets its own ordering, so it can never pair with a norm's statistics."""
    return dist.new_group(ranks=list(ranks))


def all_gather_stats(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(world, *t.shape)``: every rank's copy of a small tensor, in rank order (a norm's partial
    statistics). Each rank hands over only its own ``t`` -- half the bytes of summing a
    zero-padded ``(world, ...)`` buffer at two ranks, and the minimum a merge of every rank's
    numbers needs. Two gloo ranks swap it in one round (see :func:`_pair_sum`);
    otherwise gloo's/NCCL's all-gather. Counted as one collective, ``nbytes(t)`` sent."""
    world = dist.get_world_size(group)
    t = t.contiguous()
    if world == 1:
        return t.unsqueeze(0)
    if _pair_ok(t, group):
        me, other = _swap(t, group)
        out = torch.stack((t, other) if me == 0 else (other, t))
    else:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
        out = torch.stack(parts)
    stats.record(nbytes(t), nbytes(t) * (world - 1), collectives=1)
    return out


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup, op: str = "sum") -> torch.Tensor:
    """Out-of-place all-reduce (``sum``/``max``/``min``) of a small tensor; not differentiable."""
    out = t.detach().clone(memory_format=torch.contiguous_format)
    if dist.get_world_size(group) == 1:
        return out
    if out.dtype == torch.bool:  # gloo reduces no bools: max = any, min = all
        return all_reduce(out.to(torch.uint8), group, op).to(torch.bool)
    if op != "sum" or not _pair_sum(out, group):
        dist.all_reduce(out, op=_OPS[op], group=group)
    stats.record(nbytes(out), nbytes(out), collectives=1)
    return out


# Group names for custom ops (their arguments are ints, strings and tensors): a group is registered
# under its ``group_name`` when an op is built on it and resolved again inside the op.
_GROUPS: dict[str, dist.ProcessGroup] = {}
_CACHES: list = [_MODE.clear]  # clear() callables of caches that hold meshes or groups (see forget_groups)


def register_group_cache(clear) -> None:
    """Register the ``clear`` of a module-level cache that holds meshes or process groups."""
    _CACHES.append(clear)


def forget_groups() -> None:
    """Drop every reference this package holds to process groups and meshes (called when a manager
    destroys its process group): a group object still referenced at interpreter exit is destroyed
    during finalization, when gloo's worker threads can no longer run Python and may abort the
    process after the job has finished."""
    _GROUPS.clear()
    for clear in _CACHES:
        clear()


def group_name(group: dist.ProcessGroup) -> str:
    name = group.group_name
    _GROUPS.setdefault(name, group)
    return name


def resolve_group(name: str) -> dist.ProcessGroup:
    group = _GROUPS.get(name)
    if group is None:  # e.g. a graph compiled in another process: ask c10d
        from torch.distributed.distributed_c10d import _resolve_process_group

        from .errors import DomainParallelError

        try:
            group = _GROUPS[name] = _resolve_process_group(name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DomainParallelError(
                f"process group {name!r} of this DTensor/model no longer exists (DomainParallelManager.close() or "
                "torch.distributed.destroy_process_group() ran): create a new DomainParallelManager, shard the "
                "inputs and convert the model with it, and call close() only at the end of the job"
            ) from exc
    return group


@torch.library.custom_op("credit_dtensor::sum_over_ranks", mutates_args=())
def _sum_over_ranks_op(t: torch.Tensor, group: str) -> torch.Tensor:
    return all_reduce(t, resolve_group(group), "sum")


@_sum_over_ranks_op.register_fake
def _sum_over_ranks_fake(t, group):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _sum_setup(ctx, inputs, output) -> None:
    pass


def _sum_backward(ctx, g):
    return g, None


_sum_over_ranks_op.register_autograd(_sum_backward, setup_context=_sum_setup)


def sum_over_ranks(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable sum of per-rank partials over ``group`` (every rank gets the total).

    Its backward passes the output gradient through unchanged: exact when that gradient is the same
    on every rank, i.e. when the total is used in replicated computations (DTensor ops all-reduce
    partial gradients of ``Replicate`` results themselves). A custom op: opaque to
    ``torch.compile``, so a compiled model with a global pooling or a loss has no graph break."""
    return _sum_over_ranks_op(t, group_name(group))


def all_gather_small(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(world, *t.shape)``: every rank's copy of a small same-shape tensor (metadata, checksums).

    Like :func:`broadcast_object`, metadata traffic is not counted in :mod:`.stats` (which measures
    what ops send)."""
    world = dist.get_world_size(group)
    if world == 1:
        return t.unsqueeze(0).clone()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def all_gather_rows(t: torch.Tensor, dim: int, sizes: Sequence[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (rank ``r`` holds ``sizes[r]`` rows).

    Only for what the user asked to be full (e.g. the gradient of a plain full input): it is an
    activation-sized all-gather. Shards are padded to the largest so gloo can gather them.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return t
    big = max(sizes)
    shape = list(t.shape)
    shape[dim] = big
    padded = t.new_zeros(shape)
    padded.narrow(dim, 0, t.shape[dim]).copy_(t)
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    stats.record(nbytes(padded) * (world - 1), nbytes(padded) * (world - 1), collectives=1)
    return torch.cat([b.narrow(dim, 0, n) for b, n in zip(bufs, sizes)], dim)


def all_to_all(
    sends: Sequence[Sequence[torch.Tensor]],
    recv_numels: Sequence[int],
    group: dist.ProcessGroup,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """One all-to-all with uneven sizes: the pieces ``sends[r]`` (flattened, in order) go to group
    rank ``r``; returns the flat tensors received from each rank (``recv_numels[r]`` elements from
    rank ``r``). Both sides derive the sizes from the same pure plan, so none are exchanged; the
    rank's own piece is copied locally and not counted as traffic.
    """
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    send_numels = [sum(t.numel() for t in pieces) for pieces in sends]
    if len(sends) != world or len(recv_numels) != world or send_numels[me] != recv_numels[me]:
        raise AssertionError(f"all_to_all: plan mismatch (send {send_numels}, receive {list(recv_numels)})")
    flat = [t.reshape(-1).to(dtype) for pieces in sends for t in pieces]
    inp = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    if world == 1:
        return [inp]
    out = torch.empty(sum(recv_numels), dtype=dtype, device=device)
    dist.all_to_all_single(out, inp, list(recv_numels), send_numels, group=group)
    size = out.element_size()
    stats.record(
        (sum(send_numels) - send_numels[me]) * size, (sum(recv_numels) - recv_numels[me]) * size, collectives=1
    )
    return list(out.split(list(recv_numels)))


def broadcast(t: torch.Tensor, src: int, group: dist.ProcessGroup) -> torch.Tensor:
    """In-place broadcast of ``t`` from group rank ``src`` (returns ``t``); counted: the source sends
    one copy to each other rank, the others receive one."""
    world = dist.get_world_size(group)
    if world == 1:
        return t
    dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)
    me = dist.get_rank(group)
    stats.record(nbytes(t) * (world - 1) if me == src else 0, 0 if me == src else nbytes(t), collectives=1)
    return t


def broadcast_object(obj: object, src: int, group: dist.ProcessGroup) -> object:
    """Broadcast a small picklable object from group rank ``src`` (metadata only)."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group)
    return box[0]
