"""Never silently wrong: rank agreement, the gather guard, plain inputs that require grad, and a clear
``DomainParallelError`` for each misuse -- raised on every rank, none left blocked."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from credit_dtensor._torch_versions import at_least
from tests.harness import get_world, manager, raises, still_in_step

# --- rank agreement ------------------------------------------------------------------------------------


def _agreement_task() -> str:
    import torch.distributed as dist

    import credit_dtensor as cd
    from credit_dtensor.errors import DomainParallelError

    m = manager()
    rank = dist.get_rank()
    x = torch.zeros(1, 2, 9 + rank, 4)  # rank r passes H = 9 + r
    raises(lambda: cd.shard_tensor(x, m, 2), DomainParallelError, "rank 0 passed shape (1, 2, 9, 4)", "rank 1")
    still_in_step()
    y = torch.zeros(1, 2, 9, 4, dtype=torch.float64 if rank else torch.float32)
    raises(lambda: cd.shard_tensor(y, m, 2), DomainParallelError, "float32", "float64")
    still_in_step()
    torch.manual_seed(100 + rank)  # the classic bug: unseeded data differs per rank
    z = torch.randn(1, 2, 9, 4)
    cd.shard_tensor(z, m, 2)  # shapes agree: not checked without verify
    raises(
        lambda: cd.shard_tensor(z, m, 2, verify=True),
        DomainParallelError,
        "differs",
        "torch.manual_seed",
        "DistributedSampler",
    )
    os.environ["CREDIT_DTENSOR_VERIFY"] = "1"
    try:
        raises(lambda: cd.shard_batch({"x": z, "y": [z]}, m), DomainParallelError, "content", "differs")
    finally:
        del os.environ["CREDIT_DTENSOR_VERIFY"]
    torch.manual_seed(0)
    same = torch.randn(1, 2, 9, 4)
    cd.shard_tensor(same, m, 2, verify=True)
    cd.shard_batch({"x": same, "t": torch.zeros(3)}, m, verify=True)
    batch = {"x": same} if rank == 0 else {"x": same, "y": same}  # different batch structure
    raises(lambda: cd.shard_batch(batch, m), DomainParallelError, "disagree", "no tensor")
    still_in_step()
    return "ok"


@pytest.mark.parametrize("world", [2, 3])
def test_rank_disagreement_raises_on_every_rank(world):
    assert get_world(world).run(_agreement_task) == ["ok"] * world


# --- the gather guard ------------------------------------------------------------------------------------


class _FlipGrad(torch.autograd.Function):
    """Identity whose backward sorts along H: a gather that happens only in backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.sort(g, 2).values * 0 + g


class _RollBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        y = torch.sort(self.conv(x), 2).values  # sort along H: no rule, gathered by DTensor
        return self.conv(_FlipGrad.apply(self.conv(x))) + y


