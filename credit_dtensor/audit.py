"""Sharding audit: what the converter will do to each module, and what cannot be exact.

``plan(model, domain, input_shape)`` runs the *plain* model once on the ``meta`` device (no
memory, no compute; a real zero input on CPU if a meta run fails) with forward hooks for shapes
and a ``TorchFunctionMode`` that follows where H is in every tensor. Each module gets a row:

* the rule it runs under -- ``halo`` (rows fetched from other shards, per side), ``distributed
  stats``, ``re-chunk`` (padding), ``resample``, ``shard-local`` (declared), ``local``, ``custom``,
  ``unsupported`` (no exact rule: refused) or ``unknown`` (H could not be followed);
* the minimum local H the rule needs (``0``: any shard size, empty shards included);
* hazards -- operations whose meaning changes when H is split: attention / window partitioning
  over H (a reshape that splits or merges H), Linear or matmul contracting H, softmax and global
  over H without an exact rule, indexing one row of H. Inside a module declared shard-local they are notes: they act on local rows.

A shard-local module whose windows do not fit the shards for the given input is an error: the
plan says so before anything runs, with the largest domain size that would work.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .convert import Converter, converter_for, family_errors, window_height
from .errors import DomainParallelError
from .geometry import chunk_range, chunk_sizes
from .mesh import DomainParallelManager
from .nn._base import DomainParallelModule
from .nn.local import block_fits

__all__ = ["plan", "Plan", "PlanRow", "render_plan"]

logger = logging.getLogger(__name__)

#: Spatial modules that mix rows along H and need an exact rule (refused when none is loaded).
_SPATIAL = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Fold,
    nn.Unfold,
)


@dataclass
class PlanRow:
    """One module of the audit."""

    path: str
    kind: str
    rule: str
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    halo: tuple[int, int] | None = None  # max rows received from lower / higher ranks (None: not computed)
    min_local_h: int = 0
    hazards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    calls: int = 0

    @property
    def status(self) -> str:
        return "error" if self.errors else "hazard" if self.hazards else "ok"


@dataclass
class Plan:
    """The audit of one model for one input shape and domain size."""

    model: str
    input_shape: tuple[int, ...]
    domain: int
    shard_dim: int
    rows: list[PlanRow]
    traced_on: str
    errors: list[str] = field(default_factory=list)
    max_domain: int | None = None  # largest domain size meeting every shard-local constraint

    @property
    def ok(self) -> bool:
        """No errors (hazards are allowed: they are reported, not fatal)."""
        return not self.errors and not any(r.errors for r in self.rows)

    @property
    def hazards(self) -> list[tuple[str, str]]:
        return [(r.path, h) for r in self.rows for h in r.hazards]

    def row(self, path: str) -> PlanRow:
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(path)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.rule] = counts.get(r.rule, 0) + 1
        parts = ", ".join(f"{n} {rule}" for rule, n in sorted(counts.items()))
        h = self.input_shape[self.shard_dim]
        shards = chunk_sizes(h, self.domain)
        text = f"{self.model}: input {tuple(self.input_shape)}, H={h} over {self.domain} ranks {shards}; {parts}"
        text += f"; {len(self.hazards)} hazard(s)"
        if not self.ok:
            n_err = len(self.errors) + sum(len(r.errors) for r in self.rows)
            text += f"; {n_err} error(s)"
        return text

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=_NullFile())
        render_plan(self, console)
        return console.export_text()


class _NullFile:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def render_plan(p: Plan, console: Console | None = None, *, show_local: bool = True) -> None:
    """Print the plan as a rich table (``show_local=False`` hides plain local rows)."""
    console = console or Console()
    table = Table(title=p.summary(), title_justify="left", show_lines=False)
    for col in ("module", "type", "rule", "halo ↑/↓", "min local H", "in → out (no batch)", "hazards / notes"):
        table.add_column(col, overflow="fold")
    for r in p.rows:
        if not show_local and r.rule == "local" and r.status == "ok" and not r.notes:
            continue
        style = {"error": "red", "hazard": "yellow"}.get(r.status, "")
        halo = "-" if r.halo is None else f"{r.halo[0]}/{r.halo[1]}"
        shapes = "" if r.in_shape is None else f"{_shape(r.in_shape[1:])} → {_shape((r.out_shape or (0,))[1:])}"
        text = [f"[red]ERROR[/red] {e}" for e in r.errors]
        text += [f"[yellow]HAZARD[/yellow] {h}" for h in r.hazards]
        text += [f"[dim]{n}[/dim]" for n in r.notes]
        table.add_row(
            r.path or "(root)",
            r.kind,
            f"[{style}]{r.rule}[/{style}]" if style else r.rule,
            halo,
            "any" if r.min_local_h == 0 else str(r.min_local_h),
            shapes,
            "\n".join(text),
        )
    console.print(table)
    for e in p.errors:
        console.print(f"[red]error:[/red] {e}")
    if p.ok:
        console.print(f"[green]plan ok[/green]: {len(p.hazards)} hazard(s) to review")


def _shape(s: tuple[int, ...] | None) -> str:
    return "?" if s is None else "×".join(str(v) for v in s)


# ---------------------------------------------------------------------------------------------
# Following H through the forward
# ---------------------------------------------------------------------------------------------


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


_SOFTMAX = {
    "softmax",
    "log_softmax",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "logcumsumexp",
    "sort",
    "argsort",
    "topk",
    "normalize",
}
_REDUCE = {
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "std",
    "var",
    "prod",
    "norm",
    "logsumexp",
    "argmax",
    "argmin",
    "all",
    "any",
    "count_nonzero",
    "var_mean",
    "std_mean",
    "median",
    "nanmean",
    "nansum",
}
#: reductions over H that credit_dtensor computes exactly (per-rank partials, one all-reduce)
_EXACT_REDUCE = _REDUCE - {"prod", "median"}
_SPATIAL_FUNCS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "group_norm",
    "instance_norm",
    "batch_norm",
    "layer_norm",
    "pixel_shuffle",
    "pixel_unshuffle",
    "max_pool2d_with_indices",
}
_VIEWS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_unsafe_view"}


def _dims_arg(args: tuple, kwargs: dict, pos: int = 1, key: str = "dim") -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[pos] if len(args) > pos else None


def _norm_dims(d: Any, ndim: int) -> list[int] | None:
    if d is None:
        return None
    if isinstance(d, int):
        d = [d]
    try:
        return [int(v) % max(ndim, 1) for v in d]
    except TypeError:
        return None


class _HTracker(TorchFunctionMode):
    """Follows the dim of H through torch functions; records events per executing module."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.h: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []
        self.events: list[tuple[str, str, str, int | None]] = []  # (path, kind, message, block)
        self.module_h: dict[str, int] = {}  # global H at each module's first input
        self.merged: set[int] = set()  # tensors whose H dim also holds other dims (after a merge)

    def mark(self, t: torch.Tensor, h: int | None, merged: bool = False) -> None:
        if h is not None and isinstance(t, torch.Tensor):
            self.h[id(t)] = h
            self.keep.append(t)
            if merged:
                self.merged.add(id(t))

    def get(self, t: Any) -> int | None:
        return self.h.get(id(t)) if isinstance(t, torch.Tensor) else None

    def event(self, kind: str, msg: str, block: int | None = None) -> None:
        self.events.append((self.stack[-1] if self.stack else "", kind, msg, block))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._observe(func, args, kwargs, out)
        except Exception:  # noqa: BLE001 - the tracker must never break the model's forward
            logger.debug("audit: could not follow H through %s", _name(func), exc_info=True)
        return out

    # --- rules ---------------------------------------------------------------------------------
    def _observe(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = _name(func)
        leaves = tree_flatten((args, kwargs))[0]
        ins = [(t, self.get(t)) for t in leaves if self.get(t) is not None]
        if not ins:
            return
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            return
        t, h = ins[0]
        nd = t.ndim
        n_before = len(self.keep)
        self._dispatch(name, func, args, kwargs, t, h, nd, outs)
        if id(t) in self.merged:
            for o in self.keep[n_before:]:
                self.merged.add(id(o))

    def _dispatch(
        self,
        name: str,
        func: Any,
        args: tuple,
        kwargs: dict,
        t: torch.Tensor,
        h: int,
        nd: int,
        outs: list[torch.Tensor],
    ) -> None:
        if name in ("__get__", "size", "dim", "numel", "__len__", "item", "tolist"):
            return
        if name in _VIEWS:
            return self._view(t, h, outs[0], name)
        if name in ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"):
            return self._permute(t, h, outs[0], name, args, kwargs)
        if name in ("unsqueeze", "squeeze"):
            return self._shape_follow(t, h, outs[0], name)
        if name == "linear":
            if t is args[0] and h == nd - 1:
                self.event("hazard", "Linear over H: mixes the rows of every shard")
                return
            return self.mark(outs[0], h)
        if name in ("matmul", "__matmul__", "bmm", "mm", "__rmatmul__"):
            return self._matmul(args, outs[0], name)
        if name == "einsum":
            return self._einsum(args, outs[0])
        if name == "scaled_dot_product_attention":
            q = args[0]
            hq = self.get(q)
            if any(self.get(a) in (a.ndim - 2, a.ndim - 1) for a in args[:3] if isinstance(a, torch.Tensor)):
                self.event("hazard", "attention over H tokens (scaled_dot_product_attention): tokens span shards")
                return
            return self.mark(outs[0], hq)
        if name == "multi_head_attention_forward":
            self.event("hazard", "nn.MultiheadAttention over tokens that include H: attention spans shards")
            return
        if name == "flip":
            dims = _norm_dims(_dims_arg(args, kwargs, 1, "dims"), nd)
            if dims is None or h in dims:
                self.event("note", "flip along H: exact, rows exchanged between mirrored ranks")
            return self.mark(outs[0], h)
        if name in _SOFTMAX:
            dims = _norm_dims(_dims_arg(args, kwargs), nd)
            if dims is None and name in ("normalize",):
                dims = [1]
            if dims is None or h in dims:
                self.event("hazard", f"{name} over H: mixes the rows of every shard")
                return
            return self.mark(outs[0], h)
        if name in _REDUCE:
            dims = _norm_dims(_dims_arg(args, kwargs), nd)
            if dims is None or h in dims:
                if name in _EXACT_REDUCE:
                    self.event("note", f"{name} over H: exact (per-rank partials, one all-reduce); result Replicate")
                else:
                    self.event("hazard", f"{name} over H: no exact rule, PyTorch gathers the tensor")
                return
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
            return self.mark(outs[0], h if keep else h - sum(d < h for d in dims))
        if name.startswith("adaptive_") and "pool" in name:
            if outs[0].shape[h] == 1 and t.shape[h] > 1:
                self.event("note", f"global pooling over H ({name} to 1): exact, one all-reduce; result Replicate")
                return
            return self.mark(outs[0], h)
        if name == "roll":
            dims = _norm_dims(kwargs.get("dims", args[2] if len(args) > 2 else None), nd)
            if dims is None:
                self.event("hazard", "torch.roll without dims (flattened): PyTorch gathers the tensor")
            elif h in dims:
                self.event("note", "torch.roll along H (shifted windows): exact, only the shifted rows move")
            return self.mark(outs[0], h)
        if name == "__getitem__":
            return self._getitem(t, h, args[1] if len(args) > 1 else None, outs[0])
        if name in ("narrow", "select", "index_select", "gather", "take_along_dim", "repeat_interleave"):
            dim = _dims_arg(args, kwargs)
            if isinstance(dim, int) and dim % nd == h:
                if name in ("narrow", "index_select"):
                    self.event("note", f"{name} along H: exact, re-chunked (only rows that change owner move)")
                    return self.mark(outs[0], h)
                self.event("hazard", f"{name} along H: needs rows of other shards (PyTorch gathers)")
                return
            if name == "select":
                return self.mark(outs[0], h - (isinstance(dim, int) and dim % nd < h))
            return self.mark(outs[0], h)
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            dim = _dims_arg(args, kwargs, 1, "dim") or 0
            dim %= nd if name != "stack" else nd + 1
            if name == "stack":
                return self.mark(outs[0], h + (dim <= h))
            if dim == h:
                if name in ("cat", "concat", "concatenate"):
                    self.event("note", f"{name} along H: exact, re-chunked (only rows that change owner move)")
                    return self.mark(outs[0], h)
                self.event("hazard", f"{name} along H: concatenating shards changes their layout")
                return
            return self.mark(outs[0], h)
        if name in ("chunk", "split", "unbind", "tensor_split", "split_with_sizes"):
            dim = _dims_arg(args, kwargs, 2 if name != "unbind" else 1, "dim") or 0
            if dim % nd == h:
                if name in ("chunk", "split"):
                    self.event("note", f"{name} along H: exact, each piece re-chunked over the ranks")
                    for o in outs:
                        self.mark(o, h)
                    return
                self.event("hazard", f"{name} along H: pieces do not follow the shards")
                return
            for o in outs:
                self.mark(o, h - (name == "unbind" and dim % nd < h))
            return
        if name == "pad":
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            if mode == "circular":
                self.event("note", "F.pad(mode='circular'): exact (wraps rows across ranks on H, local on W)")
            return self.mark(outs[0], h)
        if name in ("interpolate", "upsample", "upsample_bilinear", "upsample_nearest"):
            if not _resample_rules_loaded():
                self.event("hazard", "F.interpolate: no exact resample rule is loaded, PyTorch gathers the tensor")
            else:
                self.event("note", "F.interpolate: exact resample rule (halo rows)")
            return self.mark(outs[0], h)
        if name in _SPATIAL_FUNCS:
            return self.mark(outs[0], h)
        if name in ("repeat", "tile"):
            self.event("hazard", f"{name}: repeats along H change the shard layout")
            return
        self._generic(t, h, outs, name)

    def _generic(self, t: torch.Tensor, h: int, outs: list[torch.Tensor], name: str) -> None:
        for o in outs:
            diff = o.ndim - t.ndim
            if diff >= 0 and o.shape[h + diff] == t.shape[h]:
                self.mark(o, h + diff)
            else:
                self.event(
                    "unknown", f"H not followed through {name} ({_shape(tuple(t.shape))} → {_shape(tuple(o.shape))})"
                )

    def _shape_follow(self, t: torch.Tensor, h: int, o: torch.Tensor, name: str) -> None:
        """unsqueeze/squeeze: H is the dim of the same size with as many non-1 dims before it."""
        before = sum(1 for s in t.shape[:h] if s != 1)
        k = 0
        for j, s in enumerate(o.shape):
            if s == 1 and t.shape[h] != 1:
                continue
            if k == before and s == t.shape[h]:
                return self.mark(o, j)
            k += s != 1
        self.event("unknown", f"H not followed through {name}")

    def _permute(self, t, h, o, name, args, kwargs) -> None:
        nd = t.ndim
        if name == "permute":
            perm = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
            perm = [int(p) % nd for p in (kwargs.get("dims") or perm)]
            return self.mark(o, perm.index(h))
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = (int(v) % nd for v in args[1:3])
            return self.mark(o, b if h == a else a if h == b else h)
        if name == "t":
            return self.mark(o, 1 - h if nd == 2 else h)
        src = _norm_dims(args[1], nd) or []
        dst = _norm_dims(args[2], nd) or []
        order = [d for d in range(nd) if d not in src]
        for s, d in sorted(zip(dst, src, strict=False)):
            order.insert(s, d)
        return self.mark(o, order.index(h))

    def _view(self, t: torch.Tensor, h: int, o: torch.Tensor, name: str) -> None:
        ins, outs = list(t.shape), list(o.shape)
        gi, go = _view_group(ins, outs, h)
        if gi is None:
            self.event("unknown", f"H not followed through {name}")
            return
        gi_n = [d for d in gi if ins[d] != 1]
        go_n = [d for d in go if outs[d] != 1]
        if gi_n == [h] and len(go_n) == 1:
            return self.mark(o, go_n[0])
        if gi_n == [h] and len(go_n) > 1 and id(t) in self.merged:  # un-merging: back to H's own dim
            return self.mark(o, go_n[0])
        if gi_n == [h] and len(go_n) > 1:
            block = math.prod(outs[d] for d in go_n[1:])
            sizes = "×".join(str(outs[d]) for d in go_n)
            self.event(
                "split",
                f"window partition over H ({name} splits H={ins[h]} into {sizes}: windows of {block} rows)",
                block,
            )
            return self.mark(o, go_n[0])
        others = "×".join(str(ins[d]) for d in gi_n if d != h)
        self.event(
            "merge",
            f"{name} merges H={ins[h]} with dims {others} into one of {math.prod(outs[d] for d in go)}",
        )
        if len(go_n) == 1:  # keep following: attention/Linear over the merged dim is caught later
            self.mark(o, go_n[0], merged=True)

    def _matmul(self, args: tuple, o: torch.Tensor, name: str) -> None:
        a, b = args[0], args[1]
        ha, hb = self.get(a), self.get(b)
        if name == "__rmatmul__":
            a, b, ha, hb = b, a, hb, ha
        if ha is not None:
            if a.ndim >= 2 and ha == a.ndim - 1:
                self.event("hazard", "matmul contracts H (mixes all shards)")
                return
            self.mark(o, ha + (o.ndim - a.ndim))
        if hb is not None and isinstance(b, torch.Tensor):
            if b.ndim >= 2 and hb == b.ndim - 2:
                self.event("hazard", "matmul contracts H (mixes all shards)")
                return
            if b.ndim >= 2 and hb == b.ndim - 1:
                self.event("hazard", "attention over H: keys from every row (spans shards)")
                return
            if ha is None:
                self.mark(o, hb + (o.ndim - b.ndim))

    def _einsum(self, args: tuple, o: torch.Tensor) -> None:
        eq = args[0].replace(" ", "")
        ops = args[1:] if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else args[1]
        lhs, _, rhs = eq.partition("->")
        for sub, t in zip(lhs.split(","), ops, strict=False):
            h = self.get(t)
            if h is None or "." in sub:
                continue
            letter = sub[h]
            if letter not in rhs:
                self.event("hazard", f"einsum {eq} contracts H")
                return
            self.mark(o, rhs.index(letter))

    def _getitem(self, t: torch.Tensor, h: int, index: Any, o: torch.Tensor) -> None:
        idx = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (torch.Tensor, list)) for i in idx):
            self.event("unknown", "advanced indexing: H not followed")
            return
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in idx:
            if i is Ellipsis:
                expanded += [slice(None)] * (t.ndim - n_real)
            else:
                expanded.append(i)
        expanded += [slice(None)] * (t.ndim - sum(1 for i in expanded if i is not None))
        din = dout = 0
        for i in expanded:
            if i is None:
                dout += 1
                continue
            if din == h:
                if isinstance(i, slice):
                    if slice(None).indices(t.shape[h]) != i.indices(t.shape[h]):
                        self.event("note", f"slicing H with {i!r}: exact, re-chunked (only rows that change owner move)")
                    return self.mark(o, dout)
                self.event("hazard", f"indexing H with {i!r}: selects one row of one shard (PyTorch gathers)")
                return
            din += 1
            dout += isinstance(i, slice)


