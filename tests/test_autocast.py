"""``torch.autocast("cpu", dtype=torch.bfloat16)`` on converted modules and rules, one test per op
family: the sharded output has the dtype one device gives under the same autocast, and output,
input gradient and parameter gradients agree within bf16's tolerance (2 ** -7 relative, a few ulps
of accumulated rounding allowed). Worlds 2 and 3 (uneven shards)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.harness import get_world, manager

TOL = 3e-2  # bf16 has an 8-bit mantissa; sums of a few hundred terms round a few times


class Fn(nn.Module):
    """A functional op as a module (so the converter sees it and tests share one path)."""

    def __init__(self, fn, *params: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.ps = nn.ParameterList([nn.Parameter(p) for p in params])

    def forward(self, x):
        return self.fn(x, *self.ps)


def _cases() -> dict:
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    return {
        "Conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (1, 4, 13, 8)),
        "Conv2d strided reflect": (
            lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"),
            (1, 4, 13, 8),
        ),
        "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), (1, 4, 13, 8)),
        "Conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (1, 2, 3, 13, 6)),
        "F.conv2d": (lambda: Fn(lambda x, w: F.conv2d(x, w, padding=1), r(6, 4, 3, 3)), (1, 4, 13, 8)),
        "GroupNorm": (lambda: nn.GroupNorm(2, 4), (2, 4, 13, 8)),
        "BatchNorm2d": (lambda: nn.BatchNorm2d(4), (2, 4, 13, 8)),
        "InstanceNorm2d": (lambda: nn.InstanceNorm2d(4, affine=True), (2, 4, 13, 8)),
        "LayerNorm over H,W": (lambda: nn.LayerNorm([13, 8]), (2, 4, 13, 8)),
        "F.pad reflect": (lambda: Fn(lambda x: F.pad(x, (1, 1, 2, 2), mode="reflect")), (1, 4, 13, 8)),
        "F.pad replicate": (lambda: Fn(lambda x: F.pad(x, (1, 1, 2, 2), mode="replicate")), (1, 4, 13, 8)),
        "F.pad circular": (lambda: Fn(lambda x: F.pad(x, (1, 1, 2, 2), mode="circular")), (1, 4, 13, 8)),
        "Upsample bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (1, 4, 13, 8)),
        "AvgPool2d": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (1, 4, 13, 8)),
        "MaxPool2d": (lambda: nn.MaxPool2d(2), (1, 4, 13, 8)),
        "AvgPool3d": (lambda: nn.AvgPool3d(2), (1, 2, 4, 13, 6)),
        "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d((5, 3)), (1, 4, 13, 8)),
        "PixelShuffle": (lambda: nn.PixelShuffle(2), (1, 8, 13, 8)),
        "Linear over W": (lambda: nn.Linear(8, 5), (1, 4, 13, 8)),
        "matmul over W": (lambda: Fn(lambda x, w: x @ w, r(8, 5)), (1, 4, 13, 8)),
        "conv+GN+SiLU block": (
            lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 4, 1)),
            (1, 4, 13, 8),
        ),
        "mse loss": (lambda: Fn(lambda x: F.mse_loss(x, torch.zeros_like(x)).reshape(1)), (1, 4, 13, 8)),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _task(names: list[str]) -> dict[str, str]:
    from torch.distributed.tensor import DTensor

    import credit_dtensor as cd

    m = manager()
    cases = _cases()
    out = {}
    for name in names:
        build, shape = cases[name]
        torch.manual_seed(1)
        ref = build()
        dist = copy.deepcopy(ref)
        cd.convert_to_domain_parallel(dist, m)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        h = len(shape) - 2
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yr = ref(xr)
        yr.float().sum().backward()
        xs = cd.shard_tensor(x, m, h).requires_grad_()
        with cd.gather_policy("raise"), torch.autocast("cpu", dtype=torch.bfloat16):
            ys = dist(xs)
        ys.float().sum().backward()
        full = ys.full_tensor() if isinstance(ys, DTensor) else ys
        problems = []
        if full.dtype != yr.dtype:
            problems.append(f"output dtype {full.dtype} != one device {yr.dtype}")
        elif _rel(full, yr) > TOL:
            problems.append(f"output error {_rel(full, yr):.3g}")
        if _rel(xs.grad.full_tensor(), xr.grad) > TOL:
            problems.append(f"grad x error {_rel(xs.grad.full_tensor(), xr.grad):.3g}")
        for (pn, pr), pd in zip(ref.named_parameters(), dist.parameters()):
            gd = pd.grad.full_tensor() if isinstance(pd.grad, DTensor) else pd.grad
            if gd is None or gd.dtype != pr.grad.dtype or _rel(gd, pr.grad) > TOL:
                problems.append(f"grad {pn} differs")
        out[name] = "; ".join(problems)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_family_follows_autocast_like_one_device(world):
    names = list(_cases())
    for rank, res in enumerate(get_world(world).run(_task, names)):
        bad = {k: v for k, v in res.items() if v}
        assert not bad, f"rank {rank}: {bad}"
