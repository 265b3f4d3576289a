"""One call a trainer uses: domain-parallel conversion + FSDP2 on the ``("dp", "domain")`` mesh.

``parallelize(model, manager)`` does, in order (torchtitan's order, one job per helper):

1. :func:`convert_model` -- swap every spatial module for its exact domain-parallel wrapper
   (``credit_dtensor.convert.convert_to_domain_parallel``); parameters become ``Replicate``
   DTensors on the domain mesh, broadcast from domain rank 0.
2. :func:`apply_activation_checkpointing` (optional) -- recompute each block in backward; halo
   exchanges are recomputed too, so memory drops with no change in the numbers.
3. :func:`apply_fsdp` -- ``fully_shard`` every block, then the root, on ``manager.dp_mesh``.
   Because the dp and domain meshes are siblings of one 2-D mesh, FSDP2 treats the domain mesh
   like a tensor-parallel mesh: parameters become ``(Shard(0), Replicate())`` on
   ``("dp", "domain")``. In backward the wrappers return parameter gradients ``Partial`` on the
   domain mesh; FSDP2 all-reduces them over "domain" (``Partial -> Replicate``) and then
   reduce-scatters (averages) them over "dp": each gradient is reduced exactly once per mesh dim.

Gradient reduction without FSDP (``fsdp=False``): gradients stay where autograd leaves them --
``Partial`` on the domain mesh, and unreduced across dp replicas. Call
:func:`reduce_gradients` after ``backward()`` and before ``optimizer.step()``: it packs the
gradients into flat buckets and runs one sum all-reduce per bucket through
:mod:`credit_dtensor.comm` (so the bytes are counted), over the whole world for ``Partial``
gradients (domain sum and dp sum in one collective) and over "dp" only for already-``Replicate``
ones, then divides by the dp size (data-parallel mean) and writes each gradient back as a
``Replicate`` DTensor in place.

Only ``manager.dp_mesh`` is passed to ``fully_shard``. Passing the whole 2-D mesh would make
FSDP2 use HSDP collectives, for which gloo needs
``FSDPModule.set_force_sum_reduction_for_comms(True)`` (gloo has no PREMUL_SUM/AVG);
:func:`apply_fsdp` calls it on every FSDP unit when it is given a 2-D CPU mesh.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from . import comm, intercept, rebind
from ._torch_versions import require
from .errors import DomainParallelError
from .gradsync import flatten, is_partial, overlap_gradient_reduction, settle
from .mesh import DomainParallelManager

__all__ = [
    "parallelize",
    "convert_model",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "default_blocks",
    "reduce_gradients",
]

logger = logging.getLogger(__name__)

#: Bucket size of :func:`reduce_gradients` (bytes): few collectives, bounded extra memory.
BUCKET_BYTES = 25 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# 1. conversion
# ---------------------------------------------------------------------------------------------


def convert_model(
    model: nn.Module, manager: DomainParallelManager, custom_converters: Mapping[type, Callable] | None = None
) -> nn.Module:
    """Domain-parallel conversion in place (state_dict keys unchanged); returns the model."""
    from .convert import convert_to_domain_parallel

    out = convert_to_domain_parallel(model, manager, custom_converters=custom_converters)
    return out if isinstance(out, nn.Module) else model


# ---------------------------------------------------------------------------------------------
# 2. blocks and activation checkpointing
# ---------------------------------------------------------------------------------------------


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP/checkpoint units: entries of ``model.blocks``/``model.layers`` (ModuleList) if the
    model has one, else the root's direct children that own parameters."""
    for attr in ("blocks", "layers"):
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.ModuleList, nn.Sequential)):
            return [m for m in seq if any(True for _ in m.parameters())]
    return [m for m in model.children() if any(True for _ in m.parameters())]


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's forward in backward (non-reentrant ``torch.utils.checkpoint``).

    Only the instance's ``forward`` is replaced, so module names, state_dict keys and FSDP2's
    hooks (which run around ``__call__``) are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_dp_checkpointed", False):
            continue
        inner = block.forward

        def run(*args, _inner=inner, **kwargs):
            with intercept.scoped():  # the recompute runs inside backward(), where the rules mode is off
                return _inner(*args, **kwargs)

        @functools.wraps(inner)
        def forward(*args, _run=run, **kwargs):
            return checkpoint(_run, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]
        block._dp_checkpointed = True


