"""Task functions (run inside harness workers) and case builders for the convolution tests."""

from __future__ import annotations

import copy
import math

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
        kernel_size=case["kernel"],
        stride=case.get("stride", 1),
        padding=case.get("padding", 0),
        dilation=case.get("dilation", 1),
        groups=case.get("groups", 1),
        bias=case.get("bias", True),
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
            errs = parity(
                m,
                ref,
                dist_mod,
                [x],
                shard_dims=[dim],
                out_dim=dim,
                ref_params=dict(ref.named_parameters()),
                dist_params=dict(dist_mod.named_parameters()),
            )
        else:
            errs = _functional(case, ref, x, dim, m)
        out.append({"case": case, "errors": errs, "tol": TOL[dtype]})
    return out


def functional_call(case: dict, ref: nn.Module):
    """``call(input, weight, bias)`` running ``ref``'s convolution through ``F.*`` exactly as
    PyTorch's own module does: for a non-zeros ``padding_mode``, ``F.pad(x, ...,
    mode=padding_mode)`` on every spatial dim, then ``F.conv*`` with padding 0 (``_ConvNd``'s
    ``_conv_forward``). The same call runs on the single-device and the sharded side."""
    nd = case["nd"]
    if case.get("transposed"):
        fn = getattr(F, f"conv_transpose{nd}d")

        def call(inp, weight, bias):
            return fn(inp, weight, bias, ref.stride, ref.padding, ref.output_padding, ref.groups, ref.dilation)

        return call
    fn = getattr(F, f"conv{nd}d")
    mode = case.get("padding_mode", "zeros")
    if mode != "zeros":
        pads = list(ref._reversed_padding_repeated_twice)

        def call(inp, weight, bias):
            return fn(F.pad(inp, pads, mode=mode), weight, bias, ref.stride, (0,) * nd, ref.dilation, ref.groups)

        return call

    def call(inp, weight, bias):
        return fn(inp, weight, bias, ref.stride, ref.padding, ref.dilation, ref.groups)

    return call


def _functional(case, ref, x, dim, m):
    mesh = m.domain_mesh
    w = nn.Parameter(distribute_tensor(ref.weight.detach(), mesh, [Replicate()]))
    b = nn.Parameter(distribute_tensor(ref.bias.detach(), mesh, [Replicate()])) if ref.bias is not None else None
    call = functional_call(case, ref)
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    return parity(
        m,
        lambda t: call(t, ref.weight, ref.bias),
        lambda t: call(t, w, b),
        [x],
        shard_dims=[dim],
        out_dim=dim,
        ref_params=dict(ref.named_parameters()),
        dist_params=params,
    )


# --- communication volume against an independent geometric minimum --------------------------


