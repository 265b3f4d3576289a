"""Shared by test_resample.py and test_pool.py: run one resampling case (interpolate, pooling,
pixel shuffle) through one entry point and compare with the single-device op in fp64/fp32.

A case is a plain dict (picklable for the harness): ``op`` (an ``F`` function name), ``kw``
(its keyword arguments), ``shape``, ``dim`` (the sharded dim), ``dtype`` ("f64"/"f32"),
``seed`` and ``path``: ``api`` (``credit_dtensor.ops.resample``), ``functional`` (``F.*`` on the
DTensor, i.e. our aten rules) or ``module`` (the torch module converted by our wrapper).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tests.parity import assert_parity, parity

MODULE_OF = {
    "interpolate": lambda kw: nn.Upsample(**kw),
    "pixel_shuffle": lambda kw: nn.PixelShuffle(**kw),
    "pixel_unshuffle": lambda kw: nn.PixelUnshuffle(**kw),
}
for _nd in (1, 2, 3):
    MODULE_OF[f"max_pool{_nd}d"] = lambda kw, nd=_nd: getattr(nn, f"MaxPool{nd}d")(**kw)
    MODULE_OF[f"avg_pool{_nd}d"] = lambda kw, nd=_nd: getattr(nn, f"AvgPool{nd}d")(**kw)
    MODULE_OF[f"adaptive_avg_pool{_nd}d"] = lambda kw, nd=_nd: getattr(nn, f"AdaptiveAvgPool{nd}d")(**kw)
    MODULE_OF[f"adaptive_max_pool{_nd}d"] = lambda kw, nd=_nd: getattr(nn, f"AdaptiveMaxPool{nd}d")(**kw)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def entry(c: dict, m):
    """The function under test for ``c['path']``."""
    from credit_dtensor.nn.resample import resample_wrapper_for
    from credit_dtensor.ops import resample as R

    op, kw = c["op"], c["kw"]
    if c["path"] == "api":
        return lambda t: getattr(R, op)(t, **kw)
    if c["path"] == "functional":
        return lambda t: getattr(F, op)(t, **kw)
    mod = MODULE_OF[op](kw)
    return resample_wrapper_for(mod)(mod, m)


def run_case(m, c: dict) -> dict:
    from torch.distributed.tensor import Replicate

    from credit_dtensor.sharding import shard_tensor

    dtype = torch.float64 if c["dtype"] == "f64" else torch.float32
    x = torch.randn(c["shape"], generator=torch.Generator().manual_seed(c["seed"]), dtype=dtype)
    if c.get("ties"):
        x = x.round()  # many equal values: index tie-breaking must match too
    op, kw = c["op"], c["kw"]

    def ref(t):
        return _first(getattr(F, op)(t, **kw))

    fn = entry(c, m)
    out_dim = c["dim"]
    if op.startswith("adaptive_"):  # pooled to fewer rows than ranks: a Replicate pooled tensor
        rows = _first(getattr(F, op)(torch.empty(c["shape"], device="meta"), **kw)).shape[c["dim"]]
        if rows < m.domain_world_size:
            out_dim = None
            y = _first(fn(shard_tensor(x, m, c["dim"])))
            if tuple(y.placements) != (Replicate(),):
                raise AssertionError(f"{c}: pooled output placement {y.placements} is not Replicate")
    errs = parity(m, ref, lambda t: _first(fn(t)), [x], shard_dims=[c["dim"]], out_dim=out_dim)
    assert_parity(errs, dtype, c)
    if kw.get("return_indices"):
        _, idx_ref = getattr(F, op)(x, **kw)
        _, idx = fn(shard_tensor(x, m, c["dim"]))
        got = idx.full_tensor()
        if not torch.equal(got, idx_ref):
            raise AssertionError(f"indices differ for {c}: {(got != idx_ref).sum()} of {got.numel()}")
    return errs


def run_cases(cases: list[dict]) -> list[dict]:
    from tests.harness import manager

    m = manager()
    return [run_case(m, c) for c in cases]


# ------------------------------------------------------------------------------------------------
# byte accounting against the arithmetic minimum
# ------------------------------------------------------------------------------------------------


def read_matrix(op: str, kw: dict, n: int) -> torch.Tensor:
    """``(n_out, n)`` bool: which input rows each output row reads along a 1-D probe axis, from
    PyTorch itself (one-hot inputs; max pooling reads its whole window)."""
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, n, 1)
    kw = {k: v for k, v in kw.items() if k != "return_indices"}
    if op.startswith("max_pool"):  # same windows as avg pooling (no dilation in these probes)
        op, kw = op.replace("max", "avg"), dict(kw, count_include_pad=True)
        kw.pop("dilation", None)
    elif op.startswith("adaptive_max"):
        op = op.replace("max", "avg")
    y = getattr(F, op)(eye, **kw)
    return y[:, 0, :, 0].T != 0


def expected_recv_rows(reads: torch.Tensor, world: int) -> list[int]:
    n_out, n = reads.shape
    outs = torch.arange(n_out).chunk(world)
    ins = torch.arange(n).chunk(world)
    rows = []
    for r in range(world):
        own = set(ins[r].tolist()) if r < len(ins) else set()
        need = set()
        if r < len(outs):
            for o in outs[r].tolist():
                need |= set(torch.nonzero(reads[o]).flatten().tolist())
        rows.append(len(need - own))
    return rows


def bytes_task(op: str, kw: dict, shape: tuple, dim: int) -> dict:
    from credit_dtensor import comm_stats
    from credit_dtensor.ops import resample as R
    from credit_dtensor.sharding import shard_tensor
    from tests.harness import manager

    m = manager()
    x = torch.randn(shape, dtype=torch.float64)
    xd = shard_tensor(x, m, dim).requires_grad_()
    with comm_stats() as fwd:
        y = _first(getattr(R, op)(xd, **kw))
    with comm_stats() as bwd:
        y.backward(torch.ones_like(y))
    return dict(fwd_recv=fwd.recv_bytes, bwd_sent=bwd.sent_bytes, labels=sorted(k for k in fwd.by_op))


def row_bytes(shape: tuple, dim: int) -> int:
    return math.prod(s for i, s in enumerate(shape) if i != dim) * 8
