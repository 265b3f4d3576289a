"""Exact max pooling and adaptive max pooling on DTensors sharded on a spatial dim.

PyTorch's kernel runs on each rank's extended rows (its output slice's window rows, fetched with
the halo primitive) with ``-inf`` for padding rows; an index that lands on a padding row (an
all-``-inf`` window) is moved to the window's first real row, as PyTorch does. Indices, when
returned, are *global* flat indices, equal to the single-device ones; the gradient is scattered
by the local ones. The public functions are in :mod:`.pool`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import intercept
from ..errors import DomainParallelError
from ..geometry import chunk_range
from ..geometry.resample import adaptive_range, pool_first_real, pool_out_len
from ..halo import assemble, cached_plan, disassemble, halo_gather, halo_scatter_add
from ._rows import RowOp, chunk_needs, local_shape, register_row_ops


def _neg_inf(dtype: torch.dtype) -> float:
    if not dtype.is_floating_point:
        raise DomainParallelError(f"max pooling of a sharded {dtype} tensor: only floating point dtypes are supported")
    return float("-inf")


class _IndexedMaxOp(RowOp):
    """Shared by max and adaptive max pooling: flat-index bookkeeping and the scatter adjoint.

    Subclasses set ``ext_len``, ``plan``, ``rows``, ``nd``, ``lead_ndim`` and implement
    ``_pool(ext) -> (y, ext_row_of_output_index)`` returning, per output element, the extended
    row its max came from (``h``) and the flat index's pieces before/after the sharded axis.
    """

    label = "max_pool"
    with_indices = False

    def _inner(self) -> int:
        return math.prod(self.in_shape[self.dim + 1 :])

    def _split(self, idx: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = self._inner()
        return idx // (inner * rows), (idx // inner) % rows, idx % inner

    def forward(self, x: torch.Tensor, group: dist.ProcessGroup):
        return self.forward_ext(halo_gather(x, self.dim, self.plan, group), x)

    def forward_ext(self, ext: torch.Tensor, x: torch.Tensor):
        """:meth:`forward` from the extended rows (the halo already there: a norm borrowed it)."""
        out_local = self.shape_like(x, self.out_shape, self.rows)
        if self.rows == 0:
            y = x.new_zeros(out_local)
            empty = torch.zeros(out_local, dtype=torch.long, device=x.device)
            return y, (empty if self.with_indices else None), empty
        y, pre, h, rest = self._pool(ext)
        inner = self._inner()
        n = self.in_shape[self.dim]
        ext_rows = self._ext_rows_tensor(x.device)
        global_idx = (pre * n + ext_rows[h]) * inner + rest
        local_idx = (pre * self.ext_len + h) * inner + rest
        return y, (global_idx if self.with_indices else None), local_idx

    def backward(self, g: torch.Tensor, saved: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return halo_scatter_add(self.backward_ext(g, saved), self.dim, self.plan, group)

    def backward_ext(self, g: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        """The gradient of the extended rows (before it goes to the rows' owners)."""
        ext_shape = self.shape_like(g, self.in_shape, self.ext_len)
        g_ext = g.new_zeros(ext_shape)
        if self.rows and self.ext_len:
            first = g.ndim - self.nd
            flat = g_ext.flatten(first)
            flat.scatter_add_(first, saved.flatten(first), g.flatten(first))
            g_ext = flat.view(ext_shape)
        return g_ext.contiguous()

    # lookup tables (cached per device)
    def _ext_rows_tensor(self, device: torch.device) -> torch.Tensor:
        key = ("ext_rows", device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(
                [-1 if r is None else r for r in self.ext_rows], dtype=torch.long, device=device
            )
        return self._cache[key]


class MaxPoolOp(_IndexedMaxOp):
    """``max_pool{1,2,3}d`` of one rank's shard (global indices)."""

    label = "max_pool"

    def __init__(self, in_shape, kernel, stride, padding, dilation, ceil_mode, with_indices, dim, world, rank):
        self.nd = len(kernel)
        self.dim, self.in_shape, self.with_indices = dim, tuple(in_shape), with_indices
        lead = len(in_shape) - self.nd
        sd = dim - lead
        out = [
            pool_out_len(in_shape[lead + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode)
            for i in range(self.nd)
        ]
        self.out_shape = tuple(in_shape[:lead]) + tuple(out)
        n, k, s, p, d = in_shape[dim], kernel[sd], stride[sd], padding[sd], dilation[sd]
        span = d * (k - 1) + 1

        def rows_of(o0, o1):
            if o1 <= o0:
                return ()
            a, b = o0 * s - p, (o1 - 1) * s - p + span
            touched = {o * s - p + j * d for o in range(o0, o1) for j in range(k)}
            return tuple(v if (0 <= v < n and v in touched) else None for v in range(a, b))

        needs = chunk_needs(out[sd], world, rows_of)
        self.plan = cached_plan(n, world, rank, needs)
        o0, o1 = chunk_range(out[sd], world, rank)
        self.rows, self.ext_len, self.a = o1 - o0, len(needs[rank]), o0 * s - p
        self.ext_rows = needs[rank]
        first = []
        for o in range(o0, o1):
            f = pool_first_real(o, n, k, s, p, d)
            if f is None:
                raise DomainParallelError(
                    f"max_pool: window {o} of the sharded dim (kernel {k}, stride {s}, padding {p}, dilation {d}) "
                    "reads only padding rows; PyTorch's result for it is undefined: use a smaller padding"
                )
            first.append(f - self.a)
        self.first = tuple(first)
        self.none_rows = tuple(i for i, r in enumerate(self.ext_rows) if r is None)
        self.kernel, self.stride, self.dilation, self.ceil_mode = list(kernel), list(stride), list(dilation), ceil_mode
        self.c_pad = list(padding)
        self.c_pad[sd] = 0
        self._cache: dict = {}

    def _tables(self, device: torch.device):
        key = ("tables", device)
        if key not in self._cache:
            none_mask = torch.zeros(self.ext_len, dtype=torch.bool, device=device)
            if self.none_rows:
                none_mask[list(self.none_rows)] = True
            self._cache[key] = (
                none_mask,
                torch.tensor(self.none_rows, dtype=torch.long, device=device),
                torch.tensor(self.first, dtype=torch.long, device=device),
            )
        return self._cache[key]

    def _pool(self, ext: torch.Tensor):
        none_mask, none_idx, first = self._tables(ext.device)
        if len(self.none_rows):
            ext = ext.index_fill(self.dim, none_idx, _neg_inf(ext.dtype))
        fn = getattr(F, f"max_pool{self.nd}d")
        y, idx = fn(ext, self.kernel, self.stride, self.c_pad, self.dilation, self.ceil_mode, return_indices=True)
        if y.shape[self.dim] != self.rows:
            raise AssertionError(f"max_pool: local output has {y.shape[self.dim]} rows, expected {self.rows}")
        pre, h, rest = self._split(idx, self.ext_len)
        if len(self.none_rows):
            shape = [1] * y.ndim
            shape[self.dim] = self.rows
            h = torch.where(none_mask[h], first.view(shape).expand_as(h), h)
        return y, pre, h, rest


class AdaptiveMaxPoolOp(_IndexedMaxOp):
    """``adaptive_max_pool{1,2,3}d`` of one rank's shard: every output row's window is stacked to
    a common length ``K`` (padded with ``-inf`` rows after the real ones) so PyTorch's adaptive
    kernel with ``rows`` outputs sees exactly one window per output row, in its own scan order."""

    label = "adaptive_max_pool"

    def __init__(self, in_shape, out_size, with_indices, dim, world, rank) -> None:
        self.nd = len(out_size)
        self.dim, self.in_shape, self.with_indices = dim, tuple(in_shape), with_indices
        lead = len(in_shape) - self.nd
        self.sd = sd = dim - lead
        self.out_shape = tuple(in_shape[:lead]) + tuple(out_size)
        n, n_out = in_shape[dim], out_size[sd]

        def rows_of(o0, o1):
            rows = set()
            for o in range(o0, o1):
                a, b = adaptive_range(o, n, n_out)
                rows.update(range(a, b))
            return tuple(sorted(rows))

        needs = chunk_needs(n_out, world, rows_of)
        self.plan = cached_plan(n, world, rank, needs)
        o0, o1 = chunk_range(n_out, world, rank)
        self.rows, self.ext_len, self.ext_rows = o1 - o0, len(needs[rank]), needs[rank]
        pos = {g: i for i, g in enumerate(self.ext_rows)}
        windows = [range(*adaptive_range(o, n, n_out)) for o in range(o0, o1)]
        self.K = max((len(w) for w in windows), default=1)
        self.stack = tuple(i for w in windows for i in [pos[r] for r in w] + [self.ext_len] * (self.K - len(w)))
        self.out_size = list(out_size)
        self._cache: dict = {}

    def _pool(self, ext: torch.Tensor):
        key = ("stack", ext.device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.stack, dtype=torch.long, device=ext.device)
        stack = self._cache[key]
        pad_row = ext.new_full(local_shape(ext.shape, self.dim, 1), _neg_inf(ext.dtype))
        stacked = torch.cat([ext, pad_row], self.dim).index_select(self.dim, stack)
        size = list(self.out_size)
        size[self.sd] = self.rows
        y, idx = getattr(F, f"adaptive_max_pool{self.nd}d")(stacked, size, return_indices=True)
        pre, hs, rest = self._split(idx, self.rows * self.K)
        h = stack[hs]
        return y, pre, h, rest


register_row_ops(MaxPoolOp, AdaptiveMaxPoolOp)


class FoldedMaxPool(torch.autograd.Function):
    """Max pooling of ``x`` whose halo rows a norm borrowed (:mod:`.fold`): ``(x, op, *rows) ->
    (y, global indices)`` assembled by the plan, no communication; backward returns the rows'
    gradient to the norm (which sends it to their owner in its own round)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: MaxPoolOp, *rows: torch.Tensor):  # type: ignore[override]
        y, idx, saved = op.forward_ext(assemble(x, op.dim, op.plan, list(rows)), x)
        ctx.op = op
        ctx.save_for_backward(saved)
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, g: torch.Tensor, _gidx: torch.Tensor | None):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        op = ctx.op
        with intercept.suspended():  # local tensors only: no rule applies
            own, back = disassemble(op.backward_ext(g.contiguous(), saved), op.dim, op.plan)
        return own, None, *back
