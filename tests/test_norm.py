"""Distributed normalization vs one device: group / instance / batch / layer norm, module wrappers
and functional (aten rule) paths, worlds 1-4, even / uneven / empty shards, fp64 and fp32.

Every configuration runs a few training steps and an eval step and compares output, input grad,
weight/bias grads and running stats with torch on the full tensor; running stats must also be
bitwise identical on every domain rank, and the traffic must be exactly the statistics
(forward ``2 * Q``: each rank's own statistics, backward ``2 * Q`` scalars).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from credit_dtensor.geometry.norm import NormLayout
from tests.harness import get_world, manager
from tests.parity import assert_parity, parity

DTYPES = {"float64": torch.float64, "float32": torch.float32}
KINDS = ("gn", "in", "bn", "ln", "ln_local")


# ---------------------------------------------------------------------------------------------
# Pure geometry (no processes)
# ---------------------------------------------------------------------------------------------


def test_layout_counts_uneven_and_empty():
    lay = NormLayout("group", (2, 4, 5, 3), groups=2)
    assert lay.canonical((2, 4, 5, 3)) == (1, 4, 30)
    assert lay.count() == 30
    assert lay.rank_counts(2, 4) == [12, 12, 6, 0]  # H=5 over 4: 2,2,1,0 rows of 2 ch * 3 cols
    assert sum(lay.rank_counts(2, 3)) == lay.count()
    bn = NormLayout("batch", (3, 4, 13, 2))
    assert bn.rank_counts(2, 3) == [3 * 5 * 2, 3 * 5 * 2, 3 * 3 * 2]
    assert bn.rank_counts(0, 2) == [2 * 26, 1 * 26]  # batch sharding reduces too
    assert bn.num_stats() == 4 and bn.stats_shape() == (4,)
    ln = NormLayout("layer", (2, 5, 3, 4), norm_ndim=1)  # channels-last, over C only
    assert ln.rank_counts(1, 2) is None  # H not normalized over: local statistics
    assert ln.stats_shape() == (2, 5, 3, 1)
    ln3 = NormLayout("layer", (2, 4, 5, 3), norm_ndim=3)
    assert ln3.rank_counts(2, 2) == [36, 24] and ln3.num_stats() == 2


def test_layout_rejects_bad_geometry():
    with pytest.raises(ValueError, match="not divisible"):
        NormLayout("group", (2, 6, 4, 4), groups=4)
    with pytest.raises(ValueError, match="trailing dims"):
        NormLayout("layer", (2, 3), norm_ndim=3)


def test_needs_distributed_norm():
    from credit_dtensor.nn.norm import DomainParallelBatchNorm2d, needs_distributed_norm, norm_wrapper_for

    assert needs_distributed_norm(nn.GroupNorm(2, 4))
    assert needs_distributed_norm(nn.InstanceNorm3d(4))
    assert needs_distributed_norm(nn.BatchNorm2d(4))
    assert needs_distributed_norm(nn.LayerNorm((5, 3)))
    assert not needs_distributed_norm(nn.LayerNorm(8))  # over channels (channels-last): local
    assert needs_distributed_norm(nn.LayerNorm(8), input_ndim=3, shard_dim=2)
    assert not needs_distributed_norm(nn.LayerNorm((4, 8)), input_ndim=4, shard_dim=1)
    assert not needs_distributed_norm(nn.Conv2d(2, 2, 3)) and not needs_distributed_norm(nn.ReLU())
    assert norm_wrapper_for(nn.BatchNorm2d(3)) is DomainParallelBatchNorm2d
    assert needs_distributed_norm(nn.SyncBatchNorm(3)) and norm_wrapper_for(nn.SyncBatchNorm(3)) is None


# ---------------------------------------------------------------------------------------------
# Tasks (run on every rank)
# ---------------------------------------------------------------------------------------------


def _shard_dim(cfg: dict) -> int:
    nd = len(cfg["shape"])
    if cfg["kind"] == "ln_local":  # channels-last (B, [T,] H, W, C)
        return nd - 3
    return nd - 2


def _build(cfg: dict, dtype: torch.dtype) -> nn.Module:
    kind, shape = cfg["kind"], cfg["shape"]
    c, nd, affine = shape[1], len(shape), cfg["affine"]
    if kind == "gn":
        mod = nn.GroupNorm(cfg["groups"], c, affine=affine)
    elif kind == "in":
        cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[nd]
        mod = cls(c, affine=affine, track_running_stats=cfg["track"], momentum=cfg["momentum"])
    elif kind == "bn":
        cls = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[nd]
        mod = cls(c, affine=affine, track_running_stats=cfg["track"], momentum=cfg["momentum"])
    else:
        mod = nn.LayerNorm(shape[nd - cfg["k"] :], elementwise_affine=affine, bias=cfg.get("bias", True))
    mod = mod.to(dtype)
    with torch.no_grad():
        for p in mod.parameters():
            p.uniform_(-1.5, 1.5)
        for name, b in mod.named_buffers():
            if name == "running_mean":
                b.uniform_(-1, 1)
            elif name == "running_var":
                b.uniform_(0.5, 2)
    return mod


def _functional(cfg: dict, mod: nn.Module, dist: bool, mesh):
    """``F.*`` on the module's tensors: ``(fn(x), params, buffers)``; dist params are Replicate DTensors."""
    import torch.nn.functional as F
    from torch.distributed.tensor import Replicate, distribute_tensor

    params = {}
    for name, p in mod.named_parameters():
        t = p.detach().clone()
        params[name] = (distribute_tensor(t, mesh, [Replicate()]) if dist else t).requires_grad_()
    bufs = {n: b.detach().clone() for n, b in mod.named_buffers() if n != "num_batches_tracked"}
    w, b = params.get("weight"), params.get("bias")
    rm, rv = bufs.get("running_mean"), bufs.get("running_var")
    kind, eps = cfg["kind"], 1e-5
    mom = 0.1 if cfg.get("momentum") is None else cfg["momentum"]

    def fn(x: torch.Tensor) -> torch.Tensor:
        training = fn.training  # type: ignore[attr-defined]
        if kind == "gn":
            return F.group_norm(x, cfg["groups"], w, b, eps)
        if kind == "in":
            return F.instance_norm(x, rm, rv, w, b, training or rm is None, mom, eps)
        if kind == "bn":
            return F.batch_norm(x, rm, rv, w, b, training or rm is None, mom, eps)
        return F.layer_norm(x, x.shape[x.ndim - cfg["k"] :], w, b, eps)

    fn.training = True  # type: ignore[attr-defined]
    return fn, params, bufs


