"""Folding a norm's statistics round into the halo round of the convolution that reads its output.

Exact BatchNorm/GroupNorm costs one blocking round per layer in forward (partial statistics) and
one in backward (partial sums); the 3x3 convolution after it costs another in each direction (its
halo rows). On gloo a round costs far more than its bytes, so a ``norm -> ReLU -> conv`` chain,
the most common block of the UNets this package serves, carries both in one message each way:

* **Forward.** The norm sends its partial ``(mean, M2)`` *and* the boundary rows of its input
  that the convolution's halo plan asks for (:mod:`.norm_fold`). After the merge every rank has
  the global statistics, so it normalizes the received rows itself. The rows ride along with the
  norm's output (a :class:`Carry` on the DTensor); every shard-local elementwise op applied to the
  output is applied to them too (:func:`propagate`, called by the pointwise fast path), and so is
  a pad of the other dims (``F.pad`` on W: :func:`transform`, called by :mod:`.pad`), and the
  convolution finds its halo ready and posts nothing (:mod:`.conv`; max pooling too,
  :class:`RowKey`, :mod:`.pool`). An op of several carrying
  operands (``bn2(y) + x`` in a residual block) carries the op of their rows when all were made
  for the same convolution (:func:`_worth` says when a norm should borrow for such a sum).
* **Backward.** The convolution's gradient for the borrowed rows flows (plain autograd) back
  through the elementwise chain to the norm, which adds the rows' share to its partial sums (it
  knows their ``xhat``) and sends ``[partial sums, the rows' gradient]`` to the rows' owner in
  one message; the owner adds the rows to its own output gradient.

Which convolution reads a norm's output is learned, not guessed: the first call of a norm (keyed
by its label, geometry and weight tensor) attaches a :class:`Probe` that the elementwise chain
carries and the first halo convolution reading it records; the second call agrees on the record
across the ranks (one small all-gather, once) because the decision fixes every message's size.
From then on the norm borrows the rows. Whenever the chain is anything else -- an add of an
operand without rows, another layout, a modified tensor (its version counter moved), a different convolution -- the
convolution does not use the carry and exchanges its halo as always: a stale or unused carry can
cost bytes, never a wrong number. ``CREDIT_DTENSOR_FOLD=0`` turns folding off; compiled regions
never fold.
"""

from __future__ import annotations

import os
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import comm
from ..halo import HaloPlan

__all__ = [
    "Carry",
    "Probe",
    "ConvKey",
    "RowKey",
    "enabled",
    "decide",
    "attach",
    "carried",
    "propagate",
    "carries_of",
    "transform",
    "note_consumer",
    "same_plan",
]

_ATTR = "_credit_dtensor_carry"
_SEEDED = ("rrelu", "rand", "dropout", "bernoulli", "noise")

#: ``CREDIT_DTENSOR_FOLD=0`` turns folding off (tests flip these flags in-process)
ENABLED = os.environ.get("CREDIT_DTENSOR_FOLD", "1") != "0"
#: ``CREDIT_DTENSOR_FOLD=rounds``: also fold where it sends more rows than the convolution would
#: (two norms summed before one convolution, each sending its rows: a projected shortcut)
ROUNDS = os.environ.get("CREDIT_DTENSOR_FOLD", "1") == "rounds"


@dataclass(frozen=True)
class ConvKey:
    """A halo convolution as every rank names it (rank-independent): encoded spec, global input shape, sharded dim."""

    enc: tuple[int, ...]
    shape: tuple[int, ...]
    dim: int
    group: str


@dataclass(frozen=True)
class RowKey:
    """A row op that reads a halo (max pooling) as every rank names it: its factory name and
    arguments without ``(world, rank)``, global input shape, sharded dim, group."""

    name: str
    args: tuple
    shape: tuple[int, ...]
    dim: int
    group: str


#: what a norm can borrow rows for: a halo convolution or a max pooling
Consumer = ConvKey | RowKey


class Probe:
    """Marks a norm's output on its first call: the first halo convolution reading it is recorded.
    ``keys``: the norms whose outputs reached this tensor (two after ``bn2(y) + shortcut(x)``)."""

    __slots__ = ("keys", "version")

    def __init__(self, keys: tuple[tuple, ...]) -> None:
        self.keys, self.version = keys, -1


