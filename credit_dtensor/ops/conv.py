"""Exact convolution and transposed convolution on spatially sharded DTensors.

For each rank, the rows it must read are derived from the *output* chunk it owns (DESIGN §3):
global output length -> this rank's ``torch.chunk`` slice -> the global input rows (including
virtual padding rows, mapped to their source by the padding mode) -> one batched halo gather ->
PyTorch's own convolution on the extended shard with no padding on the sharded dim. So every
configuration PyTorch accepts (any kernel, stride, dilation, padding incl. ``'same'`` with even
kernels, groups, padding modes, output_padding) is exact, and stride-misaligned or empty shards
need no special case.

Two entry points share the same local forward/backward:

* :func:`conv` — used by the module wrappers: one autograd node that keeps the extended input,
  so backward sends only gradient rows (the communication minimum).
* aten rules for ``aten.convolution`` / ``aten.convolution_backward`` — make the functional
  ``F.conv2d(x_sharded, w)`` exact. They run below autograd, so backward gathers the halo again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .. import comm, stats
from ..errors import DomainParallelError, MeshMismatchError, UnsupportedShardingError
from ..geometry import (
    chunk_range,
    conv_input_rows,
    conv_out_len,
    conv_transpose_input_rows,
    conv_transpose_out_len,
    same_padding,
    source_row,
    tuple_n,
)
from ..halo import HaloPlan, cached_plan, halo_gather, halo_scatter_add
from ..sharding import contiguous_stride
from ._dispatch import register_rule

__all__ = ["ConvSpec", "conv", "conv_spec_from_module", "needs_halo", "halo_rows", "conv_out_shape"]

aten = torch.ops.aten
MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvSpec:
    """Everything about a (transposed) convolution except its tensors, per spatial dim."""

    nd: int
    transposed: bool
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad_lo: tuple[int, ...]
    pad_hi: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int
    mode: str = "zeros"

    @staticmethod
    def make(
        nd: int,
        kernel,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        *,
        transposed: bool = False,
        output_padding=0,
        padding_mode: str = "zeros",
    ) -> ConvSpec:
        kernel = tuple_n(kernel, nd, "kernel_size")
        stride = tuple_n(stride, nd, "stride")
        dilation = tuple_n(dilation, nd, "dilation")
        if isinstance(padding, str):
            if padding == "valid":
                lo = hi = (0,) * nd
            elif padding == "same":
                pairs = [same_padding(k, d) for k, d in zip(kernel, dilation)]
                lo, hi = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
            else:
                raise DomainParallelError(f"padding={padding!r}: expected 'same', 'valid' or integers")
        else:
            lo = hi = tuple_n(padding, nd, "padding")
        if padding_mode not in MODES:
            raise DomainParallelError(f"padding_mode={padding_mode!r} is not one of {MODES}")
        if transposed and padding_mode != "zeros":
            raise DomainParallelError("transposed convolutions only support padding_mode='zeros' (as in PyTorch)")
        return ConvSpec(
            nd, transposed, kernel, stride, lo, hi, dilation, tuple_n(output_padding, nd, "output_padding"),
            int(groups), padding_mode,
        )

    @property
    def name(self) -> str:
        return f"conv{'_transpose' if self.transposed else ''}{self.nd}d"


def conv_spec_from_module(m: torch.nn.Module, output_padding=None) -> ConvSpec:
    """The :class:`ConvSpec` of an ``nn.ConvNd`` / ``nn.ConvTransposeNd`` module."""
    nd = len(m.kernel_size)
    return ConvSpec.make(
        nd, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, transposed=m.transposed,
        output_padding=m.output_padding if output_padding is None else output_padding,
        padding_mode=m.padding_mode,
    )


# ---------------------------------------------------------------------------------------------
# Geometry along the sharded dim (pure, cached)
# ---------------------------------------------------------------------------------------------


def _out_len(spec: ConvSpec, i: int, n: int) -> int:
    k, s, d = spec.kernel[i], spec.stride[i], spec.dilation[i]
    if spec.transposed:
        return conv_transpose_out_len(n, k, s, spec.pad_lo[i], d, spec.output_padding[i])
    return conv_out_len(n, k, s, spec.pad_lo[i], spec.pad_hi[i], d)


def _input_range(spec: ConvSpec, i: int, n: int, o0: int, o1: int) -> tuple[int, int]:
    k, s, d = spec.kernel[i], spec.stride[i], spec.dilation[i]
    if spec.transposed:
        return conv_transpose_input_rows(o0, o1, n, k, s, spec.pad_lo[i], d)
    return conv_input_rows(o0, o1, k, s, spec.pad_lo[i], d)


@functools.lru_cache(maxsize=4096)
def _needs(spec: ConvSpec, i: int, n: int, world: int) -> tuple[tuple[int | None, ...], ...]:
    out_len = _out_len(spec, i, n)
    mode = spec.mode
    needs = []
    for r in range(world):
        o0, o1 = chunk_range(out_len, world, r)
        a, b = _input_range(spec, i, n, o0, o1)
        needs.append(tuple(source_row(g, n, mode) for g in range(a, b)))
    return tuple(needs)


def _plan(spec: ConvSpec, i: int, n: int, world: int, rank: int) -> HaloPlan:
    return cached_plan(n, world, rank, _needs(spec, i, n, world))


def halo_rows(spec: ConvSpec, i: int, n: int, world: int, rank: int) -> int:
    """Rows ``rank`` receives from other ranks for spatial dim ``i`` of global length ``n``."""
    return _plan(spec, i, n, world, rank).recv_rows


def needs_halo(spec: ConvSpec, i: int = 0) -> bool:
    """Whether outputs can read input rows of other shards along spatial dim ``i``.

    False only when every output row reads rows of one stride block and there is no padding
    (1x1 convs, patch embeddings with kernel <= stride); such convs still communicate nothing
    when shards are stride-aligned, and the plan finds the few rows otherwise.
    """
    span = spec.dilation[i] * (spec.kernel[i] - 1) + 1
    if spec.transposed:
        return not (span <= spec.stride[i] and spec.pad_lo[i] == 0 and spec.output_padding[i] == 0)
    return not (span <= spec.stride[i] and spec.pad_lo[i] == 0 and spec.pad_hi[i] == 0)


def conv_out_shape(spec: ConvSpec, x_shape: tuple[int, ...], out_channels: int) -> tuple[int, ...]:
    """Global output shape for a batched input shape."""
    spatial = x_shape[-spec.nd:]
    return (x_shape[0], out_channels, *(_out_len(spec, i, n) for i, n in enumerate(spatial)))


def _validate(spec: ConvSpec, x_shape: tuple[int, ...], where: str) -> None:
    spatial = x_shape[-spec.nd:]
    for i, n in enumerate(spatial):
        if _out_len(spec, i, n) <= 0:
            raise DomainParallelError(
                f"{where}: spatial dim {i} of size {n} is too small for kernel {spec.kernel[i]} "
                f"(dilation {spec.dilation[i]}, padding {spec.pad_lo[i]}+{spec.pad_hi[i]}): PyTorch rejects this too"
            )
        if spec.mode == "reflect" and max(spec.pad_lo[i], spec.pad_hi[i]) >= n:
            raise DomainParallelError(
                f"{where}: reflect padding {max(spec.pad_lo[i], spec.pad_hi[i])} must be < input size {n} "
                "on spatial dim {i} (as in F.pad)"
            )
        if spec.mode == "circular" and max(spec.pad_lo[i], spec.pad_hi[i]) > n:
            raise DomainParallelError(
                f"{where}: circular padding {max(spec.pad_lo[i], spec.pad_hi[i])} must be <= input size {n} on spatial dim {i}"
            )
        if spec.transposed and spec.output_padding[i] >= max(spec.stride[i], spec.dilation[i]):
            raise DomainParallelError(
                f"{where}: output_padding {spec.output_padding[i]} must be smaller than stride or dilation "
                f"({spec.stride[i]}, {spec.dilation[i]}) on spatial dim {i}"
            )


# ---------------------------------------------------------------------------------------------
# Local computation on the extended shard (explicit forward and backward, no autograd)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Local:
    """How to run the local op for one rank: padding of the *other* spatial dims, crops."""

    spec: ConvSpec
    sd: int  # index of the sharded spatial dim
    conv_padding: tuple[int, ...]  # padding passed to aten.convolution
    explicit: tuple[tuple[int, tuple[int, ...]], ...]  # (spatial idx, source index list) pads done by index_select
    const_pad: tuple[int, ...] | None  # F.pad-style list for asymmetric zero padding of other dims
    out_rows: int  # this rank's output rows along the sharded dim
    ext_rows: int
    # transposed only: offset of the wanted rows in the local full output
    t_offset: int = 0


@functools.lru_cache(maxsize=4096)
def _local_setup(spec: ConvSpec, sd: int, spatial: tuple[int, ...], world: int, rank: int) -> _Local:
    n = spatial[sd]
    out_len = _out_len(spec, sd, n)
    o0, o1 = chunk_range(out_len, world, rank)
    a, b = _input_range(spec, sd, n, o0, o1)
    conv_padding = [0] * spec.nd
    explicit = []
    const = [0] * (2 * spec.nd)
    need_const = False
    for i in range(spec.nd):
        if i == sd:
            continue
        lo, hi = spec.pad_lo[i], spec.pad_hi[i]
        if spec.transposed or (spec.mode == "zeros" and lo == hi):
            conv_padding[i] = lo
        elif spec.mode == "zeros":
            # asymmetric 'same' on an unsharded dim: pad explicitly (F.pad order: last dim first)
            j = spec.nd - 1 - i
            const[2 * j], const[2 * j + 1] = lo, hi
            need_const = True
        else:
            idx = tuple(source_row(g, spatial[i], spec.mode) for g in range(-lo, spatial[i] + hi))
            explicit.append((i, idx))
    t_offset = 0
    if spec.transposed and b > a:
        t_offset = o0 + spec.pad_lo[sd] - a * spec.stride[sd]
    return _Local(spec, sd, tuple(conv_padding), tuple(explicit), tuple(const) if need_const else None,
                  o1 - o0, b - a, t_offset)


def _pad_other(x: torch.Tensor, loc: _Local) -> torch.Tensor:
    lead = x.ndim - loc.spec.nd
    for i, idx in loc.explicit:
        x = x.index_select(lead + i, torch.tensor(idx, device=x.device))
    if loc.const_pad is not None:
        x = torch.nn.functional.pad(x, loc.const_pad)
    return x


def _unpad_other(g: torch.Tensor, loc: _Local, ext_shape: torch.Size) -> torch.Tensor:
    lead = g.ndim - loc.spec.nd
    if loc.const_pad is not None:
        for j in range(loc.spec.nd):
            lo, hi = loc.const_pad[2 * j], loc.const_pad[2 * j + 1]
            if lo or hi:
                dim = g.ndim - 1 - j
                g = g.narrow(dim, lo, g.shape[dim] - lo - hi)
    for i, idx in reversed(loc.explicit):
        dim = lead + i
        shape = list(g.shape)
        shape[dim] = ext_shape[dim]
        out = g.new_zeros(shape)
        out.index_add_(dim, torch.tensor(idx, device=g.device), g)
        g = out
    return g


def _tconv_args(loc: _Local) -> tuple[list[int], list[int]]:
    spec = loc.spec
    pad = [0 if i == loc.sd else spec.pad_lo[i] for i in range(spec.nd)]
    opad = [0 if i == loc.sd else spec.output_padding[i] for i in range(spec.nd)]
    return pad, opad


def _crop_rows(full: torch.Tensor, dim: int, offset: int, rows: int) -> torch.Tensor:
    """Rows ``[offset, offset + rows)`` of ``full`` along ``dim``, zero where out of range."""
    n = full.shape[dim]
    lo, hi = max(offset, 0), min(offset + rows, n)
    if lo == offset and hi == offset + rows:
        return full.narrow(dim, offset, rows)
    shape = list(full.shape)
    shape[dim] = rows
    out = full.new_zeros(shape)
    if hi > lo:
        out.narrow(dim, lo - offset, hi - lo).copy_(full.narrow(dim, lo, hi - lo))
    return out


def _uncrop_rows(g: torch.Tensor, dim: int, offset: int, full_rows: int) -> torch.Tensor:
    """Adjoint of :func:`_crop_rows`."""
    rows = g.shape[dim]
    shape = list(g.shape)
    shape[dim] = full_rows
    out = g.new_zeros(shape)
    lo, hi = max(offset, 0), min(offset + rows, full_rows)
    if hi > lo:
        out.narrow(dim, lo, hi - lo).copy_(g.narrow(dim, lo - offset, hi - lo))
    return out


def _out_local_shape(ext: torch.Tensor, loc: _Local, out_channels: int) -> list[int]:
    spec = loc.spec
    lead = ext.ndim - spec.nd
    spatial = []
    for i in range(spec.nd):
        if i == loc.sd:
            spatial.append(loc.out_rows)
        else:
            n = ext.shape[lead + i]
            spatial.append(_out_len(spec, i, n))
    return [ext.shape[0], out_channels, *spatial]


def local_forward(ext: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, loc: _Local) -> torch.Tensor:
    spec = loc.spec
    dim = ext.ndim - spec.nd + loc.sd
    out_channels = w.shape[1] * spec.groups if spec.transposed else w.shape[0]
    if loc.out_rows == 0 or loc.ext_rows == 0:
        y = ext.new_zeros(_out_local_shape(ext, loc, out_channels))
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * spec.nd))
        return y
    if not spec.transposed:
        xp = _pad_other(ext, loc)
        return aten.convolution(xp, w, b, list(spec.stride), list(loc.conv_padding), list(spec.dilation),
                                False, [0] * spec.nd, spec.groups)
    pad, opad = _tconv_args(loc)
    full = aten.convolution(ext, w, None, list(spec.stride), pad, list(spec.dilation), True, opad, spec.groups)
    y = _crop_rows(full, dim, loc.t_offset, loc.out_rows)
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * spec.nd))
    return y


def local_backward(
    gy: torch.Tensor, ext: torch.Tensor, w: torch.Tensor, has_bias: bool, loc: _Local, mask: tuple[bool, bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    spec = loc.spec
    dim = ext.ndim - spec.nd + loc.sd
    sum_dims = [0, *range(2, gy.ndim)]
    gb = gy.sum(sum_dims) if (has_bias and mask[2]) else None
    if loc.out_rows == 0 or loc.ext_rows == 0:
        gx = torch.zeros_like(ext) if mask[0] else None
        gw = torch.zeros_like(w) if mask[1] else None
        return gx, gw, gb
    if not spec.transposed:
        xp = _pad_other(ext, loc)
        gxp, gw, _ = aten.convolution_backward(
            gy, xp, w, None, list(spec.stride), list(loc.conv_padding), list(spec.dilation), False,
            [0] * spec.nd, spec.groups, [mask[0], mask[1], False],
        )
        gx = _unpad_other(gxp, loc, ext.shape) if mask[0] else None
        return gx, gw, gb
    pad, opad = _tconv_args(loc)
    full_rows = (loc.ext_rows - 1) * spec.stride[loc.sd] + spec.dilation[loc.sd] * (spec.kernel[loc.sd] - 1) + 1
    gfull = _uncrop_rows(gy, dim, loc.t_offset, full_rows)
    gx, gw, _ = aten.convolution_backward(
        gfull, ext, w, None, list(spec.stride), pad, list(spec.dilation), True, opad, spec.groups,
        [mask[0], mask[1], False],
    )
    return gx, gw, gb


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
            if t.device_mesh != x.device_mesh and t.device_mesh.mesh_dim_names != x.device_mesh.mesh_dim_names:
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


def _local_param(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _param_grad(g: torch.Tensor | None, like, group: dist.ProcessGroup):
    """A replicated parameter's gradient: Partial DTensor when ``like`` (the weight) is a DTensor,
    summed plain tensor otherwise (plain parameters have no placement that could defer the sum).
    Replicated, so the local gradient has the global shape."""
    if g is None:
        return None
    if isinstance(like, DTensor):
        return DTensor.from_local(g, like.device_mesh, [Partial()] * like.device_mesh.ndim, run_check=False,
                                  shape=g.shape, stride=g.stride())
    return comm.all_reduce_sum(g.contiguous(), group)


def _local_grad(gy, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    """The output gradient as this rank's contiguous ``Shard(dim)`` slice, whatever its placement."""
    if isinstance(gy, DTensor):
        if tuple(gy.placements) != (Shard(dim),):
            gy = gy.redistribute(mesh, [Shard(dim)])
        gy = gy.to_local()
    return gy.contiguous()


