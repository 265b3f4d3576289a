"""Pure index arithmetic vs PyTorch itself (no processes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from credit_dtensor.geometry import (
    chunk_offsets,
    chunk_range,
    chunk_sizes,
    conv_input_rows,
    conv_out_len,
    conv_transpose_input_rows,
    conv_transpose_out_len,
    owner_of,
    same_padding,
    source_row,
)
from credit_dtensor.halo import make_plan


def test_chunks_follow_torch_chunk():
    """Exhaustive over n = 0..40 rows and worlds 1..9 (one test instead of 138 parametrized ones,
    a wider space): each rank's range holds exactly the indices ``torch.chunk`` gives it (trailing
    ranks short or empty), sizes and offsets agree, and every row's owner is the rank holding it."""
    for world in range(1, 10):
        for n in range(0, 41):
            chunks = [c.tolist() for c in torch.arange(n).chunk(world)] if n else []
            expected = chunks + [[] for _ in range(world - len(chunks))]
            assert chunk_sizes(n, world) == [len(c) for c in expected], (n, world)
            offs = chunk_offsets(n, world)
            assert len(offs) == world + 1 and offs[0] == 0 and offs[-1] == n, (n, world, offs)
            assert all(a <= b for a, b in zip(offs, offs[1:])), (n, world, offs)
            for r in range(world):
                a, b = chunk_range(n, world, r)
                assert list(range(a, b)) == expected[r], (n, world, r, (a, b))
                assert (a, b) == (offs[r], offs[r + 1])
                assert all(owner_of(g, n, world) == r for g in range(a, b)), (n, world, r)
            for outside in (-1, n):
                with pytest.raises(ValueError, match="outside"):
                    owner_of(outside, n, world)
    for bad in ((-1, 2), (3, 0)):
        with pytest.raises(ValueError):
            chunk_sizes(*bad)


def test_known_uneven_layouts():
    assert chunk_sizes(10, 4) == [3, 3, 3, 1]
    assert chunk_sizes(9, 4) == [3, 3, 3, 0]
    assert chunk_sizes(5, 4) == [2, 2, 1, 0]
    assert chunk_sizes(13, 3) == [5, 5, 3]


@given(
    n=st.integers(1, 12),
    lo=st.integers(0, 11),
    hi=st.integers(0, 11),
    mode=st.sampled_from(["constant", "reflect", "replicate", "circular"]),
)
def test_source_row_matches_f_pad(n, lo, hi, mode):
    if mode == "reflect" and (lo >= n or hi >= n):
        return
    if mode == "circular" and (lo > n or hi > n):
        return
    x = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, 1, n)
    padded = F.pad(x, (lo, hi), mode=mode).flatten().tolist()
    for pos, value in enumerate(padded):
        src = source_row(pos - lo, n, mode)
        assert (0.0 if src is None else float(src + 1)) == value


def _reads(y_rows, fn, n):
    """Input rows whose gradient is non-zero for the sum of the given output rows."""
    x = torch.ones(1, 1, n, dtype=torch.float64, requires_grad=True)
    y = fn(x)
    y[..., y_rows[0] : y_rows[1]].sum().backward()
    nz = (x.grad.flatten() != 0).nonzero().flatten().tolist()
    return (nz[0], nz[-1] + 1) if nz else None


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 20),
    k=st.integers(1, 6),
    s=st.integers(1, 4),
    d=st.integers(1, 3),
    p=st.integers(0, 6),
    world=st.integers(1, 5),
    data=st.data(),
)
def test_conv_input_rows_match_autograd(n, k, s, d, p, world, data):
    out_len = conv_out_len(n, k, s, p, p, d)
    if out_len <= 0:
        return
    assert out_len == F.conv1d(torch.ones(1, 1, n), torch.ones(1, 1, k), stride=s, padding=p, dilation=d).shape[-1]
    r = data.draw(st.integers(0, world - 1))
    o0, o1 = chunk_range(out_len, world, r)
    a, b = conv_input_rows(o0, o1, k, s, p, d)
    w = torch.ones(1, 1, k, dtype=torch.float64)
    got = _reads((o0, o1), lambda x: F.conv1d(x, w, stride=s, padding=p, dilation=d), n)
    if o1 == o0:
        assert (a, b) == (0, 0)
        return
    clipped = (max(a, 0), min(b, n))
    # with dilation or stride > kernel, rows between taps are not read: the range bounds what is read
    if got is None:
        assert clipped[0] >= clipped[1] or d > 1 or s > k
    else:
        assert clipped[0] <= got[0] and got[1] <= clipped[1]
        if d == 1 and k >= s:
            assert got == clipped


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 6),
    s=st.integers(1, 4),
    d=st.integers(1, 3),
    p=st.integers(0, 5),
    op=st.integers(0, 3),
    world=st.integers(1, 5),
    data=st.data(),
)
def test_conv_transpose_input_rows_match_autograd(n, k, s, d, p, op, world, data):
    if op >= max(s, d):
        return
    out_len = conv_transpose_out_len(n, k, s, p, d, op)
    if out_len <= 0:
        return
    w = torch.ones(1, 1, k, dtype=torch.float64)

    def fn(x):
        return F.conv_transpose1d(x, w, stride=s, padding=p, output_padding=op, dilation=d)

    assert fn(torch.ones(1, 1, n, dtype=torch.float64)).shape[-1] == out_len
    r = data.draw(st.integers(0, world - 1))
    o0, o1 = chunk_range(out_len, world, r)
    a, b = conv_transpose_input_rows(o0, o1, n, k, s, p, d)
    got = _reads((o0, o1), fn, n)
    if got is None:
        # rows may fall in the gaps of a strided transposed conv: the range may still be non-empty
        return
    assert a <= got[0] and got[1] <= b
    if d == 1 and k >= s:
        assert got == (a, b)


def test_same_padding_split():
    assert same_padding(3, 1) == (1, 1)
    assert same_padding(4, 1) == (1, 2)
    assert same_padding(4, 2) == (3, 3)


@given(
    n=st.integers(0, 15),
    world=st.integers(1, 5),
    halo=st.integers(0, 4),
    mode=st.sampled_from(["zeros", "circular", "replicate"]),
)
def test_plans_agree_between_senders_and_receivers(n, world, halo, mode):
    if n == 0 and mode != "zeros":
        return
    needs = []
    for r in range(world):
        a, b = chunk_range(n, world, r)
        needs.append(tuple(source_row(g, n, mode) for g in range(a - halo, b + halo)) if b > a else ())
    plans = [make_plan(n, world, r, needs) for r in range(world)]
    for src in range(world):
        lo = chunk_range(n, world, src)[0]
        for dst, rows in plans[src].sends:
            recv = dict(plans[dst].recvs)[src]
            assert tuple(lo + i for i in rows) == recv
    for dst in range(world):
        for src, rows in plans[dst].recvs:
            assert dst in dict(plans[src].sends) or not rows
