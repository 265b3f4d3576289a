"""``comm``'s small sums: on two gloo ranks they go as one swap (``_pair_sum``, ~3x
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
        big = torch.randn(comm.PAIR_SUM_MAX_BYTES // 4 + 1)
        comm.all_reduce_sum(big, group)  # the collective (above the pair-sum size)
    return {
        "calls": dict(counter.calls),
        "sent": sum(counter.sent.values()),
        "nbytes": world * 12 * 4 + big.numel() * 4,
    }


def test_the_benchmark_wire_counter_sees_all_to_all():
    """``bench --cases models`` counts sync points and bytes with ``bench_wire.intercept``: an
    attention's all-to-all (a CrossFormer's long-distance windows) must be counted like the rest."""
    for res in get_world(2).run(_wire_task, 0):
        assert res["calls"] == {"other:all_to_all_single": 1, "other:all_reduce": 1}, res
        assert res["sent"] == res["nbytes"], res


def _pair_round_task(_: int) -> dict:
    """Rounds as the ops post them: several messages to one peer (cut out again in posting order),
    empty messages between them, one direction only, nothing at all, integers, and the dtypes gloo
    has no all-to-all for (point-to-point messages); each counted and seen on the wire."""
    import torch.distributed as dist

    from credit_dtensor import comm
    from credit_dtensor.stats import comm_stats
    from credit_dtensor.tools.bench_wire import WireCounter, intercept

    m = manager()
    group = m.domain_mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cpu = torch.device("cpu")

    def msg(src: int, i: int, shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
        return (torch.arange(float(torch.Size(shape).numel())) + 1000 * src + 100 * i).reshape(shape).to(dtype)

    got, sent = {}, {}
    counter = WireCounter()
    with intercept(counter):
        for name, shapes, dtype in (
            ("several", [(2, 3), (0, 3), (1, 5), (4,)], torch.float64),
            ("ints", [(3,), (2, 2)], torch.int64),
            ("complex", [(2,), (3,)], torch.complex64),
            ("bool", [(3,)], torch.bool),
        ):
            sends = [(p, msg(rank, i, s, dtype)) for p in range(world) if p != rank for i, s in enumerate(shapes)]
            recvs = [(p, s) for p in range(world) if p != rank for s in shapes]
            with comm_stats() as st:
                got[name] = comm.exchange(sends, recvs, group, dtype=dtype, device=cpu)
            sent[name] = (st.sent_bytes, st.recv_bytes)
        # one direction: rank 0 sends 3 rows to rank 1, which sends nothing back
        one = [(1, msg(0, 7, (3, 2)))] if rank == 0 else []
        got["one"] = comm.exchange(one, [(0, (3, 2))] if rank == 1 else [], group, dtype=torch.float64, device=cpu)
        # one message that is a column of rows: it flattens to a strided view, sent dense
        col = [(1, msg(0, 8, (3, 4))[:, 1:2])] if rank == 0 else []
        got["column"] = comm.exchange(col, [(0, (3, 1))] if rank == 1 else [], group, dtype=torch.float64, device=cpu)
        got["none"] = comm.exchange(
            [(p, torch.empty(0, 3)) for p in range(world) if p != rank], [], group, dtype=torch.float32, device=cpu
        )
    return {
        "rank": rank,
        "world": world,
        "mode": comm._mode(group),
        "got": got,
        "sent": sent,
        "calls": dict(counter.calls),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_rounds_arrive_in_posting_order_as_an_all_to_all_of_two_ranks(world):
    """Two gloo ranks post a round as one all-to-all (far less latency after compute than a
    send/receive pair, ``comm._post_pair``); three keep point-to-point messages. The received
    messages, the counted bytes and the wire calls must be those of the messages themselves."""
    shapes = {
        "several": [(2, 3), (0, 3), (1, 5), (4,)],
        "ints": [(3,), (2, 2)],
        "complex": [(2,), (3,)],
        "bool": [(3,)],
    }
    item = {"several": 8, "ints": 8, "complex": 8, "bool": 1}  # bytes per element
    for res in get_world(world).run(_pair_round_task, 0):
        rank = res["rank"]
        assert res["mode"] == ("pair" if world == 2 else "direct")
        for name, sh in shapes.items():
            peers = [p for p in range(world) if p != rank]
            it = iter(res["got"][name])
            for p in peers:
                for i, s in enumerate(sh):
                    t = next(it)
                    ref = (torch.arange(float(torch.Size(s).numel())) + 1000 * p + 100 * i).reshape(s).to(t.dtype)
                    assert t.shape == torch.Size(s) and torch.equal(t, ref), (rank, name, p, i)
            n = sum(torch.Size(s).numel() for s in sh) * item[name] * len(peers)
            assert res["sent"][name] == (n, n), (rank, name)
        if rank == 1:
            assert torch.equal(res["got"]["one"][0], (torch.arange(6.0) + 700).reshape(3, 2))
            assert torch.equal(res["got"]["column"][0], (torch.arange(12.0) + 800).reshape(3, 4)[:, 1:2])
        assert res["got"]["none"] == []
        pair_calls = res["calls"].get("other:all_to_all_single", 0)
        # two gloo ranks: one call per round with a message (not the empty one); bool and complex
        # go as messages (gloo has no all-to-all for them)
        assert pair_calls == (4 if world == 2 else 0), res["calls"]
