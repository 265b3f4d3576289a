"""FSDP2 on the 2-D (dp x domain) mesh: several AdamW steps equal one device (fp64).

The reference (plain, unconverted model, global batch in one process) runs in the test process;
each world runs the distributed trainer for a batch of mesh/option configurations in one task.
H=10 gives uneven shards (5/5 -> 3/2 after the strided conv on 2 ranks; 3,3,3,1 -> 2,2,1,0 with
an empty shard on 4 ranks).
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests import harness

TOL = 1e-10

BASE = dict(steps=3, nlat=10, nlon=16, channels=3, width=8, global_batch=4, dtype="float64", lr=1e-2)


def _cfg(**kw):
    from credit_dtensor.tools.train import TrainConfig

    return TrainConfig(**{**BASE, **kw})


@functools.cache
def _reference(key: tuple) -> tuple[list[float], dict[str, torch.Tensor]]:
    from credit_dtensor.tools.train import train_reference

    res, state = train_reference(_cfg(**dict(key)))
    return res.losses, state


def task_train(configs: list[tuple[int, dict]]) -> list[dict]:
    """Run each ``(domain, config kwargs)``; return losses, full state and parameter placements."""
    import torch.distributed as dist

    from credit_dtensor.tools.train import full_state_dict, setup, train

    out = []
    for domain, kw in configs:
        m = harness.manager(domain)
        cfg = _cfg(**kw)
        model, opt = setup(cfg, m)
        placements = {
            n: (tuple(p.device_mesh.mesh_dim_names or ()), str(p.placements)) for n, p in model.named_parameters()
        }
        res = train(cfg, m, model_and_optimizer=(model, opt))
        state = full_state_dict(model)
        out.append({"losses": res.losses, "state": state if dist.get_rank() == 0 else None, "placements": placements})
    return out


def _check(result: dict, kw: dict, context: str) -> None:
    ref_losses, ref_state = _reference(tuple(sorted(kw.items())))
    assert len(result["losses"]) == len(ref_losses)
    for i, (a, b) in enumerate(zip(result["losses"], ref_losses, strict=True)):
        assert abs(a - b) <= TOL * max(1.0, abs(b)), f"{context}: loss of step {i}: {a} vs {b}"
    assert result["losses"][-1] < result["losses"][0], f"{context}: loss did not decrease"
    for k, v in ref_state.items():
        err = (result["state"][k] - v).abs().max().item()
        assert err <= TOL, f"{context}: parameter {k} differs by {err}"


WORLD2 = [
    (2, {}),  # 1 x 2, FSDP2
    (1, {}),  # 2 x 1, FSDP2
    (2, {"fsdp": False}),  # 1 x 2, reduce_gradients
    (1, {"fsdp": False, "activation_checkpointing": True}),
]
WORLD4 = [
    (2, {}),  # 2 x 2, FSDP2
    (2, {"activation_checkpointing": True}),
    (2, {"fsdp": False}),
    (2, {"fsdp": False, "overlap_gradients": True}),  # gradient buckets reduced during backward
    (4, {}),  # 1 x 4: uneven and empty shards
]


@pytest.mark.parametrize("world,configs", [(2, WORLD2), (4, WORLD4)], ids=["world2", "world4"])
def test_fsdp_parity(world: int, configs: list) -> None:
    results = harness.get_world(world).run(task_train, configs)
    for (domain, kw), res in zip(configs, results[0], strict=True):
        dp = world // domain
        context = f"{dp}x{domain} {kw}"
        _check(res, kw, context)
        for name, (dims, placement) in res["placements"].items():
            if kw.get("fsdp", True):
                assert dims == ("dp", "domain") and placement == "(Shard(dim=0), Replicate())", (
                    context,
                    name,
                    dims,
                    placement,
                )
            else:
                assert dims == ("domain",) and placement == "(Replicate(),)", (context, name, dims, placement)


def task_loss_exact(nlat: int) -> list[float]:
    """global_mse on uneven/empty H shards equals the single-device MSE; returns the errors."""
    from credit_dtensor.sharding import shard_tensor
    from credit_dtensor.tools.train import global_mse

    m = harness.manager()
    g = torch.Generator().manual_seed(nlat)
    pred = torch.randn(2, 3, nlat, 5, generator=g, dtype=torch.float64)
    tgt = torch.randn(2, 3, nlat, 5, generator=g, dtype=torch.float64)
    p = shard_tensor(pred, m, 2).requires_grad_(True)
    t = shard_tensor(tgt, m, 2)
    loss = global_mse(p, t)
    loss.backward()
    ref_p = pred.clone().requires_grad_(True)
    ref = ((ref_p - tgt) ** 2).mean()
    ref.backward()
    return [abs(loss.full_tensor().item() - ref.item()), (p.grad.full_tensor() - ref_p.grad).abs().max().item()]


def test_global_mse_exact_on_uneven_shards() -> None:
    for nlat in (5, 10):
        for errs in harness.get_world(4).run(task_loss_exact, nlat):
            assert max(errs) <= 1e-12, (nlat, errs)


def task_reduce_gradients() -> list[str]:
    """reduce_gradients turns Partial domain grads Replicate with one bucketed all-reduce."""
    from torch.distributed.tensor import Partial

    from credit_dtensor import comm_stats
    from credit_dtensor.parallelize import reduce_gradients
    from credit_dtensor.tools.data import sample_indices
    from credit_dtensor.tools.train import global_mse, setup

    m = harness.manager(2)
    cfg = _cfg(fsdp=False)
    model, _ = setup(cfg, m)
    x, y = cfg.dataset().sharded_batch(sample_indices(0, 4, m.dp_rank, m.dp_world_size), m)
    global_mse(model(x), y).backward()
    before = {str(p.grad.placements) for p in model.parameters()}
    assert all(any(isinstance(pl, Partial) for pl in p.grad.placements) for p in model.parameters()), before
    with comm_stats() as s:
        reduce_gradients(model)
    after = {str(p.grad.placements) for p in model.parameters()}
    return [str(sorted(before)), str(sorted(after)), str(s.collectives)]


def test_reduce_gradients_single_bucket() -> None:
    for _before, after, collectives in harness.get_world(4).run(task_reduce_gradients):
        assert after == "['(Replicate(),)']", after
        assert collectives == "1", collectives


def test_demo_small_run_passes() -> None:
    """The main job's machinery end to end (4 forked ranks vs 1 process), on a small config, in a
    fresh interpreter (the demo forks; this process holds harness threads)."""
    import subprocess
    import sys

    code = (
        "import sys; from rich.console import Console; from credit_dtensor.tools.demo import DemoConfig, run_demo; "
        "rep = run_demo(DemoConfig(steps=4, nlat=12, nlon=16), Console(width=200)); "
        "print('HALO', rep.halo_traffic_per_rank, rep.halo_minimum); sys.exit(0 if rep.ok else 1)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "matches the single-device run" in proc.stdout
    sent, minimum = (float(v) for v in proc.stdout.split("HALO")[-1].split()[:2])
    assert minimum > 0 and sent == minimum, (sent, minimum)