def remote_rows(fn, shape: tuple[int, ...], dim: int, world: int) -> dict[str, list[int]]:
    """Rows each rank must receive / send for ``fn`` sharded on ``dim``, from the single-device op.

    Independent of credit_dtensor's geometry and plans: ``fn`` (built with all-ones weights) runs
    on an all-ones input with ``requires_grad``; for each rank ``r``, autograd of the sum of its
    ``torch.chunk`` slice of the output says which input rows that slice reads (every path
    contributes a positive amount, so a zero gradient means "not read"). ``recv[r]`` counts the
    read rows that ``torch.chunk`` of the input gives to other ranks; ``sent[r]`` counts, over
    every other rank, the rows of ``r`` that rank reads (a row read by two ranks is sent twice).
    """
    x = torch.ones(shape, dtype=torch.float64, requires_grad=True)
    y = fn(x)
    outs = torch.arange(y.shape[dim]).chunk(world)
    ins = torch.arange(shape[dim]).chunk(world)
    owned = [set(ins[r].tolist()) if r < len(ins) else set() for r in range(world)]
    reads: list[set[int]] = []
    other = [d for d in range(y.ndim) if d != dim]
    for r in range(world):
        if r >= len(outs) or len(outs[r]) == 0:
            reads.append(set())
            continue
        g = torch.zeros_like(y)
        g.narrow(dim, int(outs[r][0]), len(outs[r])).fill_(1.0)
        (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
        assert (gx >= 0).all()
        reads.append(set(torch.nonzero(gx.sum(other)).flatten().tolist()))
    recv = [len(reads[r] - owned[r]) for r in range(world)]
    sent = [sum(len(reads[d] & owned[r]) for d in range(world) if d != r) for r in range(world)]
    return {"recv": recv, "sent": sent}


def _ones_module(case: dict) -> nn.Module:
    ref = make_module(case).double()
    with torch.no_grad():
        ref.weight.fill_(1.0)
        if ref.bias is not None:
            ref.bias.zero_()
    return ref


def _row_bytes(shape, dim: int, itemsize: int = 8) -> int:
    return math.prod(s for i, s in enumerate(shape) if i != dim) * itemsize


def expected_traffic(case: dict, world: int) -> dict[str, dict]:
    """``{op label: {"recv": [bytes per rank], "sent": [...]}}`` that the case's forward needs at
    the minimum: one fused op for the module path and for ``F.conv*`` with zeros padding (``"same"``
    with an even span included: the functional rule sees the call before PyTorch splits the
    padding); on the functional path with another ``padding_mode``, the ops users (and PyTorch's
    module) write: ``F.pad(mode)`` then ``F.conv*`` with padding 0."""
    shape, dim = _shape_dim(case)
    ref = _ones_module(case)
    nd = case["nd"]
    label = f"conv{'_transpose' if case.get('transposed') else ''}{nd}d"
    mode = case.get("padding_mode", "zeros")
    conv = getattr(F, f"conv{nd}d")
    functional = case.get("path", "module") == "functional"
    if not functional or case.get("transposed") or mode == "zeros":
        ops = [(label, ref, shape)]
    else:
        pads = list(ref._reversed_padding_repeated_twice)
        padded = tuple(F.pad(torch.empty(shape, device="meta"), pads, mode=mode).shape)
        ops = [
            ("pad", lambda t: F.pad(t, pads, mode=mode), shape),
            (label, lambda t: conv(t, ref.weight, None, ref.stride, 0, ref.dilation, ref.groups), padded),
        ]
    out = {}
    for name, fn, shp in ops:
        rows = remote_rows(fn, shp, dim, world)
        rb = _row_bytes(shp, dim)
        out[name] = {k: [n * rb for n in v] for k, v in rows.items()}
    return out


def _shape_dim(case: dict) -> tuple[tuple[int, ...], int]:
    nd = case["nd"]
    shape = (case.get("batch", 2), case["cin"], *case["spatial"])
    return shape, 2 + case.get("shard_spatial", max(nd - 2, 0))


def run_bytes_case(case: dict) -> dict:
    """Bytes this rank sends / receives in forward and backward, per op label and in total."""
    from credit_dtensor import shard_tensor

    m = manager()
    ref = make_module(case).double()
    x, dim = _input(case, torch.float64)
    if case.get("path", "module") == "module":
        fn = CONV_WRAPPERS[type(ref)](copy.deepcopy(ref), m)
    else:
        mesh = m.domain_mesh
        w = distribute_tensor(ref.weight.detach(), mesh, [Replicate()]).requires_grad_()
        b = distribute_tensor(ref.bias.detach(), mesh, [Replicate()]).requires_grad_() if ref.bias is not None else None
        call = functional_call(case, ref)

        def fn(t):
            return call(t, w, b)

    xd = shard_tensor(x, m, dim).requires_grad_()
    with comm_stats() as fwd:
        y = fn(xd)
    with comm_stats() as bwd:
        y.to_local().sum().backward()  # local sum: no extra collectives

    def counts(s):
        return {
            "recv": s.recv_bytes,
            "sent": s.sent_bytes,
            "collectives": s.collectives,
            "by_op": {k: {"recv": v.recv_bytes, "sent": v.sent_bytes} for k, v in s.by_op.items()},
        }

    return {
        "fwd": counts(fwd),
        "bwd": counts(bwd),
        "placements": [str(p) for p in y.placements],
        "grad_is_none": xd.grad is None,
    }
