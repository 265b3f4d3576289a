"""Convolution rules vs single-device PyTorch in fp64 (and fp32), worlds 1-4."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from tests.conv_cases import expected_traffic, remote_rows, run_bytes_case, run_conv_cases
from tests.harness import get_world

WORLDS = [1, 2, 3, 4]


def _check(results):
    bad = []
    for r in results:
        worst = {k: v for k, v in r["errors"].items() if not v <= r["tol"]}
        if worst:
            bad.append((r["case"], worst))
    assert not bad, f"{len(bad)} mismatching cases, first: {bad[:3]}"


def _run(size, cases, dtype="float64"):
    results = get_world(size).run(run_conv_cases, cases, dtype)
    for rank_results in results:
        _check(rank_results)


NAMED = {
    "3x3 s1 p1": dict(nd=2, cin=3, cout=4, kernel=3, padding=1, spatial=(13, 7)),
    "4x4 s2 p1": dict(nd=2, cin=3, cout=4, kernel=4, stride=2, padding=1, spatial=(13, 8)),
    "7x7 s4 p3": dict(nd=2, cin=2, cout=3, kernel=7, stride=4, padding=3, spatial=(23, 9)),
    "2x2 s2": dict(nd=2, cin=2, cout=3, kernel=2, stride=2, spatial=(10, 6)),
    "same even kernel": dict(nd=2, cin=2, cout=3, kernel=4, padding="same", spatial=(11, 6)),
    "same dilated": dict(nd=2, cin=2, cout=2, kernel=3, dilation=2, padding="same", spatial=(11, 6)),
    "dilated": dict(nd=2, cin=2, cout=3, kernel=3, dilation=3, padding=2, spatial=(14, 9)),
    "grouped": dict(nd=2, cin=4, cout=6, kernel=3, padding=1, groups=2, spatial=(9, 5)),
    "depthwise": dict(nd=2, cin=4, cout=4, kernel=5, padding=2, groups=4, spatial=(12, 5)),
    "reflect": dict(nd=2, cin=2, cout=3, kernel=3, padding=1, padding_mode="reflect", spatial=(9, 6)),
    "replicate": dict(nd=2, cin=2, cout=3, kernel=5, padding=2, padding_mode="replicate", spatial=(9, 6)),
    "circular": dict(nd=2, cin=2, cout=3, kernel=3, padding=1, padding_mode="circular", spatial=(9, 6)),
    "circular wide": dict(nd=2, cin=2, cout=2, kernel=7, padding=3, padding_mode="circular", spatial=(5, 6)),
    "padding > half kernel": dict(nd=2, cin=2, cout=2, kernel=3, padding=4, spatial=(7, 5)),
    "no bias 1x1": dict(nd=2, cin=3, cout=2, kernel=1, bias=False, spatial=(7, 5)),
    "convT 4x4 s2 p1": dict(nd=2, cin=3, cout=2, kernel=4, stride=2, padding=1, transposed=True, spatial=(7, 5)),
    "convT k3 s2 p1 op1": dict(
        nd=2, cin=3, cout=2, kernel=3, stride=2, padding=1, output_padding=1, transposed=True, spatial=(7, 5)
    ),
    "convT k1 s3 (gaps)": dict(nd=2, cin=2, cout=2, kernel=1, stride=3, transposed=True, spatial=(5, 4)),
    "convT 2x2 s2": dict(nd=2, cin=2, cout=3, kernel=2, stride=2, transposed=True, spatial=(5, 4)),
    "convT dilated grouped": dict(
        nd=2, cin=4, cout=4, kernel=3, stride=2, dilation=2, padding=2, groups=2, transposed=True, spatial=(6, 4)
    ),
    "conv1d": dict(nd=1, cin=2, cout=3, kernel=5, stride=2, padding=2, spatial=(17,)),
    "conv1d circular": dict(nd=1, cin=2, cout=3, kernel=3, padding=1, padding_mode="circular", spatial=(10,)),
    "convT1d": dict(nd=1, cin=2, cout=3, kernel=4, stride=2, padding=1, transposed=True, spatial=(9,)),
    "conv3d patch embed (2,4,4)": dict(nd=3, cin=2, cout=4, kernel=(2, 4, 4), stride=(2, 4, 4), spatial=(4, 16, 8)),
    "conv3d 3x3x3 reflect": dict(nd=3, cin=2, cout=2, kernel=3, padding=1, padding_mode="reflect", spatial=(3, 9, 4)),
    "convT3d patch recovery": dict(
        nd=3, cin=4, cout=2, kernel=(2, 4, 4), stride=(2, 4, 4), transposed=True, spatial=(2, 4, 2)
    ),
}


@pytest.mark.parametrize("size", WORLDS)
@pytest.mark.parametrize("path", ["module", "functional"])
def test_named_cases(size, path):
    """Functional cases keep padding_mode on both sides: F.pad(mode) + F.conv*(padding 0), as
    PyTorch's module does (circular included: the F.pad rule sees it before PyTorch decomposes it)."""
    _run(size, [dict(c, path=path, name=name) for name, c in NAMED.items()])