def _expected_bytes(cfg: dict, world: int, training: bool, itemsize: int) -> int:
    """Forward ``2*Q`` (this rank's statistics, all-gathered) plus backward ``2*Q`` scalars when
    statistics span ranks, else 0."""
    kind, shape = cfg["kind"], cfg["shape"]
    if world == 1 or kind == "ln_local":
        return 0
    if kind in ("bn", "in") and not training and cfg["track"]:
        return 0  # running statistics: pointwise
    q = {
        "gn": shape[0] * cfg.get("groups", 1),
        "in": shape[0] * shape[1],
        "bn": shape[1],
        "ln": math.prod(shape[: len(shape) - cfg.get("k", 1)]),
    }[kind]
    return (2 * q + 2 * q) * itemsize


def _run_one(cfg: dict) -> dict:
    from credit_dtensor import DomainParallelError
    from credit_dtensor.nn import norm as dpn
    from credit_dtensor.stats import comm_stats

    m = manager()
    world = m.domain_world_size
    dtype = DTYPES[cfg["dtype"]]
    torch.manual_seed(cfg["seed"])
    ref = _build(cfg, dtype)
    sd = _shard_dim(cfg)
    if cfg["path"] == "module":
        wrapper = dpn.norm_wrapper_for(ref)
        dp = wrapper(copy.deepcopy(ref), m)
        ref_fn, dist_fn = ref, dp
        ref_params, dist_params = dict(ref.named_parameters()), dict(dp.named_parameters())
        ref_bufs, dist_bufs = dict(ref.named_buffers()), dict(dp.named_buffers())
    else:
        ref_fn, ref_params, ref_bufs = _functional(cfg, ref, False, m.domain_mesh)
        dist_fn, dist_params, dist_bufs = _functional(cfg, ref, True, m.domain_mesh)
    worst: dict[str, float] = {}
    steps = [True] * cfg["train_steps"] + [False]
    for step, training in enumerate(steps):
        for f in (ref_fn, dist_fn):
            if isinstance(f, nn.Module):
                f.train(training)
            else:
                f.training = training
        x = torch.randn(cfg["shape"], dtype=dtype) * 2 + cfg["offset"]
        with comm_stats() as s:
            errs = parity(
                m,
                ref_fn,
                dist_fn,
                [x],
                shard_dims=[sd],
                out_dim=sd,
                ref_params=ref_params,
                dist_params=dist_params,
                seed=step,
            )
        for name, b in ref_bufs.items():
            d = dist_bufs[name]
            assert not isinstance(d, torch.distributed.tensor.DTensor), f"buffer {name} became a DTensor"
            errs[f"buf_{name}"] = (d.double() - b.double()).abs().max().item() if b.numel() else 0.0
        for k, v in errs.items():
            worst[k] = max(worst.get(k, 0.0), v)
        expect = _expected_bytes(cfg, world, training, torch.finfo(dtype).bits // 8)
        if s.sent_bytes != expect or (expect and s.collectives != 2):
            raise AssertionError(
                f"step {step}: sent {s.sent_bytes} B in {s.collectives} collectives, expected {expect} B"
            )
        for name, p in dist_params.items():  # every rank (even with an empty shard) holds a grad
            if p.grad is None:
                raise AssertionError(f"{name}.grad is None on rank {m.domain_rank}")
    try:
        assert_parity(worst, dtype, cfg)
    except AssertionError as e:
        raise DomainParallelError(str(e)) from None
    return {k: v.detach().clone() for k, v in dist_bufs.items()}


def _run_configs(configs: list[dict]) -> list[dict]:
    out = []
    for cfg in configs:
        try:
            out.append(_run_one(cfg))
        except Exception as e:
            raise AssertionError(f"config {cfg}: {type(e).__name__}: {e}") from e
    return out


def _check_all(world: int, configs: list[dict]) -> None:
    results = get_world(world).run(_run_configs, configs)
    for i, cfg in enumerate(configs):  # running stats bitwise identical on every domain rank
        for name, t in results[0][i].items():
            for r in range(1, world):
                assert torch.equal(results[r][i][name], t), f"{name} differs between rank 0 and {r}: {cfg}"


# ---------------------------------------------------------------------------------------------
# Named matrix: every kind x path at the brief's shapes (H=13 over 3, H=5 / H=2 over 4)
# ---------------------------------------------------------------------------------------------

NAMED_H = {1: (7, 7), 2: (5, 5), 3: (13, 13), 4: (5, 2)}  # (module path, functional path)


def _named(world: int) -> list[dict]:
    cfgs = []
    i = 0
    for kind in KINDS:
        for path, h in zip(("module", "functional"), NAMED_H[world], strict=True):
            i += 1
            nd = 5 if i % 3 == 0 else 4
            c = 4
            shape = (2, c, 2, h, 3) if nd == 5 else (2, c, h, 3)
            if kind == "ln_local":
                shape = (2, 2, h, 3, c) if nd == 5 else (2, h, 3, c)
            cfgs.append(
                dict(
                    kind=kind,
                    path=path,
                    shape=shape,
                    groups=(1, 2, c)[(i // 2) % 3],
                    affine=i % 4 != 1,
                    track=i % 2 == 0,
                    momentum=None if i % 5 == 0 else 0.1,
                    k={"ln": 2 + i % 2, "ln_local": 1 + i % 2}.get(kind, 1),
                    dtype="float32" if i % 7 == 0 else "float64",
                    train_steps=2 if kind in ("bn", "in") else 1,
                    offset=3.0,
                    seed=i,
                )
            )
    return cfgs


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_named_matrix(world):
    _check_all(world, _named(world))


# ---------------------------------------------------------------------------------------------
# Property-based: random configurations, several per world.run
# ---------------------------------------------------------------------------------------------


@st.composite
def _config(draw, world: int) -> dict:
    kind = draw(st.sampled_from(KINDS))
    nd = draw(st.sampled_from([4, 5]))
    b, c = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 6]))
    h = draw(st.one_of(st.integers(1, 3 * world + 1), st.sampled_from([13, 5, max(world - 1, 1)])))
    w = draw(st.integers(2, 4))
    t = draw(st.integers(1, 2))
    spatial = (t, h, w) if nd == 5 else (h, w)
    shape = (b, *spatial, c) if kind == "ln_local" else (b, c, *spatial)
    if kind == "ln":
        k = draw(st.integers(2, nd - 1 if nd == 4 else 4))  # normalized dims include H
    elif kind == "ln_local":
        k = draw(st.integers(1, 2))  # (C,) or (W, C): H excluded
    else:
        k = 1
    dtype = draw(st.sampled_from(["float64", "float64", "float32"]))
    groups = draw(st.sampled_from([1, 2, c]))
    per_stat = {
        "gn": c // groups * math.prod(spatial),
        "in": math.prod(spatial),
        "bn": b * math.prod(spatial),
    }.get(kind, math.prod(shape[len(shape) - k :]))
    if per_stat < 8:  # fp32 vs fp32 at 1e-5 needs well-conditioned statistics (a 2-element variance is not)
        dtype = "float64"
    return dict(
        kind=kind,
        path=draw(st.sampled_from(["module", "functional"])),
        shape=shape,
        groups=groups,
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.3, None])),
        k=k,
        dtype=dtype,
        train_steps=draw(st.integers(1, 3)),
        # a large offset tests the stable merge in fp64; fp32 at 1e-5 needs well-conditioned data
        # (ill-conditioned fp32 statistics differ from torch's by rounding, whichever is "right")
        offset=draw(st.sampled_from([0.0, 5.0, -100.0])) if dtype == "float64" else 0.0,
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_property(world):
    # No shrinking: every example costs a distributed run, and the failing config is in the message.
    @settings(
        max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate]
    )
    @given(st.lists(_config(world), min_size=6, max_size=6))
    def check(configs):
        _check_all(world, configs)

    check()


