"""Pure geometry of resampling and padding (no processes): every index/weight map is compared with
PyTorch's own single-device kernel, probed with one-hot inputs (so the probe *is* the truth)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from credit_dtensor.geometry.pad import check_pad, pad_out_len, pad_sources, split_pad
from credit_dtensor.geometry.resample import (
    adaptive_range,
    avg_pool_taps,
    interp_taps,
    pixel_shuffle_rows,
    pixel_unshuffle_rows,
    pool_first_real,
    pool_out_len,
    pool_window,
    taps_rows,
)

SET = settings(max_examples=150, deadline=None, derandomize=True)


def _one_hot(n: int, dtype=torch.float64) -> torch.Tensor:
    """Batch of one-hot rows along H: output[:, :, o, 0] of an op is column i's weight."""
    return torch.eye(n, dtype=dtype).reshape(n, 1, n, 1)


def _matrix(taps_of, n_out: int, n_in: int) -> torch.Tensor:
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        for r, w in taps_of(o):
            m[o, r] += w
    return m


# ------------------------------------------------------------------------------------------------
# interpolation
# ------------------------------------------------------------------------------------------------


@st.composite
def interp_case(draw):
    mode = draw(st.sampled_from(["nearest", "nearest-exact", "bilinear", "bicubic", "area"]))
    n_in = draw(st.integers(1, 40))
    use_scale = mode != "area" and draw(st.booleans())
    if use_scale:
        scale = draw(st.sampled_from([0.5, 2.0, 3.0, 1.5, 0.3, 2.7, 1.1, 0.9, 4.0, 1 / 3, 2.2, 0.75, 1.25, 1.7]))
        n_out = int(n_in * scale)
        if n_out < 1:
            scale, n_out = 2.0, 2 * n_in
    else:
        scale, n_out = None, draw(st.integers(1, 70))
    ac = draw(st.booleans()) if mode in ("bilinear", "bicubic") else None
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return mode, n_in, n_out, scale, ac, dtype


@SET
@given(interp_case())
def test_interp_taps_match_pytorch(case):
    mode, n_in, n_out, scale, ac, dtype = case
    kw = {"align_corners": ac} if ac is not None else {}
    if scale is None:
        y = F.interpolate(_one_hot(n_in, dtype), size=(n_out, 1), mode=mode, **kw)
    else:
        y = F.interpolate(_one_hot(n_in, dtype), scale_factor=(scale, 1.0), mode=mode, **kw)
    truth = y[:, 0, :, 0].T.double()  # (n_out, n_in)
    assert truth.shape == (n_out, n_in)
    single = dtype != torch.float64
    got = _matrix(lambda o: interp_taps(mode, o, n_in, n_out, ac, scale, single), n_out, n_in).to(dtype).double()
    if mode in ("nearest", "nearest-exact", "area"):
        assert torch.equal(got, truth), (got - truth).abs().max()
    else:  # bit-exact on x86-64 builds; allow an ulp for other compilers' contractions
        assert (got - truth).abs().max() <= (1e-15 if dtype == torch.float64 else 5e-7)


def test_nearest_uses_float_scale_and_special_cases():
    # out == 2 * in takes the shift path even when the user's scale says otherwise
    assert [interp_taps("nearest", o, 3, 6, None, 2.2, False)[0][0] for o in range(6)] == [0, 0, 1, 1, 2, 2]
    # a user scale (recompute_scale_factor=False) is used as-is: 1/0.3 for 10 -> 3
    y = F.interpolate(torch.arange(10.0).reshape(1, 1, 10), scale_factor=0.3, mode="nearest")
    assert [interp_taps("nearest", o, 10, 3, None, 0.3, False)[0][0] for o in range(3)] == y.flatten().long().tolist()


def test_taps_rows_skip_zero_weights():
    assert taps_rows([[(3, 0.0), (4, 1.0)], [(4, 0.5), (5, 0.5)]]) == (4, 5)


# ------------------------------------------------------------------------------------------------
# pooling
# ------------------------------------------------------------------------------------------------