class Carry:
    """The halo rows a norm borrowed for ``conv``, transformed like the tensor they ride on.

    ``rows[i]`` holds the rows received from ``plan.recvs[i]``'s source (the convolution's own
    plan, so :func:`credit_dtensor.halo.assemble` builds the extended input from them)."""

    __slots__ = ("conv", "plan", "rows", "version")

    def __init__(self, conv: Consumer, plan: HaloPlan, rows: list[torch.Tensor]) -> None:
        self.conv, self.plan, self.rows, self.version = conv, plan, rows, -1


@dataclass
class _Entry:
    #: (convolution, the norms whose probes reached it together), in the order they read the
    #: norm's output: the first is what it borrows rows for; a sum of two norms' outputs folds
    #: only when both borrow rows for that convolution
    teams: list[tuple[Consumer, tuple[tuple, ...]]] = field(default_factory=list)
    decided: bool = False
    conv: Consumer | None = None


#: key -> (the norm's weight, weakly, or None; entry): a weight that died leaves a stale entry
#: whose id a new tensor may reuse, which the weak reference tells apart (on every rank alike)
_STATE: dict[tuple, tuple[weakref.ref | None, _Entry]] = {}
comm.register_group_cache(_STATE.clear)


_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)
_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _ignore: None)


def enabled(x: torch.Tensor) -> bool:
    """Folding applies to eager fp32/fp64 calls (the norm's statistics and the rows share one
    message), outside activation checkpointing: a non-reentrant checkpoint's forward runs under
    saved-tensor hooks and its recomputation inside backward, and the two must save the same
    tensors, so neither folds nor moves a layer's decision on."""
    return (
        ENABLED
        and x.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
        and _graph_task() == -1
        and _saved_hooks(False) is None
    )


def decide(key: tuple, weight: torch.Tensor | None, group: dist.ProcessGroup) -> Probe | Consumer | None:
    """For a norm call (``key``: its label and geometry; ``weight``: its parameter, which tells
    layers of one label apart): a :class:`Probe` to attach (first call), the convolution to borrow
    rows for, or ``None``. The second call agrees across ``group`` (every rank calls it the same
    number of times: SPMD, as every collective of a step)."""
    if weight is not None:
        key = (*key, id(weight))
    hit = _STATE.get(key)
    if hit is None or (hit[0] is not None and hit[0]() is not weight):
        if len(_STATE) >= 4096:
            _STATE.clear()
        _STATE[key] = (None if weight is None else weakref.ref(weight), _Entry())
        return Probe((key,))
    entry = hit[1]
    if not entry.decided:
        conv = entry.teams[0][0] if entry.teams and _worth(entry.teams[0]) else None
        code = zlib.crc32(repr(conv).encode()) if conv is not None else 0
        codes = comm.all_gather_small(torch.tensor([code], dtype=torch.int64), group)
        entry.decided = True
        entry.conv = conv if bool((codes == code).all()) else None
    return entry.conv


def _first(key: tuple) -> tuple[Consumer, tuple[tuple, ...]] | None:
    """The first convolution that read norm ``key``'s output (what it will borrow rows for), with
    the norms whose outputs reached it together."""
    hit = _STATE.get(key)
    return hit[1].teams[0] if hit is not None and hit[1].teams else None


def _worth(first: tuple[Consumer, tuple[tuple, ...]]) -> bool:
    """Whether a norm whose first reader is ``first`` should borrow rows for it. Every norm of the
    team must borrow for that convolution (else its rows meet rows made for another one: sent for
    nothing), and, unless :data:`ROUNDS`, only one of them may send rows for it alone: ``bn2(y) +
    x`` with ``x`` carrying rows it already borrowed for an earlier convolution of the same plan
    costs no byte more than the convolution's own exchange (if ``x``'s norms borrow too);
    ``bn2(y) + bn_d(s)`` would send two sets of rows where the convolution sends one."""
    conv, team = first
    payers = 0
    for k in team:
        f = _first(k)
        if f is None or f[0] != conv:
            return False
        if f == first:
            payers += 1  # borrows rows for this convolution alone
        elif not _worth(f):  # rows borrowed for an earlier convolution (an earlier event: this ends)
            return False
    return ROUNDS or payers == 1