# ---------------------------------------------------------------------------------------------
# Other placements, unbatched input, plain-tensor params, errors
# ---------------------------------------------------------------------------------------------


def _misc() -> dict:
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from credit_dtensor.nn.norm import (
        DomainParallelBatchNorm1d,
        DomainParallelBatchNorm2d,
        DomainParallelGroupNorm,
        DomainParallelInstanceNorm2d,
        DomainParallelLayerNorm,
    )
    from credit_dtensor.ops import norm as ops
    from credit_dtensor.stats import comm_stats

    m = manager()
    mesh = m.domain_mesh
    torch.manual_seed(0)
    f64 = torch.float64
    out: dict = {}

    def both(ref_mod, wrapper, x, sd, name):
        dp = wrapper(copy.deepcopy(ref_mod), m)
        e = parity(
            m, ref_mod, dp, [x], shard_dims=[sd], out_dim=sd,
            ref_params=dict(ref_mod.named_parameters()), dist_params=dict(dp.named_parameters()),
        )  # fmt: skip
        for n, b in ref_mod.named_buffers():
            e[f"buf_{n}"] = (dict(dp.named_buffers())[n].double() - b.double()).abs().max().item()
        assert_parity(e, f64, name)

    # batch-sharded BatchNorm (statistics span ranks through dim 0) and GroupNorm (local)
    both(nn.BatchNorm2d(3).double(), DomainParallelBatchNorm2d, torch.randn(5, 3, 4, 2, dtype=f64), 0, "bn Shard(0)")
    both(nn.GroupNorm(1, 3).double(), DomainParallelGroupNorm, torch.randn(5, 3, 4, 2, dtype=f64), 0, "gn Shard(0)")
    # InstanceNorm with running stats on a batch-sharded input: batch mean across ranks
    both(
        nn.InstanceNorm2d(3, track_running_stats=True).double(), DomainParallelInstanceNorm2d,
        torch.randn(5, 3, 4, 2, dtype=f64), 0, "in Shard(0)",
    )  # fmt: skip
    # eps=0: the local-statistics shortcut would divide by a zero local variance; exact path instead
    xz = torch.randn(2, 4, 5, 3, dtype=f64)
    xz[:, :, :3] = 1.5  # constant on rank 0's rows
    both(nn.GroupNorm(2, 4, eps=0.0).double(), DomainParallelGroupNorm, xz, 2, "gn eps=0")
    # unbatched InstanceNorm2d input (C, H, W): H is dim 1
    both(
        nn.InstanceNorm2d(3, affine=True).double(),
        DomainParallelInstanceNorm2d,
        torch.randn(3, 7, 2, dtype=f64),
        1,
        "in unbatched",
    )

    # replicated input: local compute, replicated output, exact grads
    gn = nn.GroupNorm(2, 4).double()
    dp = DomainParallelGroupNorm(copy.deepcopy(gn), m)
    x = torch.randn(2, 4, 5, 3, dtype=f64)
    xr = distribute_tensor(x, mesh, [Replicate()]).requires_grad_()
    y = dp(xr)
    assert y.placements == (Replicate(),), y.placements
    y.full_tensor().square().sum().backward()
    xl = x.clone().requires_grad_()
    gn(xl).square().sum().backward()
    assert (y.full_tensor() - gn(x)).abs().max() < 1e-12
    assert (xr.grad.full_tensor() - xl.grad).abs().max() < 1e-12
    assert (dp.weight.grad.full_tensor() - gn.weight.grad).abs().max() < 1e-12

    # BatchNorm1d on (N, C): a plain input is replicated. Output, input grad, weight/bias grads and
    # running stats vs one device (parity), then the same module on (N, C, L) sharded on L (H=7
    # over 2: uneven; L=1: an empty shard) and on a batch-sharded (N, C) input.
    def bn1d():
        mod = nn.BatchNorm1d(3).double()
        with torch.no_grad():
            mod.weight.uniform_(-1.5, 1.5)
            mod.bias.uniform_(-1.5, 1.5)
        return mod

    bn1 = bn1d()
    dp1 = DomainParallelBatchNorm1d(copy.deepcopy(bn1), m)
    x2 = torch.randn(6, 3, dtype=f64)
    e = parity(
        m, bn1, dp1, [x2], shard_dims=[None], out_dim=None,
        ref_params=dict(bn1.named_parameters()), dist_params=dict(dp1.named_parameters()),
    )  # fmt: skip
    assert set(e) == {"out", "grad_in0", "grad_weight", "grad_bias"}, e
    e["buf_running_mean"] = (dp1.running_mean - bn1.running_mean).abs().max().item()
    e["buf_running_var"] = (dp1.running_var - bn1.running_var).abs().max().item()
    assert_parity(e, f64, "bn1d (N, C) plain input")
    assert (dp1(x2).full_tensor() - bn1(x2)).abs().max() < 1e-12  # and absolute, as before
    assert (dp1.running_var - bn1.running_var).abs().max() < 1e-12
    both(bn1d(), DomainParallelBatchNorm1d, torch.randn(2, 3, 7, dtype=f64), 2, "bn1d (N, C, L) Shard(L) uneven")
    both(bn1d(), DomainParallelBatchNorm1d, torch.randn(2, 3, 1, dtype=f64), 2, "bn1d (N, C, L=1) empty shard")
    both(bn1d(), DomainParallelBatchNorm1d, torch.randn(5, 3, dtype=f64), 0, "bn1d (N, C) Shard(0)")

    # plain-tensor parameters with a sharded activation: grads all-reduced (exact on every rank)
    w0 = torch.randn(4, dtype=f64, requires_grad=True)
    wd = w0.detach().clone().requires_grad_()
    x = torch.randn(2, 4, 5, 3, dtype=f64)
    e = parity(
        m, lambda t: ops.group_norm(t, 2, w0), lambda t: ops.group_norm(t, 2, wd), [x], shard_dims=[2], out_dim=2,
        ref_params={"w": w0}, dist_params={"w": wd},
    )  # fmt: skip
    assert_parity(e, f64, "plain weight (module-level function)")
    w1 = torch.randn(4, dtype=f64, requires_grad=True)
    wf = w1.detach().clone().requires_grad_()
    e = parity(
        m, lambda t: F.group_norm(t, 2, w1), lambda t: F.group_norm(t, 2, wf), [x], shard_dims=[2], out_dim=2,
        ref_params={"w": w1}, dist_params={"w": wf},
    )  # fmt: skip
    assert_parity(e, f64, "plain weight (F.group_norm)")

    # LayerNorm over channels of a channels-last tensor: local, no communication at all
    ln = DomainParallelLayerNorm(nn.LayerNorm(6).double(), m)
    xc = shard_x = distribute_tensor(torch.randn(2, 5, 3, 6, dtype=f64), mesh, [Shard(1)])
    with comm_stats() as s:
        ln(xc).to_local().sum().backward()
        F.layer_norm(shard_x, (6,)).to_local().sum()
    out["ln_local_bytes"] = s.sent_bytes

    # ---- errors -------------------------------------------------------------------------
    def err(fn):
        try:
            fn()
        except Exception as ex:  # noqa: BLE001
            return type(ex).__name__, str(ex)
        return None, ""

    # channel-sharded inputs (heads merged back into channels): re-laid out onto H first, exact
    xg = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(3))
    xc1 = distribute_tensor(xg, mesh, [Shard(1)])
    gnf = DomainParallelGroupNorm(nn.GroupNorm(2, 4), m)
    out["gn_channel_module"] = (gnf(xc1).full_tensor() - F.group_norm(xg, 2)).abs().max().item()
    bn = DomainParallelBatchNorm2d(nn.BatchNorm2d(4), m)
    out["bn_channel_module"] = (bn(xc1).full_tensor() - F.batch_norm(xg, None, None, training=True)).abs().max().item()
    out["gn_channel_F"] = (F.group_norm(xc1, 2).full_tensor() - F.group_norm(xg, 2)).abs().max().item()
    yb = F.batch_norm(xc1, None, None, training=True)
    out["bn_channel_F"] = (yb.full_tensor() - F.batch_norm(xg, None, None, training=True)).abs().max().item()
    xp = DTensor.from_local(torch.randn(2, 4, 5, 3), mesh, [Partial()], run_check=False)
    out["bn_partial"] = err(lambda: ops.batch_norm(xp, None, None, training=True))
    x2d = distribute_tensor(torch.randn(2, 4, 6, 3), m.mesh, [Replicate(), Shard(2)])
    out["bn_2d_mesh_F"] = err(lambda: F.batch_norm(x2d, None, None, training=True))
    out["gn_groups"] = err(lambda: ops.group_norm(distribute_tensor(torch.randn(2, 6, 5, 3), mesh, [Shard(2)]), 4))
    out["gn_channels"] = err(lambda: gnf(torch.randn(2, 6, 5, 3)))
    lnm = DomainParallelLayerNorm(nn.LayerNorm((5, 4)), m)
    out["ln_shape"] = err(lambda: lnm(torch.randn(2, 4, 5, 3)))
    out["bn_one_value"] = err(lambda: DomainParallelBatchNorm2d(nn.BatchNorm2d(4), m).train()(torch.randn(1, 4, 1, 1)))
    out["bn_eval_no_stats"] = err(
        lambda: ops.batch_norm(distribute_tensor(torch.randn(2, 4, 5, 3), mesh, [Shard(2)]), None, None, training=False)
    )
    # parameters on another mesh than the input
    other = manager(1).domain_mesh  # a 1-rank domain mesh: not the input's
    gno = DomainParallelGroupNorm(nn.GroupNorm(2, 4), manager(1))
    xs = distribute_tensor(torch.randn(2, 4, 5, 3), mesh, [Shard(2)])
    out["mesh_module"] = err(lambda: gno(xs))
    wo = distribute_tensor(torch.randn(4), other, [Replicate()])
    out["mesh_F"] = err(lambda: F.group_norm(xs, 2, wo))
    out["mesh_ops"] = err(lambda: ops.group_norm(xs, 2, wo))
    return out


