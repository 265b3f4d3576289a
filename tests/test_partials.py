"""``Partial`` results of DTensor's own reductions fed to ops DTensor treats as linear when they
are not (``credit_dtensor/partials.py``): silently wrong before, exact now, under every gather
policy (``allow`` skips the guard's reporting, not this). fp64 vs one device, output and input
gradients, worlds 2-4, uneven shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.harness import get_world, manager


def _programs(lab: torch.Tensor) -> dict:
    return {
        # the Frobenius norm over (H, W) is a _NormPartial; sum kept it (norm of the sums)
        "matrix_norm_sum": lambda x, y: torch.linalg.matrix_norm(x).sum(),
        "linalg_norm_sum_c": lambda x, y: torch.linalg.norm(x, dim=(2, 3)).sum(1),
        "matrix_norm_plus": lambda x, y: (torch.linalg.matrix_norm(x) + 1.0).prod(),
        # 1 - cos on a Partial cosine added the 1 on every rank
        "cosine_embedding_none": lambda x, y: F.cosine_embedding_loss(
            x[:, 0].flatten(1), y[:, 0].flatten(1), lab, reduction="none"
        ),
        "cosine_embedding_sum": lambda x, y: F.cosine_embedding_loss(
            x[:, 0].flatten(1), y[:, 0].flatten(1), -lab, margin=0.5, reduction="sum"
        ),
        "cosine_embedding_mean": lambda x, y: F.cosine_embedding_loss(x[:, 0].flatten(1), y[:, 0].flatten(1), lab),
        # linear uses stay lazy and exact
        "vector_norm_scaled": lambda x, y: (torch.linalg.vector_norm(x, dim=(2, 3)) * 2).sum(),
    }


def _task(policy: str, h: int) -> dict[str, float]:
    import credit_dtensor as cd

    m = manager()
    g = torch.Generator().manual_seed(h)
    fx, fy = (torch.randn(2, 3, h, 4, generator=g, dtype=torch.float64) for _ in range(2))
    lab = torch.tensor([1.0, -1.0], dtype=torch.float64)
    out: dict[str, float] = {}
    for name, fn in _programs(lab).items():
        if name.startswith("cosine") and h % m.domain_world_size:
            continue  # flatten(1) of uneven shards is refused with a clear error (a layout DTensor lacks)
        xr = fx.clone().requires_grad_()
        ref = fn(xr, fy)
        ref.sum().backward()
        x = cd.shard_tensor(fx.clone(), m, 2).requires_grad_()
        y = cd.shard_tensor(fy, m, 2)
        with cd.gather_policy(policy):
            got = fn(x, y)
            got.sum().backward()
        full = got.full_tensor()
        out[f"{name}: out"] = (full - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        out[f"{name}: grad"] = (cd.gather_tensor(x.grad) - xr.grad).abs().max().item()
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("policy", ["raise", "allow"])
def test_partial_results_of_dtensor_reductions_are_exact(world, policy):
    for h in (12, 13):
        for rank, out in enumerate(get_world(world).run(_task, policy, h)):
            bad = {k: v for k, v in out.items() if not v <= 1e-10}
            assert not bad, (rank, world, policy, h, bad)


def _inplace_task(policy: str) -> dict[str, float]:
    """In-place ops on ``Partial(sum)`` DTensors that need no grad (an optimizer's momentum buffer
    cloned from a partial gradient): linear ones keep the partial, the others reduce the target in
    place first -- reducing a copy dropped the write (SGD with momentum on torch 2.14 never moved
    its buffer: ``tests/test_rebind.py``)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial

    import credit_dtensor as cd

    m = manager()
    mesh, rank, world = m.domain_mesh, m.domain_rank, m.domain_world_size
    g = torch.Generator().manual_seed(5)
    fa, fb = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    share = (rank + 1) / (world * (world + 1) / 2)  # the ranks' pieces sum to the full tensor

    def partial(full: torch.Tensor) -> DTensor:
        return DTensor.from_local(full * share, mesh, [Partial()], run_check=False)

    programs = {
        "momentum": (lambda a, b: a.mul_(0.9).add_(b).div_(2).neg_(), True),
        "add_scaled": (lambda a, b: a.sub_(b).mul_(3.0), True),
        "scaled_by_a_tensor": (lambda a, b: a.mul_(torch.tensor(3.0, dtype=torch.float64)), False),
        "add_number": (lambda a, b: a.add_(1.5), False),
        "exp": (lambda a, b: a.exp_(), False),
        "clamp_then_linear": (lambda a, b: a.clamp_(min=0.0).mul_(2.0).add_(b), False),
        "product": (lambda a, b: a.mul_(b), False),
        "addcmul": (lambda a, b: a.addcmul_(b, b, value=0.5), False),
    }
    out: dict[str, float] = {}
    with cd.gather_policy(policy):
        for name, (fn, stays_partial) in programs.items():
            ref = fn(fa.clone(), fb.clone())
            a, b = partial(fa), partial(fb)
            got = fn(a, b)
            out[f"{name}: in place"] = 0.0 if got is a else float("inf")
            out[f"{name}: value"] = (a.full_tensor() - ref).abs().max().item()
            out[f"{name}: placement"] = 0.0 if a.placements[0].is_partial() == stays_partial else float("inf")
        # in a graph the target cannot be reduced in place: a clear error with the way out
        d = partial(fa).requires_grad_() * 1.0
        try:
            d.exp_()
            out["graph: refused"] = float("inf")
        except cd.DomainParallelError as exc:
            out["graph: refused"] = 0.0 if "redistribute" in str(exc) else float("inf")
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("policy", ["raise", "allow"])
def test_in_place_ops_on_partials_write_their_target(world, policy):
    for rank, out in enumerate(get_world(world).run(_inplace_task, policy)):
        bad = {k: v for k, v in out.items() if not v <= 1e-12}
        assert not bad, (rank, world, policy, bad)