def note_consumer(probe: Probe, conv: Consumer) -> None:
    """A halo convolution read the probed norms' output (through elementwise ops only)."""
    for key in probe.keys:
        hit = _STATE.get(key)
        if hit is not None and not hit[1].decided and (conv, probe.keys) not in hit[1].teams:
            hit[1].teams.append((conv, probe.keys))


def attach(out: DTensor, carry: Probe | Carry, bumps: int = 0) -> None:
    """Let ``carry`` ride on ``out`` (valid while ``out``'s local values are unmodified).
    ``bumps``: version increments still to come for the write that made ``out`` (an in-place
    method's rule returns before :func:`credit_dtensor.intercept.bump_local_version` runs)."""
    carry.version = out._local_tensor._version + bumps
    setattr(out, _ATTR, carry)


def carried(x: Any) -> Probe | Carry | None:
    """The carry on ``x`` if its local values have not changed since it was attached (never in a
    compiled region: there the norms do not fold)."""
    if torch.compiler.is_compiling():
        return None
    c = getattr(x, _ATTR, None)
    if c is None or c.version != x._local_tensor._version:
        return None
    return c


def propagate(
    carries: Sequence[tuple[Any, Probe | Carry]],
    func: Callable,
    args: tuple,
    kwargs: dict,
    out: DTensor,
    bumps: int = 0,
) -> None:
    """``out = func(*args, **kwargs)`` ran elementwise on the local rows of its tensor operands,
    each of one layout and shape: run it on the carried rows too (``carries``: ``(operand, its
    carry)``; :func:`attach`'s ``bumps``).

    Every tensor operand must carry: ``relu(x)`` and ``x * 2`` carry ``x``'s rows; ``bn2(y) +
    shortcut`` carries the sum when both norms borrowed rows for the same convolution (and unites
    their probes on the first call). An operand without a carry, tensors in ``kwargs``, carries
    made for different convolutions or random ops leave ``out`` without a carry."""
    if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return
    if any(r in getattr(func, "__name__", "") for r in _SEEDED):
        return  # random per element (rrelu in training): the rows' owner drew other numbers
    of = {id(a): c for a, c in carries}
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(id(a) not in of for a in tensors):
        return
    got = [of[id(a)] for a in tensors]
    if all(isinstance(c, Probe) for c in got):
        attach(out, Probe(tuple(dict.fromkeys(k for c in got for k in c.keys))), bumps)  # type: ignore[union-attr]
        return
    first = got[0]
    if not isinstance(first, Carry) or any(
        not isinstance(c, Carry) or c.conv != first.conv or not same_plan(c.plan, first.plan) for c in got[1:]
    ):
        return
    rows = []
    for i, r in enumerate(first.rows):
        t = func(*(of[id(a)].rows[i] if isinstance(a, torch.Tensor) else a for a in args), **kwargs)  # type: ignore[union-attr]
        if not isinstance(t, torch.Tensor) or t.shape != r.shape:
            return
        rows.append(t)
    attach(out, Carry(first.conv, first.plan, rows), bumps)


def carries_of(args: tuple) -> list[tuple[DTensor, Probe | Carry]]:
    """``(operand, its carry)`` for the DTensor operands of a call that carry a norm's rows (what
    :func:`propagate` takes)."""
    found = []
    for a in args:
        if isinstance(a, DTensor):
            c = carried(a)
            if c is not None:
                found.append((a, c))
    return found


def same_plan(a: HaloPlan, b: HaloPlan) -> bool:
    """Whether two halo plans move the same rows (plans are cached: usually the same object)."""
    return a is b or a == b


def transform(carry: Probe | Carry, fn: Callable[[torch.Tensor], Any], out: DTensor) -> None:
    """``out`` is the carrying tensor changed row by row by ``fn`` (a pad of other dims): attach
    ``carry`` with ``fn`` applied to each of its rows tensors."""
    if isinstance(carry, Probe):
        attach(out, Probe(carry.keys))
        return
    rows = []
    for r in carry.rows:
        t = fn(r)
        if not isinstance(t, torch.Tensor):
            return
        rows.append(t)
    attach(out, Carry(carry.conv, carry.plan, rows))