def _view_group(ins: list[int], outs: list[int], h: int) -> tuple[list[int] | None, list[int]]:
    """The groups of input and output dims that cover the same elements as input dim ``h``."""
    i = j = 0
    pi = po = 1
    gi: list[int] = []
    go: list[int] = []
    while i < len(ins) or j < len(outs):
        if pi == po and (gi or go):
            if h in gi:
                return gi, go
            gi, go = [], []
        if (pi <= po and i < len(ins)) or j >= len(outs):
            pi *= ins[i]
            gi.append(i)
            i += 1
        else:
            po *= outs[j]
            go.append(j)
            j += 1
    return (gi, go) if h in gi else (None, [])


def _resample_rules_loaded() -> bool:
    from .intercept import registered_functions

    return "F.interpolate" in registered_functions()


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def _halo_counts(needs: Sequence[Sequence[int | None]], n: int, world: int) -> tuple[int, int]:
    up = down = 0
    for r, rows in enumerate(needs):
        a, b = chunk_range(n, world, r)
        up = max(up, sum(1 for g in rows if g is not None and g < a))
        down = max(down, sum(1 for g in rows if g is not None and g >= b))
    return up, down


def _conv_row(row: PlanRow, mod: nn.Module, world: int, needed: bool) -> None:
    from .ops.conv_spec import conv_spec_from_module, needs

    spec = conv_spec_from_module(mod)
    if spec.transposed and row.in_shape and row.out_shape:  # output_size= may set output_padding
        nd, i = spec.nd, max(spec.nd - 2, 0)
        n_in, n_out = row.in_shape[-nd + i], row.out_shape[-nd + i]
        base = (n_in - 1) * spec.stride[i] - 2 * spec.pad_lo[i] + spec.dilation[i] * (spec.kernel[i] - 1) + 1
        op = list(spec.output_padding)
        op[i] = max(n_out - base, 0)
        spec = conv_spec_from_module(mod, output_padding=tuple(op))
    if row.in_shape is None:
        row.rule = "halo" if needed else "local"
        return
    i = max(spec.nd - 2, 0)
    n = row.in_shape[-spec.nd + i]
    row.halo = _halo_counts(needs(spec, i, n, world), n, world)
    row.rule = "halo" if any(row.halo) else "local"
    if not needed:
        row.notes.append("no wrapper needed: exact functional rule")
        if any(row.halo):
            row.notes.append("shards not stride-aligned here: a few rows move")
    sizes = chunk_sizes(n, world)
    if any(row.halo) and 0 < min(s for s in sizes if s) < max(row.halo):
        row.notes.append(f"shards {sizes} thinner than the halo: rows from beyond the neighbours")


