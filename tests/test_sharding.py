"""shard_tensor / gather_tensor / shard_batch on real gloo worlds: contents, traffic, autograd, errors."""

from __future__ import annotations

import collections
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import DTensor, Shard

from credit_dtensor import DomainParallelError, MeshMismatchError, comm_stats, gather_tensor, shard_batch, shard_tensor
from credit_dtensor.geometry import chunk_sizes
from tests.harness import get_world, manager

# (shape, dim): even, uneven (13 over 3, 5 over 4, 10 over 4), empty shards, dims 2 and 3, 5-D, negative dim
CASES = [
    ((2, 3, 12, 4), 2),
    ((2, 3, 13, 4), 2),
    ((1, 2, 5, 3), 2),
    ((1, 2, 10, 3), -2),
    ((2, 1, 2, 3), 2),
    ((1, 1, 1, 7), 2),
    ((2, 3, 4, 9, 5), 3),
    ((2, 3, 4, 9, 5), 2),
    ((1, 2, 3, 5, 2), -2),
    ((3, 7), 1),
    ((2, 3, 4, 6), 3),
]


def _full(shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=dtype).reshape(shape) * 0.5 - 3.0


def _expected_local(x: torch.Tensor, d: int, world: int, rank: int) -> torch.Tensor:
    chunks = torch.chunk(x, world, d)
    return chunks[rank] if rank < len(chunks) else x.narrow(d, x.shape[d], 0)


# --- tasks (run on every rank) --------------------------------------------------------------------


def _roundtrip_task(cases, domain=None) -> tuple[list[tuple[int, ...]], list[str]]:
    """Per case: local shard shape; plus every failed check (checks never skip a collective, so a
    wrong result fails the test without desynchronizing the ranks and restarting the world)."""
    m = manager(domain)
    world, rank = m.domain_world_size, m.domain_rank
    shapes, errors = [], []
    for shape, dim in cases:
        x = _full(shape)
        d = dim % x.ndim
        dt = shard_tensor(x, m, dim)
        full, full_no_manager = gather_tensor(dt, m), gather_tensor(dt)
        local = dt.to_local()
        checks = {
            "is a DTensor": isinstance(dt, DTensor),
            "placement": tuple(dt.placements) == (Shard(d),),
            "global shape and stride": dt.shape == x.shape and dt.stride() == x.stride(),
            "mesh": dt.device_mesh == m.domain_mesh,
            "local == torch.chunk slice": torch.equal(local, _expected_local(x, d, world, rank)),
            "no aliasing": local.numel() == 0 or local.untyped_storage().data_ptr() != x.untyped_storage().data_ptr(),
            "gather": torch.equal(full, x) and torch.equal(full_no_manager, x),
        }
        errors += [f"{k}: shape={shape} dim={dim} world={world} rank={rank}" for k, ok in checks.items() if not ok]
        shapes.append(tuple(local.shape))
    return shapes, errors


def _src_task(cases, domain=None) -> list[dict]:
    m = manager(domain)
    world, rank = m.domain_world_size, m.domain_rank
    out = []
    for shape, dim, src, dtype in cases:
        x = _full(shape, dtype)
        d = dim % x.ndim
        with comm_stats() as s:
            dt = shard_tensor(x if rank == src else None, m, dim, src=src)
        ctx = f"shape={shape} dim={dim} src={src} rank={rank}"
        assert tuple(dt.placements) == (Shard(d),) and dt.shape == x.shape and dt.dtype == dtype, ctx
        assert torch.equal(dt.to_local(), _expected_local(x, d, world, rank)), ctx
        assert torch.equal(gather_tensor(dt), x), ctx
        out.append({"sent": s.sent_bytes, "recv": s.recv_bytes, "collectives": s.collectives, "messages": s.messages})
    return out


class Pair(NamedTuple):
    field: torch.Tensor
    label: torch.Tensor


