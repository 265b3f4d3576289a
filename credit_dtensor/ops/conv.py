"""Exact convolution and transposed convolution on spatially sharded DTensors.

For each rank, the rows it must read are derived from the *output* chunk it owns: global output
length -> this rank's ``torch.chunk`` slice -> the global input rows it reads (virtual padding rows
mapped to their source by the padding mode, gaps between dilated taps skipped) -> one batched halo
gather -> PyTorch's own convolution on the extended shard with no padding on the sharded dim
(:mod:`.conv_spec`, :mod:`.conv_local`). So every configuration PyTorch accepts is exact, and
stride-misaligned or empty shards need no special case.

The halo convolution is one ``torch.library`` custom op, ``credit_dtensor::halo_conv`` (and its
backward op, :mod:`.conv_ops`), on plain local tensors: it gathers the halo inside (opaque to ``torch.compile``, so
a compiled model has no graph break at the communication), returns the output rows and the
extended input, and its registered autograd keeps that extended input so backward sends only
gradient rows (the communication minimum). :func:`conv` is the only entry point: the module
wrappers call it, and a torch-function rule routes ``F.conv*`` / ``F.conv_transpose*`` on
spatially sharded DTensors to it (PyTorch's own result there is silently corrupt).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from .. import comm, intercept
from ..dtensor import check_replicated, full_operand, local_of, local_replicated, wrap_shard
from ..errors import DomainParallelError, UnsupportedShardingError
from . import _groups, fold
from ._autocast import cast_inputs
from .conv_ops import FoldedConv, HaloConvDTensor, HaloConvEager, encode, halo_conv, setup_cached
from .conv_spec import (
    ConvSpec,
    conv_out_shape,
    conv_spec_from_module,
    halo_rows,
    needs_halo,
    validate,
)
from .family import Signature, family
from .relayout import to_spatial

FAMILY = family(
    "conv",
    "convolution and transposed convolution, any stride, dilation, padding mode and groups: output-driven halo",
    nn="credit_dtensor.nn.conv",
)

__all__ = ["ConvSpec", "conv", "conv_spec_from_module", "module_spec", "needs_halo", "halo_rows", "conv_out_shape"]

# ---------------------------------------------------------------------------------------------
# DTensor plumbing
# ---------------------------------------------------------------------------------------------


def _spatial_shard_dim(x: DTensor, nd: int) -> int | None:
    """Tensor dim of a spatial Shard placement (None when not spatially sharded)."""
    first = x.ndim - nd
    dims = [p.dim for p in x.placements if isinstance(p, Shard)]
    if any(0 < d < first for d in dims) or any(d == 0 and x.ndim == nd + 1 for d in dims):
        raise UnsupportedShardingError(
            f"conv{nd}d: input placements {x.placements} shard the channel dim, which convolutions mix: "
            "shard activations on H (Shard(-2)) or the batch dim, or redistribute to Replicate first"
        )
    spatial = [d for d in dims if d >= first]
    if not spatial:
        return None
    if len(x.placements) != 1:
        raise UnsupportedShardingError(
            f"spatially sharded convolution input on a {len(x.placements)}-D mesh {x.device_mesh}: "
            "activations must live on the 1-D domain mesh (use DomainParallelManager.domain_mesh)"
        )
    return spatial[0]


def _check_operands(x: DTensor, w, b, where: str) -> None:
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise DomainParallelError(f"{where}: {name} must be a tensor")
        check_replicated(t, x.device_mesh, where, name)


def _param(t: torch.Tensor | None, mesh) -> torch.Tensor | None:
    """A replicated parameter as a local tensor whose gradient is exact: ``Partial`` for DTensors
    (reduced once by DTensor/FSDP), summed over the domain group for plain tensors."""
    if t is None:
        return None
    return local_replicated(t) if isinstance(t, DTensor) else full_operand(t, mesh)


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
    """(Transposed) convolution of ``x``; exact for inputs sharded on any spatial dim.

    ``x`` is a DTensor on the 1-D domain mesh; Replicate or batch-sharded inputs run PyTorch's own
    DTensor rule (no halo is needed). Parameters may be Replicate DTensors (gradients come back
    ``Partial``) or plain tensors (gradients are summed over the domain group in backward).
    """
    if not isinstance(x, DTensor):
        raise DomainParallelError(f"{spec.name}: expected a DTensor input, got {type(x).__name__}")
    batched = x.ndim == spec.nd + 2
    if x.ndim not in (spec.nd + 1, spec.nd + 2):
        raise DomainParallelError(
            f"{spec.name}: expected a {spec.nd + 2}-D (or unbatched {spec.nd + 1}-D) input, got {x.ndim}-D"
        )
    x = to_spatial(x, spec.nd)  # channel-sharded (heads merged into channels): back on H
    dim = _spatial_shard_dim(x, spec.nd)
    if dim is None:
        return _builtin(x, weight, bias, spec)
    x, weight, bias = cast_inputs(spec.name, x, weight, bias)  # torch.autocast, as conv*d does
    with intercept.suspended():  # DTensor plumbing and the op on local tensors: no rule applies
        return _halo(x, weight, bias, spec, dim, batched)


def _halo(x: DTensor, weight, bias, spec: ConvSpec, dim: int, batched: bool) -> DTensor:
    _check_operands(x, weight, bias, spec.name)
    if not batched:
        y = _halo(_unsqueeze0(x, dim), weight, bias, spec, dim + 1, True)
        return _squeeze0(y, dim + 1)
    shape = tuple(x.shape)
    compiling = torch.compiler.is_compiling()
    _validate(spec, shape, compiling)
    mesh = x.device_mesh
    world, rank, group = _mesh_info(mesh, compiling)
    args = (encode(spec), shape[dim], dim, world, rank, group)
    out_channels = weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]
    out_shape = conv_out_shape(spec, shape, out_channels)
    carry = fold.carried(x)
    if carry is not None:
        key = fold.ConvKey(tuple(args[0]), shape, dim, group)
        if isinstance(carry, fold.Probe):
            if needs_halo(spec, dim - (x.ndim - spec.nd)):
                fold.note_consumer(carry, key)
        elif carry.conv == key:
            y = _folded(x, weight, bias, carry, args)
            if y is not None:
                return wrap_shard(y, mesh, dim, out_shape)
    if not compiling and isinstance(weight, DTensor) and (bias is None or isinstance(bias, DTensor)):
        return HaloConvDTensor.apply(x, weight, bias, args, out_shape)
    w, b = _param(weight, mesh), _param(bias, mesh)
    if compiling:
        y, _ = halo_conv(x.to_local(), w, b, *args)
    else:
        y = HaloConvEager.apply(x.to_local(), w, b, args)
    return wrap_shard(y, mesh, dim, out_shape)


def _folded(x: DTensor, weight, bias, carry: fold.Carry, args: tuple) -> torch.Tensor | None:
    """The local output rows from the halo a norm borrowed (:mod:`.fold`), or ``None`` when the
    carry was made for another plan (then the usual exchange runs, as on every rank)."""
    xl = local_of(x)
    _, hplan, loc = setup_cached(xl, *args[:5])
    if not fold.same_plan(hplan, carry.plan):
        return None
    mesh = x.device_mesh
    return FoldedConv.apply(xl, _param(weight, mesh), _param(bias, mesh), loc, hplan, args[2], *carry.rows)


_VALID: set[tuple[ConvSpec, tuple[int, ...]]] = set()


def _validate(spec: ConvSpec, shape: tuple[int, ...], compiling: bool) -> None:
    """:func:`validate`, remembered per (spec, global shape) in eager mode (it raises or passes)."""
    if compiling:
        validate(spec, shape, spec.name)
        return
    key = (spec, shape)
    if key not in _VALID:
        validate(spec, shape, spec.name)
        if len(_VALID) >= 4096:
            _VALID.clear()
        _VALID.add(key)


_MESHES: dict[int, tuple] = {}
comm.register_group_cache(_MESHES.clear)


def _mesh_info(mesh, compiling: bool) -> tuple[int, int, str]:
    """(size, local rank, group name) of the domain mesh, memoised per mesh in eager mode."""
    if compiling:
        return mesh.size(), mesh.get_local_rank(), _groups.name_of(mesh)
    hit = _MESHES.get(id(mesh))
    if hit is None or hit[0] is not mesh:
        hit = _MESHES[id(mesh)] = (mesh, mesh.size(), mesh.get_local_rank(), _groups.name_of(mesh))
    return hit[1:]


@functools.lru_cache(maxsize=1024)
def _module_spec(nd, kernel, stride, padding, dilation, groups, transposed, output_padding, padding_mode) -> ConvSpec:
    return ConvSpec.make(
        nd,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        transposed=transposed,
        output_padding=output_padding,
        padding_mode=padding_mode,
    )


def module_spec(m: torch.nn.Module, output_padding=None) -> ConvSpec:
    """:func:`conv_spec_from_module`, memoised on the module's hyper-parameters in eager mode (a
    module's forward asks for it on every call)."""
    if torch.compiler.is_compiling():
        return conv_spec_from_module(m, output_padding)
    op = m.output_padding if output_padding is None else output_padding
    try:
        return _module_spec(
            len(m.kernel_size),
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            m.transposed,
            tuple(op) if isinstance(op, list) else op,
            m.padding_mode,
        )
    except TypeError:  # an unhashable hyper-parameter (a list): build it afresh
        return conv_spec_from_module(m, output_padding)