def test_misc_placements_and_errors():
    res = get_world(2).run(_misc)
    for r in res:
        assert r["ln_local_bytes"] == 0
        for key in ("gn_channel_module", "bn_channel_module", "gn_channel_F", "bn_channel_F"):
            assert r[key] < 1e-5, (key, r[key])
        assert r["bn_partial"] == (None, ""), r["bn_partial"]  # a partial sum is reduced first
        expect = {
            "bn_2d_mesh_F": ("UnsupportedShardingError", "2-D mesh"),
            "gn_groups": ("DomainParallelError", "not divisible by num_groups=4"),
            "gn_channels": ("DomainParallelError", "weight shape (4,) != (6,)"),
            "ln_shape": ("DomainParallelError", "normalized_shape [5, 4] does not match"),
            "bn_one_value": ("DomainParallelError", "more than 1 value per channel"),
            "bn_eval_no_stats": ("DomainParallelError", "running_mean and running_var are required"),
            "mesh_module": ("MeshMismatchError", "mesh"),
            "mesh_F": ("MeshMismatchError", "weight lives on mesh"),
            "mesh_ops": ("MeshMismatchError", "weight lives on mesh"),
        }
        for key, (cls, text) in expect.items():
            got_cls, msg = r[key]
            assert got_cls == cls and text in msg, f"{key}: got {got_cls}: {msg}"