def _shard_batch_task() -> dict:
    m = manager()
    x4, x5 = _full((2, 3, 7, 4)), _full((1, 2, 3, 6, 5))
    other = [_full((3,)), _full((2, 5)), _full((2, 3, 4))]
    already = shard_tensor(_full((1, 1, 4, 2)), m, 3)
    dd = collections.defaultdict(list, {"a": x4})
    batch = {
        "x": x4,
        "y": x5,
        "static": other[2],
        "lead": other[0],
        "scalar": 1.5,
        "name": "era5",
        "list": [x4, other[1], None],
        "tuple": (x5, 3),
        "pair": Pair(x4, other[0]),
        "nested": collections.OrderedDict(inner=[{"deep": x5}]),
        "already": already,
        "defaultdict": dd,
    }
    out = shard_batch(batch, m)
    placements = lambda t: tuple(t.placements)  # noqa: E731
    assert type(out) is dict and set(out) == set(batch)
    assert placements(out["x"]) == (Shard(2),) and placements(out["y"]) == (Shard(3),)
    assert torch.equal(gather_tensor(out["x"]), x4) and torch.equal(gather_tensor(out["y"]), x5)
    assert out["static"] is other[2] and out["lead"] is other[0]
    assert out["scalar"] == 1.5 and out["name"] == "era5"
    assert type(out["list"]) is list and placements(out["list"][0]) == (Shard(2),)
    assert out["list"][1] is other[1] and out["list"][2] is None
    assert type(out["tuple"]) is tuple and placements(out["tuple"][0]) == (Shard(3),) and out["tuple"][1] == 3
    assert type(out["pair"]) is Pair and placements(out["pair"].field) == (Shard(2),)
    assert out["pair"].label is other[0]
    assert type(out["nested"]) is collections.OrderedDict
    assert placements(out["nested"]["inner"][0]["deep"]) == (Shard(3),)
    assert out["already"] is already  # DTensors pass through untouched
    assert placements(out["defaultdict"]["a"]) == (Shard(2),)
    assert placements(shard_batch(x5, m)) == (Shard(3),)
    assert shard_batch(other[1], m) is other[1]
    return {"local_x": tuple(out["x"].to_local().shape), "local_y": tuple(out["y"].to_local().shape)}


def _autograd_task() -> None:
    m = manager()
    world, rank = m.domain_world_size, m.domain_rank
    # plain full tensor -> shard: every rank gets the full, exact gradient (all ranks' rows)
    x = _full((2, 3, 7, 4)).requires_grad_()
    w = _full((2, 3, 7, 4)).cos()
    dt = shard_tensor(x, m, 2)
    assert dt.requires_grad
    (dt.to_local() * _expected_local(w, 2, world, rank)).sum().backward()
    assert torch.equal(x.grad, w)
    # DTensor leaf -> gather -> loss: the gradient comes back as this rank's shard
    leaf = shard_tensor(_full((1, 2, 5, 3)), m, 2).requires_grad_()
    y = gather_tensor(leaf)
    assert not isinstance(y, DTensor) and y.requires_grad
    (y * y).sum().backward()
    assert tuple(leaf.grad.placements) == (Shard(2),)
    assert torch.allclose(leaf.grad.to_local(), 2 * leaf.to_local().detach())
    # the 5-D path through shard_batch is differentiable as well
    z = _full((1, 2, 3, 6, 5)).requires_grad_()
    shard_batch({"z": z}, m)["z"].to_local().sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # every rank's rows: the full gradient


def _expect(fn, exc: type[Exception], *words: str) -> str:
    try:
        fn()
    except exc as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        assert not missing, f"message {msg!r} lacks {missing}"
        return msg
    raise AssertionError(f"no {exc.__name__} raised")


def _bad_input_task() -> list[str]:
    m1, m2 = manager(1), manager(2)
    x = _full((1, 2, 6, 3))
    msgs = [
        _expect(lambda: shard_tensor(_full((5,)), m2, 2), DomainParallelError, "shard_tensor", "dim 2", "1-D"),
        _expect(lambda: shard_tensor(_full((5,)), m2), DomainParallelError, "dim -2", "at least 2 dims"),
        _expect(lambda: shard_tensor(_full((2, 3)), m2, 3), DomainParallelError, "dim 3", "2-D", "at least 4 dims"),
        _expect(
            lambda: shard_tensor(torch.empty(1, 2, 6, 3, device="meta"), m2, 2),
            DomainParallelError,
            "'meta'",
            "'cpu'",
            ".to('cpu')",
        ),
        _expect(lambda: shard_batch({"x": torch.empty(1, 2, 6, 3, device="meta")}, m2), DomainParallelError, "'meta'"),
        _expect(lambda: shard_tensor(None, m2, 2), DomainParallelError, "src="),
        _expect(lambda: shard_tensor(x, m2, 2, src=5), DomainParallelError, "src=5", "0..1"),
        _expect(
            lambda: shard_tensor(shard_tensor(x, m2), m2), DomainParallelError, "already a DTensor", "redistribute"
        ),
        _expect(lambda: shard_tensor(x, m2.mesh, 2), DomainParallelError, "1-D domain DeviceMesh", "manager"),
        _expect(lambda: gather_tensor(x), DomainParallelError, "expected a DTensor"),
    ]
    # a DTensor made on the domain-2 mesh, gathered with the domain-1 manager (and vice versa)
    on2, on1 = shard_tensor(x, m2, 2), shard_tensor(x, m1, 2)
    msgs.append(_expect(lambda: gather_tensor(on2, m1), MeshMismatchError, "gather_tensor", "manager that created it"))
    msgs.append(_expect(lambda: gather_tensor(on1, m2), MeshMismatchError, "gather_tensor"))
    assert issubclass(MeshMismatchError, DomainParallelError) and issubclass(DomainParallelError, ValueError)
    # after all that, the group still works (no rank is stuck in a half-done exchange)
    assert torch.equal(gather_tensor(on2, m2), x) and torch.equal(gather_tensor(on1, m1), x)
    dist.barrier()
    return msgs


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_roundtrip_even_uneven_empty(world):
    per_rank = get_world(world).run(_roundtrip_task, CASES)
    assert [e for _, errs in per_rank for e in errs] == []
    for i, (shape, dim) in enumerate(CASES):
        d = dim % len(shape)
        sizes = [per_rank[r][0][i][d] for r in range(world)]
        assert sizes == chunk_sizes(shape[d], world), (shape, dim, sizes)