@st.composite
def pool_case(draw):
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 4))
    p = draw(st.integers(0, k // 2))
    d = draw(st.integers(1, 3))
    n = draw(st.integers(1, 20))
    ceil = draw(st.booleans())
    return n, k, s, p, d, ceil


@SET
@given(pool_case())
def test_pool_out_len_matches_pytorch(case):
    n, k, s, p, d, ceil = case
    try:
        ref = F.max_pool1d(torch.empty(1, 1, n, device="meta"), k, s, p, d, ceil_mode=ceil).shape[-1]
    except RuntimeError:
        assert pool_out_len(n, k, s, p, d, ceil) < 1
        return
    assert pool_out_len(n, k, s, p, d, ceil) == ref


@SET
@given(pool_case(), st.booleans(), st.sampled_from([None, 1, 3, 7]))
def test_avg_pool_taps_match_pytorch(case, include_pad, divisor):
    n, k, s, p, _, ceil = case
    x = _one_hot(n)
    try:
        y = F.avg_pool2d(x, (k, 1), (s, 1), (p, 0), ceil, include_pad, divisor)
    except RuntimeError:
        return
    truth = y[:, 0, :, 0].T
    n_out = truth.shape[0]

    def taps(o):
        rows, div = avg_pool_taps(o, n, k, s, p, include_pad, divisor)
        return [(r, 1.0 / div) for r, _ in rows]

    assert (_matrix(taps, n_out, n) - truth).abs().max() <= 1e-15


@SET
@given(pool_case())
def test_max_pool_windows_and_first_real_row(case):
    n, k, s, p, d, ceil = case
    x = -torch.ones(1, 1, n, dtype=torch.float64) * float("inf")  # all -inf: index = first real row
    try:
        _, idx = F.max_pool1d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
    except RuntimeError:
        return
    for o, i in enumerate(idx.flatten().tolist()):
        win = [r for r in pool_window(o, k, s, p, d) if 0 <= r < n]
        first = pool_first_real(o, n, k, s, p, d)
        if first is not None:
            assert i == first == win[0]


@SET
@given(st.integers(1, 30), st.integers(1, 30))
def test_adaptive_ranges_match_pytorch(n_in, n_out):
    truth = F.adaptive_avg_pool2d(_one_hot(n_in), (n_out, 1))[:, 0, :, 0].T
    taps = lambda o: [(r, 1.0 / (b - a)) for a, b in [adaptive_range(o, n_in, n_out)] for r in range(a, b)]  # noqa: E731
    assert (_matrix(taps, n_out, n_in) - truth).abs().max() <= 1e-15


def test_pixel_rows():
    assert pixel_shuffle_rows(3, 8, 2) == (1, 4)
    assert pixel_shuffle_rows(4, 4, 2) == (0, 0)
    assert pixel_unshuffle_rows(1, 3, 3) == (3, 9)


# ------------------------------------------------------------------------------------------------
# padding
# ------------------------------------------------------------------------------------------------


@SET
@given(
    st.integers(1, 12),
    st.integers(-6, 8),
    st.integers(-6, 8),
    st.sampled_from(["constant", "reflect", "replicate", "circular"]),
)
def test_pad_sources_match_pytorch(n, lo, hi, mode):
    ramp = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
    try:
        check_pad(n, lo, hi, mode)
        if pad_out_len(n, lo, hi) < 1:
            return
    except ValueError:
        return
    kw = {"value": -1.0} if mode == "constant" else {}
    truth = F.pad(ramp, (lo, hi), mode=mode, **kw).flatten().long().tolist()
    got = [-1 if r is None else r for r in pad_sources(0, pad_out_len(n, lo, hi), n, lo, hi, mode)]
    assert got == truth


def test_check_pad_rejects_what_pytorch_rejects():
    with pytest.raises(ValueError, match="more than once"):
        check_pad(5, 6, 0, "circular")
    with pytest.raises(ValueError, match="more than once"):
        check_pad(5, -5, 1, "circular")  # PyTorch returns uninitialised memory here
    with pytest.raises(ValueError, match="smaller"):
        check_pad(5, 5, 0, "reflect")
    check_pad(5, 5, 0, "replicate")


def test_split_pad():
    assert split_pad((1, 2, 3, 4), 4) == {3: (1, 2), 2: (3, 4)}
    with pytest.raises(ValueError):
        split_pad((1, 2, 3), 4)


@SET
@given(
    st.sampled_from(["nearest", "nearest-exact"]),
    st.integers(1, 3),
    st.integers(1, 12),
    st.sampled_from([1.1, 1.3, 2.2, 2.05, 0.7, 1.5, 2.0, 3.0, 1.9, 1.05]),
)
def test_nearest_forward_and_backward_maps_per_rank(mode, nd, n, scale):
    """PyTorch's nearest kernels take the out==in / out==2*in shortcuts in the 2-D forward and in
    every backward only: the backward is then not the forward's adjoint. Both maps are probed."""
    from credit_dtensor.geometry.resample import nearest_uses_shortcuts

    if int(n * scale) < 1:
        return
    shape = [1, 1] + [1] * nd
    shape[2] = n
    sf = [scale] + [1.0] * (nd - 1)
    x = torch.arange(float(n), dtype=torch.float64).reshape(shape).requires_grad_()
    y = F.interpolate(x, scale_factor=sf, mode=mode)
    out = y.shape[2]
    fwd = y.flatten().long().tolist()
    jac = torch.stack(
        [
            torch.autograd.grad(y, x, torch.eye(out, dtype=torch.float64)[o].reshape(y.shape), retain_graph=True)[
                0
            ].flatten()
            for o in range(out)
        ]
    )
    bwd = jac.argmax(1).tolist()
    for backward, truth in ((False, fwd), (True, bwd)):
        special = nearest_uses_shortcuts(nd, backward)
        got = [interp_taps(mode, o, n, out, None, scale, False, special)[0][0] for o in range(out)]
        assert got == truth, (backward, got, truth)


def test_nearest_is_local_only_where_every_rank_keeps_its_rows():
    from credit_dtensor.geometry import chunk_offsets
    from credit_dtensor.geometry.resample import nearest_is_local, nearest_source

    for n in range(1, 20):
        for world in range(1, 5):
            for scale in (1.0, 2.0, 3.0, 4.0, 1.5, 0.5):
                local = nearest_is_local(n, scale, world)
                if not local:
                    continue
                s = int(scale)
                offs, out_offs = chunk_offsets(n, world), chunk_offsets(n * s, world)
                for r in range(world):  # every output row of rank r reads an input row of rank r
                    for o in range(out_offs[r], out_offs[r + 1]):
                        src = nearest_source(o, n, n * s, scale)
                        assert offs[r] <= src < offs[r + 1], (n, world, scale, r, o, src)
    assert nearest_is_local(16, 2.0, 2) and not nearest_is_local(7, 2.0, 3) and not nearest_is_local(16, 3.0, 2)
