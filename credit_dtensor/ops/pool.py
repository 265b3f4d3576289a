"""Exact pooling on DTensors sharded on a spatial dim: max, average, adaptive average and adaptive
max pooling, 1-D/2-D/3-D, batched or not.

Average pooling (``count_include_pad``, ``divisor_override``, ``ceil_mode``) and adaptive average
pooling are separable: taps along the sharded axis (:class:`~._rows.SeparableOp`), PyTorch's
kernel on the other axes. Max pooling (dilation, ``ceil_mode``, global ``return_indices``) is in
:mod:`.max_pool`. Adaptive average pooling to fewer rows than ranks (global pooling, SE gates)
returns a ``Replicate`` tensor after one all-reduce of the pooled values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .. import comm, stats
from ..dtensor import domain_shard_dim, local_of, spatial_shard_dim, wrap_replicate, wrap_shard
from ..geometry import chunk_range, window_crosses_shards
from ..geometry.resample import adaptive_range, avg_pool_taps, pool_out_len
from . import _groups, fold
from ._autocast import cast_inputs
from ._route import route_rule
from ._rows import (
    SeparableOp,
    apply_row_op,
    build_row_op,
    domain_info,
    local_shape,
    meta_like,
    register_row_ops,
    row_op_ref,
)
from .family import family
from .max_pool import AdaptiveMaxPoolOp, FoldedMaxPool, MaxPoolOp
from .pointwise import local_apply

FAMILY = family("resample")

aten = torch.ops.aten


def _ntuple(v: int | Sequence[int] | None, n: int, default: Sequence[int] | None = None) -> tuple[int, ...]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        if default is None:
            raise ValueError("missing value")
        return tuple(default)
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(a) for a in v)
    return t * n if len(t) == 1 else t


class AdaptiveAvgPoolOp(SeparableOp):
    """Adaptive average pooling (== ``interpolate(mode='area')``) of one rank's shard."""

    label = "adaptive_avg_pool"

    def __init__(self, in_shape, out_size, dim, world, rank) -> None:
        self.nd = len(out_size)
        self.dim, self.in_shape = dim, tuple(in_shape)
        lead = len(in_shape) - self.nd
        self.out_shape = tuple(in_shape[:lead]) + tuple(out_size)
        n, n_out = in_shape[dim], out_size[dim - lead]
        self.sd = dim - lead

        def taps_of(o):
            a, b = adaptive_range(o, n, n_out)
            return [(r, 1.0 / (b - a)) for r in range(a, b)]

        self._setup_taps(n, n_out, taps_of, world, rank)
        self.out_size = list(out_size)

    def _other(self, yh: torch.Tensor) -> torch.Tensor:
        if self.nd == 1:
            return yh
        return getattr(aten, f"_adaptive_avg_pool{self.nd}d").default(
            yh, local_shape(self.out_size, self.sd, self.rows)
        )

    def _other_adjoint(self, g: torch.Tensor, yh_shape: list[int]) -> torch.Tensor:
        if self.nd == 1:
            return g
        return getattr(aten, f"_adaptive_avg_pool{self.nd}d_backward").default(g, g.new_empty(yh_shape))


class AvgPoolOp(SeparableOp):
    """``avg_pool{1,2,3}d`` of one rank's shard."""

    label = "avg_pool"

    def __init__(self, in_shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor, dim, world, rank):
        self.nd = len(kernel)
        self.dim, self.in_shape = dim, tuple(in_shape)
        lead = len(in_shape) - self.nd
        sd = self.sd = dim - lead
        out = [pool_out_len(in_shape[lead + i], kernel[i], stride[i], padding[i], 1, ceil_mode) for i in range(self.nd)]
        self.out_shape = tuple(in_shape[:lead]) + tuple(out)
        n = in_shape[dim]
        k, s, p = kernel[sd], stride[sd], padding[sd]
        h_only = self.nd == 1

        def taps_of(o):
            rows, div = avg_pool_taps(o, n, k, s, p, count_include_pad, divisor)
            if divisor is not None and not h_only:
                return rows  # stage C divides by the override
            return [(r, 1.0 / div) for r, _ in rows]

        self._setup_taps(n, out[sd], taps_of, world, rank)
        self.c_kernel = list(kernel)
        self.c_stride = list(stride)
        self.c_pad = list(padding)
        self.c_kernel[sd], self.c_stride[sd], self.c_pad[sd] = 1, 1, 0
        self.ceil_mode, self.count_include_pad, self.divisor = ceil_mode, count_include_pad, divisor

    def _other(self, yh: torch.Tensor) -> torch.Tensor:
        if self.nd == 1:
            return yh
        op = getattr(aten, f"avg_pool{self.nd}d").default
        return op(yh, self.c_kernel, self.c_stride, self.c_pad, self.ceil_mode, self.count_include_pad, self.divisor)

    def _other_adjoint(self, g: torch.Tensor, yh_shape: list[int]) -> torch.Tensor:
        if self.nd == 1:
            return g
        op = getattr(aten, f"avg_pool{self.nd}d_backward").default
        return op(
            g,
            g.new_empty(yh_shape),
            self.c_kernel,
            self.c_stride,
            self.c_pad,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor,
        )


