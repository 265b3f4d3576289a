"""Convolution rules vs single-device PyTorch in fp64 (and fp32), worlds 1-4."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conv_cases import run_bytes_case, run_conv_cases
from tests.harness import get_world

WORLDS = [1, 2, 3, 4]

try:
    import credit_dtensor.ops.pad  # noqa: F401  (registers the aten.constant_pad_nd rule)

    _HAS_PAD_RULE = True
except ImportError:
    _HAS_PAD_RULE = False


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
    "convT k3 s2 p1 op1": dict(nd=2, cin=3, cout=2, kernel=3, stride=2, padding=1, output_padding=1,
                               transposed=True, spatial=(7, 5)),
    "convT k1 s3 (gaps)": dict(nd=2, cin=2, cout=2, kernel=1, stride=3, transposed=True, spatial=(5, 4)),
    "convT 2x2 s2": dict(nd=2, cin=2, cout=3, kernel=2, stride=2, transposed=True, spatial=(5, 4)),
    "convT dilated grouped": dict(nd=2, cin=4, cout=4, kernel=3, stride=2, dilation=2, padding=2, groups=2,
                                  transposed=True, spatial=(6, 4)),
    "conv1d": dict(nd=1, cin=2, cout=3, kernel=5, stride=2, padding=2, spatial=(17,)),
    "conv1d circular": dict(nd=1, cin=2, cout=3, kernel=3, padding=1, padding_mode="circular", spatial=(10,)),
    "convT1d": dict(nd=1, cin=2, cout=3, kernel=4, stride=2, padding=1, transposed=True, spatial=(9,)),
    "conv3d patch embed (2,4,4)": dict(nd=3, cin=2, cout=4, kernel=(2, 4, 4), stride=(2, 4, 4), spatial=(4, 16, 8)),
    "conv3d 3x3x3 reflect": dict(nd=3, cin=2, cout=2, kernel=3, padding=1, padding_mode="reflect", spatial=(3, 9, 4)),
    "convT3d patch recovery": dict(nd=3, cin=4, cout=2, kernel=(2, 4, 4), stride=(2, 4, 4), transposed=True,
                                   spatial=(2, 4, 2)),
}


@pytest.mark.parametrize("size", WORLDS)
@pytest.mark.parametrize("path", ["module", "functional"])
def test_named_cases(size, path):
    cases = [dict(c, path=path, name=name) for name, c in NAMED.items()]
    if path == "functional" and not _HAS_PAD_RULE:
        # F.conv2d(padding='same') with an even kernel pads explicitly (aten.constant_pad_nd) first
        cases = [c for c in cases if not (c.get("padding") == "same" and c["name"] == "same even kernel")]
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
    _run(size, cases + [dict(c, path="functional") for c in cases])


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
    case = dict(nd=nd, cin=cin, cout=cout, kernel=kernel, stride=stride, dilation=dilation, groups=groups,
                bias=draw(st.booleans()), batch=draw(st.integers(1, 2)), seed=draw(st.integers(0, 1000)))
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


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(cases=st.lists(conv_case(), min_size=6, max_size=6))
def test_property_all_worlds(cases):
    for size in WORLDS:
        _run(size, cases)


# --- communication volume -------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 4])
def test_bytes_equal_minimum(size):
    cases = [
        dict(nd=2, cin=3, cout=4, kernel=3, padding=1, spatial=(13, 7)),
        dict(nd=2, cin=2, cout=3, kernel=7, stride=4, padding=3, spatial=(23, 9)),
        dict(nd=2, cin=2, cout=3, kernel=3, padding=1, padding_mode="circular", spatial=(9, 6)),
        dict(nd=2, cin=3, cout=2, kernel=4, stride=2, padding=1, transposed=True, spatial=(7, 5)),
    ]
    for case in cases:
        for r in get_world(size).run(run_bytes_case, case):
            assert r["fwd_recv"] == r["min"], (case, r)
            assert r["bwd_sent"] == r["min"], (case, r)  # adjoint: gradient rows go back, nothing more
            assert r["fwd_collectives"] == 0
    # 1x1 conv and aligned patch embedding communicate nothing
    for case in [dict(nd=2, cin=3, cout=4, kernel=1, spatial=(12, 7)),
                 dict(nd=2, cin=2, cout=2, kernel=2, stride=2, spatial=(16, 4))]:
        for r in get_world(size).run(run_bytes_case, case):
            assert r["fwd_recv"] == r["fwd_sent"] == r["bwd_sent"] == 0, (case, r)
