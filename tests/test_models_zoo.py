"""The model zoo of weather / vision transformers, converted and H-sharded, exact end to end with
no activation all-gather: a Swin network with shifted windows, a CREDIT-style CrossFormer stage
(cross-embedding, local and long-distance attention, periodic longitude + reflected latitude
padding), a FuXi-style cube embedding + Swin-V2 stage, a U-Net with scSE gates and a pooled
classifier head.

For each model and (world, H) -- even shards, uneven ones (5 window rows over 3 ranks: 2, 2, 1)
and stages whose shards are empty -- the converted model on the sharded input matches the plain
model on the full input in fp64 (1e-10 relative): every output, the input gradient and every
parameter gradient, with the gather guard in ``raise`` mode (forward and backward), and
``credit_dtensor.plan`` reports no hazard for the configuration.
"""

from __future__ import annotations

import copy

import pytest
import torch

from credit_dtensor.models import MODELS as FACTORIES
from tests.harness import get_world, manager
from tests.parity import rel_err

TOL = 1e-10

#: name -> (kwargs, input shape for H, sharded dim)
ZOO = {
    "swin": ({}, lambda h: (2, 3, h, 16), 2),
    "crossformer_credit": ({}, lambda h: (2, 3, h, 6), 2),
    "fuxi": ({"patch": (2, 2, 2)}, lambda h: (1, 2, 2, h, 32), 3),
    "unet_scse": ({}, lambda h: (2, 3, h, 8), 2),
}
#: world -> H per model: even, uneven (windows 2, 2, 1 over 3 ranks), empty shards in deep stages
CASES = {
    "swin": {2: (32,), 3: (40,), 4: (24,)},  # windows of 4 on H/2: 4 | 5 (2, 2, 1) | 3 (1, 1, 1, 0)
    "crossformer_credit": {2: (14,), 3: (18,), 4: (10,)},  # embedded H 8 | 10 (windows 2, 2, 1) | 6 (1, 1, 1, 0)
    "fuxi": {2: (32,), 3: (80,), 4: (32,)},  # Swin-V2 windows of 4 on H/4: 2 | 5 (2, 2, 1) | 2 (1, 1, 0, 0)
    "unet_scse": {2: (16,), 3: (20,), 4: (12,)},  # levels 20, 10, 5 (2, 2, 1) | 12, 6, 3 (1, 1, 1, 0)
}


def _outputs(y) -> list:
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _zoo_task(cases: list[tuple[str, int]]) -> dict:
    import credit_dtensor as cd
    from credit_dtensor.dtensor import domain_shard_dim, wrap_replicate

    m = manager()
    results = {}
    for name, h in cases:
        kwargs, shape, hdim = ZOO[name]
        torch.manual_seed(h)
        ref = FACTORIES[name](**kwargs).double()
        conv = cd.convert_to_domain_parallel(copy.deepcopy(ref), m)
        g = torch.Generator().manual_seed(h)
        x = torch.randn(shape(h), generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        ys_ref = _outputs(ref(xr))
        grads = [torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys_ref]
        sum((y * gy).sum() for y, gy in zip(ys_ref, grads)).backward()
        xs = cd.shard_tensor(x.clone(), m, hdim).requires_grad_()
        errs: dict[str, float] = {}
        try:
            with cd.gather_policy("raise"):
                ys = _outputs(conv(xs))
                terms = []
                for y, gy in zip(ys, grads):
                    d = domain_shard_dim(y)
                    gd = cd.shard_tensor(gy, m, d) if d is not None else wrap_replicate(gy, m.domain_mesh)
                    terms.append((y * gd).sum())
                sum(terms).backward()
        except Exception as exc:  # noqa: BLE001 - reported with the case
            results[(name, h)] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        for i, (y, yr) in enumerate(zip(ys, ys_ref)):
            errs[f"out{i} ({tuple(y.shape)}, {getattr(y, 'placements', None)})"] = rel_err(y, yr)
        errs["grad_x"] = rel_err(xs.grad, xr.grad)
        for (n, p), q in zip(conv.named_parameters(), ref.parameters()):
            errs[f"grad_{n}"] = rel_err(p.grad, q.grad)
        results[(name, h)] = {"errs": errs, "n_params": len(list(ref.parameters()))}
    return results


def _plan_report(name: str, world: int, h: int) -> tuple[bool, list, str]:
    from credit_dtensor import plan

    kwargs, shape, hdim = ZOO[name]
    p = plan(FACTORIES[name](**kwargs), world, shape(h), shard_dim=hdim)
    return p.ok, p.hazards, str(p)


_RESULTS: dict[int, list[dict]] = {}


def _world_results(world: int) -> list[dict]:
    """One ``run`` per world for every model (world start-up dominates otherwise)."""
    if world not in _RESULTS:
        cases = [(name, h) for name in ZOO for h in CASES[name][world]]
        _RESULTS[world] = get_world(world).run(_zoo_task, cases)
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_exact_without_gathers(name, world):
    for rank, results in enumerate(_world_results(world)):
        for h in CASES[name][world]:
            res = results[(name, h)]
            where = f"{name} H={h} on {world} ranks, rank {rank}"
            assert "error" not in res, f"{where}: {res.get('error')}"
            errs = res["errs"]
            assert len([k for k in errs if k.startswith("grad_")]) == res["n_params"] + 1, where
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            assert not bad, f"{where}: {bad}"


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_plan_reports_no_hazards(name):
    for world, hs in CASES[name].items():
        for h in hs:
            ok, hazards, text = _plan_report(name, world, h)
            assert ok and not hazards, text