class _ChannelsLast(nn.Module):
    """A norm fed a channels-last copy of its input (what a permute-based LayerNorm2d followed by a
    1x1 conv hands the next BatchNorm in smp's UPerNet)."""

    def __init__(self, norm: nn.Module, fmt: torch.memory_format) -> None:
        super().__init__()
        self.norm, self.fmt = norm, fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.contiguous(memory_format=self.fmt))


def _channels_last_inputs(h: int) -> None:
    from credit_dtensor.convert import convert_to_domain_parallel

    m = manager()
    for b in (1, 2):
        for name, norm, nd in (
            ("bn", nn.BatchNorm2d(4), 4),
            ("gn", nn.GroupNorm(2, 4), 4),
            ("in", nn.InstanceNorm2d(4, affine=True), 4),
            ("bn3d", nn.BatchNorm3d(4), 5),
        ):
            for training in (True, False):
                torch.manual_seed(1)
                fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
                ref = _ChannelsLast(copy.deepcopy(norm), fmt).double().train(training)
                if hasattr(ref.norm, "running_mean") and ref.norm.running_mean is not None:
                    ref.norm.running_mean.uniform_(-1, 1)
                    ref.norm.running_var.uniform_(0.5, 2)
                dp = convert_to_domain_parallel(copy.deepcopy(ref), m)
                shape = (b, 4, h, 5) if nd == 4 else (b, 4, 2, h, 5)
                x = torch.randn(shape, dtype=torch.float64)
                errs = parity(
                    m,
                    ref,
                    dp,
                    [x],
                    shard_dims=[nd - 2],
                    out_dim=nd - 2,
                    ref_params=dict(ref.named_parameters()),
                    dist_params=dict(dp.named_parameters()),
                )
                assert_parity(errs, torch.float64, f"{name} b={b} training={training} h={h}")


@pytest.mark.parametrize("world,h", [(2, 8), (3, 13)])
def test_channels_last_inputs_exact(world, h):
    """Channels-last inputs, batch 1 included: the local tensor the rules hand PyTorch keeps its
    own strides (``view_as`` re-strided the size-1 batch dim, and CPU ``batch_norm``'s backward
    then returned wrong input and weight gradients in eval mode)."""
    get_world(world).run(_channels_last_inputs, h)
