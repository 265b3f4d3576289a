"""Parameter-gradient reduction overlapped with backward (models parallelized with ``fsdp=False``).

:func:`~credit_dtensor.parallelize.reduce_gradients` after ``backward()`` makes every rank wait for
one all-reduce of all gradients at the end of the step. A :class:`GradientReducer` starts that
work during backward instead, the way DDP does: parameters are grouped into buckets (reverse
registration order, about the order backward produces their gradients); a post-accumulate-grad hook
marks each parameter ready, and a bucket whose parameters are all ready is copied into one flat
buffer and its sum all-reduce is posted without waiting, while autograd computes the gradients of
the layers below. ``reduce_gradients(model)`` then only waits for the posted buckets, reduces
what is left (parameters whose hook did not fire) exactly as before, divides by the data-parallel
size and leaves every gradient ``Replicate``.

Exactness and ordering:

* the numbers are those of :func:`reduce_gradients`: the same sums of the same local gradients
  (one sum all-reduce per bucket in both), the same division, the same layout;
* buckets are posted strictly in index order on every rank, on process groups of their own
  (:func:`credit_dtensor.comm.new_group_like`), so a bucket can never pair with a norm's
  statistics or a halo message of the step itself, even if two ranks ran backward's nodes in a
  different order;
* a bucket is posted once all its parameters that had a gradient in the previous round have one
  (in the first round: all of them), so a parameter no forward uses holds nothing back for long;
  one that gets a gradient after its bucket left is reduced by :meth:`GradientReducer.finish`;
* a gradient that changes after its bucket was posted (a second ``backward`` before
  ``reduce_gradients``: gradient accumulation) makes the reducer drop what it posted and reduce
  every gradient again at :meth:`GradientReducer.finish`: correct, only slower. Use
  :meth:`GradientReducer.no_sync` around the accumulation micro-steps to post nothing there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from . import comm, intercept
from .dtensor import as_dtensor, local_of
from .errors import DomainParallelError
from .mesh import DomainParallelManager, rank_layout

__all__ = ["GradientReducer", "overlap_gradient_reduction", "OVERLAP_BUCKET_BYTES"]

logger = logging.getLogger(__name__)

#: Bucket size of the overlapped reduction (bytes): small enough that the first buckets travel
#: while backward still has layers to go, large enough that a step makes few collectives.
OVERLAP_BUCKET_BYTES = 1 << 20

# process groups of the reducers, dropped with every other group reference (comm.forget_groups)
_GROUPS: dict[tuple[int, ...], object] = {}
comm.register_group_cache(_GROUPS.clear)


def is_partial(g: torch.Tensor) -> bool:
    """A gradient that holds only this rank's contribution: a ``Partial`` DTensor, or a plain tensor
    (a plain weight used on sharded activations)."""
    return not isinstance(g, DTensor) or any(isinstance(p, Partial) for p in g.placements)


def write_back(items: list[tuple[nn.Parameter, torch.Tensor]], flat: torch.Tensor) -> None:
    """Set each ``p.grad`` to its slice of the reduced ``flat`` buffer: ``Replicate`` on the
    gradient's mesh for DTensor gradients, the plain slice otherwise."""
    offset = 0
    for p, g in items:
        t = g._local_tensor if isinstance(g, DTensor) else g
        n = t.numel()
        local = flat[offset : offset + n].view(t.shape)
        offset += n
        if isinstance(g, DTensor):
            p.grad = as_dtensor(local, g.device_mesh, (Replicate(),) * g.device_mesh.ndim, g.shape, g.stride())
        else:
            p.grad = local


def settle(items: list[tuple[nn.Parameter, torch.Tensor]], flat: torch.Tensor, dp: int) -> None:
    """A reduced bucket: the data-parallel mean, written back as each parameter's gradient."""
    if dp > 1:
        flat.div_(dp)
    write_back(items, flat)


def flatten(items: list[tuple[nn.Parameter, torch.Tensor]]) -> torch.Tensor:
    """One contiguous buffer of the local gradients, in ``items`` order."""
    return torch.cat([(local_of(g) if isinstance(g, DTensor) else g).reshape(-1) for _, g in items])


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    waiting: int = 0  # parameters whose hook has not fired in this round
    posted: tuple | None = None  # (items, flat, pending sum)
    handled: bool = False  # posted, or left to finish()


@dataclass
class _Round:
    ready: set[int] = field(default_factory=set)
    next_index: int = 0
    stale: bool = False


