"""The scan family (``ops/scan.py``): ``torch.cumsum`` / ``Tensor.cumsum`` along H on H-sharded
tensors vs one device, forward and input gradient, fp64 1e-10, worlds 1-4, even, uneven and empty
shards, under the gather guard in ``raise`` mode; only one row per rank crosses ranks; along other
dims the scan is local (no communication); ``plan`` reports it as exact."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import get_world, manager
from tests.parity import parity

TOL = 1e-10


def _task(h: int, dim: int, dtype_name: str | None, seed: int) -> dict[str, float]:
    import credit_dtensor as cd
    from credit_dtensor.stats import comm_stats

    m = manager()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, h, 5, generator=g, dtype=torch.float64)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    errors: dict[str, float] = {}
    for name, fn in (
        ("torch.cumsum", lambda t: torch.cumsum(t, dim, dtype=dtype) * 1.5),
        ("Tensor.cumsum", lambda t: t.cumsum(dim=dim).cumsum(dim)),  # two scans in a row
    ):
        xr = x.clone().requires_grad_()
        yr = fn(xr)
        gy = torch.randn(yr.shape, generator=g, dtype=yr.dtype)
        yr.backward(gy)
        xs = cd.shard_tensor(x.clone(), m, 2).requires_grad_()
        with cd.gather_policy("raise"), comm_stats() as s:
            y = fn(xs)
            y.backward(cd.shard_tensor(gy, m, 2))
        scale = max(1.0, yr.abs().max().item())
        errors[f"{name} dim {dim}: out"] = (y.full_tensor() - yr).abs().max().item() / scale
        errors[f"{name} dim {dim}: dtype"] = 0.0 if y.dtype == yr.dtype else math.inf
        errors[f"{name} dim {dim}: grad x"] = (xs.grad.full_tensor() - xr.grad).abs().max().item() / scale
        if dim % 4 != 2 or m.domain_world_size == 1:
            errors[f"{name} dim {dim}: local, yet sent {s.sent_bytes} B"] = 0.0 if s.sent_bytes == 0 else math.inf
        else:  # each scan: one all-reduce of world rows of 2x3x5 forward, one backward
            row = 2 * 3 * 5 * y.element_size()
            limit = 2 * 2 * m.domain_world_size * row * 2  # two scans, fwd + bwd, ring all-reduce <= 2x
            errors[f"{name}: sent {s.sent_bytes} B > {limit} B"] = 0.0 if s.sent_bytes <= limit else math.inf
    return errors


def _check(world: int, h: int, dim: int, dtype_name: str | None = None, seed: int = 0) -> None:
    for rank, errors in enumerate(get_world(world).run(_task, h, dim, dtype_name, seed)):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank}, world {world}, H={h}, dim={dim}: {bad}"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [12, 13])
def test_cumsum_along_h_matches_one_device(world, h):
    _check(world, h, 2)
    _check(world, h, -2, "float64")


@pytest.mark.parametrize("world", [3, 4])
def test_cumsum_with_empty_shards(world):
    _check(world, 2, 2)


@pytest.mark.parametrize("dim", [1, 3, -1])
def test_cumsum_along_other_dims_is_local(dim):
    _check(3, 13, dim)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=st.integers(1, 4), h=st.integers(1, 17), seed=st.integers(0, 100))
def test_cumsum_property(world, h, seed):
    _check(world, h, 2, None, seed)


def test_plan_calls_cumsum_over_h_exact():
    from torch import nn

    from credit_dtensor.audit import plan

    class Scan(nn.Module):
        def forward(self, x):
            return x.cumsum(2)

    p = plan(Scan(), 2, (1, 2, 8, 4))
    assert not p.hazards, p.hazards
    assert any("cumsum over H: exact" in n for r in p.rows for n in r.notes)


def _products_task(h: int, seed: int) -> dict[str, float]:
    """``cumprod`` / ``logcumsumexp`` along H (they all-gathered): a local scan and the earlier
    shards' totals (one row per rank crosses), zeros included (``cumprod``'s backward special case)."""
    import credit_dtensor as cd
    from credit_dtensor.stats import comm_stats

    m = manager()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, h, 5, generator=g, dtype=torch.float64)
    x = x * (x.abs() > 0.4)  # some exact zeros
    errors: dict[str, float] = {}
    for name, fn in (
        ("cumprod", lambda t: t.cumprod(2)),
        ("cumprod_dtype", lambda t: torch.cumprod(t * 1.5, -2, dtype=torch.float64)),
        ("logcumsumexp", lambda t: torch.logcumsumexp(t, 2)),
        ("logcumsumexp_method", lambda t: (t * 3).logcumsumexp(dim=-2)),
    ):
        with cd.gather_policy("raise"), comm_stats() as s:  # the reference runs on plain tensors: no bytes
            errs = parity(m, fn, fn, [x], shard_dims=[2], out_dim=2, seed=seed)
        errors.update({f"{name}: {k}": v for k, v in errs.items()})
        limit = 2 * 2 * m.domain_world_size * 2 * 3 * 5 * 8  # one row per rank, fwd + bwd, ring <= 2x
        errors[f"{name}: sent {s.sent_bytes} B > {limit} B"] = 0.0 if s.sent_bytes <= limit else math.inf
    return errors


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [3, 13])
def test_cumprod_and_logcumsumexp_along_h_match_one_device(world, h):
    for rank, errors in enumerate(get_world(world).run(_products_task, h, world)):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank}, world {world}, H={h}: {bad}"