register_row_ops(AdaptiveAvgPoolOp, AvgPoolOp)


def _pool_dim(input: torch.Tensor, nd: int, where: str) -> int | None:
    if input.ndim not in (nd + 1, nd + 2):
        return None  # let PyTorch raise its own error
    return spatial_shard_dim(input, nd, where)


def _per_row(fn, input, *args, **kwargs):
    """A pooling whose input is not sharded on a pooled dim: PyTorch's own. Sharded on a leading
    dim (``avg_pool1d`` over W of a ``(B, H, W)`` tensor, H its "channels"), each rank pools its own
    rows (``to_spatial`` moved the shard through an all-to-all and back)."""
    sd = domain_shard_dim(input)
    if sd is None:
        return fn(input, *args, **kwargs)
    return local_apply(fn, (input, *args), kwargs, input, sd, empty_rows=True)


def _max_pool(nd, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    where = f"max_pool{nd}d"
    dim = _pool_dim(input, nd, where)
    fn = getattr(F, where)
    if dim is None:
        return _per_row(
            fn, input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=return_indices
        )
    k = _ntuple(kernel_size, nd)
    s = _ntuple(stride, nd, k)
    p, d = _ntuple(padding, nd), _ntuple(dilation, nd)
    meta = fn(meta_like(input), k, s, p, d, ceil_mode=ceil_mode)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    op = row_op_ref(
        MaxPoolOp.__name__,
        (tuple(input.shape), k, s, p, d, bool(ceil_mode), True, dim, world, rank),
        dim,
        meta.shape,
        with_indices=True,
    )
    carry = fold.carried(input)
    folded = _folded_max_pool(input, op, carry, (k, s, p, d)) if carry is not None else None  # type: ignore[arg-type]
    y, idx = apply_row_op(input, op) if folded is None else folded  # type: ignore[arg-type]
    return (y, idx) if return_indices else y


def _folded_max_pool(x: DTensor, op, carry, geometry: tuple) -> tuple[DTensor, DTensor] | None:
    """Max pooling from the halo rows a norm borrowed (:mod:`.fold`): ``(y, indices)``, or ``None``
    (the probe noted, or a carry made for another plan: the usual exchange runs, as on every rank)."""
    mesh = x.device_mesh
    key = fold.RowKey(op.name, op.args[:-2], tuple(x.shape), op.dim, _groups.name_of(mesh))
    if isinstance(carry, fold.Probe):
        k, s, p, d = (g[op.dim - (x.ndim - len(geometry[0]))] for g in geometry)
        if window_crosses_shards(k, s, d, p, p):
            fold.note_consumer(carry, key)
        return None
    if carry.conv != key:
        return None
    built = build_row_op(op.name, op.args)
    if not fold.same_plan(built.plan, carry.plan):
        return None
    y, idx = FoldedMaxPool.apply(local_of(x), built, *carry.rows)
    return wrap_shard(y, mesh, op.dim, op.out_shape), wrap_shard(idx, mesh, op.dim, op.out_shape)


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool1d``; exact on sharded inputs; indices are global (as on one device)."""
    return _max_pool(1, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool2d``; exact on sharded inputs; indices are global (as on one device)."""
    return _max_pool(2, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool3d``; exact on sharded inputs; indices are global (as on one device)."""
    (input,) = cast_inputs("max_pool3d", input)  # torch.autocast: fp32 on CPU
    return _max_pool(3, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _avg_pool(
    nd, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    where = f"avg_pool{nd}d"
    dim = _pool_dim(input, nd, where)
    fn = getattr(F, where)
    extra = {} if nd == 1 else {"divisor_override": divisor_override}
    if dim is None:
        return _per_row(fn, input, kernel_size, stride, padding, ceil_mode, count_include_pad, **extra)
    k = _ntuple(kernel_size, nd)
    s = _ntuple(stride, nd, k)
    p = _ntuple(padding, nd)
    meta = fn(meta_like(input), k, s, p, ceil_mode, count_include_pad, **extra)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    args = (tuple(input.shape), k, s, p, bool(ceil_mode), bool(count_include_pad), divisor_override, dim, world, rank)
    return apply_row_op(input, row_op_ref(AvgPoolOp.__name__, args, dim, meta.shape))  # type: ignore[arg-type]


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """``F.avg_pool1d``; exact on sharded inputs."""
    return _avg_pool(1, input, kernel_size, stride, padding, ceil_mode, count_include_pad)


def avg_pool2d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """``F.avg_pool2d``; exact on sharded inputs."""
    return _avg_pool(2, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool3d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """``F.avg_pool3d``; exact on sharded inputs."""
    (input,) = cast_inputs("avg_pool3d", input)  # torch.autocast: fp32 on CPU
    return _avg_pool(3, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive_size(input: torch.Tensor, output_size, nd: int) -> tuple[int, ...]:
    size = _ntuple(output_size, nd) if not isinstance(output_size, (list, tuple)) else tuple(output_size)
    if len(size) == 1 and nd > 1:
        size = size * nd
    spatial = input.shape[input.ndim - nd :]
    return tuple(int(spatial[i]) if size[i] is None else int(size[i]) for i in range(nd))


def _adaptive_avg(nd, input, output_size):
    where = f"adaptive_avg_pool{nd}d"
    dim = _pool_dim(input, nd, where)
    fn = getattr(F, where)
    if dim is None:
        return _per_row(fn, input, output_size)
    size = _adaptive_size(input, output_size, nd)
    meta = fn(meta_like(input), size)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    if size[dim - (input.ndim - nd)] < world:
        return _pooled_replicate(fn, input, dim, size, nd)
    op = row_op_ref(AdaptiveAvgPoolOp.__name__, (tuple(input.shape), size, dim, world, rank), dim, meta.shape)
    return apply_row_op(input, op)  # type: ignore[arg-type]


def _pooled_replicate(fn, input: DTensor, dim: int, size: tuple[int, ...], nd: int) -> DTensor:
    """Adaptive average pooling to fewer rows than ranks (global pooling, SE gates, classifier
    heads): each rank sums its rows' share of every window, one all-reduce of the *pooled* tensor
    finishes it, and the result is ``Replicate`` -- a pooled vector, not a shard most ranks would
    hold empty (which ``flatten`` and broadcasting against the activation would have to gather)."""
    mesh, group, world, rank = domain_info(input)
    n, n_out = input.shape[dim], size[dim - (input.ndim - nd)]
    a0, a1 = chunk_range(n, world, rank)
    x = input.to_local()
    weights = torch.zeros(n_out, a1 - a0, dtype=x.dtype, device=x.device)
    for o in range(n_out):
        s, e = adaptive_range(o, n, n_out)
        if max(s, a0) < min(e, a1):
            weights[o, max(s, a0) - a0 : min(e, a1) - a0] = 1.0 / (e - s)
    part = torch.movedim(torch.movedim(x, dim, -1) @ weights.T, -1, dim)
    pooled = fn(part, size)  # the other dims (rows are already pooled: identity along H)
    with stats.op_label("adaptive_avg_pool"):
        total = comm.sum_over_ranks(pooled, group)
    return wrap_replicate(total, mesh)


def adaptive_avg_pool1d(input, output_size):
    """``F.adaptive_avg_pool1d``; exact on sharded inputs."""
    return _adaptive_avg(1, input, output_size)


def adaptive_avg_pool2d(input, output_size):
    """``F.adaptive_avg_pool2d``; exact on sharded inputs."""
    return _adaptive_avg(2, input, output_size)


def adaptive_avg_pool3d(input, output_size):
    """``F.adaptive_avg_pool3d``; exact on sharded inputs."""
    (input,) = cast_inputs("adaptive_avg_pool3d", input)  # torch.autocast: fp32 on CPU
    return _adaptive_avg(3, input, output_size)


def _adaptive_max(nd, input, output_size, return_indices=False):
    where = f"adaptive_max_pool{nd}d"
    dim = _pool_dim(input, nd, where)
    fn = getattr(F, where)
    if dim is None:
        return _per_row(fn, input, output_size, return_indices)
    size = _adaptive_size(input, output_size, nd)
    meta = fn(meta_like(input), size)
    _, _, world, rank = domain_info(input)  # type: ignore[arg-type]
    op = row_op_ref(
        AdaptiveMaxPoolOp.__name__,
        (tuple(input.shape), size, True, dim, world, rank),
        dim,
        meta.shape,
        with_indices=True,
    )
    y, idx = apply_row_op(input, op)  # type: ignore[arg-type]
    if size[dim - (input.ndim - nd)] < world:
        y, idx = _max_pooled_replicate(y, idx, dim, return_indices)
    return (y, idx) if return_indices else y


def _max_pooled_replicate(y: DTensor, idx: DTensor, dim: int, with_indices: bool) -> tuple[DTensor, DTensor | None]:
    """Adaptive max pooling to fewer rows than ranks (global max pooling, CBAM/scSE-style gates,
    classifier heads): the exact row op leaves the few pooled rows on some ranks and none on the
    others; each rank places its rows into a zero tensor of the pooled size and one all-reduce of
    the *pooled* tensor makes it ``Replicate`` on every rank (values and global indices), as for
    adaptive average pooling -- no activation is gathered, and ``flatten`` + ``Linear`` heads and
    broadcasting against the activation need no further communication."""
    mesh, group, world, rank = domain_info(y)
    n_out = y.shape[dim]
    o0, o1 = chunk_range(n_out, world, rank)
    shape = list(y.shape)

    def padded(local: torch.Tensor) -> torch.Tensor:
        before, after = list(shape), list(shape)
        before[dim], after[dim] = o0, n_out - o1
        return torch.cat([local.new_zeros(before), local, local.new_zeros(after)], dim)

    with stats.op_label("adaptive_max_pool"):
        total = comm.sum_over_ranks(padded(y.to_local()), group)
        itotal = comm.all_reduce(padded(idx.to_local()), group, "sum") if with_indices else None
    return wrap_replicate(total, mesh), None if itotal is None else wrap_replicate(itotal, mesh)


def adaptive_max_pool1d(input, output_size, return_indices=False):
    """``F.adaptive_max_pool1d``; exact on sharded inputs; indices are global."""
    return _adaptive_max(1, input, output_size, return_indices)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """``F.adaptive_max_pool2d``; exact on sharded inputs; indices are global."""
    return _adaptive_max(2, input, output_size, return_indices)


def adaptive_max_pool3d(input, output_size, return_indices=False):
    """``F.adaptive_max_pool3d``; exact on sharded inputs; indices are global."""
    return _adaptive_max(3, input, output_size, return_indices)


def _routes() -> dict:
    """``F.*pool*`` -> (our function, spatial dims, implied kwargs). ``F.max_poolNd`` dispatches on
    ``return_indices``; its torch-function call names the dispatcher."""
    table: dict = {}
    for nd in (1, 2, 3):
        mp, amp = globals()[f"max_pool{nd}d"], globals()[f"adaptive_max_pool{nd}d"]
        table[getattr(F, f"max_pool{nd}d")] = (mp, nd, {})
        table[getattr(F, f"max_pool{nd}d_with_indices")] = (mp, nd, {"return_indices": True})
        table[getattr(F, f"avg_pool{nd}d")] = (globals()[f"avg_pool{nd}d"], nd, {})
        table[getattr(F, f"adaptive_avg_pool{nd}d")] = (globals()[f"adaptive_avg_pool{nd}d"], nd, {})
        table[getattr(F, f"adaptive_max_pool{nd}d")] = (amp, nd, {})
        table[getattr(F, f"adaptive_max_pool{nd}d_with_indices")] = (amp, nd, {"return_indices": True})
    return table


_POOL_ROUTES = _routes()
FAMILY.rule(_POOL_ROUTES, h="halo", note="input rows of each output row gathered")(
    route_rule("pool_rule", _POOL_ROUTES, per_channel=True)
)
