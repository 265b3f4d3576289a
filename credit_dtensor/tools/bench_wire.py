"""Benchmark bytes: what this rank hands to the process group, and the geometric minimum.

:func:`intercept` wraps ``torch.distributed``'s send/recv/collectives (and the functional
collectives) inside the benchmark process only, so the count does not trust our own
bookkeeping; :func:`minimum_bytes` derives the minimum from the single-device model's geometry.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["WireCounter", "intercept", "minimum_bytes"]


def _nbytes(t: object) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


@dataclass
class WireCounter:
    """Bytes this rank hands to the process group, by phase (set with :meth:`phase`)."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    recv: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    current: str = "other"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        old, self.current = self.current, name
        try:
            yield
        finally:
            self.current = old

    def add(self, kind: str, sent: int, recv: int) -> None:
        self.sent[self.current] += sent
        self.recv[self.current] += recv
        self.calls[f"{self.current}:{kind}"] += 1


# (function name, bytes sent, bytes received) as functions of the call's arguments
def _args0(a, k):
    return a[0] if a else k.get("tensor", k.get("input", k.get("self")))


_WIRE: dict[str, Callable] = {
    "send": lambda a, k: (_nbytes(_args0(a, k)), 0),
    "isend": lambda a, k: (_nbytes(_args0(a, k)), 0),
    "recv": lambda a, k: (0, _nbytes(_args0(a, k))),
    "irecv": lambda a, k: (0, _nbytes(_args0(a, k))),
    "all_reduce": lambda a, k: (_nbytes(_args0(a, k)), _nbytes(_args0(a, k))),
    "broadcast": lambda a, k: (_nbytes(_args0(a, k)), _nbytes(_args0(a, k))),
    "all_gather": lambda a, k: (_nbytes(a[1] if len(a) > 1 else k.get("tensor")), _nbytes(_args0(a, k))),
    "all_gather_into_tensor": lambda a, k: (
        _nbytes(a[1] if len(a) > 1 else k.get("input_tensor")),
        _nbytes(_args0(a, k)),
    ),
    "reduce_scatter": lambda a, k: (_nbytes(a[1] if len(a) > 1 else k.get("input_list")), _nbytes(_args0(a, k))),
    "reduce_scatter_tensor": lambda a, k: (_nbytes(a[1] if len(a) > 1 else k.get("input")), _nbytes(_args0(a, k))),
    "all_to_all_single": lambda a, k: (
        _nbytes(a[1] if len(a) > 1 else k.get("input")),
        _nbytes(a[0] if a else k.get("output")),
    ),
    "all_to_all": lambda a, k: (
        _nbytes(a[1] if len(a) > 1 else k.get("input_tensor_list")),
        _nbytes(a[0] if a else k.get("output_tensor_list")),
    ),
}
_FUNCOL: dict[str, Callable] = {
    "all_reduce": lambda a, k: (_nbytes(a[0]), _nbytes(a[0])),
    "all_gather_tensor": lambda a, k: (_nbytes(a[0]), 0),
    "all_gather_tensor_autograd": lambda a, k: (_nbytes(a[0]), 0),
    "reduce_scatter_tensor": lambda a, k: (_nbytes(a[0]), 0),
    "reduce_scatter_tensor_autograd": lambda a, k: (_nbytes(a[0]), 0),
    "all_to_all_single": lambda a, k: (_nbytes(a[0]), 0),
    "broadcast": lambda a, k: (_nbytes(a[0]), _nbytes(a[0])),
}


