"""Row-local ops on H-sharded tensors vs one device: activations whose backward DTensor has no
strategy for (``hardswish_backward``), pointwise ops on shards smaller than the mesh (DTensor would
replicate them), ``F.linear`` / ``matmul`` over channels of token tensors sharded on their token
dim (uneven: DTensor refuses "Cannot flatten unevenly sharded tensor"), softmax over channels, a
MobileNetV3-style block with a squeeze-excitation gate, in-place activations (``inplace=True``).
fp64 1e-10, worlds 1-4, gather guard raise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.harness import get_world, manager


class _MobileBlock(nn.Module):
    """Conv -> hardswish -> squeeze-excitation (hardsigmoid gate on pooled channels) -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 2, 1)
        self.excite = nn.Conv2d(2, 8, 1)
        self.project = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = F.hardswish(self.expand(x))
        gate = F.hardsigmoid(self.excite(F.relu(self.reduce(F.adaptive_avg_pool2d(h, 1)))))
        return self.project(h * gate) + x


def _cases():
    return {
        "hardswish": lambda x, p: F.hardswish(x) * p["w"],
        "silu_gelu_mish": lambda x, p: F.mish(F.gelu(F.silu(x))) + p["w"],
        "where_clamp": lambda x, p: torch.where(x > 0, x, x.clamp(min=-0.5) * p["w"]),
        "softmax_channels": lambda x, p: F.softmax(x * p["w"], dim=1),
        "log_softmax_w": lambda x, p: F.log_softmax(x, dim=-1) * p["w"],
        # along H itself: per-row statistics over the ranks (dimwise), never the activation
        "softmax_h": lambda x, p: F.softmax(x * p["w"], dim=2),
        "log_softmax_h": lambda x, p: torch.log_softmax(x, dim=-2) * p["w"],
        "normalize_channels": lambda x, p: F.normalize(x, dim=1) * p["w"],
        "tokens_linear": lambda x, p: F.linear(x.flatten(3).transpose(2, 3).flatten(0, 1)[:, :, :2], p["lin"]),
        "channels_last_linear": lambda x, p: F.linear(x.permute(0, 2, 3, 1), p["lin5"], p["b"]),
        "matmul": lambda x, p: x.permute(0, 2, 3, 1) @ p["mat"],
        "mobile_block": lambda x, p: p["block"](x),
        # global max pooling to fewer rows than ranks (CBAM-style gate): a Replicate pooled tensor
        "max_gate": lambda x, p: x * torch.sigmoid(F.adaptive_max_pool2d(x, 1).flatten(1)[:, :, None, None] * p["w"]),
        # in place on a non-leaf (torchvision's nn.Hardswish(inplace=True) & co.): the backward of
        # hardswish/silu/elu reads the input, which the in-place op overwrites
        "inplace_hardswish": lambda x, p: F.hardswish(x * p["w"], inplace=True),
        "inplace_silu_elu": lambda x, p: F.elu(nn.SiLU(inplace=True)(x * p["w"]), inplace=True) * p["w"],
        "inplace_relu_hardsigmoid": lambda x, p: F.hardsigmoid(F.relu(x * p["w"], inplace=True) * 1.5, inplace=True),
    }


def _task(h: int) -> dict[str, float]:
    from torch.distributed.tensor import Replicate, distribute_tensor

    import credit_dtensor as cd

    m = manager()
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, 5, dtype=torch.float64)
    params = {
        "w": torch.rand(1, 3, 1, 1, dtype=torch.float64) + 0.5,
        "lin": torch.randn(4, 2, dtype=torch.float64),
        "lin5": torch.randn(4, 3, dtype=torch.float64),
        "b": torch.randn(4, dtype=torch.float64),
        "mat": torch.randn(3, 6, dtype=torch.float64),
    }
    block_ref = _MobileBlock().double()
    errors: dict[str, float] = {}
    for name, fn in _cases().items():
        if name == "tokens_linear":
            continue  # flatten merges H with W: covered by the reshape rules, not here
        ref_p = {k: v.clone().requires_grad_() for k, v in params.items()}
        ref_p["block"] = block_ref
        xr = x.clone().requires_grad_()
        yr = fn(xr, ref_p)
        g = torch.randn(yr.shape, dtype=torch.float64)
        block_ref.zero_grad()
        yr.backward(g)
        dist_p = {
            k: distribute_tensor(v.clone(), m.domain_mesh, [Replicate()]).requires_grad_() for k, v in params.items()
        }
        block = cd.convert_to_domain_parallel(_MobileBlock().double(), m)
        block.load_state_dict(block_ref.state_dict())
        dist_p["block"] = block
        xs = cd.shard_tensor(x.clone(), m, 2).requires_grad_()
        with cd.gather_policy("raise"):
            y = fn(xs, dist_p)
            y.backward(cd.shard_tensor(g, m, cd.dtensor.domain_shard_dim(y)))
        scale = max(1.0, yr.abs().max().item())
        errors[f"{name}: out"] = (y.full_tensor() - yr).abs().max().item() / scale
        errors[f"{name}: grad x"] = (xs.grad.full_tensor() - xr.grad).abs().max().item()
        for k in ("w", "lin5", "b", "mat"):
            if ref_p[k].grad is not None:
                errors[f"{name}: grad {k}"] = (dist_p[k].grad.full_tensor() - ref_p[k].grad).abs().max().item()
        if name == "mobile_block":
            for (n, p), q in zip(block.named_parameters(), block_ref.parameters()):
                errors[f"{name}: grad {n}"] = (p.grad.full_tensor() - q.grad).abs().max().item()
    return errors


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [13, 2])
def test_row_local_ops_match_one_device(world, h):
    for rank, errors in enumerate(get_world(world).run(_task, h)):
        bad = {k: v for k, v in errors.items() if not v <= 1e-10 or math.isnan(v)}
        assert not bad, f"rank {rank}, world {world}, H={h}: {bad}"