def _unsqueeze0(x: DTensor, dim: int) -> DTensor:
    return wrap_shard(x.to_local().unsqueeze(0), x.device_mesh, dim + 1, (1, *x.shape))


def _squeeze0(y: DTensor, dim: int) -> DTensor:
    return wrap_shard(y.to_local().squeeze(0), y.device_mesh, dim - 1, tuple(y.shape[1:]))


def _builtin(x, weight, bias, spec: ConvSpec):
    """PyTorch's own path for inputs that are not spatially sharded (no halo needed)."""
    F = torch.nn.functional
    if spec.mode != "zeros":
        pads = []
        for i in reversed(range(spec.nd)):
            pads += [spec.pad_lo[i], spec.pad_hi[i]]
        x = F.pad(x, pads, mode=spec.mode)
        padding = 0
    elif spec.pad_lo == spec.pad_hi:
        padding = list(spec.pad_lo)
    else:
        pads = []
        for i in reversed(range(spec.nd)):
            pads += [spec.pad_lo[i], spec.pad_hi[i]]
        x = F.pad(x, pads)
        padding = 0
    if spec.transposed:
        fn = getattr(F, f"conv_transpose{spec.nd}d")
        return fn(x, weight, bias, spec.stride, padding, list(spec.output_padding), spec.groups, spec.dilation)
    fn = getattr(F, f"conv{spec.nd}d")
    return fn(x, weight, bias, spec.stride, padding, spec.dilation, spec.groups)


