"""Exact interpolate / nn.Upsample and pixel (un)shuffle on sharded DTensors vs one device.

Hypothesis draws configurations (mode, size or scale factor incl. non-integer, align_corners,
recompute_scale_factor, 3-D/4-D/5-D, sharded dim, dtype) in the parent; each example runs a batch
of them on a gloo world of 1-4 ranks through one entry point (public function, ``F.*`` on the
DTensor = aten rules, or the module wrapper), forward and input gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from tests.harness import get_world, manager
from tests.resample_cases import bytes_task, expected_recv_rows, read_matrix, row_bytes, run_cases

NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # a failing batch reports at once
HSET = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    phases=NO_SHRINK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

MODES = {
    3: ["nearest", "nearest-exact", "linear", "area"],
    4: ["nearest", "nearest-exact", "bilinear", "bicubic", "area"],
    5: ["nearest", "nearest-exact", "trilinear", "area"],
}


def _valid_interp(shape, kw, path) -> bool:
    try:
        y = F.interpolate(torch.empty(shape, device="meta"), **kw)
    except (ValueError, RuntimeError, NotImplementedError, TypeError, ZeroDivisionError):
        return False
    if path == "functional" and kw["mode"] == "area" and all(s == 1 for s in y.shape[2:]):
        return False  # PyTorch computes this as a mean: exact Partial(avg) output, not our rule
    return min(y.shape) > 0


@st.composite
def interp_case(draw, path: str):
    ndim = draw(st.sampled_from([3, 4, 4, 5]))
    mode = draw(st.sampled_from(MODES[ndim]))
    nd = ndim - 2
    shape = [draw(st.integers(1, 2)), draw(st.integers(1, 2))] + [draw(st.integers(1, 5)) for _ in range(nd)]
    h = ndim - 2 if ndim >= 4 else 2
    shape[h] = draw(st.integers(1, 11))
    dim = draw(st.sampled_from([h, h, h, ndim - 1, 2]))
    kw: dict = {"mode": mode}
    if draw(st.booleans()):
        kw["size"] = tuple(draw(st.integers(1, 2 * s + 3)) for s in shape[2:])
        if nd == 1 and draw(st.booleans()):
            kw["size"] = kw["size"][0]
    else:
        factors = st.sampled_from([2.0, 0.5, 1.5, 3.0, 0.7, 2.5, 1.3, 1 / 3, 2.2, 1.1])
        kw["scale_factor"] = draw(factors) if draw(st.booleans()) else tuple(draw(factors) for _ in range(nd))
        if mode != "area":
            kw["recompute_scale_factor"] = draw(st.sampled_from([None, True, False]))
    if mode in ("linear", "bilinear", "trilinear", "bicubic"):
        kw["align_corners"] = draw(st.booleans())
    shape = tuple(shape)
    assume(_valid_interp(shape, kw, path))
    return dict(
        op="interpolate",
        kw=kw,
        shape=shape,
        dim=dim,
        path=path,
        dtype=draw(st.sampled_from(["f64", "f64", "f32"])),
        seed=draw(st.integers(0, 10**6)),
    )


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("path", ["api", "functional", "module"])
@HSET
@given(data=st.data())
def test_interpolate_parity(world, path, data):
    cases = data.draw(st.lists(interp_case(path), min_size=8, max_size=8))
    get_world(world).run(run_cases, cases)


@st.composite
def pixel_case(draw, path: str):
    r = draw(st.sampled_from([2, 3]))
    shuffle = draw(st.booleans())
    lead = [draw(st.integers(1, 2)) for _ in range(draw(st.sampled_from([1, 1, 2])))]
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 4))
    if shuffle:
        shape = (*lead, draw(st.integers(1, 2)) * r * r, h, w)
        op, kw = "pixel_shuffle", {"upscale_factor": r}
    else:
        shape = (*lead, draw(st.integers(1, 2)), h * r, w * r)
        op, kw = "pixel_unshuffle", {"downscale_factor": r}
    dim = draw(st.sampled_from([len(shape) - 2, len(shape) - 2, len(shape) - 1]))
    return dict(
        op=op,
        kw=kw,
        shape=shape,
        dim=dim,
        path=path,
        dtype=draw(st.sampled_from(["f64", "f32"])),
        seed=draw(st.integers(0, 10**6)),
    )


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("path", ["api", "functional", "module"])
@settings(
    max_examples=2, deadline=None, derandomize=True, phases=NO_SHRINK, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_pixel_shuffle_parity(world, path, data):
    cases = data.draw(st.lists(pixel_case(path), min_size=8, max_size=8))
    get_world(world).run(run_cases, cases)


# ------------------------------------------------------------------------------------------------
# Named real-world cases
# ------------------------------------------------------------------------------------------------

UNET = [
    dict(op="interpolate", kw={"scale_factor": 2, "mode": "nearest"}),
    dict(op="interpolate", kw={"scale_factor": 2, "mode": "bilinear", "align_corners": False}),
    dict(op="interpolate", kw={"scale_factor": 2, "mode": "bilinear", "align_corners": True}),
    dict(op="interpolate", kw={"size": (19, 7), "mode": "bicubic", "align_corners": False}),
    # CREDIT-style resolution change (721 -> 640 rows at small scale: 13 -> 11)
    dict(op="interpolate", kw={"size": (11, 9), "mode": "bilinear", "align_corners": False}),
    dict(op="interpolate", kw={"size": (5, 3), "mode": "area"}),
    dict(op="pixel_shuffle", kw={"upscale_factor": 2}),
]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [10, 13, 3])
def test_named_unet_cases(world, h):
    cases = []
    for i, c in enumerate(UNET):
        for path in ("api", "functional", "module"):
            shape = (2, 8 if c["op"] == "pixel_shuffle" else 3, h, 6)
            cases.append(dict(c, shape=shape, dim=2, path=path, dtype="f64", seed=i))
        cases.append(dict(c, shape=shape, dim=2, path="api", dtype="f32", seed=i))
    get_world(world).run(run_cases, cases)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("i", range(len(UNET) - 1))
def test_interpolate_bytes_are_minimal(world, i):
    """Each rank receives exactly the input rows its output chunk reads (PyTorch's own one-hot
    probe says which), once, and sends their gradients back in backward."""
    c = UNET[i]
    shape, dim = (2, 3, 10, 6), 2
    kw_h = dict(c["kw"])
    if "size" in kw_h:
        kw_h["size"] = (kw_h["size"][0], 1)
    else:
        kw_h["scale_factor"] = (kw_h["scale_factor"], 1.0)
    reads = read_matrix("interpolate", kw_h, shape[dim])
    res = get_world(world).run(bytes_task, c["op"], c["kw"], shape, dim)
    rows = expected_recv_rows(reads, world)
    assert [r["fwd_recv"] for r in res] == [k * row_bytes(shape, dim) for k in rows]
    assert [r["bwd_sent"] for r in res] == [k * row_bytes(shape, dim) for k in rows]
    if world == 3 and c["kw"]["mode"] != "area":
        assert any(rows)  # H=10 over 3 ranks: these modes read across a shard boundary


def test_pixel_unshuffle_bytes_are_minimal():
    shape, dim, world = (1, 2, 12, 4), 2, 4  # in 3,3,3,3 -> out 2,2,1,1: rows move across ranks
    res = get_world(world).run(bytes_task, "pixel_unshuffle", {"downscale_factor": 2}, shape, dim)
    reads = torch.zeros(6, 12, dtype=torch.bool)
    for o in range(6):
        reads[o, 2 * o : 2 * o + 2] = True
    rows = expected_recv_rows(reads, world)
    assert [r["fwd_recv"] for r in res] == [k * row_bytes(shape, dim) for k in rows]
    assert sum(rows) > 0


# ------------------------------------------------------------------------------------------------
# Errors and detection
# ------------------------------------------------------------------------------------------------


def _errors_task() -> list[tuple[str, str]]:
    from credit_dtensor.ops import resample as R
    from credit_dtensor.sharding import shard_tensor

    m = manager()
    x = shard_tensor(torch.randn(1, 2, 8, 6), m, 2)
    out = []
    for fn in (
        lambda: R.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True),
        lambda: F.interpolate(x, scale_factor=0.5, mode="bicubic", antialias=True),
        lambda: R.pixel_shuffle(shard_tensor(torch.randn(1, 8, 4, 4), m, 1), 2),
        lambda: R.pixel_unshuffle(shard_tensor(torch.randn(1, 2, 5, 4), m, 2), 2),
    ):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the class is asserted by the test
            out.append((type(e).__name__, str(e)))
        else:
            out.append(("no error", ""))
    return out


def test_unsupported_configs_raise_clear_errors():
    """Every rank raises our error class with a message naming the constraint and the fix."""
    expect = [
        ("DomainParallelError", ("antialias", "not supported", "antialias=False")),
        ("DomainParallelError", ("antialias", "not supported", "antialias=False")),
        ("UnsupportedShardingError", ("pixel_shuffle", "channel dim 1", "shard on H")),
        ("DomainParallelError", ("pixel_unshuffle", "H=5", "not divisible by downscale_factor=2")),
    ]
    for rank, msgs in enumerate(get_world(2).run(_errors_task)):
        for (cls, words), (got_cls, msg) in zip(expect, msgs, strict=True):
            assert got_cls == cls and all(w in msg for w in words), (f"rank {rank}", cls, words, got_cls, msg)


def test_needs_domain_parallel():
    from torch import nn

    from credit_dtensor.nn.resample import needs_domain_parallel, resample_wrapper_for

    for mod in (
        nn.Upsample(scale_factor=2),
        nn.UpsamplingBilinear2d(scale_factor=2),
        nn.MaxPool2d(2),
        nn.AvgPool3d(2),
        nn.AdaptiveAvgPool2d(3),
        nn.AdaptiveMaxPool1d(2),
        nn.PixelShuffle(2),
        nn.PixelUnshuffle(2),
    ):
        assert needs_domain_parallel(mod), mod
        assert resample_wrapper_for(mod) is not None
    for mod in (nn.Conv2d(1, 1, 3), nn.ReLU(), nn.ZeroPad2d(1)):
        assert not needs_domain_parallel(mod)


QUIRKS = [  # PyTorch's backward is not its forward's adjoint here; we reproduce both
    dict(op="interpolate", kw={"scale_factor": 1.1, "mode": "bicubic"}, shape=(1, 2, 9, 5)),  # no size change
    dict(op="interpolate", kw={"scale_factor": (1.1, 1.5), "mode": "bicubic"}, shape=(1, 2, 9, 5)),
    dict(op="interpolate", kw={"scale_factor": (1.5, 1.1), "mode": "bicubic"}, shape=(1, 2, 9, 5)),
    dict(op="interpolate", kw={"scale_factor": 2.2, "mode": "nearest"}, shape=(1, 2, 7)),  # out == 2*in, 1-D
    dict(op="interpolate", kw={"scale_factor": 1.1, "mode": "nearest"}, shape=(1, 2, 3, 9, 4)),  # out == in, 3-D
    dict(op="interpolate", kw={"scale_factor": 2.2, "mode": "nearest"}, shape=(1, 2, 7, 4)),  # 2-D shortcuts
]


@pytest.mark.parametrize("world", [2, 3])
def test_pytorch_nearest_and_bicubic_quirks(world):
    cases = [
        dict(c, dim=len(c["shape"]) - 2 if len(c["shape"]) > 3 else 2, path=p, dtype="f64", seed=i)
        for i, c in enumerate(QUIRKS)
        for p in ("api", "functional")
    ]
    get_world(world).run(run_cases, cases)


def _plain_input_task() -> list[float]:
    from torch import nn

    from credit_dtensor.nn.resample import resample_wrapper_for

    m = manager()
    errs = []
    for mod, shape in (
        (nn.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 7, 5)),
        (nn.MaxPool2d(3, 2, 1), (2, 3, 9, 6)),
        (nn.MaxPool1d(2), (2, 3, 9)),
        (nn.PixelUnshuffle(2), (1, 2, 6, 4)),
        (nn.AdaptiveAvgPool3d((2, 3, 2)), (1, 2, 3, 7, 4)),
    ):
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # same on all ranks
        ref = mod(x)
        out = resample_wrapper_for(mod)(mod, m)(x)  # a plain input is sharded on H (dim -2; -1 for 3-D)
        errs.append((out.full_tensor() - ref).abs().max().item())
    return errs


def test_wrappers_accept_plain_tensors():
    for errs in get_world(3).run(_plain_input_task):
        assert max(errs) < 1e-12, errs
