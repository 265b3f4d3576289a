"""What used to end in a raw PyTorch error now works or raises a DomainParallelError that names the
fix, on every rank: non-reentrant activation checkpointing (exact), ``Tensor.unfold`` along H (a halo
op, exact), contractions over channels on uneven shards (exact), ``numpy()`` / ``tolist()``, a model
used after its manager closed, an unsupported device type, ``DistributedDataParallel`` over a
converted model, ``credit-dtensor info --domain N`` in one process."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.harness import get_world, manager, raises, still_in_step
from tests.parity import rel_err


def _block() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.GroupNorm(1, 3),
        torch.nn.SiLU(),
        torch.nn.Conv2d(3, 2, 3, padding=1),
    ).double()


def _checkpoint_task() -> dict[str, float]:
    import credit_dtensor as cd

    m = manager()
    ref, block = _block(), _block()
    cd.convert_to_domain_parallel(block, m)
    x = torch.randn(1, 2, 13, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {}
    for reentrant in (False, True):
        xr = x.clone().requires_grad_()
        yr = checkpoint(ref, xr, use_reentrant=reentrant)
        yr.pow(2).sum().backward()
        xs = cd.shard_tensor(x, m, 2).requires_grad_()
        with cd.gather_policy("raise"):
            y = checkpoint(block, xs, use_reentrant=reentrant)
            y.pow(2).sum().backward()
        out[f"reentrant={reentrant} out"] = rel_err(y, yr)
        out[f"reentrant={reentrant} grad x"] = rel_err(xs.grad, xr.grad)
        for (n, a), b in zip(block.named_parameters(), ref.parameters()):
            out[f"reentrant={reentrant} grad {n}"] = rel_err(a.grad, b.grad)
            a.grad = b.grad = None
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_checkpoint_non_reentrant_is_exact(world):
    for rank, errs in enumerate(get_world(world).run(_checkpoint_task)):
        assert all(v < 1e-10 for v in errs.values()), (rank, errs)


def _unfold_and_contraction_task() -> dict[str, float]:
    import credit_dtensor as cd

    m = manager()
    out = {}
    g = torch.Generator().manual_seed(2)
    for h, size, step in [(13, 3, 1), (13, 3, 2), (13, 5, 4), (4, 3, 1), (13, 13, 1), (7, 2, 3)]:
        x = torch.randn(1, 2, h, 5, generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        yr = xr.unfold(2, size, step)
        w = torch.randn(yr.shape, generator=g, dtype=torch.float64)
        (yr * w).sum().backward()
        xs = cd.shard_tensor(x, m, 2).requires_grad_()
        with cd.gather_policy("raise"):
            y = xs.unfold(2, size, step)
            (y * cd.shard_tensor(w, m, 2)).sum().backward()
            y_w = xs.unfold(3, 2, 1)
        out[f"unfold {h},{size},{step}"] = rel_err(y, yr)
        out[f"unfold {h},{size},{step} grad"] = rel_err(xs.grad, xr.grad)
        out[f"unfold along W {h}"] = rel_err(y_w, x.unfold(3, 2, 1))
    x = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64)
    y = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64)
    c = torch.randn(4, generator=g, dtype=torch.float64)
    xs, ys = cd.shard_tensor(x, m, 2), cd.shard_tensor(y, m, 2)
    with cd.gather_policy("raise"):
        out["einsum over channels"] = rel_err(torch.einsum("bchw,c->bhw", xs, c), torch.einsum("bchw,c->bhw", x, c))
        out["einsum over H, W"] = rel_err(torch.einsum("bchw,bchw->bc", xs, ys), torch.einsum("bchw,bchw->bc", x, y))
    return out


@pytest.mark.parametrize("world", [1, 3, 4])
def test_unfold_along_h_and_contractions_are_exact(world):
    for rank, errs in enumerate(get_world(world).run(_unfold_and_contraction_task)):
        bad = {k: v for k, v in errs.items() if not v < 1e-10}
        assert not bad, (rank, bad)


def _errors_task() -> str:
    import credit_dtensor as cd

    m = manager()
    x = cd.shard_tensor(torch.randn(1, 2, 13, 4, dtype=torch.float64), m, 2)
    raises(lambda: x.numpy(), cd.DomainParallelError, "numpy", "gather_tensor(x).numpy()", "to_local")
    raises(lambda: x.tolist(), cd.DomainParallelError, "tolist", "gather_tensor")
    assert cd.gather_tensor(x).numpy().shape == (1, 2, 13, 4)
    assert isinstance(x.sum().tolist(), float)  # a Replicate result: its local value is the whole tensor
    # data-dependent lengths: refused with the masked form (DTensor said "aten.nonzero.default")
    raises(lambda: torch.masked_select(x, x > 0), cd.DomainParallelError, "masked_select", "torch.where(mask")
    raises(lambda: (x > 0).nonzero(), cd.DomainParallelError, "nonzero", "torch.where(mask")
    raises(lambda: torch.argwhere(x), cd.DomainParallelError, "argwhere", "gather_tensor")
    # allclose: one bool, the same on every rank (DTensor said "aten.allclose.default")
    y = x.clone()
    assert torch.allclose(x, y) is True and x.allclose(y + 1e-3, atol=1e-6) is False
    raises(lambda: cd.DomainParallelManager(1, device_type="tpu"), cd.DomainParallelError, "'tpu'", "'cpu'")
    model = cd.convert_to_domain_parallel(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1)), m)
    msg = raises(
        lambda: torch.nn.parallel.DistributedDataParallel(model), RuntimeError, "DistributedDataParallel", "parallelize"
    )
    still_in_step()
    return msg


@pytest.mark.parametrize("world", [2, 3])
def test_raw_errors_name_the_fix_on_every_rank(world):
    get_world(world).run(_errors_task)


def _closed_task() -> str:
    """A private world: close the default group, then use the model (ends the world)."""
    import torch.distributed as dist

    import credit_dtensor as cd

    m = cd.DomainParallelManager(dist.get_world_size(), device_type="cpu")
    m.owns_process_group = True  # let close() end the harness's group, as a manager that made it would
    model = cd.convert_to_domain_parallel(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1)), m)
    x = torch.randn(1, 2, 8, 4)
    m.close()
    return raises(lambda: model(x), cd.DomainParallelError, "process group", "close()", "new DomainParallelManager")


def test_model_after_close_says_so():
    from tests.harness import World

    w = World(2)
    try:
        for msg in w.run(_closed_task):
            assert "(Conv2d)" in msg or "Conv2d" in msg, msg
    finally:
        w.close()


def test_cli_info_domain_outside_torchrun_is_a_usage_error(capsys):
    from credit_dtensor.cli import EXIT_USAGE, main

    with pytest.raises(SystemExit) as exc:
        main(["info", "--domain", "3"])
    assert exc.value.code == EXIT_USAGE
    assert "torchrun --standalone --nproc-per-node 3" in capsys.readouterr().err
