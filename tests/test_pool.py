"""Exact max / avg / adaptive pooling (1-D, 2-D, 3-D) on sharded DTensors vs one device.

Forward, input gradient and -- for max pooling with ``return_indices`` -- the indices, which are
global flat indices equal to the single-device ones (also under ties: rounded inputs). Hypothesis
draws kernel/stride/padding/dilation/ceil_mode/count_include_pad/divisor_override and shapes in
the parent; batches run on gloo worlds of 1-4 ranks through the public functions, ``F.*`` on the
DTensor (aten rules) and the module wrappers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from credit_dtensor.geometry.resample import pool_first_real, pool_out_len
from tests.harness import get_world
from tests.resample_cases import bytes_task, expected_recv_rows, read_matrix, row_bytes, run_cases

NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # a failing batch reports at once
HSET = settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    phases=NO_SHRINK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _windows_have_real_rows(spatial, k, s, p, d, ceil) -> bool:
    """Reject configs where some window reads only padding (PyTorch's result there is undefined)."""
    for i, n in enumerate(spatial):
        out = pool_out_len(n, k[i], s[i], p[i], d[i], ceil)
        if out < 1 or any(pool_first_real(o, n, k[i], s[i], p[i], d[i]) is None for o in range(out)):
            return False
    return True


def _valid(op: str, shape, kw) -> bool:
    try:
        y = getattr(F, op)(torch.empty(shape, device="meta"), **kw)
    except (ValueError, RuntimeError, TypeError):
        return False
    y = y[0] if isinstance(y, tuple) else y
    return min(y.shape) > 0


@st.composite
def pool_case(draw, path: str, kind: str):
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    batched = nd == 1 or draw(st.integers(0, 3)) > 0
    lead = [draw(st.integers(1, 2)), draw(st.integers(1, 2))][: 2 if batched else 1]
    spatial = [draw(st.integers(1, 6)) for _ in range(nd)]
    h = nd - 2 if nd >= 2 else 0  # H of the spatial dims (the only one for 1-D)
    spatial[h] = draw(st.integers(1, 13))
    shape = tuple(lead + spatial)
    sd = draw(st.sampled_from([h, h, h, nd - 1, 0]))
    dim = len(lead) + sd
    op = {
        "max": f"max_pool{nd}d",
        "avg": f"avg_pool{nd}d",
        "amax": f"adaptive_max_pool{nd}d",
        "aavg": f"adaptive_avg_pool{nd}d",
    }[kind]
    kw: dict = {}
    if kind in ("max", "avg"):
        k = tuple(draw(st.integers(1, 4)) for _ in range(nd))
        s = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        p = tuple(draw(st.integers(0, ki // 2)) for ki in k)
        d = tuple(draw(st.integers(1, 2)) for _ in range(nd)) if kind == "max" else (1,) * nd
        ceil = draw(st.booleans())
        kw = dict(kernel_size=k, stride=s if draw(st.integers(0, 3)) else None, padding=p, ceil_mode=ceil)
        if kind == "max":
            kw.update(dilation=d, return_indices=draw(st.booleans()))
        else:
            kw["count_include_pad"] = draw(st.booleans())
            if nd > 1:
                kw["divisor_override"] = draw(st.sampled_from([None, None, 1, 3, 5]))
        assume(_windows_have_real_rows(spatial, k, kw["stride"] or k, p, d, ceil))
    else:
        size = [draw(st.integers(1, n + 2)) for n in spatial]
        if nd > 1 and draw(st.integers(0, 3)) == 0:
            size[draw(st.integers(0, nd - 1))] = None
        kw["output_size"] = tuple(size) if nd > 1 else size[0]
        if kind == "amax":
            kw["return_indices"] = draw(st.booleans())
        if path == "functional" and kind == "aavg" and all((n if v is None else v) == 1 for v, n in zip(size, spatial)):
            size[0] = 2  # output 1 everywhere is computed by PyTorch as a mean (exact Partial), not pooling
            kw["output_size"] = tuple(size) if nd > 1 else size[0]
    assume(_valid(op, shape, kw))
    return dict(
        op=op,
        kw=kw,
        shape=shape,
        dim=dim,
        path=path,
        ties=kind in ("max", "amax") and draw(st.booleans()),
        dtype=draw(st.sampled_from(["f64", "f64", "f32"])),
        seed=draw(st.integers(0, 10**6)),
    )


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("path", ["api", "functional", "module"])
@HSET
@given(data=st.data())
def test_pool_parity(world, path, data):
    cases = []
    for kind in ("max", "avg", "amax", "aavg"):
        cases += data.draw(st.lists(pool_case(path, kind), min_size=3, max_size=3))
    get_world(world).run(run_cases, cases)


# ------------------------------------------------------------------------------------------------
# Named cases
# ------------------------------------------------------------------------------------------------

NAMED = [
    dict(op="max_pool2d", kw=dict(kernel_size=2, stride=2)),
    dict(op="max_pool2d", kw=dict(kernel_size=2, stride=2, return_indices=True)),
    dict(op="avg_pool2d", kw=dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)),
    dict(op="max_pool2d", kw=dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, return_indices=True)),
    dict(op="avg_pool2d", kw=dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, divisor_override=4)),
    dict(op="adaptive_avg_pool2d", kw=dict(output_size=(1, 1))),
    dict(op="adaptive_max_pool2d", kw=dict(output_size=(3, 2), return_indices=True)),
]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [10, 11, 3])
def test_named_pool_cases(world, h):
    cases = []
    for i, c in enumerate(NAMED):
        for path in ("api", "functional", "module"):
            if path == "functional" and c["op"] == "adaptive_avg_pool2d":
                continue  # PyTorch computes output (1, 1) as a mean (exact, Partial placement)
            cases.append(dict(c, shape=(2, 3, h, 6), dim=2, path=path, dtype="f64", seed=i, ties=i % 2 == 1))
        cases.append(dict(c, shape=(2, 3, h, 6), dim=2, path="api", dtype="f32", seed=i))
    get_world(world).run(run_cases, cases)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("i", [0, 2, 3, 4, 6])