# ---------------------------------------------------------------------------------------------
# Functional path: F.conv* / F.conv_transpose* as users call them (torch-function rules)
# ---------------------------------------------------------------------------------------------

_CONV_ARGS = Signature(("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
_TCONV_ARGS = Signature(("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"))


def _batch_local(func, a: dict, x: DTensor):
    """Batch-sharded input: the local op is exact (PyTorch 2.13 mis-shapes uneven batch shards)."""
    mesh = x.device_mesh
    _check_operands(x, a["weight"], a.get("bias"), getattr(func, "__name__", "conv"))
    local = dict(a)
    local["input"] = x.to_local()
    for k in ("weight", "bias"):
        t = a.get(k)
        if isinstance(t, torch.Tensor):
            local[k] = full_operand(t, mesh)
    y = func(**local)
    return wrap_shard(y, mesh, 0, (x.shape[0], *y.shape[1:]))


def _call_spec(nd: int, transposed: bool, a) -> ConvSpec:
    """The :class:`ConvSpec` of a functional call's bound arguments."""
    return ConvSpec.make(
        nd,
        tuple(a["weight"].shape[2:]),
        a.get("stride", 1),
        a.get("padding", 0),
        a.get("dilation", 1),
        a.get("groups", 1),
        transposed=transposed,
        output_padding=a.get("output_padding", 0),
    )


def _functional_rule(nd: int, transposed: bool):
    def rule(func, a):
        x = a.get("input")
        if not isinstance(x, DTensor) or x.ndim not in (nd + 1, nd + 2):
            return NotImplemented
        orig = x
        moved = to_spatial(x, nd)  # channel-sharded (heads merged into channels): back on H; Partial: reduced
        if moved is not x:
            a["input"] = x = moved
        dim = _spatial_shard_dim(x, nd)
        if dim is None:
            if _is_batch_sharded(x) and x.ndim == nd + 2:
                return _batch_local(func, a, x)
            return func(**a) if moved is not orig else NotImplemented
        return conv(x, a["weight"], a.get("bias"), _call_spec(nd, transposed, a))

    rule.__qualname__ = f"conv{'_transpose' if transposed else ''}{nd}d_rule"
    return rule


def _sharded_rule(nd: int, transposed: bool):
    """The usual functional call -- an input already on one spatial Shard placement, autocast off
    -- straight to :func:`conv`, ahead of the full rule and outside the gather guard: that path
    runs no DTensor dispatch (local tensors, our custom ops and halo messages)."""

    def rule(func, a):
        x = a.get("input")
        if (
            not isinstance(x, DTensor)
            or x.ndim not in (nd + 1, nd + 2)
            or len(x.placements) != 1
            or not isinstance(x.placements[0], Shard)
            or x.placements[0].dim % x.ndim < x.ndim - nd
            or torch.is_autocast_enabled(x.device.type)
        ):
            return NotImplemented
        return conv(x, a["weight"], a.get("bias"), _call_spec(nd, transposed, a))

    rule.__qualname__ = f"conv{'_transpose' if transposed else ''}{nd}d_sharded_rule"
    return rule


def _is_batch_sharded(x: DTensor) -> bool:
    return len(x.placements) == 1 and isinstance(x.placements[0], Shard) and x.placements[0].dim == 0


for _nd, (_f, _tf) in {
    1: (F.conv1d, F.conv_transpose1d),
    2: (F.conv2d, F.conv_transpose2d),
    3: (F.conv3d, F.conv_transpose3d),
}.items():
    for _fn, _args, _t in ((_f, _CONV_ARGS, False), (_tf, _TCONV_ARGS, True)):
        FAMILY.rule(_fn, h="halo", note="input on one spatial shard: halo rows", signature=_args, unwatched=True)(
            _sharded_rule(_nd, _t)
        )
    FAMILY.rule(_f, h="halo", note="halo rows from the output chunk", signature=_CONV_ARGS)(
        _functional_rule(_nd, False)
    )
    FAMILY.rule(_tf, h="halo", note="halo rows from the output chunk", signature=_TCONV_ARGS)(
        _functional_rule(_nd, True)
    )
