"""Gradient reduction overlapped with backward (``credit_dtensor.gradsync``), fp64.

The truth is the one-device model's gradients (of the full-field loss); the overlapped reducer
must give them -- and the same collectives and bytes as ``reduce_gradients`` after backward --
for even, uneven (H=13 on 3 ranks) and empty shards, dp x domain meshes, buckets that mix
gradient layouts, parameters without a gradient, and gradient accumulation (with and without
``no_sync``). A bucket must be on the wire before backward ends, or there is no overlap.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from tests import harness

TOL = 1e-11


class Net(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv, a parameter used on a replicated scalar only (its
    gradient arrives Replicate, not Partial), and parameters no forward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.spare = nn.Linear(2, 2)  # registered last: its parameters open the first bucket

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _data(h: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(h)
    return (
        torch.randn(batch, 3, h, 7, generator=g, dtype=torch.float64),
        torch.randn(batch, 4, h, 7, generator=g, dtype=torch.float64),
    )


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean() * model.scale**2


def _reference(h: int, passes: int, dp: int) -> dict[str, torch.Tensor]:
    """One device: the mean over dp replicas (each a slice of the batch) of ``passes`` accumulated backwards."""
    model = _model()
    x, y = _data(h, batch=2 * dp)
    for _ in range(passes):
        for r in range(dp):
            (_loss(model, x[2 * r : 2 * r + 2], y[2 * r : 2 * r + 2]) / dp).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_posted(reducer, into: list[int], grad: torch.Tensor) -> torch.Tensor:
    into.append(sum(b.posted is not None for b in reducer.buckets))
    return grad


def task_overlap(domain: int, h: int, passes: int, no_sync: bool, bucket_bytes: int) -> dict:
    from torch.distributed.tensor import DTensor, Replicate

    from credit_dtensor import comm_stats, convert_to_domain_parallel, reduce_gradients, shard_tensor
    from credit_dtensor.gradsync import overlap_gradient_reduction

    m = harness.manager(domain)
    x, y = _data(h, batch=2 * m.dp_world_size)
    rows = slice(2 * m.dp_rank, 2 * m.dp_rank + 2)
    xs, ys = shard_tensor(x[rows], m, 2), shard_tensor(y[rows], m, 2)
    out: dict = {}
    for mode in ("after", "overlap"):
        model = convert_to_domain_parallel(_model(), m)
        reducer = overlap_gradient_reduction(model, m, bucket_bytes) if mode == "overlap" else None
        # a first step teaches the reducer that `spare` gets no gradient (then it holds no bucket back)
        _loss(model, xs, ys).backward()
        reduce_gradients(model, m)
        model.zero_grad(set_to_none=True)
        posted_before_end: list[int] = []
        xs_in = xs.detach().requires_grad_(True)
        if reducer is not None:  # the input's gradient is backward's last: count what travels by then
            xs_in.register_hook(functools.partial(_count_posted, reducer, posted_before_end))
        with comm_stats() as during:
            for i in range(passes):
                ctx = reducer.no_sync() if (reducer is not None and no_sync and i < passes - 1) else None
                if ctx is not None:
                    with ctx:
                        _loss(model, xs_in, ys).backward()
                else:
                    _loss(model, xs_in, ys).backward()
        with comm_stats() as after:
            reduce_gradients(model, m)
        grads = {}
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            assert isinstance(p.grad, DTensor) and p.grad.placements == (Replicate(),), (mode, n, p.grad)
            grads[n] = p.grad.to_local().clone()
        out[mode] = {
            "grads": grads,
            "collectives": during.collectives + after.collectives,
            "sent": during.sent_bytes + after.sent_bytes,
            "posted_before_end": posted_before_end,
            "buckets": len(reducer.buckets) if reducer is not None else 0,
            "during": during.collectives,
        }
        if reducer is not None:
            reducer.remove()
    return out


CASES = [
    # world, domain, H, passes, no_sync, bucket bytes
    (2, 2, 12, 1, False, 256),  # even shards, one parameter tensor per bucket or so
    (3, 3, 13, 1, False, 1 << 20),  # uneven shards, one bucket
    (3, 3, 13, 2, False, 256),  # accumulation without no_sync: every bucket reduced again
    (3, 3, 13, 3, True, 256),  # accumulation with no_sync
    (4, 4, 3, 1, False, 256),  # empty shards
    (4, 2, 10, 1, False, 256),  # dp 2 x domain 2
]


@pytest.mark.parametrize("world,domain,h,passes,no_sync,bucket", CASES)
def test_overlap_equals_one_device(world, domain, h, passes, no_sync, bucket) -> None:
    dp = world // domain
    ref = _reference(h, passes, dp)
    results = harness.get_world(world).run(task_overlap, domain, h, passes, no_sync, bucket)
    for rank, res in enumerate(results):
        for mode in ("after", "overlap"):
            got = res[mode]["grads"]
            assert set(got) == set(ref), (mode, sorted(got), sorted(ref))  # `spare` has none
            for n, g in got.items():
                err = (g - ref[n]).abs().max().item()
                assert err <= TOL * max(1.0, ref[n].abs().max().item()), (rank, mode, n, err)
        over, after = res["overlap"], res["after"]
        if passes == 1 or no_sync:
            # the same bytes on the wire, bucket by bucket instead of in one go
            assert over["sent"] == after["sent"], (over["sent"], after["sent"])
            assert over["collectives"] > after["collectives"] or over["buckets"] == 1, (over, after)
        else:  # accumulation without no_sync: what was posted after the first backward is sent again
            assert over["sent"] > after["sent"], (over["sent"], after["sent"])
        if over["buckets"] > 1:  # buckets travel while backward still runs (the input's gradient comes last)
            assert over["posted_before_end"][-1] >= 1, over["posted_before_end"]
        if no_sync:  # micro-steps post nothing
            assert over["posted_before_end"][: passes - 1] == [0] * (passes - 1), over["posted_before_end"]


def task_parallelize_refuses_fsdp_overlap() -> str:
    from credit_dtensor import parallelize
    from credit_dtensor.errors import DomainParallelError

    m = harness.manager(2)
    return harness.raises(lambda: parallelize(_model(), m, overlap_gradients=True), DomainParallelError, "fsdp=False")


def task_refusals() -> list[str]:
    from credit_dtensor import DomainParallelManager, parallelize
    from credit_dtensor.errors import DomainParallelError
    from credit_dtensor.gradsync import overlap_gradient_reduction
    from credit_dtensor.parallelize import reduce_gradients

    m = harness.manager(2)
    fsdp_model = parallelize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).double(), m)
    sharded = harness.raises(lambda: overlap_gradient_reduction(fsdp_model, m), DomainParallelError, "FSDP2")
    model = parallelize(_model(), m, fsdp=False, overlap_gradients=True)
    other = DomainParallelManager(2)  # same world, another manager object
    mixed = harness.raises(lambda: reduce_gradients(model, other), DomainParallelError, "another manager")
    return [sharded, mixed]


def test_parallelize_refuses_overlap_with_fsdp() -> None:
    harness.get_world(2).run(task_parallelize_refuses_fsdp_overlap)


def test_refuses_fsdp_models_and_a_second_manager() -> None:
    harness.get_world(2).run(task_refusals)