def _geometry(x: DTensor, spec: ConvSpec, dim: int) -> tuple[HaloPlan, _Local]:
    """This rank's halo plan and local-op setup for ``x`` sharded on tensor dim ``dim``."""
    mesh = x.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    sd = dim - (x.ndim - spec.nd)
    spatial = tuple(x.shape[-spec.nd:])
    return _plan(spec, sd, spatial[sd], world, rank), _local_setup(spec, sd, spatial, world, rank)


def _halo_forward(x: DTensor, w, b, spec: ConvSpec, dim: int):
    """Gather the halo, run the local op, wrap the output. Returns ``(y, ext, w_local, plan, loc)``."""
    mesh = x.device_mesh
    plan, loc = _geometry(x, spec, dim)
    with stats.op_label(spec.name):
        ext = halo_gather(x.to_local(), dim, plan, mesh.get_group())
    wl = _local_param(w)
    y = local_forward(ext, wl, _local_param(b), loc)
    out_channels = wl.shape[1] * spec.groups if spec.transposed else wl.shape[0]
    return _wrap(y, mesh, dim, conv_out_shape(spec, tuple(x.shape), out_channels)), ext, wl, plan, loc


def _wrap(local: torch.Tensor, mesh: DeviceMesh, dim: int, shape) -> DTensor:
    shape = torch.Size(shape)
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=shape, stride=contiguous_stride(shape))