def test_pool_bytes_are_minimal(world, i):
    """Each rank receives exactly the input rows its output chunk's windows read, once."""
    c = NAMED[i]
    if c["op"].startswith("adaptive_") and world > c["kw"]["output_size"][0]:
        pytest.skip("pooled to fewer rows than ranks: a Replicate result (one all-reduce of the pooled tensor)")
    shape, dim = (2, 3, 10, 6), 2
    kw_h = {k: (v[0] if isinstance(v, tuple) else v) for k, v in c["kw"].items() if k != "return_indices"}
    for key in ("kernel_size", "stride", "padding"):
        if key in kw_h:
            kw_h[key] = (kw_h[key], 1) if key != "padding" else (kw_h[key], 0)
    if "output_size" in kw_h:
        kw_h["output_size"] = (kw_h["output_size"], 1)
    reads = read_matrix(c["op"], kw_h, shape[dim])
    res = get_world(world).run(bytes_task, c["op"], c["kw"], shape, dim)
    rows = expected_recv_rows(reads, world)
    assert [r["fwd_recv"] for r in res] == [k * row_bytes(shape, dim) for k in rows]
    assert [r["bwd_sent"] for r in res] == [k * row_bytes(shape, dim) for k in rows]
    if world == 4:
        assert any(rows)  # H=10 over 4 ranks (3,3,3,1): every case here reads across a boundary


def _index_semantics_task() -> list[bool]:
    """All-(-inf) windows at the padded edge: PyTorch reports the window's first real row."""
    from credit_dtensor.ops import resample as R
    from credit_dtensor.sharding import shard_tensor
    from tests.harness import manager

    m = manager()
    x = torch.full((1, 1, 9, 4), float("-inf"), dtype=torch.float64)
    x[0, 0, 4, 1] = 1.0
    ok = []
    for kw in (
        dict(kernel_size=3, stride=1, padding=1),
        dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),
        dict(kernel_size=3, stride=2, padding=1, dilation=2),
    ):
        y_ref, i_ref = F.max_pool2d(x, return_indices=True, **kw)
        xd = shard_tensor(x, m, 2).requires_grad_()
        y, idx = R.max_pool2d(xd, return_indices=True, **kw)
        y.backward(torch.ones_like(y))
        xr = x.clone().requires_grad_()
        F.max_pool2d(xr, **kw).backward(torch.ones_like(y_ref))
        ok.append(
            torch.equal(idx.full_tensor(), i_ref)
            and torch.equal(y.full_tensor(), y_ref)
            and torch.equal(xd.grad.full_tensor(), xr.grad)
        )
    return ok


@pytest.mark.parametrize("world", [2, 4])
def test_max_pool_all_neg_inf_windows(world):
    assert all(all(r) for r in get_world(world).run(_index_semantics_task))


