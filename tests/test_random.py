"""Random ops on H-sharded tensors (CPU meshes): element-wise draws are independent per row and the
same at every domain size (a sharded run equals the 1-rank run of the same program and seed), never
a mask repeated across shards; feature dropout equals PyTorch's one-device mask; draws that are not
random consume nothing; the default generator stays in step across the domain ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.harness import get_world, manager

H = 13

PROGRAMS = {
    "dropout": lambda x: F.dropout(x, 0.5, True),
    "alpha_dropout": lambda x: F.alpha_dropout(x, 0.3, True),
    "nn.Dropout": lambda x: torch.nn.Dropout(0.25)(x),
    "dropout inplace": lambda x: F.dropout(x * 1, 0.5, True, inplace=True),
    "randn_like": lambda x: torch.randn_like(x) + x,
    "rand_like": lambda x: torch.rand_like(x) * x,
    "bernoulli": lambda x: torch.bernoulli(torch.sigmoid(x)),
    "uniform_": lambda x: (x * 1).uniform_(-1, 1),
    "normal_": lambda x: (x * 1).normal_(),
    "bernoulli_": lambda x: (x * 0).bernoulli_(0.3),
}


def _draw(m, name: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    import credit_dtensor as cd

    torch.manual_seed(seed)
    xs = cd.shard_tensor(x, m, 2)
    with cd.gather_policy("raise"):
        y = PROGRAMS[name](xs)
    return y.full_tensor()


def _world_invariance_task() -> dict[str, float]:
    import torch.distributed as dist

    from credit_dtensor import DomainParallelManager

    m = manager()
    one = DomainParallelManager(1, device_type="cpu")  # every rank alone: the 1-rank run
    x = torch.randn(2, 3, H, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = {}
    for name in PROGRAMS:
        got = _draw(m, name, x, 7)
        ref = _draw(one, name, x, 7)
        out[name] = (got - ref).abs().max().item()
        # never a mask or noise repeated across shards: the first rows of the first and last shards differ
        last = (dist.get_world_size() - 1) * -(-H // dist.get_world_size())
        out[f"{name}: rows differ"] = float(last > 0 and torch.equal(got[:, :, 0], got[:, :, last]))
    torch.manual_seed(11)
    _ = F.dropout(__import__("credit_dtensor").shard_tensor(x, m, 2), 0.5, True)
    after = torch.rand(4)  # the default generator stays in step over the domain ranks
    allr = [torch.empty(4) for _ in range(dist.get_world_size())]
    dist.all_gather(allr, after)
    out["generator in step"] = max((a - after).abs().max().item() for a in allr)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_draws_equal_the_one_rank_draws_and_differ_across_shards(world):
    for rank, errs in enumerate(get_world(world).run(_world_invariance_task)):
        bad = {k: v for k, v in errs.items() if v != 0.0}
        assert not bad, f"rank {rank}: {bad}"


def _dropout_semantics_task() -> dict[str, float]:
    import credit_dtensor as cd

    m = manager()
    x = torch.rand(4, 8, 40, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    torch.manual_seed(5)
    xs = cd.shard_tensor(x, m, 2).requires_grad_()
    y = F.dropout(xs, 0.4, True)
    y.sum().backward()
    yf, gf = y.full_tensor(), xs.grad.full_tensor()
    kept = yf != 0
    return {
        "drop rate": abs(1 - kept.double().mean().item() - 0.4),
        "scale": (yf[kept] - x[kept] / 0.6).abs().max().item(),
        "grad": (gf - kept.double() / 0.6).abs().max().item(),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_dropout_scales_and_drops_at_the_rate_with_its_gradient(world):
    for errs in get_world(world).run(_dropout_semantics_task):
        assert errs["drop rate"] < 0.02 and errs["scale"] < 1e-12 and errs["grad"] < 1e-12, errs


def _feature_and_deterministic_task() -> dict[str, float]:
    import credit_dtensor as cd

    m = manager()
    x = torch.randn(2, 6, H, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = {}
    for name, fn in {
        "dropout2d": lambda t: F.dropout2d(t, 0.5, True),
        "nn.Dropout2d": lambda t: torch.nn.Dropout2d(0.5)(t),
        "feature_alpha_dropout": lambda t: F.feature_alpha_dropout(t, 0.5, True),
    }.items():
        torch.manual_seed(9)
        ref = fn(x)
        torch.manual_seed(9)
        got = fn(cd.shard_tensor(x, m, 2)).full_tensor()
        out[name] = (got - ref).abs().max().item()  # PyTorch's own one-device mask
    # in place on a tensor autograd records (smp's FPN head: nn.Dropout2d(inplace=True) after a conv)
    wgt = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, fn in {
        "dropout2d inplace": lambda t: F.dropout2d(t, 0.5, True, True),
        "nn.Dropout2d(inplace=True)": lambda t: torch.nn.Dropout2d(0.5, inplace=True)(t),
        "feature_alpha_dropout inplace": lambda t: F.feature_alpha_dropout(t, 0.5, True, True),
    }.items():
        torch.manual_seed(9)
        xr = x.clone().requires_grad_()
        yr = fn(xr * 2)
        (yr * wgt).sum().backward()
        torch.manual_seed(9)
        xs = cd.shard_tensor(x, m, 2).requires_grad_()
        ys = fn(xs * 2)
        (ys * cd.shard_tensor(wgt, m, 2)).sum().backward()
        out[name] = max(
            (ys.full_tensor() - yr).abs().max().item(), (xs.grad.full_tensor() - xr.grad).abs().max().item()
        )
    # not random and in place: the input itself, unwritten (relu's saved output stays valid)
    xs = cd.shard_tensor(x, m, 2).requires_grad_()
    y = torch.relu(xs)
    v = y._version
    z = F.dropout2d(y, 0.5, False, True)
    out["eval inplace untouched"] = float(z is not y or y._version != v)
    y.sum().backward()
    # draws that are not random consume nothing: the next plain draw is the one-device one
    torch.manual_seed(4)
    F.dropout(x, 0.0, True), F.dropout(x, 0.5, False)
    ref = torch.rand(3)
    torch.manual_seed(4)
    xs = cd.shard_tensor(x, m, 2)
    a, b = F.dropout(xs, 0.0, True), F.dropout(xs, 0.5, False)
    out["p=0 / eval consume nothing"] = (torch.rand(3) - ref).abs().max().item()
    out["p=0 / eval identity"] = max((a.full_tensor() - x).abs().max().item(), (b.full_tensor() - x).abs().max().item())
    return out


@pytest.mark.parametrize("world", [1, 3, 4])
def test_feature_dropout_is_one_device_and_non_random_calls_draw_nothing(world):
    for errs in get_world(world).run(_feature_and_deterministic_task):
        assert all(v == 0.0 for v in errs.values()), errs