@contextlib.contextmanager
def intercept(counter: WireCounter) -> Iterator[WireCounter]:
    """Wrap the process-group entry points (package and ``distributed_c10d`` names alike, so
    ``P2POp``'s identity checks still pass, and ``ProcessGroup.send``/``recv``) and the functional
    collectives; restore on exit."""
    import torch.distributed._functional_collectives as funcol
    import torch.distributed.distributed_c10d as c10d

    saved: list[tuple[object, str, object]] = []
    wrappers: dict[int, Callable] = {}
    depth = [0]  # a call that re-enters itself (c10d's torch-function handling) is one call on the wire

    def wrap(mod: object, name: str, size: Callable, kind: str) -> None:
        # a class attribute as stored (pybind's method descriptor, restored as such), else the function
        orig = vars(mod).get(name) if isinstance(mod, type) else getattr(mod, name, None)
        if orig is None:
            return
        if id(orig) not in wrappers:

            def wrapper(*a, __orig=orig, **k):
                if not depth[0]:
                    s, r = size(a, k)
                    counter.add(kind, s, r)
                depth[0] += 1
                try:
                    return __orig(*a, **k)
                finally:
                    depth[0] -= 1

            wrapper.__name__ = orig.__name__
            wrappers[id(orig)] = wrapper
        saved.append((mod, name, orig))
        setattr(mod, name, wrappers[id(orig)])

    for name, size in _WIRE.items():
        wrap(c10d, name, size, name)
        wrap(dist, name, size, name)
    # the process group's own calls (``comm`` posts gloo messages and two-rank rounds there
    # directly; ``dist.isend``/``irecv``/``all_to_all_single`` end in them too, counted once by the
    # depth guard)
    wrap(dist.ProcessGroup, "send", lambda a, k: (_nbytes(a[1]), 0), "isend")
    wrap(dist.ProcessGroup, "recv", lambda a, k: (0, _nbytes(a[1])), "irecv")
    wrap(dist.ProcessGroup, "alltoall_base", lambda a, k: (_nbytes(a[2]), _nbytes(a[1])), "all_to_all_single")
    for name, size in _FUNCOL.items():
        wrap(funcol, name, size, f"funcol.{name}")
    try:
        yield counter
    finally:
        for mod, name, orig in reversed(saved):
            setattr(mod, name, orig)


def _chunk_ranges(n: int, world: int) -> list[range]:
    """torch.chunk rule: ceil(n/world) rows each, the rest to the last non-empty ranks."""
    size = -(-n // world) if n else 0
    return [range(min(r * size, n), min((r + 1) * size, n)) for r in range(world)]


def _needed_rows(mod: nn.Module, h_in: int, out_rows: range) -> set[int]:
    k, s, p, d = mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0]
    need: set[int] = set()
    if isinstance(mod, nn.ConvTranspose2d):
        for y in out_rows:
            for kk in range(k):
                num = y + p - kk * d
                if num % s == 0 and 0 <= num // s < h_in:
                    need.add(num // s)
    else:
        for o in out_rows:
            for kk in range(k):
                i = o * s - p + kk * d
                if 0 <= i < h_in:
                    need.add(i)
    return need


def minimum_bytes(model: nn.Module, x: torch.Tensor, world: int, input_grad: bool) -> dict[str, list[int]]:
    """Per-rank minimum bytes *sent*, ``{"halo": [...], "stats": [...], "grad_reduce": [...]}``.

    Halo: each conv's input rows another rank needs (forward) plus, when that input needs a
    gradient, the gradient of every row this rank borrowed (backward). Statistics: GroupNorm's
    per-(sample, group) sum and sum of squares in forward and two sums in backward. Gradient
    reduction: one all-reduce of every parameter gradient (for world > 1).
    """
    halo, stats = [0] * world, [0] * world
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda m, a, y: records.append((m, a[0], y)))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.GroupNorm))
    ]
    try:
        with torch.no_grad():
            x = x.detach().requires_grad_(input_grad)
            with torch.enable_grad():
                model(x)
    finally:
        for h in hooks:
            h.remove()
    if world == 1:
        return {"halo": halo, "stats": stats, "grad_reduce": [0]}
    for mod, inp, out in records:
        el = inp.element_size()
        if isinstance(mod, nn.GroupNorm):
            scalars = inp.shape[0] * mod.num_groups * 2
            for r in range(world):
                stats[r] += scalars * el * (2 if inp.requires_grad else 1)
            continue
        h_in, h_out = inp.shape[2], out.shape[2]
        row = inp[:, :, :1].numel() * el
        owned = _chunk_ranges(h_in, world)
        for r, rows in enumerate(_chunk_ranges(h_out, world)):
            borrowed = _needed_rows(mod, h_in, rows) - set(owned[r])
            for i in borrowed:
                owner = next(q for q, o in enumerate(owned) if i in o)
                halo[owner] += row  # forward: owner sends the row
                if inp.requires_grad:
                    halo[r] += row  # backward: the row's gradient goes back
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"halo": halo, "stats": stats, "grad_reduce": [params] * world}