def _guard_task() -> dict:
    import credit_dtensor as cd
    from credit_dtensor.guard import record_gathers

    m = manager()
    x = cd.shard_tensor(torch.randn(1, 2, 10, 4, generator=torch.Generator().manual_seed(0)), m, 2)
    out: dict = {}
    # warn (the default): one warning per op and call site
    with cd.gather_policy("warn"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.sort(x, 2)
    out["warnings"] = [str(i.message) for i in w if issubclass(i.category, cd.ImplicitGatherWarning)]
    # raise: every rank raises before the collective; the ranks are still in step afterwards
    with cd.gather_policy("raise"):
        out["raise"] = raises(lambda: torch.sort(x, 2), cd.ImplicitGatherError, "torch.sort", "bytes")
        assert isinstance(cd.ImplicitGatherError("x"), cd.DomainParallelError)
        full = cd.gather_tensor(x)  # explicit gathers are never flagged
        assert full.shape == (1, 2, 10, 4)
    still_in_step()
    # allow: silent
    with cd.gather_policy("allow"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.sort(x, 2)
    out["allow"] = len([i for i in w if issubclass(i.category, cd.ImplicitGatherWarning)])
    # the setter form, the getter, and the module path inside a converted model
    previous = cd.gather_policy()
    cd.gather_policy("raise")
    assert cd.gather_policy() == "raise"
    cd.gather_policy(previous)
    torch.manual_seed(0)
    model = cd.convert_to_domain_parallel(nn.Sequential(_RollBlock()), m)
    with cd.gather_policy("allow"), record_gathers() as events:
        y = model(x)
        y.sum().backward()
    out["events"] = [(e.op, e.module, e.phase) for e in events]
    raises(lambda: cd.gather_policy("sometimes"), cd.DomainParallelError, "warn", "raise", "allow")
    return out


@pytest.mark.skipif(
    not at_least(2, 13),
    reason="torch 2.11's DTensor fails the backward of torch.sort over the sharded dim (aten.scatter gets a plain "
    "index tensor); the gathered sort this test uses has no package rule",
)
def test_gather_guard_policies():
    for rank, out in enumerate(get_world(2).run(_guard_task)):
        assert len(out["warnings"]) == 1, (rank, out["warnings"])
        assert "torch.sort" in out["warnings"][0] and "test_guard.py" in out["warnings"][0], out["warnings"][0]
        assert "CREDIT_DTENSOR_GATHER" in out["warnings"][0]
        assert out["allow"] == 0
        ops = {(op, mod, phase) for op, mod, phase in out["events"]}
        assert ("torch.sort", "0 (_RollBlock)", "forward") in ops, ops
        assert any(phase == "backward" for _, _, phase in ops), ops


def _arming_task() -> dict:
    """Which of DTensor's own ops arm the backward watch (a dispatch mode over every op of every later
    backward): only those with a sharded operand, other than a dim reordering."""
    import torch.nn.functional as F
    from torch.distributed.tensor import Replicate, distribute_tensor

    import credit_dtensor as cd
    from credit_dtensor import guard

    m = manager()
    torch.manual_seed(0)
    full, table_full = torch.randn(1, 4, 10, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    x = cd.shard_tensor(full, m, 2).requires_grad_()
    table = distribute_tensor(table_full, m.domain_mesh, [Replicate()]).requires_grad_()
    before = guard._state["dtensor_dispatch"]
    guard._state["dtensor_dispatch"] = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", cd.ImplicitGatherWarning)
            # a position-bias MLP on a replicated table (CrossFormer) and a permute of a shard: DTensor's own
            bias = F.layer_norm(table, (2,)).sum()
            y = x.permute(0, 2, 3, 1).transpose(1, 2)
            # and the other ops whose backward maps placements: size-1 dims, stack / unbind
            a, b = torch.stack([x.unsqueeze(1).squeeze(1), x]).unbind(0)
            loss = (y * y).sum() + bias + (a * b).sum()
            out = {"armed_by_replicate_and_reorder": guard._state["dtensor_dispatch"]}
            # DTensor's own ops on a sharded operand that requires grad, whose results are not
            # differentiated (a backward seed, a mask, a buffer): nothing of them is in a graph
            seed = torch.ones_like(loss)
            mask, zeros, buf = x > 0, torch.zeros_like(x), x.new_zeros((2, 3))
            out["armed_by_results_without_grad"] = guard._state["dtensor_dispatch"]
            out["no_grad_results"] = not any(t.requires_grad for t in (seed, mask, zeros, buf))
            loss.backward(seed)
        ref_x, ref_t = full.clone().requires_grad_(), table_full.clone().requires_grad_()
        ((ref_x.permute(0, 2, 3, 1).transpose(1, 2) ** 2).sum() * 2 + F.layer_norm(ref_t, (2,)).sum()).backward()
        out["x_grad"] = float((cd.gather_tensor(x.grad) - ref_x.grad).abs().max())
        out["table_grad"] = float((table.grad.full_tensor() - ref_t.grad).abs().max())
        with warnings.catch_warnings(), cd.gather_policy("warn"):
            warnings.simplefilter("ignore")
            torch.sort(x, 2)  # DTensor's own op over the shards, recorded by autograd: arms it
        out["armed_by_sharded_op"] = guard._state["dtensor_dispatch"]
    finally:
        guard._state["dtensor_dispatch"] = before or guard._state["dtensor_dispatch"]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_only_sharded_dtensor_ops_arm_the_backward_watch(world):
    """The watch costs every op of every later backward a Python call (~30% of a CrossFormer step):
    a replicated table's MLP, a permute of a shard and results that are not differentiated
    (``ones_like``, a comparison, ``new_zeros``) cannot gather in backward and must not arm it;
    an op over the shards that DTensor runs itself must. Gradients exact either way."""
    for rank, out in enumerate(get_world(world).run(_arming_task)):
        assert out["armed_by_replicate_and_reorder"] is False, (rank, out)
        assert out["armed_by_results_without_grad"] is False and out["no_grad_results"], (rank, out)
        assert out["armed_by_sharded_op"] is True, (rank, out)
        assert out["x_grad"] < 1e-12 and out["table_grad"] < 1e-12, (rank, out)


def _env_task() -> str:
    import credit_dtensor as cd
    from credit_dtensor import guard

    m = manager()
    x = cd.shard_tensor(torch.randn(1, 2, 8, 4), m, 2)
    os.environ["CREDIT_DTENSOR_GATHER"] = "raise"
    guard._state["policy"] = None
    try:
        raises(lambda: torch.sort(x, 2), cd.ImplicitGatherError, "gather guard policy 'raise'")
        os.environ["CREDIT_DTENSOR_GATHER"] = "bogus"
        guard._state["policy"] = None
        raises(lambda: torch.sort(x, 2), cd.DomainParallelError, "CREDIT_DTENSOR_GATHER='bogus'")
    finally:
        del os.environ["CREDIT_DTENSOR_GATHER"]
        guard._state["policy"] = None
    still_in_step()
    return "ok"


def test_gather_policy_from_environment():
    assert get_world(2).run(_env_task) == ["ok", "ok"]


# --- plain inputs that require grad -------------------------------------------------------------------------


def _plain_grad_task() -> float:
    import credit_dtensor as cd

    m = manager()
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GELU(), nn.Conv2d(3, 1, 3, padding=1)).double()
    model = cd.convert_to_domain_parallel(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GELU(), nn.Conv2d(3, 1, 3, padding=1)).double(), m
    )
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 2, 13, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).square().mean().backward()
    model(x).square().mean().backward()  # plain input: the wrapper shards it
    assert x.grad is not None and x.grad.shape == x.shape
    return (x.grad - x_ref.grad).abs().max().item()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plain_input_gets_full_exact_gradient(world):
    for err in get_world(world).run(_plain_grad_task):
        assert err < 1e-12


