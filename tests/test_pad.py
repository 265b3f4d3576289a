"""Exact F.pad / padding modules on sharded DTensors vs the single-device op (forward + input grad).

Configurations come from hypothesis in the parent process and run in batches on gloo worlds 1-4
(uneven and empty shards arise from small H). Three entry points: ``credit_dtensor.ops.pad.pad``,
``F.pad`` on a DTensor (aten rules; not for circular, which PyTorch decomposes above DTensor) and
the module wrappers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.harness import get_world, manager
from tests.parity import assert_parity, parity

MODULES = {
    ("constant", 1): nn.ConstantPad1d,
    ("constant", 2): nn.ConstantPad2d,
    ("constant", 3): nn.ConstantPad3d,
    ("zero", 1): nn.ZeroPad1d,
    ("zero", 2): nn.ZeroPad2d,
    ("zero", 3): nn.ZeroPad3d,
    ("reflect", 1): nn.ReflectionPad1d,
    ("reflect", 2): nn.ReflectionPad2d,
    ("reflect", 3): nn.ReflectionPad3d,
    ("replicate", 1): nn.ReplicationPad1d,
    ("replicate", 2): nn.ReplicationPad2d,
    ("replicate", 3): nn.ReplicationPad3d,
    ("circular", 1): nn.CircularPad1d,
    ("circular", 2): nn.CircularPad2d,
    ("circular", 3): nn.CircularPad3d,
}


def _make_module(mode: str, pad: tuple[int, ...], value: float | None) -> nn.Module:
    k = len(pad) // 2
    if mode == "constant" and value == 0.0:
        return MODULES[("zero", k)](pad)
    if mode == "constant":
        return MODULES[("constant", k)](pad, value)
    return MODULES[(mode, k)](pad)


def _pad_one(m, c: dict) -> dict:
    from credit_dtensor.nn.pad import pad_wrapper_for
    from credit_dtensor.ops.pad import pad

    dtype = torch.float64 if c["dtype"] == "f64" else torch.float32
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["shape"], generator=g, dtype=dtype)
    mode, p, value, dim = c["mode"], c["pad"], c["value"], c["dim"]
    kw = {"value": value} if mode == "constant" else {}

    def ref(t):
        return F.pad(t, p, mode=mode, **kw)

    if c["path"] == "api":

        def fn(t):
            return pad(t, p, mode, value)

    elif c["path"] == "functional":
        fn = ref
    else:
        mod = _make_module(mode, p, value)
        fn = pad_wrapper_for(mod)(mod, m)
    errs = parity(m, ref, fn, [x], shard_dims=[dim], out_dim=dim)
    assert_parity(errs, dtype, c)
    return errs


def _pad_task(cases: list[dict]) -> list[dict]:
    m = manager()
    return [_pad_one(m, c) for c in cases]


def _valid(shape, pad, mode, value) -> bool:
    from credit_dtensor.geometry.pad import check_pad, split_pad

    try:
        for d, (lo, hi) in split_pad(pad, len(shape)).items():
            check_pad(shape[d], lo, hi, mode)
            if shape[d] + lo + hi < 1:
                return False
        F.pad(torch.zeros(shape), list(pad), mode=mode, **({"value": value} if mode == "constant" else {}))
    except (ValueError, RuntimeError, NotImplementedError):
        return False
    return True


@st.composite
def pad_case(draw, path: str):
    modes = ["constant", "reflect", "replicate"] + ([] if path == "functional" else ["circular"])
    mode = draw(st.sampled_from(modes))
    ndim = draw(st.sampled_from([3, 4, 5]))
    k = draw(st.integers(1, ndim - 2))  # padded trailing dims (the module form pads k dims)
    if mode != "constant" and path != "module":
        k = min(k, 3)
    shape = [draw(st.integers(1, 2)), draw(st.integers(1, 2))] + [draw(st.integers(1, 9)) for _ in range(ndim - 2)]
    h = ndim - 2 if ndim >= 4 else ndim - 1
    shape[h] = draw(st.integers(1, 13))
    dim = draw(st.sampled_from([h] * 6 + [ndim - 1, 0]))
    if path == "module":
        # modules want exactly k+1 or k+2 dims: use k = ndim - 2
        k = ndim - 2
    pad = []
    for i in range(k):
        n = shape[ndim - 1 - i]
        pad += [draw(st.integers(-min(n - 1, 3), min(n + 2, 6))), draw(st.integers(-min(n - 1, 3), min(n + 2, 6)))]
    value = draw(st.sampled_from([0.0, 1.5, -2.0])) if mode == "constant" else None
    from hypothesis import assume

    assume(_valid(shape, pad, mode, value))
    return dict(
        shape=tuple(shape),
        dim=dim,
        pad=tuple(pad),
        mode=mode,
        value=value,
        path=path,
        dtype=draw(st.sampled_from(["f64", "f64", "f32"])),
        seed=draw(st.integers(0, 10**6)),
    )


HSET = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: a failing batch names its case
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("path", ["api", "functional", "module"])
@HSET
@given(data=st.data())
def test_pad_parity(world, path, data):
    cases = data.draw(st.lists(pad_case(path), min_size=6, max_size=6))
    get_world(world).run(_pad_task, cases)


# ------------------------------------------------------------------------------------------------
# Named cases
# ------------------------------------------------------------------------------------------------


def _named_cases() -> list[dict]:
    base = dict(dtype="f64", seed=7, value=None)
    return [
        # periodic-conv pattern: circular on W (local) + reflect on H (halo)
        dict(base, shape=(2, 3, 10, 8), dim=2, pad=(1, 1, 0, 0), mode="circular", path="module"),
        dict(base, shape=(2, 3, 10, 8), dim=2, pad=(0, 0, 1, 1), mode="reflect", path="module"),
        # circular on H wraps the last rank to the first
        dict(base, shape=(1, 2, 9, 4), dim=2, pad=(2, 2, 3, 3), mode="circular", path="api"),
        # tiny H over 4 ranks: empty shards on both sides of the pad
        dict(base, shape=(1, 1, 2, 3), dim=2, pad=(0, 0, 1, 1), mode="replicate", path="api"),
        dict(base, shape=(1, 1, 1, 3), dim=2, pad=(0, 0, 0, 3), mode="replicate", path="functional"),
        dict(base, shape=(1, 1, 5, 3), dim=2, pad=(0, 0, -3, 1), mode="constant", value=2.5, path="functional"),
        dict(base, shape=(2, 1, 6, 3), dim=2, pad=(1, 1, 2, -1), mode="circular", path="api"),
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pad_named(world):
    get_world(world).run(_pad_task, _named_cases())


def _bytes_task(shape, pad, mode, dim) -> dict:
    from credit_dtensor import comm_stats
    from credit_dtensor.ops.pad import pad as dpad
    from credit_dtensor.sharding import shard_tensor

    m = manager()
    x = torch.randn(shape, dtype=torch.float64)
    xd = shard_tensor(x, m, dim).requires_grad_()
    with comm_stats() as fwd:
        y = dpad(xd, pad, mode)
    with comm_stats() as bwd:
        y.backward(torch.ones_like(y))
    return dict(
        fwd_recv=fwd.recv_bytes,
        fwd_sent=fwd.sent_bytes,
        bwd_sent=bwd.sent_bytes,
        bwd_recv=bwd.recv_bytes,
        by_op=sorted(fwd.by_op),
        shape=tuple(y.shape),
        placements=tuple(y.placements),
        local_rows=y.to_local().shape[dim],
        grad_placements=tuple(xd.grad.placements),
    )


def _expected_rows(shape, pad, mode, dim, world) -> tuple[list[int], list[int]]:
    """Independent of our geometry: pad an index ramp with PyTorch; per rank, the rows of other
    ranks its output chunk reads (received) and its own rows other ranks read (sent, per reader)."""
    n = shape[dim]
    ramp = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)  # pad along the last dim
    lo, hi = pad[2 * (len(shape) - 1 - dim)], pad[2 * (len(shape) - 1 - dim) + 1]
    src = F.pad(ramp, (lo, hi), mode=mode, **({"value": -1.0} if mode == "constant" else {})).flatten().long()
    out_chunks = torch.arange(len(src)).chunk(world)
    in_chunks = torch.arange(n).chunk(world)
    owned, reads = [], []
    for r in range(world):
        owned.append(set(in_chunks[r].tolist()) if r < len(in_chunks) else set())
        mine = set(src[out_chunks[r]].tolist()) if r < len(out_chunks) else set()
        reads.append({s for s in mine if s >= 0})
    recv = [len(reads[r] - owned[r]) for r in range(world)]
    sent = [sum(len(reads[d] & owned[r]) for d in range(world) if d != r) for r in range(world)]
    return recv, sent


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize(
    "shape,pad,mode",
    [
        ((2, 3, 10, 5), (0, 0, 2, 3), "reflect"),
        ((2, 3, 10, 5), (1, 1, 3, 3), "circular"),
        ((1, 2, 7, 4), (0, 0, 2, 2), "constant"),
        ((1, 2, 7, 4), (0, 0, 4, 0), "replicate"),
    ],
)
def test_pad_bytes_are_minimal(world, shape, pad, mode):
    dim = 2
    from torch.distributed.tensor import Shard

    res = get_world(world).run(_bytes_task, shape, pad, mode, dim)
    rows, sent = _expected_rows(shape, pad, mode, dim, world)
    row_bytes = shape[0] * shape[1] * shape[3] * 8  # rows travel before W is padded
    assert [r["fwd_recv"] for r in res] == [k * row_bytes for k in rows]
    assert [r["fwd_sent"] for r in res] == [k * row_bytes for k in sent]
    # backward sends each received row's gradient back and receives each sent row's, nothing more
    assert [r["bwd_sent"] for r in res] == [k * row_bytes for k in rows]
    assert [r["bwd_recv"] for r in res] == [k * row_bytes for k in sent]
    if any(rows):
        assert all(r["by_op"] in (["pad"], []) for r in res)
    # the result is F.pad's global shape, H-sharded by torch.chunk on every rank (input grad too)
    full = F.pad(torch.empty(shape), pad, mode=mode).shape
    chunks = [len(c) for c in torch.arange(full[dim]).chunk(world)]
    for r, got in enumerate(res):
        assert got["shape"] == tuple(full) and got["placements"] == (Shard(dim),), (r, got)
        assert got["local_rows"] == (chunks[r] if r < len(chunks) else 0), (r, got)
        assert got["grad_placements"] == (Shard(dim),), (r, got)


def _error_of(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the class is asserted by the caller
        return type(e).__name__, str(e)
    return "no error", ""


#: (pad, mode) that F.pad rejects for H=5, and what the message must say
INVALID = [
    ((0, 0, 6, 0), "circular", "wrapping around more than once"),
    ((0, 0, 5, 0), "reflect", "Padding size should be less than the corresponding input dimension"),
    ((0, 0, -6, 0), "constant", "length must be non-negative"),
]


def _errors_task() -> list[dict]:
    """Each invalid pad through our API and through F.pad on the DTensor, next to what F.pad
    raises for the same global shape on one device."""
    from credit_dtensor.ops.pad import pad
    from credit_dtensor.sharding import shard_tensor

    m = manager()
    x = torch.randn(1, 1, 5, 3)
    xd = shard_tensor(x, m, 2)
    out = []
    for p, mode, _ in INVALID:
        out.append(
            dict(
                api=_error_of(lambda p=p, mode=mode: pad(xd, p, mode)),
                functional=_error_of(lambda p=p, mode=mode: F.pad(xd, p, mode)),
                single=_error_of(lambda p=p, mode=mode: F.pad(x, p, mode)),
            )
        )
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_pad_invalid_configs_raise(world):
    """Every rank raises PyTorch's own error (the class and the key words F.pad raises on one
    device) for pads PyTorch rejects, on both entry points; never a silent result or another
    exception."""
    for rank, res in enumerate(get_world(world).run(_errors_task)):
        for (p, mode, words), got in zip(INVALID, res):
            assert got["single"][0] == "RuntimeError" and words in got["single"][1], (p, mode, got)  # PyTorch's
            for path in ("api", "functional"):
                cls, msg = got[path]
                assert cls == "RuntimeError" and words in msg, (f"rank {rank}", path, p, mode, got)


# ------------------------------------------------------------------------------------------------
# Converter pattern: a padding module followed by a padding=0 convolution, plain-tensor inputs
# ------------------------------------------------------------------------------------------------


def _pad_conv_task(layers: list[str], hs: tuple[int, ...]) -> list[dict]:
    return [_pad_conv_one(layers, h) for h in hs]


def _pad_conv_one(layers: list[str], h: int) -> dict:
    import copy

    from credit_dtensor.nn.conv import DomainParallelConv2d
    from credit_dtensor.nn.pad import pad_wrapper_for

    m = manager()
    torch.manual_seed(0)
    mods = []
    for name in layers:
        if name == "conv":
            mods.append(nn.Conv2d(3, 4, 3, padding=0, dtype=torch.float64))
        else:
            mods.append(eval(name))  # e.g. "nn.ZeroPad2d((1, 1, 2, 0))"
    ref = nn.Sequential(*mods)
    dist = copy.deepcopy(ref)
    for i, mod in enumerate(dist):
        wrapper = DomainParallelConv2d if isinstance(mod, nn.Conv2d) else pad_wrapper_for(mod)
        dist[i] = wrapper(mod, m)
    x = torch.randn(2, 3, h, 7, dtype=torch.float64)
    conv_ref, conv_dist = ref[len(ref) - 1], dist[len(dist) - 1]
    errs = parity(
        m,
        ref,
        dist,
        [x],
        shard_dims=[2],
        out_dim=2,
        ref_params={"w": conv_ref.weight, "b": conv_ref.bias},
        dist_params={"w": conv_dist.weight, "b": conv_dist.bias},
    )
    assert_parity(errs, torch.float64, layers)
    # a plain (unsharded) input is sharded on H by the first wrapper
    y = dist(x.clone())
    assert (y.full_tensor() - ref(x)).abs().max() < 1e-12
    return errs


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "layers",
    [
        ["nn.ZeroPad2d((1, 1, 2, 0))", "conv"],
        ["nn.ZeroPad2d(1)", "conv"],
        ["nn.CircularPad2d((1, 1, 0, 0))", "nn.ReflectionPad2d((0, 0, 1, 1))", "conv"],  # periodic lon, pole
        ["nn.ReplicationPad2d((0, 0, 3, 1))", "conv"],
    ],
)
def test_pad_then_conv(world, layers):
    get_world(world).run(_pad_conv_task, layers, (9, 4))


def test_needs_domain_parallel_pads():
    from credit_dtensor.nn.pad import needs_domain_parallel

    for mod in (
        nn.ZeroPad2d(1),
        nn.ConstantPad3d(1, 2.0),
        nn.ReflectionPad1d(2),
        nn.ReplicationPad2d(1),
        nn.CircularPad2d((1, 1, 0, 0)),
    ):
        assert needs_domain_parallel(mod)
    for mod in (nn.Conv2d(1, 1, 3), nn.MaxPool2d(2), nn.Identity()):
        assert not needs_domain_parallel(mod)
