"""Programs in the style of torchvision's Swin on H-sharded tensors, vs one device (fp64 1e-10):

* channels-last activations (``permute(0, 2, 3, 1)``) split into windows with ``view`` and merged
  back with ``reshape``: the local tensors are not contiguous, and a DTensor that described them
  as contiguous made DTensor turn a later ``reshape`` into an impossible ``view``;
* an attention mask built with ``x.new_zeros((H, W))`` from a sharded ``x`` (a ``Replicate``
  DTensor) and filled by slice assignment (``mask[a:b, c:d] = k``), which DTensor has no strategy
  for (``fill_.Tensor``);
* window attention by explicit ``matmul`` of ``(windows, heads, tokens, d)`` tensors inside
  windows that lie in one shard (DTensor flattens the batch dims and refuses uneven shards).

Worlds 1-4, H = 16 (windows of 2 rows: 8 windows, uneven over 3 ranks), gather guard ``raise``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.harness import get_world, manager

WS = 2  # window rows and columns


def _swin_like(x: torch.Tensor, p: dict) -> torch.Tensor:
    b, _, h, w = x.shape
    y = F.conv2d(x, p["conv"], padding=1).permute(0, 2, 3, 1)  # (B, H, W, C) channels-last view
    c = y.shape[-1]
    y = F.layer_norm(y, (c,), p["ln_w"], p["ln_b"])
    mask = y.new_zeros((h, w))  # the shifted-window mask pattern
    mask[: h // 2, : w // 2] = 1.0
    mask[h // 2 :, w // 2 :] = -1.0
    t = y.view(b, h // WS, WS, w // WS, WS, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, WS * WS, c)
    m = mask.view(h // WS, WS, w // WS, WS).permute(0, 2, 1, 3).reshape(-1, WS * WS)  # (windows, tokens)
    heads = 2  # (windows, heads, tokens, d): a 4-D batched matmul, sharded on the windows
    nw = t.shape[0]
    qkv = F.linear(t, p["qkv"])  # chunk along channels of a tensor sharded on windows: local
    q, k, v = (z.reshape(nw, WS * WS, heads, c // heads).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
    attn = q.matmul(k.transpose(-2, -1)) * c**-0.5 + m[:, None, :, None] * 0.1
    out = attn.softmax(dim=-1).matmul(v).transpose(1, 2).reshape(t.shape[0], WS * WS, c)
    out = out.view(b, h // WS, w // WS, WS, WS, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    return out.permute(0, 3, 1, 2)


def _task(h: int) -> dict[str, float]:
    from torch.distributed.tensor import Replicate, distribute_tensor

    import credit_dtensor as cd

    m = manager()
    g = torch.Generator().manual_seed(h)
    x = torch.randn(1, 3, h, 8, generator=g, dtype=torch.float64)
    params = {
        "conv": torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64),
        "ln_w": torch.rand(4, generator=g, dtype=torch.float64) + 0.5,
        "ln_b": torch.randn(4, generator=g, dtype=torch.float64),
        "qkv": torch.randn(12, 4, generator=g, dtype=torch.float64),
    }
    ref_p = {k: v.clone().requires_grad_() for k, v in params.items()}
    xr = x.clone().requires_grad_()
    yr = _swin_like(xr, ref_p)
    gy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    yr.backward(gy)
    dist_p = {k: distribute_tensor(v.clone(), m.domain_mesh, [Replicate()]).requires_grad_() for k, v in params.items()}
    xs = cd.shard_tensor(x, m, 2).requires_grad_()
    with cd.gather_policy("raise"):
        y = _swin_like(xs, dist_p)
        y.backward(cd.shard_tensor(gy, m, cd.dtensor.domain_shard_dim(y)))
    scale = max(1.0, yr.abs().max().item())
    errors = {"out": (y.full_tensor() - yr).abs().max().item() / scale}
    errors["grad x"] = (xs.grad.full_tensor() - xr.grad).abs().max().item()
    for k in params:
        errors[f"grad {k}"] = (dist_p[k].grad.full_tensor() - ref_p[k].grad).abs().max().item()
    return errors


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_swin_style_program_matches_one_device(world):
    for rank, errors in enumerate(get_world(world).run(_task, 16)):
        bad = {k: v for k, v in errors.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}, world {world}: {bad}"


def _inplace_after_save_task() -> dict[str, str]:
    """Modify in place a tensor that backward needs: one device raises; so must we (a rule saves
    the *local* tensor, whose version DTensor's in-place ops do not bump: the rules mode bumps it,
    ``intercept.bump_local_version``; silently wrong before)."""
    import credit_dtensor as cd

    m = manager()
    x = torch.randn(2, 3, 12, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {}
    cases = {
        "silu": F.silu,
        "gelu": F.gelu,
        "square": lambda t: t * t,
        "hardswish": F.hardswish,
        "sigmoid": torch.sigmoid,
    }
    for name, f in cases.items():
        results = []
        for side in ("one device", "sharded"):
            base = x.clone().requires_grad_() if side == "one device" else cd.shard_tensor(x, m, 2).requires_grad_()
            h = base * 1.0
            y = f(h)
            h.mul_(2)  # after f saved what it needs
            try:
                y.sum().backward()
                g = base.grad.full_tensor() if side == "sharded" else base.grad
                results.append(("ok", g))
            except RuntimeError as exc:
                results.append(("raised", "modified" in str(exc) and "inplace" in str(exc)))
        (a, ga), (b, gb) = results
        if a == "ok" and b == "ok":
            out[name] = f"ok {(ga - gb).abs().max().item():.1e}"
        else:
            out[name] = f"{a}/{b} named={gb if b == 'raised' else None}"
    # operators that only read (~, int) are not writes: a saved mask stays valid
    a = cd.shard_tensor(x, m, 2).requires_grad_()
    mask = a.detach() > 0
    y = torch.where(mask, a, 0.0)
    _ = ~mask, int((mask.sum() > 0).full_tensor())
    try:
        y.sum().backward()
        out["read_only_operators"] = "ok"
    except RuntimeError as exc:
        out["read_only_operators"] = f"raised: {exc}"
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_inplace_on_saved_tensor_raises_like_one_device(world):
    """Pointwise ops run on local tensors, which autograd saves; an in-place op on the DTensor
    bumps the version of its local tensor, so backward raises exactly where one device does, and
    an op that saved only its output (sigmoid) stays legal."""
    for rank, res in enumerate(get_world(world).run(_inplace_after_save_task)):
        for name in ("silu", "gelu", "square", "hardswish"):
            assert res[name] == "raised/raised named=True", (rank, name, res[name])
        assert res["sigmoid"] == "ok 0.0e+00", (rank, res["sigmoid"])  # saves its output: legal
        assert res["read_only_operators"] == "ok", (rank, res["read_only_operators"])
