"""Exact convolution and transposed convolution on spatially sharded DTensors.

For each rank, the rows it must read are derived from the *output* chunk it owns: global output
length -> this rank's ``torch.chunk`` slice -> the global input rows it reads (virtual padding rows
mapped to their source by the padding mode, gaps between dilated taps skipped) -> one batched halo
gather -> PyTorch's own convolution on the extended shard with no padding on the sharded dim
(:mod:`.conv_spec`, :mod:`.conv_local`). So every configuration PyTorch accepts is exact, and
stride-misaligned or empty shards need no special case.

The halo convolution is one ``torch.library`` custom op, ``credit_dtensor::halo_conv`` (and its
backward op), on plain local tensors: it gathers the halo inside (opaque to ``torch.compile``, so
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
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .. import intercept, stats
from ..dtensor import full_operand, global_stride, local_replicated, wrap_shard
from ..errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from ..halo import halo_gather, halo_scatter_add
from ..intercept import register
from . import _groups
from .conv_local import local_backward, local_forward, local_setup
from .conv_spec import (
    MODES,
    ConvSpec,
    conv_out_shape,
    conv_spec_from_module,
    halo_rows,
    needs_halo,
    plan,
    validate,
)

__all__ = ["ConvSpec", "conv", "conv_spec_from_module", "module_spec", "needs_halo", "halo_rows", "conv_out_shape"]

# ---------------------------------------------------------------------------------------------
# The custom ops (plain local tensors; the spec travels as a list of ints)
# ---------------------------------------------------------------------------------------------


def _encode(spec: ConvSpec) -> list[int]:
    return [
        spec.nd,
        int(spec.transposed),
        spec.groups,
        MODES.index(spec.mode),
        *spec.kernel,
        *spec.stride,
        *spec.pad_lo,
        *spec.pad_hi,
        *spec.dilation,
        *spec.output_padding,
    ]


@functools.lru_cache(maxsize=1024)
def _decode(enc: tuple[int, ...]) -> ConvSpec:
    nd = enc[0]
    f = [tuple(enc[4 + i * nd : 4 + (i + 1) * nd]) for i in range(6)]
    return ConvSpec(nd, bool(enc[1]), f[0], f[1], f[2], f[3], f[4], f[5], enc[2], MODES[enc[3]])


def _setup(x: torch.Tensor, enc: list[int], n: int, dim: int, world: int, rank: int):
    spec = _decode(tuple(enc))
    sd = dim - (x.ndim - spec.nd)
    spatial = list(x.shape[-spec.nd :])
    spatial[sd] = n
    return spec, plan(spec, sd, n, world, rank), local_setup(spec, sd, tuple(spatial), world, rank)


_SETUPS: dict[tuple, tuple] = {}


def _setup_cached(x: torch.Tensor, enc: list[int], n: int, dim: int, world: int, rank: int):
    """:func:`_setup` for real tensors, memoised on the small key (the plan caches underneath hash
    every rank's row lists on each lookup)."""
    key = (*enc, n, dim, world, rank, *x.shape)
    hit = _SETUPS.get(key)
    if hit is None:
        if len(_SETUPS) >= 4096:
            _SETUPS.clear()
        hit = _SETUPS[key] = _setup(x, enc, n, dim, world, rank)
    return hit


def _forward_impl(x, w, b, enc, n, dim, world, rank, group):
    spec, hplan, loc = _setup_cached(x, enc, n, dim, world, rank)
    with stats.op_label(spec.name):
        ext = halo_gather(x, dim, hplan, _groups.resolve(group))
    y = local_forward(ext, w, b, loc)
    if ext is x:  # the shard itself: backward reads the saved input instead
        return y, x.new_empty(0)
    if ext.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and x.numel():
        ext = ext.clone()  # a view of the shard (a sub-range of own rows): custom ops may not alias
    return y, ext


@torch.library.custom_op("credit_dtensor::halo_conv", mutates_args=())
def halo_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    enc: list[int],
    n: int,
    dim: int,
    world: int,
    rank: int,
    group: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's output rows, and its extended input (empty when it is the shard itself)."""
    return _forward_impl(x, w, b, enc, n, dim, world, rank, group)


@halo_conv.register_fake
def _halo_conv_fake(x, w, b, enc, n, dim, world, rank, group):
    spec, hplan, loc = _setup(x, enc, n, dim, world, rank)
    out_channels = w.shape[1] * spec.groups if spec.transposed else w.shape[0]
    shape = list(conv_out_shape(spec, (x.shape[0], x.shape[1], *x.shape[2:]), out_channels))
    shape[dim] = loc.out_rows
    ext_shape = list(x.shape)
    ext_shape[dim] = loc.ext_rows
    return x.new_empty(shape), x.new_empty(0 if hplan.is_identity else ext_shape)


def _backward_impl(gy, x, ext, w, has_bias, mask, enc, n, dim, world, rank, group):
    spec, hplan, loc = _setup_cached(x, enc, n, dim, world, rank)
    source = x if hplan.is_identity else ext
    gx_ext, gw, gb = local_backward(gy.contiguous(), source, w, has_bias, loc, (mask[0], mask[1], mask[2]))
    gx = x.new_empty(0)
    if mask[0]:  # the same on every rank (SPMD), so skipping the adjoint exchange is symmetric
        with stats.op_label(spec.name):
            gx = halo_scatter_add(gx_ext.contiguous(), dim, hplan, _groups.resolve(group))
        gx = gx.clone() if gx is gx_ext else gx
    return gx, (gw if gw is not None else w.new_empty(0)), (gb if gb is not None else w.new_empty(0))


@torch.library.custom_op("credit_dtensor::halo_conv_backward", mutates_args=())
def halo_conv_backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    ext: torch.Tensor,
    w: torch.Tensor,
    has_bias: bool,
    mask: list[bool],
    enc: list[int],
    n: int,
    dim: int,
    world: int,
    rank: int,
    group: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_w, grad_b) of this rank; grad_x already summed at the rows' owners. Gradients
    that are not needed come back empty."""
    return _backward_impl(gy, x, ext, w, has_bias, mask, enc, n, dim, world, rank, group)


@halo_conv_backward.register_fake
def _halo_conv_backward_fake(gy, x, ext, w, has_bias, mask, enc, n, dim, world, rank, group):
    spec = _decode(tuple(enc))
    out_channels = w.shape[1] * spec.groups if spec.transposed else w.shape[0]
    return (
        x.new_empty(x.shape if mask[0] else (0,)),
        w.new_empty(w.shape if mask[1] else (0,)),
        w.new_empty((out_channels,) if (mask[2] and has_bias) else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, w, b, enc, n, dim, world, rank, group = inputs
    ctx.save_for_backward(x, output[1], w)
    ctx.args = (b is not None, enc, n, dim, world, rank, group)


def _backward(ctx, gy, _gext):
    x, ext, w = ctx.saved_tensors
    has_bias, enc, n, dim, world, rank, group = ctx.args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = halo_conv_backward(gy, x, ext, w, has_bias, mask, enc, n, dim, world, rank, group)
    return (
        gx if mask[0] else None,
        gw if mask[1] else None,
        gb if mask[2] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


halo_conv.register_autograd(_backward, setup_context=_setup_context)


def _eager_backward(ctx, gy: torch.Tensor):
    x, ext, w = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], ctx.has_bias and need[2]]
    gx, gw, gb = _backward_impl(gy, x, ext, w, ctx.has_bias, mask, *ctx.args)
    return mask, gx, gw, gb


class _HaloConvEager(torch.autograd.Function):
    """Eager mode, plain local tensors: the same implementations and saved tensors as the custom op
    and its registered autograd, without the custom-op dispatch layers (several times the host time
    of a small conv). Compiled regions call the custom op (opaque to Dynamo)."""

    @staticmethod
    def forward(ctx, x, w, b, args):  # type: ignore[override]
        y, ext = _forward_impl(x, w, b, *args)
        ctx.save_for_backward(x, ext, w)
        ctx.has_bias, ctx.args = b is not None, args
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        mask, gx, gw, gb = _eager_backward(ctx, gy)
        return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None


class _HaloConvDTensor(torch.autograd.Function):
    """Eager mode, an H-sharded DTensor input and Replicate DTensor parameters: one autograd node for
    what ``x.to_local()``, ``to_local(grad_placements=[Partial()])`` of each parameter, the op and
    ``from_local`` of the result do, with the same values, placements and global shapes: the input
    gradient comes back with the input's placement, parameter gradients ``Partial``, and an output
    gradient of another placement is redistributed first (as ``from_local``'s backward does)."""

    @staticmethod
    def forward(ctx, x, w, b, args, out_shape):  # type: ignore[override]
        xl, wl = x.to_local(), w.to_local()  # grad mode is off here: the local tensors themselves
        y, ext = _forward_impl(xl, wl, None if b is None else b.to_local(), *args)
        ctx.save_for_backward(xl, ext, wl)
        ctx.has_bias, ctx.args = b is not None, args
        out_placements = (Shard(args[2]),)
        ctx.x_meta = (x.device_mesh, x.placements, x.shape, x.stride(), out_placements)
        ctx.w_meta = (w.device_mesh, w.shape, None if b is None else b.shape)
        shape = torch.Size(out_shape)
        return DTensor.from_local(
            y, x.device_mesh, out_placements, run_check=False, shape=shape, stride=global_stride(y, shape)
        )

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        mesh, placements, x_shape, x_stride, out_placements = ctx.x_meta
        if isinstance(gy, DTensor):
            if gy.placements != out_placements:
                gy = gy.redistribute(mesh, out_placements)
            gy = gy.to_local()
        mask, gx, gw, gb = _eager_backward(ctx, gy)
        w_mesh, w_shape, b_shape = ctx.w_meta
        partial = [Partial()] * w_mesh.ndim
        return (
            DTensor.from_local(gx, mesh, placements, run_check=False, shape=x_shape, stride=global_stride(gx, x_shape))
            if mask[0]
            else None,
            DTensor.from_local(gw, w_mesh, partial, run_check=False, shape=w_shape, stride=gw.stride())
            if mask[1]
            else None,
            DTensor.from_local(gb, w_mesh, partial, run_check=False, shape=b_shape, stride=gb.stride())
            if mask[2]
            else None,
            None,
            None,
        )


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
        if isinstance(t, DTensor):
            if (
                t.device_mesh is not x.device_mesh
                and t.device_mesh != x.device_mesh
                and t.device_mesh.mesh_dim_names != x.device_mesh.mesh_dim_names
            ):
                raise MeshMismatchError(
                    f"{where}: input is on mesh {x.device_mesh} but {name} on {t.device_mesh}: "
                    "convert the module with the same manager that shards its input"
                )
            if not all(isinstance(p, Replicate) for p in t.placements):
                raise UnsupportedShardingError(
                    f"{where}: {name} placements {t.placements} are not supported with an H-sharded input: "
                    "parameters must be Replicate on the domain mesh (FSDP2 all-gathers them for forward)"
                )
        elif t is not None and not isinstance(t, torch.Tensor):
            raise DomainParallelError(f"{where}: {name} must be a tensor")


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
    dim = _spatial_shard_dim(x, spec.nd)
    if dim is None:
        return _builtin(x, weight, bias, spec)
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
    args = (_encode(spec), shape[dim], dim, world, rank, group)
    out_channels = weight.shape[1] * spec.groups if spec.transposed else weight.shape[0]
    out_shape = conv_out_shape(spec, shape, out_channels)
    if not compiling and isinstance(weight, DTensor) and (bias is None or isinstance(bias, DTensor)):
        return _HaloConvDTensor.apply(x, weight, bias, args, out_shape)
    w, b = _param(weight, mesh), _param(bias, mesh)
    if compiling:
        y, _ = halo_conv(x.to_local(), w, b, *args)
    else:
        y = _HaloConvEager.apply(x.to_local(), w, b, args)
    return wrap_shard(y, mesh, dim, out_shape)


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

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TCONV_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    vals = dict(zip(names, args))
    vals.update(kwargs)
    return vals


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


def _functional_rule(nd: int, transposed: bool):
    names = _TCONV_ARGS if transposed else _CONV_ARGS

    def rule(func, args, kwargs):
        a = _bind(names, args, kwargs)
        x = a.get("input")
        if not isinstance(x, DTensor) or x.ndim not in (nd + 1, nd + 2):
            return NotImplemented
        dim = _spatial_shard_dim(x, nd)
        if dim is None:
            if _is_batch_sharded(x) and x.ndim == nd + 2:
                return _batch_local(func, a, x)
            return NotImplemented
        w = a["weight"]
        spec = ConvSpec.make(
            nd,
            tuple(w.shape[2:]),
            a.get("stride", 1),
            a.get("padding", 0),
            a.get("dilation", 1),
            a.get("groups", 1),
            transposed=transposed,
            output_padding=a.get("output_padding", 0),
        )
        return conv(x, w, a.get("bias"), spec)

    rule.__qualname__ = f"conv{'_transpose' if transposed else ''}{nd}d_rule"
    return rule


def _is_batch_sharded(x: DTensor) -> bool:
    return len(x.placements) == 1 and isinstance(x.placements[0], Shard) and x.placements[0].dim == 0


for _nd, (_f, _tf) in {
    1: (F.conv1d, F.conv_transpose1d),
    2: (F.conv2d, F.conv_transpose2d),
    3: (F.conv3d, F.conv_transpose3d),
}.items():
    register(_f)(_functional_rule(_nd, False))
    register(_tf)(_functional_rule(_nd, True))