# --- misuses -----------------------------------------------------------------------------------------------


def _misuse_task() -> str:
    import numpy as np
    import torch.distributed as dist
    import torch.nn.functional as F

    import credit_dtensor as cd

    m = manager()
    E = cd.DomainParallelError
    raises(lambda: cd.shard_tensor([[1.0, 2.0]], m, 0), E, "expected a torch.Tensor, got list", "torch.as_tensor")
    raises(lambda: cd.shard_tensor(np.zeros((2, 3)), m, 0), E, "got ndarray", "torch.as_tensor")
    raises(lambda: cd.convert_to_domain_parallel(torch.zeros(3), m), E, "expected an nn.Module, got Tensor")
    raises(lambda: cd.plan(lambda: nn.Conv2d(1, 1, 3), 2, (1, 1, 8, 8)), E, "expected an nn.Module, got function")
    x = cd.shard_tensor(torch.randn(1, 2, 8, 6), m, 2)
    raises(lambda: nn.Unfold(3)(x), cd.UnsupportedShardingError, "F.unfold", "Conv2d")
    grid = torch.zeros(1, 8, 6, 2)
    raises(
        lambda: F.grid_sample(x, grid, align_corners=False),
        cd.UnsupportedShardingError,
        "F.grid_sample",
        "gather_tensor",
    )
    # (nn.MultiheadAttention over H-sharded tokens is exact now: tests/test_attention.py)
    own = cd.DomainParallelManager(dist.get_world_size(), device_type="cpu")
    own.close()  # the group is not its own: it stays up, but the manager is closed
    raises(lambda: cd.shard_tensor(torch.zeros(1, 1, 4, 4), own, 2), E, "closed", "new DomainParallelManager")
    raises(lambda: cd.convert_to_domain_parallel(nn.Conv2d(1, 1, 3), own), E, "closed")
    still_in_step()
    return "ok"


@pytest.mark.parametrize("world", [1, 3])
def test_misuses_raise_clear_errors(world):
    assert get_world(world).run(_misuse_task) == ["ok"] * world
