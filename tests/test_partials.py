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