def _pad_row(row: PlanRow, mod: nn.Module, world: int) -> None:
    from .geometry.pad import normalize_pad_mode, pad_sources

    row.rule = "re-chunk"
    pads = tuple(mod.padding)
    if row.in_shape is None or len(pads) < 2:
        return
    nd = len(pads) // 2
    lo, hi = (pads[2], pads[3]) if nd >= 2 else (pads[0], pads[1])
    n = row.in_shape[-2] if nd >= 2 else row.in_shape[-1]
    mode = {
        "_ConstantPadNd": "constant",
        "_ReflectionPadNd": "reflect",
        "_ReplicationPadNd": "replicate",
        "_CircularPadNd": "circular",
    }
    m = next((v for k, v in mode.items() if any(c.__name__ == k for c in type(mod).__mro__)), "constant")
    n_out = n + lo + hi
    needs = [pad_sources(*chunk_range(n_out, world, r), n, lo, hi, normalize_pad_mode(m)) for r in range(world)]
    row.halo = _halo_counts(needs, n, world)
    if (lo, hi) == (0, 0):
        row.notes.append("no H padding")


def _max_domain(constraints: list[tuple[int, int]], domain: int) -> int | None:
    for d in range(domain, 0, -1):
        if all(block_fits(n, d, b) for n, b in constraints):
            return d
    return None


