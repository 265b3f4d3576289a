"""DomainParallelManager: rank layout on real gloo worlds 1..4, world 8 by arithmetic, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import credit_dtensor.mesh as mesh_mod
from credit_dtensor import DomainParallelError, DomainParallelManager, initialize_domain_parallel
from credit_dtensor.mesh import get_domain_parallel_manager, rank_layout
from tests.harness import get_world, manager

DIVISORS = {1: [1], 2: [1, 2], 3: [1, 3], 4: [1, 2, 4]}


# --- tasks (run on every rank) --------------------------------------------------------------------


def _layout_task(domains: list[int]) -> list[dict]:
    out = []
    for d in domains:
        m = manager(d)
        out.append(
            {
                "domain": d,
                "rank": dist.get_rank(),
                "domain_rank": m.domain_rank,
                "domain_world_size": m.domain_world_size,
                "dp_rank": m.dp_rank,
                "dp_world_size": m.dp_world_size,
                "domain_group": dist.get_process_group_ranks(m.domain_group),
                "dp_group": dist.get_process_group_ranks(m.dp_group),
                "domain_mesh": m.domain_mesh.mesh.tolist(),
                "dp_mesh": m.dp_mesh.mesh.tolist(),
                "mesh_shape": tuple(m.mesh.shape),
                "dim_names": m.mesh.mesh_dim_names,
                "is_first": m.is_first_domain_rank,
                "is_last": m.is_last_domain_rank,
                "shard_dim": m.shard_dim,
                "device_type": m.device_type,
            }
        )
    return out


def _expect_error(fn, *words: str) -> str:
    try:
        fn()
    except DomainParallelError as exc:
        msg = str(exc)
        missing = [w for w in words if w not in msg]
        assert not missing, f"message {msg!r} lacks {missing}"
        return msg
    raise AssertionError(f"{fn} did not raise DomainParallelError")


def _initialize_task() -> dict:
    world = dist.get_world_size()
    previous = mesh_mod._GLOBAL_MANAGER
    try:
        m = initialize_domain_parallel(world, world, shard_dim=-3)
        same = get_domain_parallel_manager() is m
        info = (m.domain_world_size, m.dp_world_size, m.shard_dim, m.domain_rank == dist.get_rank())
        msgs = [
            _expect_error(
                lambda: initialize_domain_parallel(world + 1, 1), "world_size=", "pass the launched world size"
            ),
            _expect_error(lambda: initialize_domain_parallel(world, 0), "domain_parallel_size=0", ">= 1"),
        ]
        msgs.append(
            _expect_error(lambda: DomainParallelManager(world + 1), "does not divide", f"choose a divisor of {world}")
        )
        msgs.append(_expect_error(lambda: DomainParallelManager(0), ">= 1"))
        still = get_domain_parallel_manager() is m  # failed calls must not replace it
        return {"same": same, "info": info, "still": still, "msgs": msgs}
    finally:
        mesh_mod._GLOBAL_MANAGER = previous


def _close_task() -> tuple[bool, bool]:
    # the harness made the group: a manager must not destroy it
    with DomainParallelManager(dist.get_world_size()) as m:
        owns = m.owns_process_group
    m.close()
    return owns, dist.is_initialized()


# --- distributed tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_layout_on_real_worlds(world):
    per_rank = get_world(world).run(_layout_task, DIVISORS[world])
    for i, d in enumerate(DIVISORS[world]):
        domain_groups, dp_groups = rank_layout(world, d)
        for r, results in enumerate(per_rank):
            got = results[i]
            dom = next(g for g in domain_groups if r in g)
            dpg = next(g for g in dp_groups if r in g)
            assert got["rank"] == r
            assert got["domain_group"] == dom and got["domain_mesh"] == dom
            assert got["dp_group"] == dpg and got["dp_mesh"] == dpg
            assert got["domain_rank"] == dom.index(r)
            assert got["dp_rank"] == dpg.index(r)
            assert got["domain_world_size"] == d
            assert got["dp_world_size"] == world // d
            assert got["mesh_shape"] == (world // d, d)
            assert got["dim_names"] == ("dp", "domain")
            assert got["is_first"] == (dom.index(r) == 0)
            assert got["is_last"] == (dom.index(r) == d - 1)
            assert got["shard_dim"] == -2
            assert got["device_type"] == "cpu"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_initialize_and_bad_sizes_on_real_worlds(world):
    for res in get_world(world).run(_initialize_task):
        assert res["same"] and res["still"]
        assert res["info"] == (world, 1, -3, True)


def test_close_leaves_a_foreign_group_alone():
    assert get_world(2).run(_close_task) == [(False, True), (False, True)]


# --- pure arithmetic and parent-process checks -------------------------------------------------------


@pytest.mark.parametrize(
    "domain, expected_domain, expected_dp",
    [
        (2, [[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]),
        (4, [[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]]),
        (1, [[r] for r in range(8)], [list(range(8))]),
        (8, [list(range(8))], [[r] for r in range(8)]),
    ],
)
def test_rank_layout_world_8(domain, expected_domain, expected_dp):
    assert rank_layout(8, domain) == (expected_domain, expected_dp)


@pytest.mark.parametrize(
    "world, domain, words",
    [
        (8, 3, ["does not divide world_size=8", "choose a divisor of 8", "[1, 2, 4, 8]"]),
        (4, 0, ["domain_parallel_size=0", ">= 1"]),
        (4, -2, ["domain_parallel_size=-2", ">= 1"]),
        (4, 2.0, ["must be an integer"]),
        (0, 1, ["world_size=0"]),
    ],
)
def test_rank_layout_bad_sizes(world, domain, words):
    with pytest.raises(DomainParallelError) as info:
        rank_layout(world, domain)
    for w in words:
        assert w in str(info.value)


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@pytest.mark.parametrize(
    "make",
    [
        lambda: DomainParallelManager(1),
        lambda: DomainParallelManager(1, device_type="cpu"),
        lambda: initialize_domain_parallel(1, 1),
    ],
    ids=["manager", "manager-cpu", "initialize"],
)
def test_no_process_group_and_no_torchrun_env(monkeypatch, make):
    # the pytest process itself never has a process group (the harness ranks are subprocesses)
    assert not dist.is_initialized()
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")  # a partial env must still be reported, not half-used
    with pytest.raises(DomainParallelError, match="torchrun") as info:
        make()
    msg = str(info.value)
    assert "WORLD_SIZE" in msg and "init_process_group" in msg
    assert not dist.is_initialized()


def test_bad_domain_size_fails_before_touching_the_process_group():
    assert not dist.is_initialized()
    with pytest.raises(DomainParallelError, match=">= 1"):
        DomainParallelManager(0)
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu():
    with pytest.raises(DomainParallelError, match="device_type='cpu'"):
        DomainParallelManager(1, device_type="cuda")


def test_manager_creates_group_from_torchrun_env_and_close_destroys_it(monkeypatch):
    from credit_dtensor.tools.launch import free_port

    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        m = DomainParallelManager(1, device_type="cpu")
        assert m.owns_process_group and dist.is_initialized() and dist.get_backend() == "gloo"
        assert (m.dp_world_size, m.domain_world_size, m.domain_rank) == (1, 1, 0)
        assert m.is_first_domain_rank and m.is_last_domain_rank
        m.close()
        assert not dist.is_initialized()
        m.close()  # idempotent
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