class _HaloConv(torch.autograd.Function):
    """Module path: one autograd node; keeps the extended input for backward."""

    @staticmethod
    def forward(ctx, x: DTensor, w, b, spec: ConvSpec, dim: int):
        y, ext, wl, plan, loc = _halo_forward(x, w, b, spec, dim)
        ctx.save_for_backward(ext, wl)
        ctx.meta = (spec, dim, plan, loc, x.device_mesh, x.shape, b is not None)
        ctx.params = (w, b)
        return y

    @staticmethod
    def backward(ctx, gy: DTensor):
        ext, wl = ctx.saved_tensors
        spec, dim, plan, loc, mesh, x_shape, has_bias = ctx.meta
        w, b = ctx.params
        group = mesh.get_group()
        if not isinstance(gy, DTensor):
            raise DomainParallelError(f"{spec.name}: expected a DTensor gradient")
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        gx_ext, gw, gb = local_backward(_local_grad(gy, mesh, dim), ext, wl, has_bias, loc, mask)
        gx = None
        if mask[0]:  # the same on every rank (SPMD), so skipping the adjoint exchange is symmetric
            with stats.op_label(spec.name):
                gx_local = halo_scatter_add(gx_ext.contiguous(), dim, plan, group)
            gx = _wrap(gx_local, mesh, dim, x_shape)
        return gx, _param_grad(gw, w, group), _param_grad(gb, b, group), None, None


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
        raise DomainParallelError(f"{spec.name}: expected a {spec.nd + 2}-D (or unbatched {spec.nd + 1}-D) input, got {x.ndim}-D")
    dim = _spatial_shard_dim(x, spec.nd)
    if dim is None:
        return _builtin(x, weight, bias, spec)
    _check_operands(x, weight, bias, spec.name)
    if not batched:
        from .. import sharding as _sh  # noqa: F401

        y = conv(_unsqueeze0(x, dim), weight, bias, spec)
        return _squeeze0(y, dim + 1)
    _validate(spec, tuple(x.shape), spec.name)
    return _HaloConv.apply(x, weight, bias, spec, dim)


