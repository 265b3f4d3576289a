"""Every difference between the PyTorch releases the package supports (2.11 to 2.14), in one place.

The rest of the package calls the names below instead of testing ``torch.__version__`` itself, so
supporting one more release (or dropping an old one) is an edit to this file alone. Nothing in torch
is patched. Where an older release lacks something the package cannot rebuild exactly,
:func:`require` raises a :class:`~credit_dtensor.errors.DomainParallelError` that names the release
needed, never a silently different result. What differs (docs/testing.md, "Supported PyTorch
versions"):

* :func:`install` (called on import; 2.11/2.12 only): the gradient of an unevenly sharded leaf
  (``shard_tensor(x).requires_grad_()``) stays sharded instead of being all-gathered
  (:func:`_leaf_gradient_rule`); a convolution of a ``Replicate`` activation (after global pooling)
  runs locally, because DTensor's own backward there returns ``N`` times the weight gradient
  (:func:`_replicated_conv_rule`).
* :func:`is_plain_shard`: the ``Shard`` test that also holds under Dynamo on 2.11.
* :func:`flop_counter`: ``FlopCounterMode`` without per-module tracking on 2.11/2.12 (it fails on
  DTensor leaves there); the total is unchanged.
* :func:`require` (2, 13) in ``parallelize(compile=...)``: 2.11's Dynamo cannot trace a converted
  conv/norm block as one graph; plain ``torch.compile`` (graph breaks allowed) works and is exact.
* :func:`ieee_fp32`: TF32 off for a parity check, with whichever TF32 API the process uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from .errors import DomainParallelError

__all__ = [
    "TORCH_VERSION",
    "MIN_TORCH",
    "at_least",
    "require",
    "ieee_fp32",
    "is_plain_shard",
    "flop_counter",
    "install",
    "installed",
]

#: Oldest release the package supports (pyproject's ``torch>=`` bound).
MIN_TORCH = (2, 11)


def _parse(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


#: ``(major, minor)`` of the running torch, e.g. ``(2, 13)`` for ``2.13.0+cpu``.
TORCH_VERSION: tuple[int, int] = _parse(torch.__version__)


def at_least(major: int, minor: int) -> bool:
    """Whether the running torch is ``major.minor`` or newer."""
    return TORCH_VERSION >= (major, minor)


def require(major: int, minor: int, what: str) -> None:
    """Raise :class:`DomainParallelError` naming ``torch>=major.minor`` unless the running torch has it."""
    if not at_least(major, minor):
        raise DomainParallelError(
            f"{what} needs torch>={major}.{minor}; this is torch {torch.__version__}: "
            f"upgrade torch (pip install 'torch>={major}.{minor}') or avoid {what}"
        )


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """Full fp32 (no TF32) for CUDA matmuls and cuDNN convolutions inside the block.

    TF32 (on by default for cuDNN convolutions) rounds operands to 10 mantissa bits, so two
    mathematically equal fp32 computations of different shapes (a shard with halo rows against the
    full tensor) differ by ~1e-3: a parity check at 1e-5 needs it off. 2.11-2.14 have two spellings:
    the legacy ``allow_tf32`` flags and ``fp32_precision``. Once ``fp32_precision`` has been set,
    reading the legacy ``torch.backends.cudnn.allow_tf32`` raises ("mix of the legacy and new
    APIs"), while setting the legacy flags keeps both readable; so the legacy flags are used unless
    the caller already switched to the new API, whose settings are then used and restored instead.
    """
    backends = torch.backends
    try:
        legacy = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)
    except RuntimeError:  # the process already uses fp32_precision: stay with that API
        legacy = None
    if legacy is not None:
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = legacy
        return
    targets = [(backends.cuda.matmul, "fp32_precision"), (backends.cudnn.conv, "fp32_precision")]
    saved = [getattr(obj, name) for obj, name in targets]
    try:
        for obj, name in targets:
            setattr(obj, name, "ieee")
        yield
    finally:
        for (obj, name), old in zip(targets, saved):
            setattr(obj, name, old)


def is_plain_shard(placement: object) -> bool:
    """``placement`` is a ``Shard`` (not ``_StridedShard``), decided the same way eager and under Dynamo.

    ``type(p) is Shard`` is False under ``torch.compile`` on torch 2.11 for the placements of a DTensor
    made inside the compiled region (Dynamo reports the C++ base class), which turned every
    normalization of a compiled model into an ``UnsupportedShardingError``. ``isinstance`` works on
    2.11-2.14, and no torch placement subclasses ``Shard`` there (``_StridedShard`` is a sibling,
    excluded explicitly for releases where it might not be).
    """
    from torch.distributed.tensor import Shard, placement_types

    strided = getattr(placement_types, "_StridedShard", None)
    return isinstance(placement, Shard) and not (strided is not None and isinstance(placement, strided))


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP counts towards "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def flop_counter(counter: Any) -> Any:
    """``counter`` (a ``torch.utils.flop_counter.FlopCounterMode``) made safe for sharded leaf inputs.

    On torch 2.11/2.12 the counter's ``ModuleTracker`` registers a multi-grad hook on every module
    input, which asks ``t.view_as(t).grad_fn.next_functions``; for a DTensor leaf that ``grad_fn``
    belongs to an ``autograd.Function`` whose node is freed with the temporary view, and the access
    raises ("Attribute 'next_functions' is invalid for this instance of _C._FunctionBase"). There
    the tracker is replaced by one that attributes every FLOP to "Global": the total
    (``get_total_flops``) is the same, only the per-module breakdown is lost. 2.13+: unchanged.
    """
    if not at_least(2, 13):
        counter.mod_tracker = _GlobalOnly()
    return counter


# --- DTensor behaviour the package relies on, back-filled for older releases -------------------------------


def _restride(grad: Any, stride: tuple[int, ...], shape: tuple[int, ...]) -> Any:
    """The same gradient, with the global stride of the leaf it is about to be accumulated into."""
    from torch.distributed.tensor import DTensor

    if not isinstance(grad, DTensor) or tuple(grad.shape) != shape or tuple(grad.stride()) == stride:
        return grad
    return DTensor.from_local(
        grad.to_local(), grad.device_mesh, grad.placements, run_check=False, shape=grad.shape, stride=stride
    )


def _leaf_gradient_rule(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``requires_grad_()`` on a sharded DTensor leaf: keep its gradient's stride equal to the leaf's.

    Why (torch 2.11/2.12 only): a gradient that comes back through ``to_local()`` gets its global stride
    recomputed from the *local* shard, which is off for uneven shards (``H=13`` over 2 ranks:
    ``(210, 70, 5, 1)`` on rank 0 against the leaf's ``(195, 65, 5, 1)``). Autograd then accumulates it
    through ``new_empty_strided`` with the leaf's strides plus ``copy_``. torch 2.13 lets that empty
    tensor keep the shard placement; 2.11/2.12 do so only for evenly shardable shapes (their local
    stride arithmetic assumes even shards) and otherwise choose ``Replicate``, so the ``copy_``
    all-gathers the gradient (values exact, placement ``Replicate``, an activation-sized all-gather).
    A hook on the leaf re-wraps the incoming gradient with the leaf's own global stride (metadata only,
    no data moves), so autograd stores it as it is, sharded, on every release.

    Not covered: the attribute form ``x.requires_grad = True`` (the rules mode treats property setters
    as metadata and shows them to no rule); on 2.11/2.12 such a leaf still receives its gradient
    exact but ``Replicate``, through the all-gather the gather guard reports. Use ``requires_grad_()``.
    """
    out = func(*args, **kwargs)
    from torch.distributed.tensor import DTensor

    x = args[0] if args else None
    if (
        isinstance(x, DTensor)
        and x.is_leaf
        and x.requires_grad
        and any(p.is_shard() for p in x.placements)
        and not getattr(x, "_credit_dtensor_restride", False)
    ):
        x.register_hook(partial(_restride, stride=tuple(x.stride()), shape=tuple(x.shape)))
        x._credit_dtensor_restride = True
    return out


_CONV_ARG_NAMES = ("input", "weight", "bias")


def _replicated_local(t: Any, mesh: Any) -> Any:
    """The local tensor of a DTensor replicated on ``mesh`` (a plain tensor as it is); None otherwise."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if t.device_mesh != mesh or not all(p.is_replicate() for p in t.placements):
        return None
    return t.to_local()


def _replicated_conv_rule(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``F.conv*d`` / ``F.conv_transpose*d`` of a ``Replicate`` input: run on the local tensors.

    Why (torch 2.11/2.12 only): there DTensor's ``aten.convolution_backward`` rule always declares the
    weight and bias gradients ``Partial`` (and the input gradient like the input), whatever the
    placements; for a ``Replicate`` input every rank computes the *whole* weight gradient, so the
    ``Partial`` sum counts it once per rank (measured: ``N`` times the true gradient on ``N`` ranks,
    e.g. a squeeze-excitation gate's 1x1 convs after global pooling). 2.13 derives the placements
    from the inputs. Here the convolution runs on the local tensors, its result wrapped ``Replicate``:
    autograd then reduces a ``Partial`` output gradient once (``from_local``'s backward) and every
    rank's weight gradient is the whole, exact one, ``Replicate``. Asked only after the package's own
    conv rules (spatially or batch-sharded inputs) have declined.
    """
    from torch.distributed.tensor import DTensor

    values = dict(zip(_CONV_ARG_NAMES, args))
    values.update({k: v for k, v in kwargs.items() if k in _CONV_ARG_NAMES})
    x = values.get("input")
    if not isinstance(x, DTensor) or not all(p.is_replicate() for p in x.placements):
        return NotImplemented
    mesh = x.device_mesh
    local = {name: _replicated_local(values.get(name), mesh) for name in ("weight", "bias")}
    if any(local[n] is None and values.get(n) is not None for n in local):
        return NotImplemented  # a parameter sharded or on another mesh: DTensor decides (or refuses)
    n_pos = min(len(args), 3)
    new_args = [x.to_local(), local["weight"], local["bias"]][:n_pos] + list(args[3:])
    new_kwargs = {k: (local[k] if k in local else v) for k, v in kwargs.items() if k != "input"}
    if "input" in kwargs:
        new_kwargs["input"] = x.to_local()
    y = func(*new_args, **new_kwargs)
    return DTensor.from_local(y, mesh, x.placements, run_check=False)


_INSTALLED: list[str] = []


def installed() -> tuple[str, ...]:
    """Names of the back-fills :func:`install` put in place on this torch (empty on 2.13+)."""
    return tuple(_INSTALLED)


def install() -> None:
    """Back-fill, once per process, what the package relies on and older supported releases lack.

    The package's import calls it; on torch >= 2.13 it does nothing. On 2.11/2.12 it registers two
    rules with the package's own torch-function mode (nothing in torch is patched): the leaf-gradient
    stride fix of :func:`_leaf_gradient_rule` and the ``Replicate`` convolution of
    :func:`_replicated_conv_rule` (DTensor's own gives ``N`` times the weight gradient there).
    """
    if at_least(2, 13) or _INSTALLED:
        return
    from .ops.family import family

    compat = family(
        "compat", f"back-fills for torch {torch.__version__} (< 2.13): leaf-gradient strides, Replicate conv"
    )
    compat.rule(torch.Tensor.requires_grad_, h="local", note="leaf-gradient stride fix")(_leaf_gradient_rule)
    _INSTALLED.append("leaf_gradient_stride")
    F = torch.nn.functional
    convs = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
    compat.rule(*convs, h="local", note="Replicate input: one weight gradient, not N")(_replicated_conv_rule)
    _INSTALLED.append("replicated_conv_backward")