@pytest.mark.parametrize("size", [1, 3])
def test_named_functional_circular(size):
    cases = [dict(c, path="functional", name=name) for name, c in NAMED.items() if c.get("padding_mode") == "circular"]
    cases.append(
        dict(nd=2, cin=2, cout=2, kernel=3, padding=1, padding_mode="circular", spatial=(2, 4), path="functional")
    )
    _run(size, cases)


@pytest.mark.parametrize("size", [2, 3])
def test_named_cases_fp32(size):
    cases = [dict(c, name=name) for name, c in NAMED.items()]
    _run(size, cases, "float32")


@pytest.mark.parametrize("size", [3, 4])
def test_empty_and_tiny_shards(size):
    cases = [
        dict(nd=2, cin=2, cout=2, kernel=3, padding=1, spatial=(2, 4)),  # H < world: empty shards
        dict(nd=2, cin=2, cout=2, kernel=5, padding=2, spatial=(5, 4)),  # halo wider than shards
        dict(nd=2, cin=2, cout=2, kernel=3, stride=2, padding=1, spatial=(5, 3)),
        dict(nd=2, cin=2, cout=2, kernel=3, padding=1, padding_mode="reflect", spatial=(3, 4)),
        dict(nd=2, cin=2, cout=2, kernel=3, padding=1, padding_mode="circular", spatial=(2, 4)),
        dict(nd=2, cin=2, cout=2, kernel=4, stride=2, padding=1, transposed=True, spatial=(2, 3)),
        dict(nd=2, cin=2, cout=2, kernel=1, spatial=(1, 3)),
    ]
    functional = [dict(c, path="functional") for c in cases]
    _run(size, cases + functional)


# --- property-based -----------------------------------------------------------------------


