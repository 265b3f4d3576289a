"""Task functions (run inside harness workers) and case builders for the convolution tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, distribute_tensor

from credit_dtensor import comm_stats
from credit_dtensor.nn.conv import CONV_WRAPPERS
from tests.harness import manager
from tests.parity import TOL, parity

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def make_module(case: dict) -> nn.Module:
    nd = case["nd"]
    kw = dict(
        kernel_size=case["kernel"], stride=case.get("stride", 1), padding=case.get("padding", 0),
        dilation=case.get("dilation", 1), groups=case.get("groups", 1), bias=case.get("bias", True),
    )
    if case.get("transposed"):
        cls = getattr(nn, f"ConvTranspose{nd}d")
        kw["output_padding"] = case.get("output_padding", 0)
    else:
        cls = getattr(nn, f"Conv{nd}d")
        kw["padding_mode"] = case.get("padding_mode", "zeros")
    return cls(case["cin"], case["cout"], **kw)


def _input(case: dict, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    nd = case["nd"]
    shape = [case.get("batch", 2), case["cin"], *case["spatial"]]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(case.get("seed", 0)), dtype=dtype)
    sd = case.get("shard_spatial", max(nd - 2, 0))
    return x, 2 + sd


def run_conv_cases(cases: list[dict], dtype_name: str = "float64") -> list[dict]:
    """Each case: module path and (optionally) functional path vs single device."""
    dtype = DTYPES[dtype_name]
    m = manager()
    out = []
    for case in cases:
        torch.manual_seed(case.get("seed", 0))
        ref = make_module(case).to(dtype)
        x, dim = _input(case, dtype)
        path = case.get("path", "module")
        if path == "module":
            dist_mod = CONV_WRAPPERS[type(ref)](copy.deepcopy(ref), m)
            errs = parity(m, ref, dist_mod, [x], shard_dims=[dim], out_dim=dim,
                          ref_params=dict(ref.named_parameters()), dist_params=dict(dist_mod.named_parameters()))
        else:
            errs = _functional(case, ref, x, dim, m)
        out.append({"case": case, "errors": errs, "tol": TOL[dtype]})
    return out


def _functional(case, ref, x, dim, m):
    nd = case["nd"]
    mesh = m.domain_mesh
    w = nn.Parameter(distribute_tensor(ref.weight.detach(), mesh, [Replicate()]))
    b = nn.Parameter(distribute_tensor(ref.bias.detach(), mesh, [Replicate()])) if ref.bias is not None else None
    if case.get("transposed"):
        fn = getattr(F, f"conv_transpose{nd}d")

        def call(inp, weight, bias):
            return fn(inp, weight, bias, ref.stride, ref.padding, ref.output_padding, ref.groups, ref.dilation)
    else:
        fn = getattr(F, f"conv{nd}d")

        def call(inp, weight, bias):
            return fn(inp, weight, bias, ref.stride, ref.padding, ref.dilation, ref.groups)

    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    return parity(m, lambda t: call(t, ref.weight, ref.bias), lambda t: call(t, w, b), [x], shard_dims=[dim],
                  out_dim=dim, ref_params=dict(ref.named_parameters()), dist_params=params)


def run_bytes_case(case: dict) -> dict:
    """Bytes received in forward and backward of the module path vs the rows the plan needs."""
    from credit_dtensor.ops.conv import conv_spec_from_module, halo_rows

    m = manager()
    ref = make_module(case).double()
    x, dim = _input(case, torch.float64)
    mod = CONV_WRAPPERS[type(ref)](copy.deepcopy(ref), m)
    from credit_dtensor import shard_tensor

    xd = shard_tensor(x, m, dim).requires_grad_()
    with comm_stats() as fwd:
        y = mod(xd)
    with comm_stats() as bwd:
        y.to_local().sum().backward()  # local sum: no extra collectives
    spec = conv_spec_from_module(ref)
    rows = halo_rows(spec, dim - 2, x.shape[dim], m.domain_world_size, m.domain_rank)
    row_bytes = x[(slice(None),) * dim + (0,)].numel() * x.element_size()
    return {
        "fwd_recv": fwd.recv_bytes, "bwd_sent": bwd.sent_bytes, "min": rows * row_bytes,
        "fwd_sent": fwd.sent_bytes, "bwd_recv": bwd.recv_bytes, "fwd_collectives": fwd.collectives,
    }