def _mixed_dtype_task() -> dict[str, float]:
    """An fp32 bias (plain or ``Replicate``) added to fp64 rows sharded on a batch-like dim (the
    position bias of window attention on its logits): the bias's gradient is reduced over the rows
    in fp64 and rounded to fp32 once, as on one device -- bit for bit, not per rank then summed."""
    import credit_dtensor as cd
    from credit_dtensor.dtensor import wrap_replicate

    m = manager()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 6, 6, generator=g, dtype=torch.float64) * 1e3
    gy = torch.randn(13, 6, 6, generator=g, dtype=torch.float64)
    b0 = torch.randn(6, 6, generator=g, dtype=torch.float32)
    errors = {}
    for kind in ("plain", "replicate"):
        for name, op in (("add", lambda a, b: a + b), ("mul", lambda a, b: b * a)):
            ref = b0.clone().requires_grad_()
            y = op(x, ref)
            y.backward(gy)
            b = b0.clone().requires_grad_()
            bd = wrap_replicate(b, m.domain_mesh) if kind == "replicate" else b
            with cd.gather_policy("raise"):
                ys = op(cd.shard_tensor(x, m, 0), bd)
                ys.backward(cd.shard_tensor(gy, m, 0))
            errors[f"{kind} {name}: out"] = (ys.full_tensor() - y).abs().max().item()
            errors[f"{kind} {name}: dtype"] = float(ys.dtype != y.dtype)
            errors[f"{kind} {name}: grad bits"] = (b.grad - ref.grad).abs().max().item()
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_lower_precision_full_operand_gradient_is_rounded_once(world):
    for rank, errors in enumerate(get_world(world).run(_mixed_dtype_task)):
        bad = {k: v for k, v in errors.items() if v != 0.0}
        assert not bad, f"rank {rank}, world {world}: {bad}"


def _one_row_widened_task(h: int) -> dict[str, float]:
    """A row sliced out of the field and widened back over H (``expand_as``, ``expand``,
    ``broadcast_to``): the row lives on one rank and is broadcast from it (not all-gathered, not
    reported)."""
    import warnings

    import credit_dtensor as cd
    from tests.parity import parity

    m = manager()
    x = torch.randn(2, 3, h, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {}
    for name, fn in {
        "expand_as": lambda t: t + t[:, :, 3:4].expand_as(t),
        "expand": lambda t: t * t[:, :, -1:].expand(-1, -1, h, -1),
        "broadcast_to": lambda t: t - torch.broadcast_to(t[:, :, :1], t.shape),
        "Tensor.broadcast_to": lambda t: t - t[:, :, 2:3].broadcast_to(t.shape),
    }.items():
        with warnings.catch_warnings(record=True) as seen, cd.gather_policy("warn"):
            warnings.simplefilter("always")
            errs = parity(m, fn, fn, [x], shard_dims=[2], out_dim=2)
        reported = any(issubclass(w.category, cd.ImplicitGatherWarning) for w in seen)
        out[name] = max(errs.values()) + (1.0 if reported else 0.0)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_a_row_widened_over_h_is_exact_and_gathers_nothing(world):
    for errs in get_world(world).run(_one_row_widened_task, 13):
        assert all(v < 1e-12 for v in errs.values()), errs