@st.composite
def conv_case(draw):
    nd = draw(st.sampled_from([1, 2, 2, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 5)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    spatial = []
    for i in range(nd):
        lo = dilation[i] * (kernel[i] - 1) + 1
        spatial.append(draw(st.integers(max(1, lo - 2), lo + 12)))
    case = dict(
        nd=nd,
        cin=cin,
        cout=cout,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 1000)),
    )
    if transposed:
        padding = tuple(draw(st.integers(0, dilation[i] * (kernel[i] - 1))) for i in range(nd))
        out_pad = tuple(draw(st.integers(0, max(stride[i], dilation[i]) - 1)) for i in range(nd))
        case.update(transposed=True, padding=padding, output_padding=out_pad)
        for i in range(nd):  # PyTorch needs a positive output size
            n = spatial[i]
            if (n - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + out_pad[i] + 1 <= 0:
                spatial[i] = n + 2 * padding[i]
    else:
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        if draw(st.booleans()) and all(s == 1 for s in stride):
            padding = draw(st.sampled_from(["same", "valid"]))
        else:
            padding = tuple(draw(st.integers(0, kernel[i] + 1)) for i in range(nd))
        case.update(padding=padding, padding_mode=mode)
        for i in range(nd):
            p = 0 if isinstance(padding, str) else padding[i]
            if isinstance(padding, str) and padding == "same":
                p = dilation[i] * (kernel[i] - 1)
            if mode in ("reflect", "circular"):
                spatial[i] = max(spatial[i], p + 1)
            need = dilation[i] * (kernel[i] - 1) + 1 - (0 if isinstance(padding, str) else 2 * p)
            if padding == "valid":
                need = dilation[i] * (kernel[i] - 1) + 1
            spatial[i] = max(spatial[i], need, 1)
    case["spatial"] = tuple(spatial)
    case["shard_spatial"] = draw(st.integers(0, nd - 1))
    case["path"] = draw(st.sampled_from(["module", "functional"]))
    return case


# No shrinking: every example is a distributed run over 4 worlds, and a failing batch names its cases.
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(cases=st.lists(conv_case(), min_size=6, max_size=6))
def test_property_all_worlds(cases):
    for size in WORLDS:
        _run(size, cases)


# --- communication volume against an independent geometric minimum ------------------------------

#: Extra cases that must move nothing (1x1 conv, patch embedding on stride-aligned shards) or that
#: are the brief's uneven layout (H=13 over 3 is NAMED["3x3 s1 p1"]).
BYTES_EXTRA = {
    "1x1 H=12": dict(nd=2, cin=3, cout=4, kernel=1, spatial=(12, 7)),
    "patch 2x2 s2 aligned": dict(nd=2, cin=2, cout=2, kernel=2, stride=2, spatial=(16, 4)),
    "reflect H=13": dict(nd=2, cin=2, cout=3, kernel=5, padding=2, padding_mode="reflect", spatial=(13, 4)),
}


def _check_traffic(case: dict, world: int, results: list[dict]) -> None:
    """Per rank and per op label: forward receives exactly the rows its output chunk reads from
    other ranks and sends exactly the rows others read from it (``expected_traffic``, derived from
    the single-device op only); backward is the adjoint (each received row's gradient goes back);
    no collective, on the module and the functional path alike (one autograd node each)."""
    exp = expected_traffic(case, world)
    for r, res in enumerate(results):
        f, b = res["fwd"], res["bwd"]
        ctx = (case.get("name", case), f"rank {r} of {world}", exp, res)
        assert not res["grad_is_none"], ctx
        assert f["collectives"] == 0 and b["collectives"] == 0, ctx
        assert f["recv"] == sum(e["recv"][r] for e in exp.values()), ctx
        assert f["sent"] == sum(e["sent"][r] for e in exp.values()), ctx
        bwd_total = {"sent": 0, "recv": 0}
        for label, e in exp.items():
            got = f["by_op"].get(label, {"recv": 0, "sent": 0})
            assert got == {"recv": e["recv"][r], "sent": e["sent"][r]}, (label, ctx)
            gb = b["by_op"].get(label, {"recv": 0, "sent": 0})
            adjoint = {"sent": e["recv"][r], "recv": e["sent"][r]}
            assert gb == adjoint, (label, "backward is not the adjoint of forward", ctx)
            bwd_total = {k: bwd_total[k] + gb[k] for k in bwd_total}
        assert {"sent": b["sent"], "recv": b["recv"]} == bwd_total, ctx  # no traffic under other labels


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("path", ["module", "functional"])
def test_bytes_equal_independent_minimum(size, path):
    """Bytes received/sent by our conv == the geometric minimum derived from PyTorch's own op
    (``conv_cases.remote_rows``), forward and backward, on every rank."""
    cases = [dict(c, name=name, path=path) for name, c in {**NAMED, **BYTES_EXTRA}.items()]
    results = get_world(size).run(_bytes_cases, cases)
    for i, case in enumerate(cases):
        _check_traffic(case, size, [rank[i] for rank in results])
    if size == 3:  # the minimum is not trivially zero: H=13 over 3 moves rows both ways
        exp = expected_traffic(dict(NAMED["3x3 s1 p1"], path=path), 3)
        assert exp["conv2d"]["recv"] == [i * 2 * 3 * 7 * 8 for i in (1, 2, 1)]  # B*C*W*8 bytes a row


def _bytes_cases(cases: list[dict]) -> list[dict]:
    return [run_bytes_case(c) for c in cases]


#: Dilation (or a stride larger than the kernel) leaves rows between the taps that no output of a
#: rank's chunk reads: they must not be fetched.
GAP_CASES = [
    dict(nd=2, cin=2, cout=2, kernel=3, stride=2, dilation=2, padding=1, spatial=(14, 5)),  # H: min [1,1], got [1,2]
    dict(nd=1, cin=2, cout=2, kernel=2, stride=2, dilation=3, padding=0, spatial=(4,), padding_mode="reflect"),
]


@pytest.mark.parametrize("i", range(len(GAP_CASES)))
def test_bytes_minimal_with_dilation_gaps(i):
    case = dict(GAP_CASES[i], path="module")
    world = 2 if case["nd"] == 2 else 3
    results = get_world(world).run(_bytes_cases, [case])
    _check_traffic(case, world, [rank[0] for rank in results])


# --- the plans themselves against the same probe, many configurations, no processes ----------


@st.composite
def conv1d_config(draw, gaps: bool):
    k, s = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    d = draw(st.integers(1, 3)) if gaps else 1
    if not gaps and k < s:
        k, s = s, k  # no gap between the rows consecutive outputs read
    n, world = draw(st.integers(1, 20)), draw(st.integers(2, 5))
    if draw(st.booleans()):
        p = draw(st.integers(0, d * (k - 1)))
        op = draw(st.integers(0, max(s, d) - 1))
        cfg = dict(
            nd=1,
            cin=1,
            cout=1,
            kernel=k,
            stride=s,
            dilation=d,
            padding=p,
            output_padding=op,
            transposed=True,
            spatial=(n,),
            bias=False,
        )
        assume((n - 1) * s - 2 * p + d * (k - 1) + op + 1 > 0)
    else:
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        p = draw(st.integers(0, k + 1))
        assume(not (mode == "reflect" and p >= n) and not (mode == "circular" and p > n))
        assume(n + 2 * p - d * (k - 1) - 1 >= 0)
        cfg = dict(
            nd=1, cin=1, cout=1, kernel=k, stride=s, dilation=d, padding=p, padding_mode=mode, spatial=(n,), bias=False
        )
    return cfg, world


def _plan_vs_probe(cfg: dict, world: int) -> tuple[list[int], list[int]]:
    from credit_dtensor.ops.conv import conv_spec_from_module, halo_rows
    from tests.conv_cases import make_module

    mod = make_module(cfg).double()
    with torch.no_grad():
        mod.weight.fill_(1.0)
    n = cfg["spatial"][0]
    probe = remote_rows(mod, (1, 1, n), 2, world)["recv"]
    plan = [halo_rows(conv_spec_from_module(mod), 0, n, world, r) for r in range(world)]
    return probe, plan


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(conv1d_config(gaps=False))
def test_plan_rows_equal_independent_minimum(cfg_world):
    """Without gaps between taps (dilation 1, kernel >= stride) every plan receives exactly the
    rows PyTorch's own op reads across shard boundaries: strides, paddings, modes, transposed,
    output_padding, uneven and empty shards, worlds 2-5."""
    probe, plan = _plan_vs_probe(*cfg_world)
    assert plan == probe, cfg_world


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
@given(conv1d_config(gaps=True))
def test_plan_rows_equal_independent_minimum_with_gaps(cfg_world):
    probe, plan = _plan_vs_probe(*cfg_world)
    assert plan == probe, cfg_world
