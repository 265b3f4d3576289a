"""Random ops on H-sharded tensors: every element drawn once, independently, the same at every
domain size.

The domain ranks of one sample are seeded alike (model initialisation needs it), and PyTorch's
DTensor runs a random op on a CPU mesh on each shard with the rank's own generator: every rank
drew the *same* mask or noise over its own rows (``F.dropout``, ``torch.randn_like``), a silently
wrong program. (On CUDA meshes DTensor's offset-based generator makes a sharded draw equal the
one-device draw; those calls are left to it.)

Here, on CPU meshes:

* **element-wise draws** (``F.dropout`` / ``F.alpha_dropout`` in training, ``torch.rand_like`` /
  ``randn_like`` / ``randint_like``, ``torch.bernoulli`` / ``poisson`` / ``normal`` of sharded
  tensors, ``Tensor.uniform_`` / ``normal_`` / ``bernoulli_`` / ``exponential_`` / ...) take one
  64-bit seed from the default generator (the same on every rank, so plain and ``Replicate`` draws
  after it stay in step), and draw each global row ``g`` from a generator seeded with
  ``mix(seed, g)``. Rows are independent streams; the result does not depend on the domain size
  or the shard sizes (a 4-rank run draws what a 1-rank run draws) and is reproducible with
  ``torch.manual_seed``. It is not PyTorch's one-device sequence, which a CPU generator cannot
  produce for a part of a tensor without drawing the whole of it;
* **feature draws** (``F.dropout1d/2d/3d``, ``F.feature_alpha_dropout``, ``nn.Dropout2d``): the
  mask is per (sample, channel) and spans H, so every rank must draw the same one: they run on the
  local tensor with the default generator, which gives exactly PyTorch's one-device mask;
* a draw that is not random (``training=False``, ``p=0``) runs locally and consumes nothing, as on
  one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .. import intercept
from ..dtensor import align_operand, domain_shard_dim, first_sharded, wrap_shard
from ..geometry import chunk_range
from .family import Signature, family, input_of
from .pointwise import local_apply

FAMILY = family("random", "dropout and random fills: one stream per global row, so no mask repeats across ranks")

__all__ = ["row_seed", "ELEMENTWISE", "FEATURE", "INPLACE"]

_MASK64 = (1 << 64) - 1


def row_seed(seed: int, row: int) -> int:
    """A 63-bit seed for global row ``row`` of a draw seeded ``seed`` (SplitMix64 finalizer: nearby
    rows and seeds give unrelated streams)."""
    z = (seed + (row + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _on_cpu_mesh(x: Any) -> bool:
    return domain_shard_dim(x) is not None and x.device_mesh.device_type == "cpu"


#: ``F.dropout`` & co. (``F.alpha_dropout``, ``F.feature_alpha_dropout``): one signature
_DROPOUT_ARGS = Signature(("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})


def _deterministic(func: Callable, args: tuple, kwargs: dict) -> bool:
    """``F.dropout(x, p, training)`` & co. that draw nothing (not training, or ``p == 0``)."""
    if func not in _DROPOUTS:
        return False
    a = _DROPOUT_ARGS.bind(args, kwargs)
    return not a["training"] or a["p"] == 0


def _local_args(func: Callable, args: tuple, kwargs: dict, x: DTensor, sd: int) -> tuple[tuple, dict]:
    """Tensor arguments as this rank's rows: ``x`` (and tensors sharded like it) local, full tensors
    that span the sharded dim cut to the local rows, others as they are."""

    def loc(a: Any) -> Any:
        if a is x:
            return x.to_local()
        if isinstance(a, torch.Tensor) and a.ndim:
            return align_operand(a, x, sd, x.ndim, getattr(func, "__name__", "random"))
        return a

    return tuple(loc(a) for a in args), {k: loc(v) for k, v in kwargs.items()}


def _row(a: Any, sd: int, x_ndim: int, i: int) -> Any:
    """Local row ``i`` (kept as a dim of size 1) of a tensor aligned with ``x``."""
    if isinstance(a, torch.Tensor) and a.ndim:
        d = sd - (x_ndim - a.ndim)
        if d >= 0 and a.shape[d] != 1:
            return a.narrow(d, i, 1)
    return a


def _draw_rows(func: Callable, largs: tuple, lkwargs: dict, x: DTensor, sd: int, inplace: bool) -> torch.Tensor:
    """``func`` on each local row, row ``g`` drawing from ``row_seed(seed, g)``."""
    mesh = x.device_mesh
    lo, hi = chunk_range(x.shape[sd], mesh.size(), mesh.get_local_rank())
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # one draw, the same on every rank
    rows = []
    gen = torch.default_generator
    with torch.random.fork_rng(devices=[]):
        if hi == lo:  # an empty shard: the op on no rows (nothing drawn that counts)
            return largs[0].clone() if inplace else func(*largs, **lkwargs)
        for i in range(hi - lo):
            gen.manual_seed(row_seed(seed, lo + i))
            ra = tuple(_row(a, sd, x.ndim, i) for a in largs)
            rk = {k: _row(v, sd, x.ndim, i) for k, v in lkwargs.items()}
            if inplace:
                ra = (ra[0].clone(), *ra[1:])
            rows.append(func(*ra, **rk))
    return torch.cat(rows, sd) if len(rows) > 1 else rows[0]


def _elementwise_rule(func, args, kwargs):
    x = first_sharded(*args, *kwargs.values())
    if not _on_cpu_mesh(x):
        return NotImplemented
    sd = domain_shard_dim(x)
    if _deterministic(func, args, kwargs):
        return local_apply(func, args, kwargs, x, sd)
    if func in _DROPOUTS and _DROPOUT_ARGS.bind(args, kwargs)["inplace"]:
        out = _elementwise_rule(func, args[:3], {k: v for k, v in kwargs.items() if k != "inplace"})
        with intercept.suspended():
            x.copy_(out)
        return x
    largs, lkwargs = _local_args(func, args, kwargs, x, sd)
    out = _draw_rows(func, largs, lkwargs, x, sd, inplace=False)
    return wrap_shard(out, x.device_mesh, sd, [*x.shape[:sd], x.shape[sd], *out.shape[sd + 1 :]])


def _inplace_rule(func, args, kwargs):
    """``x.uniform_()`` & co.: the draws out of place, then one DTensor ``copy_`` into ``x`` (local)."""
    x = args[0]
    if not _on_cpu_mesh(x):
        return NotImplemented
    sd = domain_shard_dim(x)
    largs, lkwargs = _local_args(func, args, kwargs, x, sd)
    with torch.no_grad():
        out = _draw_rows(func, largs, lkwargs, x, sd, inplace=True)
    with intercept.suspended():
        x.copy_(wrap_shard(out, x.device_mesh, sd, x.shape))
    return x


def _feature_rule(func, args, kwargs):
    """Channel masks span H: the same on every rank, drawn as on one device. ``inplace=True`` draws
    out of place, then one DTensor ``copy_`` (local) into ``x``: autograd refuses an in-place op on
    the local view of a DTensor that records gradients."""
    x = input_of(args, kwargs)
    if not _on_cpu_mesh(x):
        return NotImplemented
    a = _DROPOUT_ARGS.bind(args, kwargs)
    if a["inplace"]:
        if not a["training"] or a["p"] == 0:
            return x  # as on one device: the input itself, not written
        out = local_apply(func, args[:3], {k: v for k, v in kwargs.items() if k != "inplace"}, x, domain_shard_dim(x))
        with intercept.suspended():
            x.copy_(out)
        return x
    return local_apply(func, args, kwargs, x, domain_shard_dim(x))


_DROPOUTS = (F.dropout, F.alpha_dropout)
ELEMENTWISE: tuple[Callable, ...] = (
    *_DROPOUTS,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.bernoulli,
    torch.Tensor.bernoulli,
    torch.poisson,
    torch.normal,
)
INPLACE: tuple[Callable, ...] = tuple(
    getattr(torch.Tensor, name)
    for name in (
        "uniform_",
        "normal_",
        "bernoulli_",
        "exponential_",
        "cauchy_",
        "log_normal_",
        "geometric_",
        "random_",
    )
    if hasattr(torch.Tensor, name)
)
FEATURE: tuple[Callable, ...] = (F.dropout1d, F.dropout2d, F.dropout3d, F.feature_alpha_dropout)

FAMILY.rule(*ELEMENTWISE, h="random")(_elementwise_rule)
FAMILY.rule(*INPLACE, h="random")(_inplace_rule)
FAMILY.rule(*FEATURE, h="random")(_feature_rule)
