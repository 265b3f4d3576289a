"""Optimizers built before ``convert_to_domain_parallel`` / ``parallelize`` keep training the model:
conversion and FSDP2 make new parameter objects, and the optimizers that held the old ones are
rebound (state moved along). Training matches one device step for step (fp64)."""

from __future__ import annotations

import pytest
import torch

from tests.harness import get_world, manager


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.GroupNorm(1, 3), torch.nn.SiLU(), torch.nn.Conv2d(3, 2, 1)
    ).double()


OPTIMIZERS = {
    "sgd momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw foreach off": lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=False),
}


def _train_task(how: str, stepped_before: bool) -> dict[str, float]:
    import credit_dtensor as cd
    from credit_dtensor.parallelize import parallelize

    m = manager()
    x = torch.randn(1, 2, 13, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {}
    for name, make in OPTIMIZERS.items():
        model, ref = _model(), _model()
        opt, ropt = make(model.parameters()), make(ref.parameters())
        if stepped_before:  # the optimizer has state from a step on the plain model
            for mm, oo in ((model, opt), (ref, ropt)):
                oo.zero_grad()
                mm(x).pow(2).mean().backward()
                oo.step()
        if how == "convert":
            cd.convert_to_domain_parallel(model, m)
        else:
            parallelize(model, m, fsdp=True)
        xs = cd.shard_tensor(x, m, 2)
        for _ in range(3):
            opt.zero_grad()
            model(xs).pow(2).mean().backward()
            opt.step()
            ropt.zero_grad()
            ref(x).pow(2).mean().backward()
            ropt.step()
        out[name] = max(
            (a.full_tensor() - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters(), strict=True)
        )
        assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("how,stepped", [("convert", False), ("convert", True), ("parallelize", True)])
def test_optimizer_built_before_conversion_trains_the_converted_model(world, how, stepped):
    for rank, errs in enumerate(get_world(world).run(_train_task, how, stepped)):
        assert all(v < 1e-10 for v in errs.values()), f"rank {rank}: {errs}"