# ---------------------------------------------------------------------------------------------
# 3. FSDP2
# ---------------------------------------------------------------------------------------------


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    blocks: Iterable[nn.Module],
    *,
    mp_policy: object | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` each block, then the root, on ``mesh`` (normally ``manager.dp_mesh``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    kwargs["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    units = [*blocks, model]
    for unit in units:
        fully_shard(unit, **kwargs)
    if mesh.ndim == 2 and mesh.device_type == "cpu":
        # HSDP on gloo: gloo lacks PREMUL_SUM/AVG all-reduce, so FSDP2 must sum then scale
        for unit in units:
            unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
    return model


def parallelize(
    model: nn.Module,
    manager: DomainParallelManager,
    *,
    fsdp: bool = True,
    mp_policy: object | None = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    blocks: Iterable[nn.Module] | None = None,
    custom_converters: Mapping[type, Callable] | None = None,
    compile: bool | str = False,
    overlap_gradients: bool = False,
) -> nn.Module:
    """Make ``model`` domain-parallel on ``manager.domain_mesh`` and FSDP2-sharded on ``manager.dp_mesh``.

    Args:
        model: a plain torch model on the manager's device (converted in place).
        manager: the ``("dp", "domain")`` mesh owner.
        fsdp: apply FSDP2. Without it, call :func:`reduce_gradients` after each backward.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (default: full precision).
        reshard_after_forward: FSDP2's option (free gathered params after forward).
        activation_checkpointing: recompute every block in backward.
        blocks: FSDP/checkpoint units (default :func:`default_blocks`).
        custom_converters: passed to ``convert_to_domain_parallel``.
        compile: ``torch.compile`` every block (``True``: inductor, or a backend name such as
            ``"aot_eager"``) with ``fullgraph=True, dynamic=False``; the whole model when it has no
            blocks. FSDP2's hooks stay outside the compiled regions (torchtitan's recipe).
        overlap_gradients: with ``fsdp=False``, reduce the gradients bucket by bucket during
            backward (:func:`~credit_dtensor.gradsync.overlap_gradient_reduction`);
            :func:`reduce_gradients` after backward then waits for them. Same numbers.

    Returns the same model object (FSDP2 swaps its class in place).
    """
    if not isinstance(manager, DomainParallelManager):
        raise DomainParallelError(f"parallelize: expected a DomainParallelManager, got {type(manager).__name__}")
    dev = {p.device.type for p in model.parameters()}
    if dev and dev != {manager.device_type}:
        raise DomainParallelError(
            f"parallelize: model parameters are on {sorted(dev)} but the mesh is {manager.device_type!r}: "
            f"move the model with .to({manager.device_type!r}) first"
        )
    if overlap_gradients and fsdp:
        raise DomainParallelError(
            "parallelize(overlap_gradients=True) applies to fsdp=False (FSDP2 overlaps its own gradient "
            "reductions): pass fsdp=False, or drop overlap_gradients"
        )
    blocks = list(blocks) if blocks is not None else default_blocks(model)
    model = convert_model(model, manager, custom_converters)
    if activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if fsdp:
        before = {(id(m), n): p for m in model.modules() for n, p in m._parameters.items() if p is not None}
        apply_fsdp(model, manager.dp_mesh, blocks, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
        for m in model.modules():  # FSDP2 registers new (sharded) parameters: optimizers built before follow
            for n, p in m._parameters.items():
                old = before.get((id(m), n))
                if old is not None and p is not None and p is not old:
                    rebind.record(old, p)
        rebind.rebind_optimizers()
    else:
        model._dp_manager = manager  # for reduce_gradients
        if overlap_gradients:
            overlap_gradient_reduction(model, manager)
    if compile:
        apply_compile(blocks or [model], "inductor" if compile is True else str(compile))
    logger.info(
        "parallelized %s: dp=%d domain=%d fsdp=%s blocks=%d checkpointing=%s",
        type(model).__name__,
        manager.dp_world_size,
        manager.domain_world_size,
        fsdp,
        len(blocks),
        activation_checkpointing,
    )
    return model


def apply_compile(units: Iterable[nn.Module], backend: str = "inductor") -> None:
    """``torch.compile`` each unit's ``forward`` in place (names, parameters and hooks unchanged).

    The unit's hooks -- FSDP2's all-gather and reshard hooks among them -- run eagerly around the
    compiled forward: ``nn.Module.compile`` would compile ``__call__`` with its hooks, and torch
    2.14's FSDP2 hooks refuse to be traced ("torch._dynamo.disable() was called inside a compiled
    region"). ``fullgraph=True``: every rule of a converted model is traceable or an opaque custom
    op, so a graph break is a bug to report, not a slowdown to accept. ``dynamic=False``: shard
    sizes are static per input size (a new field size compiles a new graph instead of symbolic
    shapes).
    """
    require(2, 13, "parallelize(compile=...) (torch.compile(fullgraph=True) of converted blocks)")
    for unit in units:
        unit.forward = torch.compile(unit.forward, backend=backend, fullgraph=True, dynamic=False)


# ---------------------------------------------------------------------------------------------
# gradient reduction without FSDP
# ---------------------------------------------------------------------------------------------


def _buckets(grads: list[tuple[nn.Parameter, torch.Tensor]]) -> Iterable[list[tuple[nn.Parameter, torch.Tensor]]]:
    bucket: list = []
    size = 0
    for item in grads:
        nb = item[1].numel() * item[1].element_size()
        if bucket and (size + nb > BUCKET_BYTES or item[1].dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += nb
    if bucket:
        yield bucket


def reduce_gradients(model: nn.Module, manager: DomainParallelManager | None = None) -> None:
    """Reduce the gradients of a model parallelized with ``fsdp=False``, in place.

    ``Partial`` (domain) gradients and plain-tensor gradients (a plain weight used on sharded
    activations holds only this rank's contribution) are summed over the whole world -- one
    collective does the domain sum and the dp sum; ``Replicate`` gradients are summed over "dp"
    only. All are then divided by the dp size (mean over data-parallel replicas) and every DTensor
    gradient is left ``Replicate`` on its mesh. One all-reduce per bucket of <= 25 MiB.

    With :func:`~credit_dtensor.gradsync.overlap_gradient_reduction` (``parallelize(...,
    fsdp=False, overlap_gradients=True)``) the buckets were posted during backward: this waits for
    them and reduces only what is left, with the same result.
    """
    reducer = getattr(model, "_grad_reducer", None)
    if reducer is not None:
        if manager is not None and manager is not reducer.manager:
            raise DomainParallelError(
                "reduce_gradients: the model's gradients are reduced during backward with another manager's groups "
                "(overlap_gradient_reduction): pass that manager, or none"
            )
        reducer.finish()
        return
    manager = manager or getattr(model, "_dp_manager", None)
    if manager is None:
        raise DomainParallelError(
            "reduce_gradients: no manager: pass it, or parallelize the model with fsdp=False first"
        )
    reduce_gradient_list(list(model.parameters()), manager)


def reduce_gradient_list(params: list[nn.Parameter], manager: DomainParallelManager) -> None:
    """:func:`reduce_gradients` of the parameters ``params`` (those without a gradient skipped)."""
    partial, replicate = [], []
    for p in params:
        g = p.grad
        if g is None:
            continue
        (partial if is_partial(g) else replicate).append((p, g))
    world_group = dist.group.WORLD
    dp = manager.dp_world_size
    with intercept.suspended():  # flat buffers, local tensors and one sum each: no rule applies
        for items, group in ((partial, world_group), (replicate, manager.dp_group)):
            for bucket in _buckets(items):
                flat = flatten(bucket)
                comm.all_reduce_sum(flat, group)
                settle(bucket, flat, dp)
