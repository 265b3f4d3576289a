"""Dense heads on flattened H-sharded features (VGG's and AlexNet's classifier, a regression head
on a pooled field): ``flatten(1)`` merges H *under* the channels, so no rank holds a
``torch.chunk`` shard of the flat dim; it used to raise. Now the shards move onto the channels
(one all-to-all) and the merge re-chunks, and a ``Linear`` over the sharded features with no other
dim to hold the shards sums each rank's partial product once (an all-reduce of the output).

fp64 against one device, outputs, input and parameter gradients, worlds 1-4, even and uneven H,
batch 1 (row-parallel Linear) and 2 (the shards move to the batch), nothing gathered."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.harness import get_world, manager
from tests.parity import TOL, parity, rel_err


def _programs(w: torch.Tensor, b: torch.Tensor) -> dict:
    return {
        "flatten_linear": lambda x: F.linear(x.flatten(1), w, b),
        "view_linear": lambda x: F.linear(x.view(x.shape[0], -1), w),
        "reshape_matmul": lambda x: x.reshape(x.shape[0], -1) @ w.t(),
        "flatten_5d": lambda x: F.linear(x.unsqueeze(2).expand(-1, -1, 2, -1, -1).flatten(1), w.repeat(1, 2), b),
    }


def _head(c: int, pooled: tuple[int, int]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pooled),
        nn.Flatten(),
        nn.Linear(c * pooled[0] * pooled[1], 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).double()


def _task(h: int) -> dict[str, str]:
    import credit_dtensor as cd
    from credit_dtensor.dtensor import domain_shard_dim, wrap_replicate

    m = manager()
    world = m.domain_world_size
    out: dict[str, str] = {}
    for batch in (1, 2):
        g = torch.Generator().manual_seed(h + batch)
        x = torch.randn(batch, 4, h, 3, generator=g, dtype=torch.float64)
        w = torch.randn(5, 4 * h * 3, generator=g, dtype=torch.float64)
        b = torch.randn(5, generator=g, dtype=torch.float64)
        for name in _programs(w, b):
            # plain parameters with gradients: each rank's must be the full one-device gradient
            ref_p = {"w": w.clone().requires_grad_(), "b": b.clone().requires_grad_()}
            dist_p = {k: v.detach().clone().requires_grad_() for k, v in ref_p.items()}
            fn_ref, fn = _programs(ref_p["w"], ref_p["b"])[name], _programs(dist_p["w"], dist_p["b"])[name]
            with cd.gather_policy("raise"), cd.comm_stats() as st:
                # Linear moves the shards onto a batch of `world` samples; matmul sums partial products
                on_batch = batch >= world > 1 and "matmul" not in name
                errs = parity(
                    m,
                    fn_ref,
                    fn,
                    [x],
                    shard_dims=[2],
                    out_dim=0 if on_batch else None,
                    ref_params=ref_p,
                    dist_params=dist_p,
                )
            out[f"{name} B={batch}"] = str(max(errs.values()))
            # the features move once (all-to-all) and back in backward, the output's all-reduce, and the
            # plain weight's and bias's gradients summed over the ranks (each holds the full one)
            share = x.numel() * 8 / world
            extra = 8 * (2 * batch * 5 + 2 * (2 * w.numel() + b.numel()))
            out[f"{name} B={batch} bytes"] = str(st.recv_bytes <= 2 * share + 2 * extra + 4096)
        torch.manual_seed(0)
        ref = _head(4, (5, 2)).eval()
        dp = cd.convert_to_domain_parallel(copy.deepcopy(ref), m)
        xr = x[:, :3].clone().requires_grad_()
        yr = ref(xr)
        gy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
        yr.backward(gy)
        xs = cd.shard_tensor(x[:, :3].clone(), m, 2).requires_grad_()
        with cd.gather_policy("raise"):
            y = dp(xs)
            d = domain_shard_dim(y)
            y.backward(cd.shard_tensor(gy, m, d) if d is not None else wrap_replicate(gy, y.device_mesh))
        errs = [rel_err(y, yr), rel_err(xs.grad, xr.grad)]
        errs += [rel_err(p.grad, q.grad) for p, q in zip(dp.parameters(), ref.parameters())]
        out[f"module head B={batch}"] = str(max(errs))
    narrow = cd.shard_tensor(torch.randn(1, 2, h, 3, dtype=torch.float64), m, 2)
    try:
        with cd.gather_policy("raise"):
            narrow.flatten(1)
        out["narrow"] = "ran"
    except cd.DomainParallelError as exc:
        out["narrow"] = str(exc)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [12, 13])
def test_dense_heads_on_flattened_features_match_one_device(world, h):
    for rank, out in enumerate(get_world(world).run(_task, h)):
        for key, v in out.items():
            if key.endswith("bytes"):
                assert v == "True", (world, h, rank, key)
            elif key == "narrow":
                # two channels cannot hold the shards of 3 or 4 ranks and the batch has 1: a clear error
                if world >= 3:
                    assert "merged under dims of size 2" in v and "shard" in v, (world, rank, v)
                else:
                    assert v == "ran", (world, rank, v)
            else:
                assert float(v) <= TOL[torch.float64], (world, h, rank, key, v)


def test_plan_notes_the_dense_head_and_flags_too_few_channels():
    from credit_dtensor.audit import plan

    p = plan(_head(4, (5, 2)), 2, (1, 3, 12, 3))
    notes = " ".join(n for r in p.rows for n in r.notes)
    assert p.ok and not p.hazards, p.hazards
    assert "shards move onto the outermost merged dim" in notes and "partial product is summed once" in notes
    narrow = plan(_head(2, (5, 2)), 3, (1, 3, 12, 3))  # 2 channels cannot hold 3 ranks' shards
    assert any("merged under dims of size 2" in h for _, h in narrow.hazards), narrow.hazards