class GradientReducer:
    """Reduces a model's gradients bucket by bucket while backward runs (see the module docs).

    Build it with :func:`overlap_gradient_reduction`; ``reduce_gradients(model)`` calls
    :meth:`finish`. Every rank must build it for the same model at the same point (it creates
    process groups).
    """

    def __init__(self, model: nn.Module, manager: DomainParallelManager, bucket_bytes: int) -> None:
        manager.check_open("overlap_gradient_reduction")
        self.manager = manager
        world = torch.distributed.get_world_size()
        _, dp_groups = rank_layout(world, manager.domain_world_size)
        me = torch.distributed.get_rank()
        self._world_ranks = tuple(range(world))
        self._dp_ranks = tuple(next(g for g in dp_groups if me in g))
        for ranks in [self._world_ranks, *map(tuple, dp_groups)]:  # every rank creates every group, in order
            if ranks not in _GROUPS and len(ranks) > 1:
                _GROUPS[ranks] = comm.new_group_like(ranks)
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        size, current = 0, []
        for p in reversed(params):
            nb = p.numel() * p.element_size()
            if current and (size + nb > bucket_bytes or p.dtype != current[0].dtype):
                self._add_bucket(current)
                size, current = 0, []
            current.append(p)
            size += nb
        if current:
            self._add_bucket(current)
        self._sync = True
        self._expected: set[int] | None = None  # parameters that got a gradient last round (None: all)
        self._round = _Round()
        self._reset()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        logger.info(
            "gradient reduction overlapped with backward: %d buckets of <= %d bytes", len(self.buckets), bucket_bytes
        )

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        bucket = _Bucket(params)
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    def _reset(self) -> None:
        self._round = _Round()
        expected = self._expected
        for b in self.buckets:
            b.waiting = sum(1 for p in b.params if expected is None or id(p) in expected)
            b.posted, b.handled = None, False

    def _group(self, partial: bool):
        ranks = self._world_ranks if partial else self._dp_ranks
        if len(ranks) == 1:
            return None
        group = _GROUPS.get(ranks)
        if group is None:
            raise DomainParallelError(
                "reduce_gradients: the process groups of this model's gradient reducer are gone (the manager was "
                "closed): build the manager, the model and its reducer again"
            )
        return group

    # --- during backward ------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync or torch.compiler.is_compiling():
            return
        rnd = self._round
        if id(p) in rnd.ready:  # a second gradient for p in this round: accumulation
            rnd.stale = True
            return
        rnd.ready.add(id(p))
        bucket = self._bucket_of[id(p)]
        if bucket.handled or rnd.stale:
            return  # a parameter that had no gradient last round, its bucket gone without it: finish() reduces it
        bucket.waiting -= 1
        while rnd.next_index < len(self.buckets) and self.buckets[rnd.next_index].waiting <= 0:
            self._post(self.buckets[rnd.next_index])
            rnd.next_index += 1

    def _post(self, bucket: _Bucket) -> None:
        bucket.handled = True
        items = [(p, p.grad) for p in bucket.params if p.grad is not None]
        kinds = {is_partial(g) for _, g in items}
        if not items or len(kinds) != 1 or len({g.dtype for _, g in items}) != 1:
            return  # mixed layouts or dtypes: finish() reduces these as reduce_gradients does
        with intercept.suspended():
            flat = flatten(items)
            group = self._group(kinds.pop())
            pending = comm.all_reduce_sum_start(flat, group) if group is not None else None
        bucket.posted = (items, flat, pending)

    # --- after backward -------------------------------------------------------------------------
    def finish(self) -> None:
        """Wait for the posted buckets and reduce the rest: afterwards every gradient is summed
        over the domain (``Partial`` ones) and averaged over dp, and ``Replicate`` (what
        :func:`~credit_dtensor.parallelize.reduce_gradients` leaves)."""
        from .parallelize import reduce_gradient_list

        rnd = self._round
        dp = self.manager.dp_world_size
        done: set[int] = set()
        with intercept.suspended():
            for bucket in self.buckets:
                if bucket.posted is None:
                    continue
                items, flat, pending = bucket.posted
                if pending is not None:
                    pending.wait()
                if rnd.stale or any(p.grad is not g for p, g in items):
                    continue  # the gradients moved on after posting: reduced again below
                settle(items, flat, dp)
                done.update(id(p) for p, _ in items)
        rest = [p for p in (q for b in self.buckets for q in b.params) if id(p) not in done and p.grad is not None]
        if rnd.ready and not rnd.stale:
            self._expected = set(rnd.ready)  # an unused parameter holds no bucket back next round
        self._reset()
        if rnd.stale:
            logger.debug("gradient accumulation without no_sync(): every bucket reduced again")
        reduce_gradient_list(rest, self.manager)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Post nothing during the backward passes inside (gradient accumulation micro-steps); the
        ``reduce_gradients`` after the last backward reduces the accumulated gradients."""
        before, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = before

    def remove(self) -> None:
        """Remove the hooks (``reduce_gradients`` goes back to reducing after backward)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def overlap_gradient_reduction(
    model: nn.Module, manager: DomainParallelManager | None = None, bucket_bytes: int = OVERLAP_BUCKET_BYTES
) -> GradientReducer:
    """Reduce ``model``'s gradients during backward; ``reduce_gradients(model)`` finishes the work.

    ``manager`` defaults to the one :func:`~credit_dtensor.parallelize.parallelize` recorded
    (``fsdp=False``). Every rank must call it. Returns the reducer (also kept on the model).
    """
    manager = manager or getattr(model, "_dp_manager", None)
    if manager is None:
        raise DomainParallelError(
            "overlap_gradient_reduction: no manager: pass it, or parallelize the model with fsdp=False first"
        )
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise DomainParallelError(
            f"overlap_gradient_reduction: {type(model).__name__} is sharded with FSDP2, which reduces its gradients "
            "itself (overlapped with backward); reducing them again would double them: use it only on models "
            "parallelized with fsdp=False"
        )
    old = getattr(model, "_grad_reducer", None)
    if old is not None:
        old.remove()
    reducer = GradientReducer(model, manager, bucket_bytes)
    model._grad_reducer = reducer
    model._dp_manager = manager
    return reducer