def _unsqueeze0(x: DTensor, dim: int) -> DTensor:
    local = x.to_local().unsqueeze(0)
    return _wrap(local, x.device_mesh, dim + 1, (1, *x.shape))


def _squeeze0(y: DTensor, dim: int) -> DTensor:
    local = y.to_local().squeeze(0)
    return _wrap(local, y.device_mesh, dim - 1, tuple(y.shape[1:]))


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
# Functional path: aten rules (below autograd)
# ---------------------------------------------------------------------------------------------


def _spec_from_aten(weight_shape, stride, padding, dilation, transposed, output_padding, groups) -> ConvSpec:
    nd = len(weight_shape) - 2
    return ConvSpec.make(nd, tuple(weight_shape[2:]), stride, tuple(padding), dilation, groups,
                         transposed=bool(transposed), output_padding=output_padding)


def _aten_args(args, kwargs, names):
    vals = list(args) + [kwargs[n] for n in names[len(args):]]
    return vals


_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_CONV_BW_NAMES = ("grad_output", "input", "weight", "bias_sizes", "stride", "padding", "dilation", "transposed",
                  "output_padding", "groups", "output_mask")


def _is_batch_sharded(x: DTensor) -> bool:
    return len(x.placements) == 1 and isinstance(x.placements[0], Shard) and x.placements[0].dim == 0