def test_roundtrip_on_a_domain_submesh():
    # world 4 as dp=2 x domain=2: shards follow the domain rank, not the global rank
    per_rank = get_world(4).run(_roundtrip_task, CASES[:3], 2)
    assert [e for _, errs in per_rank for e in errs] == []
    shapes = [s for s, _ in per_rank]
    assert shapes[0] == shapes[2] and shapes[1] == shapes[3]
    assert shapes[0][1][2] == 7 and shapes[1][1][2] == 6  # H=13 over 2


_shape = st.lists(st.integers(1, 4), min_size=2, max_size=3)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    world=st.sampled_from([2, 3, 4]),
    cases=st.lists(st.tuples(_shape, st.integers(0, 9), st.integers(0, 1), st.booleans()), min_size=1, max_size=6),
)
def test_roundtrip_hypothesis(world, cases):
    built = []
    for lead, h, extra, five in cases:
        shape = (*lead[:2], *([3] if five else []), h, 2 + extra)
        built.append((shape, len(shape) - 2))
    per_rank = get_world(world).run(_roundtrip_task, built, timeout=60)
    assert [e for _, errs in per_rank for e in errs] == []
    for i, (shape, d) in enumerate(built):
        assert [per_rank[r][0][i][d] for r in range(world)] == chunk_sizes(shape[d], world)


SRC_CASES = [
    ((2, 3, 13, 4), 2, 0, torch.float64),
    ((2, 3, 13, 4), 2, 2, torch.float32),
    ((1, 2, 5, 3), 2, 3, torch.float64),  # src holds an empty shard on world 4
    ((2, 3, 4, 9, 5), 3, 1, torch.float32),
    ((1, 1, 2, 3), 2, 0, torch.float64),  # empty shards on the receivers
]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_src_scatter_sends_only_needed_rows(world):
    cases = [(shape, d, src % world, dtype) for shape, d, src, dtype in SRC_CASES]
    per_rank = get_world(world).run(_src_task, cases)
    for i, (shape, d, src, dtype) in enumerate(cases):
        row_bytes = torch.empty((), dtype=dtype).element_size()
        for s in shape[:d] + shape[d + 1 :]:
            row_bytes *= s
        rows = chunk_sizes(shape[d], world)
        for r in range(world):
            got = per_rank[r][i]
            assert got["collectives"] == 0, got  # nothing is broadcast
            if r == src:
                assert got["sent"] == sum(rows[q] for q in range(world) if q != src) * row_bytes, (i, got)
                assert got["recv"] == 0 and got["messages"] == sum(1 for q in range(world) if q != src and rows[q])
            else:
                assert got["sent"] == 0 and got["recv"] == rows[r] * row_bytes, (i, r, got)


def test_src_on_world_1():
    (res,) = get_world(1).run(_src_task, [((1, 2, 5, 3), 2, 0, torch.float64)])
    assert res == [{"sent": 0, "recv": 0, "collectives": 0, "messages": 0}]


@pytest.mark.parametrize("world", [1, 3])
def test_shard_batch(world):
    per_rank = get_world(world).run(_shard_batch_task)
    assert [r["local_x"][2] for r in per_rank] == chunk_sizes(7, world)
    assert [r["local_y"][3] for r in per_rank] == chunk_sizes(6, world)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_shard_and_gather_are_differentiable(world):
    get_world(world).run(_autograd_task)


def test_bad_inputs():
    msgs = get_world(2).run(_bad_input_task)
    assert msgs[0] == msgs[1]  # every rank raises the same message
