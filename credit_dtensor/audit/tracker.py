"""Following H through a forward: a ``TorchFunctionMode`` that knows, for every tensor it has
seen, which of its dims holds H, and records what happens to H per executing module (hazards,
notes, window partitions, merges) for :func:`credit_dtensor.audit.plan`."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..geometry.window import moved_units, view_plan, window_fit
from .report import shape_text

__all__ = ["HTracker"]

logger = logging.getLogger("credit_dtensor.audit")


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


@functools.cache
def _names() -> SimpleNamespace:
    """The function names the tracker follows, read from the op-family descriptors
    (:mod:`credit_dtensor.ops.family`), so ``plan`` says what the rules do."""
    from ..ops.family import families, function_names

    # by function, not name: F.unfold is refused, Tensor.unfold is exact
    refused = {f: e.note for fam in families() if fam.name == "refuse" for e in fam.entries for f in e.funcs}
    return SimpleNamespace(
        dimwise=function_names(families_=("dimwise", "scan")),
        # exact along H in some family (softmax: per-row statistics; cumsum: the scan family)
        dimwise_exact=function_names("stats", "reduce"),
        reduce=function_names(families_=("reduce",)),
        reduce_exact=function_names("reduce", families_=("reduce",)),
        spatial=function_names(families_=("conv", "norm", "resample")),
        views=function_names(families_=("reshape",)),
        attention=bool(function_names(families_=("attention",))),
        refused=refused,
    )


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


class HTracker(TorchFunctionMode):
    """Follows the dim of H through torch functions; records events per executing module."""

    def __init__(self, stack: list[str], domain: int = 2) -> None:
        super().__init__()
        self.stack = stack
        self.domain = domain  # what the reshape rules do depends on the shard sizes
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
        self._follow(name, func, args, kwargs, t, h, nd, outs)
        if id(t) in self.merged:
            for o in self.keep[n_before:]:
                self.merged.add(id(o))

    def _follow(
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
        names = _names()
        if func in names.refused:
            self.event("hazard", f"{name} on an H-sharded tensor is refused ({names.refused[func]})")
            return
        if name in names.views:
            return self._view(t, h, outs[0], name)
        if name in ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"):
            return self._permute(t, h, outs[0], name, args, kwargs)
        if name in ("unsqueeze", "squeeze"):
            return self._shape_follow(t, h, outs[0], name)
        if name == "linear":
            if t is args[0] and h == nd - 1:
                self.event(
                    "note",
                    "Linear over the sharded dim: exact, the shards move to another dim first (all-to-all), or "
                    "without one each rank's partial product is summed once (an all-reduce of the output)",
                )
                return
            return self.mark(outs[0], h)
        if name in ("matmul", "__matmul__", "bmm", "mm", "__rmatmul__"):
            return self._matmul(args, outs[0], name)
        if name == "einsum":
            return self._einsum(args, outs[0])
        if name == "scaled_dot_product_attention":
            q = args[0]
            hq = self.get(q)
            qkv = [a for a in args[:3] if isinstance(a, torch.Tensor)]
            if hq == q.ndim - 2 and all(self.get(a) in (None, a.ndim - 2) for a in qkv) and names.attention:
                self.event("note", "attention over H tokens (scaled_dot_product_attention): exact, Ulysses all-to-all")
                return self.mark(outs[0], hq)
            if any(self.get(a) in (a.ndim - 2, a.ndim - 1) for a in qkv):
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
        if name in names.dimwise:
            dims = _norm_dims(_dims_arg(args, kwargs), nd)
            if dims is None and name in ("normalize",):
                dims = [1]
            if dims is None or h in dims:
                if name in names.dimwise_exact:
                    self.event("note", f"{name} over H: exact (per-row statistics or shard totals over the ranks)")
                    return self.mark(outs[0], h)
                self.event("hazard", f"{name} over H: mixes the rows of every shard")
                return
            return self.mark(outs[0], h)
        if name in names.reduce:
            dims = _norm_dims(_dims_arg(args, kwargs), nd)
            if dims is None or h in dims:
                if name in names.reduce_exact:
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
            self.event("note", "F.interpolate: exact resample rule (halo rows)")
            return self.mark(outs[0], h)
        if name in names.spatial:
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
                    "unknown",
                    f"H not followed through {name} ({shape_text(tuple(t.shape))} → {shape_text(tuple(o.shape))})",
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
        """What the reshape rules do (:func:`credit_dtensor.geometry.window.view_plan`): local,
        re-chunked (a note), or refused (a merge under a larger dim: ``"merge"``)."""
        ins, outs = tuple(t.shape), tuple(o.shape)
        p = view_plan(ins, outs, h, self.domain)
        if p is None:
            self.event("unknown", f"H not followed through {name}")
            return
        if p.kind == "unsupported":
            from ..ops.reshape import _group_outer_dim, _intermediate_dim

            if _intermediate_dim(tuple(ins), p, self.domain) is not None:
                how = "merged where the dims are whole (two all-to-alls)"
            elif _group_outer_dim(tuple(ins), p, self.domain) is not None:
                how = "the shards move onto the outermost merged dim first (one all-to-all)"
            else:
                self.event("merge", f"{name} {shape_text(ins)} → {shape_text(outs)}: {p.reason}")
                return
            self.event(
                "note", f"{name} {shape_text(ins)} → {shape_text(outs)} merges H under a larger dim: exact, {how}"
            )
            return self.mark(o, p.out_dim)
        n, m = ins[h], outs[p.out_dim]
        if n != m and n > 1:
            if n % m == 0 or m % n == 0:
                block = max(n, m) // min(n, m)
                what = (
                    f"{name} splits H={n} into {m} windows of {block} rows"
                    if n > m
                    else f"{name} merges {n} windows of {block} rows into H={m}"
                )
                self.event("note", f"{what}: exact; {window_fit(max(n, m), self.domain, block).describe()}")
            else:
                self.event("note", f"{name} reshapes H={n} into a dim of {m}: exact ({p.kind})")
        elif p.kind == "rechunk":
            moved = sum(moved_units(p.in_units, p.out_units, r) for r in range(self.domain))
            self.event(
                "note", f"{name} {shape_text(ins)} → {shape_text(outs)}: exact, re-chunked ({moved} pieces move)"
            )
        self.mark(o, p.out_dim)

    def _matmul(self, args: tuple, o: torch.Tensor, name: str) -> None:
        a, b = args[0], args[1]
        ha, hb = self.get(a), self.get(b)
        if name == "__rmatmul__":
            a, b, ha, hb = b, a, hb, ha
        if ha is not None:
            if a.ndim >= 2 and ha == a.ndim - 1:
                self.event("note", "matmul contracts H: exact, local partial sums summed once (or re-laid out)")
                return
            self.mark(o, ha + (o.ndim - a.ndim))
        if hb is not None and isinstance(b, torch.Tensor):
            if b.ndim >= 2 and hb == b.ndim - 2:
                self.event("note", "matmul contracts H: exact, local partial sums summed once (or re-laid out)")
                return
            if b.ndim >= 2 and hb == b.ndim - 1:
                self.event(
                    "note", "attention over H: keys from every row; exact, operands re-laid out onto a batch dim"
                )
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
                self.event("note", f"einsum {eq} contracts H: exact, partial sums summed once (or re-laid out)")
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
                        self.event(
                            "note", f"slicing H with {i!r}: exact, re-chunked (only rows that change owner move)"
                        )
                    return self.mark(o, dout)
                self.event("note", f"indexing H with {i!r}: exact, the row is broadcast from its owner")
                return
            din += 1
            dout += isinstance(i, slice)
