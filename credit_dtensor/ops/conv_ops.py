"""The halo convolution as ``torch.library`` custom ops on local tensors (what ``torch.compile``
sees: opaque nodes whose implementation exchanges the halo rows), and the eager autograd
functions that run the same implementations without the custom-op dispatch layers.

The spec travels as a list of ints (:func:`encode`); the forward returns the extended input as
a second output so the backward never fetches the halo again.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor, Partial, Shard

from .. import intercept, stats
from ..dtensor import as_dtensor, global_stride, wrap_shard
from ..halo import assemble, disassemble, halo_gather_start, halo_scatter_add, halo_scatter_add_start, own_rows
from . import _groups
from .conv_local import local_backward, local_forward, local_setup
from .conv_spec import MODES, ConvSpec, conv_out_shape, plan

__all__ = ["halo_conv", "halo_conv_backward", "HaloConvEager", "HaloConvDTensor", "FoldedConv", "encode", "decode"]

# ---------------------------------------------------------------------------------------------
# The custom ops (plain local tensors; the spec travels as a list of ints)
# ---------------------------------------------------------------------------------------------


def encode(spec: ConvSpec) -> list[int]:
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
def decode(enc: tuple[int, ...]) -> ConvSpec:
    nd = enc[0]
    f = [tuple(enc[4 + i * nd : 4 + (i + 1) * nd]) for i in range(6)]
    return ConvSpec(nd, bool(enc[1]), f[0], f[1], f[2], f[3], f[4], f[5], enc[2], MODES[enc[3]])


def _setup(x: torch.Tensor, enc: list[int], n: int, dim: int, world: int, rank: int):
    spec = decode(tuple(enc))
    sd = dim - (x.ndim - spec.nd)
    spatial = list(x.shape[-spec.nd :])
    spatial[sd] = n
    return spec, plan(spec, sd, n, world, rank), local_setup(spec, sd, tuple(spatial), world, rank)


_SETUPS: dict[tuple, tuple] = {}


def setup_cached(x: torch.Tensor, enc: list[int], n: int, dim: int, world: int, rank: int):
    """:func:`_setup` for real tensors, memoised on the small key (the plan caches underneath hash
    every rank's row lists on each lookup)."""
    key = (*enc, n, dim, world, rank, *x.shape)
    hit = _SETUPS.get(key)
    if hit is None:
        if len(_SETUPS) >= 4096:
            _SETUPS.clear()
        hit = _SETUPS[key] = _setup(x, enc, n, dim, world, rank)
    return hit


def _interior(spec, hplan, loc) -> tuple[int, int, int, int] | None:
    """``(j0, j1, x0, rows)``: output rows ``[j0, j1)`` read only the rank's own rows, ``rows`` of
    them from row ``x0`` of the shard -- computed while the halo travels (non-transposed convs
    with a halo and at least one such row); ``None`` otherwise."""
    if spec.transposed or hplan.is_local or loc.out_rows == 0:
        return None
    own = own_rows(hplan)
    if own is None:
        return None
    pos, start, count = own
    s, reach = spec.stride[loc.sd], spec.dilation[loc.sd] * (spec.kernel[loc.sd] - 1)
    j0 = -(-pos // s)
    j1 = min(loc.out_rows, (pos + count - 1 - reach) // s + 1)
    if j1 <= j0 or (j0 == 0 and j1 == loc.out_rows):
        return None
    return j0, j1, start + j0 * s - pos, (j1 - j0 - 1) * s + reach + 1


def _forward_impl(x, w, b, enc, n, dim, world, rank, group):
    spec, hplan, loc = setup_cached(x, enc, n, dim, world, rank)
    split = _interior(spec, hplan, loc)
    with stats.op_label(spec.name):
        finish = halo_gather_start(x, dim, hplan, _groups.resolve(group))
    if split is None:
        ext = finish()
        y = local_forward(ext, w, b, loc)
    else:  # overlap: the interior rows are computed while the halo rows travel
        j0, j1, x0, rows = split
        mid = local_forward(x.narrow(dim, x0, rows), w, b, loc)
        ext = finish()
        s, reach = spec.stride[loc.sd], spec.dilation[loc.sd] * (spec.kernel[loc.sd] - 1)
        parts = [mid]
        if j0 > 0:
            parts.insert(0, local_forward(ext.narrow(dim, 0, (j0 - 1) * s + reach + 1), w, b, loc))
        if j1 < loc.out_rows:
            parts.append(local_forward(ext.narrow(dim, j1 * s, (loc.out_rows - j1 - 1) * s + reach + 1), w, b, loc))
        y = torch.cat(parts, dim) if len(parts) > 1 else mid
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
    spec, hplan, loc = setup_cached(x, enc, n, dim, world, rank)
    source = x if hplan.is_identity else ext
    gy = gy.contiguous()
    if mask[0] and (mask[1] or mask[2]) and not hplan.is_local:
        # overlap: the input gradient's halo rows travel back while the weight gradient is computed
        gx_ext, _, _ = local_backward(gy, source, w, has_bias, loc, (True, False, False))
        with stats.op_label(spec.name):
            finish = halo_scatter_add_start(gx_ext.contiguous(), dim, hplan, _groups.resolve(group))
        _, gw, gb = local_backward(gy, source, w, has_bias, loc, (False, mask[1], mask[2]))
        gx = finish()
        gx = gx.clone() if gx is gx_ext else gx
        return gx, (gw if gw is not None else w.new_empty(0)), (gb if gb is not None else w.new_empty(0))
    gx_ext, gw, gb = local_backward(gy, source, w, has_bias, loc, (mask[0], mask[1], mask[2]))
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
    spec = decode(tuple(enc))
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
    with intercept.suspended():  # local tensors only: no rule applies
        gx, gw, gb = _backward_impl(gy, x, ext, w, ctx.has_bias, mask, *ctx.args)
    return mask, gx, gw, gb


class HaloConvEager(torch.autograd.Function):
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


class HaloConvDTensor(torch.autograd.Function):
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
        ctx.x_meta = (x.device_mesh, x.placements, x.shape, (Shard(args[2]),))
        ctx.w_meta = (w.device_mesh, w.shape, None if b is None else b.shape)
        return wrap_shard(y, x.device_mesh, args[2], out_shape)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        mesh, placements, x_shape, out_placements = ctx.x_meta
        if isinstance(gy, DTensor):
            if gy.placements != out_placements:
                gy = gy.redistribute(mesh, out_placements)
            gy = gy.to_local()
        mask, gx, gw, gb = _eager_backward(ctx, gy)
        w_mesh, w_shape, b_shape = ctx.w_meta
        partial = (Partial(),) * w_mesh.ndim
        return (
            as_dtensor(gx, mesh, placements, x_shape, global_stride(gx, x_shape)) if mask[0] else None,
            as_dtensor(gw, w_mesh, partial, w_shape, gw.stride()) if mask[1] else None,
            as_dtensor(gb, w_mesh, partial, b_shape, gb.stride()) if mask[2] else None,
            None,
            None,
        )


class FoldedConv(torch.autograd.Function):
    """Eager mode: the local convolution of the shard extended with rows a norm already borrowed
    (:mod:`.fold`; ``rows`` in ``plan.recvs`` order). Nothing travels here: the rows' gradient
    flows back by autograd to the norm, which returns it to their owners with its own sums."""

    @staticmethod
    def forward(ctx, x, w, b, loc, plan, dim, *rows):  # type: ignore[override]
        ext = assemble(x, dim, plan, list(rows))
        ctx.save_for_backward(ext, w)
        ctx.has_bias, ctx.loc, ctx.plan, ctx.dim = b is not None, loc, plan, dim
        return local_forward(ext, w, b, loc)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        ext, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = (need[0] or any(need[6:]), need[1], ctx.has_bias and need[2])
        with intercept.suspended():  # local tensors only: no rule applies
            gx, gw, gb = local_backward(gy.contiguous(), ext, w, ctx.has_bias, ctx.loc, mask)
            gl, back = disassemble(gx, ctx.dim, ctx.plan) if mask[0] else (None, [None] * (len(need) - 6))
        return gl, gw if mask[1] else None, gb if mask[2] else None, None, None, None, *back
