"""``comm``'s small sums: on two gloo ranks they go as one send/receive pair (``_pair_sum``, ~3x
less latency than gloo's all-reduce on the CPU box); the result must equal the collective's, be
bitwise the same on both ranks, and count the same bytes; other sizes and worlds keep the
collective. ``all_reduce_sum_start`` (posted now, waited later) gives the same bits."""

from __future__ import annotations

import pytest
import torch

from tests.harness import get_world, manager


def _task(seed: int) -> dict:
    import torch.distributed as dist

    from credit_dtensor import comm
    from credit_dtensor.stats import comm_stats

    m = manager()
    group = m.domain_mesh.get_group()
    rank = dist.get_rank(group)
    g = torch.Generator().manual_seed(seed + rank)
    out = {}
    for name, t in (
        ("float32", torch.randn(7, 5, generator=g)),
        ("float64", torch.randn(3, generator=g, dtype=torch.float64) * 1e8),
        ("int64", torch.randint(-100, 100, (4,), generator=g)),
        ("large", torch.randn(comm.PAIR_SUM_MAX_BYTES // 4 + 1, generator=g)),  # the collective
    ):
        ref = t.clone()
        dist.all_reduce(ref, group=group)
        with comm_stats() as s:
            got = comm.all_reduce_sum(t.clone(), group)
            out_of_place = comm.all_reduce(t, group, "sum")
        with comm_stats() as s_started:
            pending = comm.all_reduce_sum_start(t.clone(), group)
            busy = torch.randn(64, 64, generator=g) @ torch.randn(64, 64, generator=g)  # work while it travels
            started = pending.wait()
        del busy
        out[name] = (got, out_of_place, ref, s.sent_bytes, t.numel() * t.element_size(), started, s_started.sent_bytes)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_small_sums_match_the_collective_and_agree_bitwise(world):
    results = get_world(world).run(_task, 0)
    for rank, res in enumerate(results):
        for name, (got, oop, ref, sent, n, started, sent_started) in res.items():
            assert torch.allclose(got, ref, rtol=1e-6, atol=0), (rank, name)
            assert torch.equal(got, oop), (rank, name)
            assert sent == 2 * n, (rank, name, sent)  # counted like the all-reduce: n each time
            assert torch.equal(got, results[0][name][0]), (rank, name)  # the same bits on every rank
            # posted now, waited later (gradient buckets): the same sum, bits and count
            assert torch.equal(started, got), (rank, name)
            assert sent_started == n, (rank, name, sent_started)


def _gather_task(seed: int) -> dict:
    import torch.distributed as dist

    from credit_dtensor import comm
    from credit_dtensor.stats import comm_stats

    m = manager()
    group = m.domain_mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = {}
    for name, t in (
        ("stats", torch.randn(2, 5, generator=torch.Generator().manual_seed(seed + rank), dtype=torch.float64)),
        ("large", torch.full((comm.PAIR_SUM_MAX_BYTES // 4 + 1,), float(rank))),  # the collective
    ):
        with comm_stats() as s:
            got = comm.all_gather_stats(t, group)
        ref = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(ref, t, group=group)
        out[name] = (got, torch.stack(ref), s.sent_bytes, s.collectives, t.numel() * t.element_size())
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_statistics_gather_is_every_rank_in_order_and_sends_only_its_own(world):
    for rank, res in enumerate(get_world(world).run(_gather_task, 0)):
        for name, (got, ref, sent, collectives, n) in res.items():
            assert torch.equal(got, ref), (rank, name)
            assert sent == (n if world > 1 else 0) and collectives == (1 if world > 1 else 0), (rank, name, sent)


def _wire_task(_: int) -> dict:
    import torch.distributed as dist

    from credit_dtensor import comm
    from credit_dtensor.tools.bench_wire import WireCounter, intercept

    m = manager()
    group = m.domain_mesh.get_group()
    world = dist.get_world_size(group)
    pieces = [[torch.randn(3, 4)] for _ in range(world)]
    counter = WireCounter()
    with intercept(counter):
        comm.all_to_all(pieces, [12] * world, group, dtype=torch.float32, device=torch.device("cpu"))
        comm.all_reduce_sum(torch.randn(5000), group)  # the collective (above the pair-sum size)
    return {"calls": dict(counter.calls), "sent": sum(counter.sent.values()), "nbytes": world * 12 * 4}


def test_the_benchmark_wire_counter_sees_all_to_all():
    """``bench --cases models`` counts sync points and bytes with ``bench_wire.intercept``: an
    attention's all-to-all (a CrossFormer's long-distance windows) must be counted like the rest."""
    for res in get_world(2).run(_wire_task, 0):
        assert res["calls"] == {"other:all_to_all_single": 1, "other:all_reduce": 1}, res
        assert res["sent"] == res["nbytes"] + 5000 * 4, res