def plan(
    model: nn.Module,
    manager_or_domain_size: DomainParallelManager | int,
    input_shape: Sequence[int],
    *,
    shard_dim: int = -2,
    dtype: torch.dtype = torch.float32,
    custom_converters: dict[type, Any] | None = None,
) -> Plan:
    """Audit the plain ``model`` for inputs of ``input_shape`` split over a domain (see module doc).

    Returns a :class:`Plan` (``plan.ok``, ``plan.rows``, ``plan.hazards``, ``print(plan)``).
    ``custom_converters`` (the ones you will pass to the converter) mark their modules ``custom``.
    """
    if not isinstance(model, nn.Module):
        raise DomainParallelError(
            f"plan: expected an nn.Module, got {type(model).__name__}: pass the plain model (a model factory "
            "must return an nn.Module)"
        )
    domain = (
        manager_or_domain_size.domain_world_size
        if isinstance(manager_or_domain_size, DomainParallelManager)
        else int(manager_or_domain_size)
    )
    if domain < 1:
        raise DomainParallelError(f"plan: domain size {domain} must be >= 1")
    shape = tuple(int(s) for s in input_shape)
    hdim = shard_dim % len(shape)
    if any(isinstance(m, DomainParallelModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    ):
        raise DomainParallelError("plan: the model is already converted; audit the plain model (before conversion)")
    custom = tuple(custom_converters or ())
    traced, traced_on, trace_error, tracker, order = _trace(model, shape, hdim, dtype)
    rows: dict[str, PlanRow] = {}

    def row_for(path: str, mod: nn.Module) -> PlanRow:
        if path not in rows:
            base = traced.get(path)
            rows[path] = PlanRow(path, type(mod).__name__, "")
            if base is not None:
                rows[path].in_shape, rows[path].out_shape, rows[path].calls = base.in_shape, base.out_shape, base.calls
        return rows[path]

    opaque: dict[str, int] = {}  # shard-local / custom subtrees: their insides run locally
    constraints: list[tuple[int, int]] = []
    for path, mod in model.named_modules():
        if any(path.startswith(p + ".") for p in opaque):
            continue
        if custom and isinstance(mod, custom):
            row = row_for(path, mod)
            row.rule = "custom"
            row.notes.append("custom converter: its subtree is not audited")
            opaque[path] = -1
            continue
        conv = converter_for(mod)
        needed = conv is not None and conv.applies(mod)
        if conv is None and list(mod.children()):
            continue
        row = row_for(path, mod)
        if needed and not _is_shard_local(conv) and conv.family != "local":
            opaque[path] = -1  # the wrapper replaces its forward: what torch's forward does inside is moot
        if conv is not None and conv.family == "conv":
            _conv_row(row, mod, domain, needed)
        elif conv is not None and conv.family == "norm":
            row.rule = "distributed stats" if needed else "local"
        elif conv is not None and conv.family == "pad":
            _pad_row(row, mod, domain)
        elif conv is not None and conv.family == "resample":
            row.rule = "resample"
            row.notes.append("exact resample rule (halo rows from the op's taps)")
        elif conv is not None and _is_shard_local(conv) and needed:
            block = window_height(mod) or 1
            row.rule, row.min_local_h = "shard-local", block
            opaque[path] = block
            n = _module_h(tracker, path)
            if n is not None and block > 1:
                constraints.append((n, block))
                if not block_fits(n, domain, block):
                    row.errors.append(
                        f"windows of {block} rows do not fit the shards {chunk_sizes(n, domain)} of H={n} here: "
                        f"every shard needs a multiple of {block} rows"
                    )
        elif conv is not None and needed and conv.family != "local":
            row.rule = "custom"
            row.notes.append(f"converted by {getattr(conv.factory, '__name__', conv.factory)} ({conv.family})")
        elif isinstance(mod, nn.SyncBatchNorm):
            row.rule = "unsupported"
            row.errors.append("nn.SyncBatchNorm has no domain-parallel wrapper: use nn.BatchNorm2d")
        elif isinstance(mod, _SPATIAL):
            row.rule = "unsupported"
            row.hazards.append(f"{type(mod).__name__} mixes rows along H and no exact rule is loaded for it")
            for fam, err in family_errors().items():
                row.notes.append(f"family {fam!r} failed to import: {err}")
        else:
            row.rule = "local"
        _global_pool_hazard(row, mod)
        if row.calls == 0 and traced:
            row.notes.append("not called in the traced forward")

    _attach_events(rows, row_for, tracker, opaque, domain, model)
    for r in rows.values():
        r.rule = r.rule or "local"
    errors: list[str] = [trace_error] if trace_error else []
    max_domain = _max_domain(constraints, domain) if constraints else domain
    bad = [r for r in rows.values() if r.errors]
    if bad:
        hint = f"use at most {max_domain} domain ranks" if max_domain else "no domain size fits"
        errors.append(
            f"{len(bad)} module(s) need a local H that the shards of this input do not provide "
            f"(first: {bad[0].path}): {hint}, or change the input size / window sizes"
        )
    ordered = sorted(rows.values(), key=lambda r: order.get(r.path, len(order)))
    return Plan(type(model).__name__, shape, domain, hdim, ordered, traced_on, errors, max_domain)


def _global_pool_hazard(row: PlanRow, mod: nn.Module) -> None:
    """Adaptive pooling to one row along H: exact (an all-reduce), but the result is not sharded."""
    pools = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
    if isinstance(mod, pools) and row.in_shape and row.out_shape and len(row.in_shape) >= 3:
        i = -2 if len(row.in_shape) >= 4 else -1
        if row.out_shape[i] == 1 and row.in_shape[i] > 1:
            row.notes.append(
                f"global pooling over H ({type(mod).__name__} to 1 row): exact, one all-reduce of the pooled "
                "tensor; the output is Replicate (flatten + Linear heads and gates work on it)"
            )


def _is_shard_local(conv: Converter) -> bool:
    from .nn.local import DomainParallelShardLocal, shard_local

    return conv.factory is shard_local or conv.factory is DomainParallelShardLocal


def _module_h(tracker: _HTracker | None, path: str) -> int | None:
    return None if tracker is None else tracker.module_h.get(path)


def _attach_events(rows, row_for, tracker, opaque, domain, model) -> None:
    if tracker is None:
        return
    seen: set[tuple[str, str]] = set()
    inside: dict[str, list[str]] = {}  # shard-local owner -> short descriptions of what it does locally
    for path, kind, msg, block in tracker.events:
        if (path, msg) in seen:
            continue
        seen.add((path, msg))
        owner = next((p for p in sorted(opaque, key=len) if path == p or path.startswith(p + ".")), None)
        if owner is not None:
            if kind != "note" and opaque[owner] >= 0:
                short = {"split": f"windows of {block} rows", "merge": "H merged into windows"}.get(kind, msg)
                if short not in inside.setdefault(owner, []):
                    inside[owner].append(short)
            continue
        row = row_for(path, model.get_submodule(path) if path else model)
        if kind == "note":
            row.notes.append(msg)
        elif kind == "unknown":
            row.notes.append(msg)
            if row.rule in ("", "local"):
                row.rule = "unknown"
        elif kind == "split":
            n = _module_h(tracker, path)
            fits = n is not None and block_fits(n, domain, block or 1)
            row.hazards.append(
                f"{msg}: exact only if each shard holds whole windows"
                + (" (these shards do)" if fits else "")
                + "; declare the module shard-local"
            )
            row.min_local_h = max(row.min_local_h, block or 0)
        elif kind == "merge":
            row.hazards.append(
                f"{msg}: PyTorch refuses it for uneven shards; declare the module shard-local if each item "
                "lies in one shard"
            )
        else:
            row.hazards.append(msg)
    for owner, items in inside.items():
        rows[owner].notes.append("runs on each shard's rows: " + "; ".join(items))


def _trace(model: nn.Module, shape: tuple[int, ...], hdim: int, dtype: torch.dtype):
    """Run the model once with hooks and the H tracker: on meta first, then on real CPU zeros."""
    last_error = ""
    for device in ("meta", "cpu"):
        try:
            return _trace_on(model, shape, hdim, dtype, device)
        except Exception as exc:  # noqa: BLE001 - fall back, then report
            last_error = f"{type(exc).__name__}: {exc}"
            logger.info("plan: tracing on %s failed (%s)", device, last_error)
    return {}, "none", f"the model could not be traced ({last_error}): static audit only, shapes unknown", None, {}


def _first_tensor(x: Any) -> torch.Tensor | None:
    return next((a for a in tree_flatten(x)[0] if isinstance(a, torch.Tensor)), None)


def _trace_on(model: nn.Module, shape: tuple[int, ...], hdim: int, dtype: torch.dtype, device: str):
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    stack: list[str] = []
    tracker = _HTracker(stack)
    rows: dict[str, PlanRow] = {}
    order: dict[str, int] = {}
    handles = []

    def pre(module: nn.Module, args: tuple, path: str) -> None:
        stack.append(path)
        order.setdefault(path, len(order))
        row = rows.setdefault(path, PlanRow(path, type(module).__name__, ""))
        t = _first_tensor(args)
        if row.calls == 0 and t is not None:
            row.in_shape = tuple(t.shape)
            h = tracker.get(t)
            if h is not None:
                tracker.module_h[path] = t.shape[h]
        row.calls += 1

    def post(module: nn.Module, args: tuple, out: Any, path: str) -> None:
        row = rows[path]
        if row.out_shape is None:
            t = _first_tensor(out)
            row.out_shape = tuple(t.shape) if t is not None else None
        stack.pop()

    for path, mod in m.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda mod_, a, p=path: pre(mod_, a, p)))
        handles.append(mod.register_forward_hook(lambda mod_, a, o, p=path: post(mod_, a, o, p)))
    x = torch.zeros(shape, dtype=dtype, device=device)
    m.eval()
    try:
        with torch.no_grad(), tracker:
            tracker.mark(x, hdim)
            m(x)
    finally:
        for hd in handles:
            hd.remove()
    return rows, device, "", tracker, order