def _convolution_rule(op, args, kwargs):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = _aten_args(args, kwargs, _CONV_NAMES)
    if not isinstance(x, DTensor):
        return NotImplemented
    nd = x.ndim - 2
    dim = _spatial_shard_dim(x, nd)
    if dim is None:
        if not _is_batch_sharded(x):
            return NotImplemented
        # PyTorch 2.13 mis-shapes uneven batch shards; the local op is exact, so do it ourselves
        _check_operands(x, w, b, "aten.convolution")
        y = aten.convolution(x.to_local(), _local_param(w), _local_param(b), stride, padding, dilation, transposed,
                             output_padding, groups)
        shape = (x.shape[0], *y.shape[1:])
        return _wrap(y, x.device_mesh, 0, shape)
    spec = _spec_from_aten(w.shape, stride, padding, dilation, transposed, output_padding, groups)
    _check_operands(x, w, b, f"aten.convolution ({spec.name})")
    _validate(spec, tuple(x.shape), spec.name)
    return _halo_forward(x, w, b, spec, dim)[0]


def _convolution_backward_rule(op, args, kwargs):
    (gy, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
     mask) = _aten_args(args, kwargs, _CONV_BW_NAMES)
    if not isinstance(x, DTensor):
        return NotImplemented
    nd = x.ndim - 2
    dim = _spatial_shard_dim(x, nd)
    if dim is None:
        if not _is_batch_sharded(x):
            return NotImplemented
        return _batch_backward(gy, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask)
    spec = _spec_from_aten(w.shape, stride, padding, dilation, transposed, output_padding, groups)
    mesh = x.device_mesh
    group = mesh.get_group()
    plan, loc = _geometry(x, spec, dim)
    gyl = _local_grad(gy, mesh, dim)
    with stats.op_label(spec.name):
        ext = halo_gather(x.to_local(), dim, plan, group)  # recomputed: aten saved only the shard
    wl = _local_param(w)
    has_bias = bias_sizes is not None and bool(mask[2])
    gx_ext, gw, gb = local_backward(gyl, ext, wl, has_bias, loc, (True, bool(mask[1]), bool(mask[2])))
    with stats.op_label(spec.name):
        gx_local = halo_scatter_add(gx_ext.contiguous(), dim, plan, group)
    gx = _wrap(gx_local, mesh, dim, x.shape) if mask[0] else None
    return gx, _param_grad(gw, w, group) if mask[1] else None, _param_grad(gb, w, group) if mask[2] else None


def _batch_backward(gy, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask):
    mesh = x.device_mesh
    group = mesh.get_group()
    gx, gw, gb = aten.convolution_backward(_local_grad(gy, mesh, 0), x.to_local(), _local_param(w), bias_sizes, stride,
                                           padding, dilation, transposed, output_padding, groups, mask)
    gx_out = _wrap(gx, mesh, 0, x.shape) if mask[0] else None
    return gx_out, _param_grad(gw, w, group) if mask[1] else None, _param_grad(gb, w, group) if mask[2] else None


register_rule(aten.convolution.default, _convolution_rule)
register_rule(aten.convolution_backward.default, _convolution_backward_rule)