def test_needs_domain_parallel_pools():
    from torch import nn

    from credit_dtensor.nn.resample import needs_domain_parallel

    for mod in (
        nn.MaxPool1d(2),
        nn.MaxPool3d(2),
        nn.AvgPool1d(3),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool3d(1),
        nn.AdaptiveMaxPool2d(2),
    ):
        assert needs_domain_parallel(mod)


def _invalid_task() -> list[dict]:
    """Each invalid pooling on the DTensor (F.* and our API) next to the same call on one device."""
    from credit_dtensor.ops import resample as R
    from credit_dtensor.sharding import shard_tensor
    from tests.harness import manager

    m = manager()
    x = torch.randn(1, 2, 9, 6)
    xd = shard_tensor(x, m, 2)

    def err(fn, t):
        try:
            fn(t)
        except Exception as e:  # noqa: BLE001 - the class is asserted by the test
            return type(e).__name__, str(e)
        return "no error", ""

    out = []
    for fn in (
        lambda t: F.max_pool2d(t, 2, padding=2),
        lambda t: R.max_pool2d(t, 2, padding=2) if isinstance(t, type(xd)) else F.max_pool2d(t, 2, padding=2),
        lambda t: F.avg_pool2d(t, 3, padding=2),
        lambda t: F.max_pool2d(t, 11),
    ):
        out.append({"sharded": err(fn, xd), "single": err(fn, x)})
    return out


def test_invalid_pools_raise_like_pytorch():
    """Every rank raises what PyTorch raises on one device: the same class, and the key words."""
    words = [
        "pad should be at most half",
        "pad should be at most half",
        "pad should be at most half",
        "Output size is too small",
    ]
    for rank, res in enumerate(get_world(2).run(_invalid_task)):
        for w, got in zip(words, res, strict=True):
            assert got["single"][0] == "RuntimeError" and w in got["single"][1], got  # PyTorch's own
            cls, msg = got["sharded"]
            assert cls == got["single"][0] and w in msg, (f"rank {rank}", w, got)


def _leading_dim_task(h: int) -> dict[str, float]:
    """Pools whose input is sharded on a dim they do not pool (1-D pools over W of a ``(B, H, W)``
    field, H their "channels"; 2-D pools of a ``(B, H, Hs, Ws)`` stack): each rank's rows, no
    byte moves (``to_spatial`` sent the shard through an all-to-all and back; DTensor's own backward
    of ``avg_pool1d`` failed), empty shards included."""
    import credit_dtensor as cd
    from credit_dtensor.dtensor import domain_shard_dim
    from credit_dtensor.stats import comm_stats
    from tests.harness import manager

    m = manager()
    g = torch.Generator().manual_seed(h)
    x = torch.randn(2, h, 6, generator=g, dtype=torch.float64)
    out: dict[str, float] = {}
    for name, fn in {
        "avg_pool1d": lambda t: F.avg_pool1d(t, 2),
        "max_pool1d": lambda t: F.max_pool1d(t, 3, 1, 1),
        "max_pool1d_indices": lambda t: F.max_pool1d(t, 2, return_indices=True)[0],
        "adaptive_avg_pool1d": lambda t: F.adaptive_avg_pool1d(t, 4),
        "adaptive_max_pool1d": lambda t: F.adaptive_max_pool1d(t, 4),
        "lp_pool1d": lambda t: F.lp_pool1d(t.abs() + 0.1, 2, 2),
        "avg_pool2d_stack": lambda t: F.avg_pool2d(t.unsqueeze(-1).expand(2, h, 6, 4), 2),
    }.items():
        xr = x.clone().requires_grad_()
        yr = fn(xr)
        gy = torch.randn(yr.shape, generator=g, dtype=yr.dtype)
        yr.backward(gy)
        xs = cd.shard_tensor(x.clone(), m, 1).requires_grad_()
        with cd.gather_policy("raise"), comm_stats() as s:
            y = fn(xs)
            y.backward(cd.shard_tensor(gy, m, domain_shard_dim(y)))
        out[f"{name}: out"] = (cd.gather_tensor(y) - yr).abs().max().item()
        out[f"{name}: grad"] = (cd.gather_tensor(xs.grad) - xr.grad).abs().max().item()
        out[f"{name}: bytes"] = float(s.sent_bytes)
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("h", [4, 13])
def test_pools_of_a_tensor_sharded_on_a_dim_they_do_not_pool(world, h):
    for rank, out in enumerate(get_world(world).run(_leading_dim_task, h)):
        bad = {k: v for k, v in out.items() if not v <= 1e-12}
        assert not bad, (rank, world, h, bad)
