"""Modules whose computation never crosses a shard boundary, run on each rank's own rows.

* :class:`DomainParallelLinear` -- ``nn.Linear`` over a dim that is not the sharded one (channels
  of a channels-last tensor). PyTorch 2.13's DTensor flattens the leading dims for ``linear``
  and refuses unevenly sharded inputs ("Cannot flatten unevenly sharded tensor"); computing on
  the local rows is exact for every shard size and sends nothing. A Linear *over* the sharded
  dim (a dense head on flattened features) moves the shards onto another dim of at least
  ``world`` entries, or else sums each rank's partial products once (an all-reduce of the output).
* :class:`DomainParallelShardLocal` -- any module declared shard-local (window attention whose
  windows lie inside one shard, per-row MLPs, ...): its own ``forward`` runs unchanged on plain
  local tensors (the same code as on one device), parameters are the local replicas with their
  gradients returned ``Partial``. ``block`` is the window height: every shard boundary must fall
  on a multiple of it, checked from geometry before anything runs (same answer on every rank).

Both are ordinary wrappers (class swap, ``state_dict`` keys unchanged), picked up by the converter
through :data:`LOCAL_WRAPPERS`; shard-local is opt-in per module type via
``register_converter(MyAttention, shard_local)`` or ``custom_converters={MyAttention: ...}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..dtensor import domain_shard_dim, full_operand, is_sharded, local_replicated, wrap_replicate, wrap_shard
from ..errors import DomainParallelError, MeshMismatchError
from ..geometry import chunk_sizes
from ..geometry.window import window_height
from ..ops.linear import FAMILY, off_features, row_parallel
from ._base import DomainParallelModule, module_label

__all__ = [
    "DomainParallelLinear",
    "DomainParallelShardLocal",
    "LOCAL_WRAPPERS",
    "shard_local",
    "block_fits",
    "window_height",
    "needs_conversion",
]


class DomainParallelLinear(DomainParallelModule, nn.Linear):
    """``nn.Linear`` on the local rows: exact and communication-free for inputs sharded on any
    dim but the last (the one it contracts)."""

    wraps = nn.Linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        mesh = self._dp_mesh
        if not isinstance(input, DTensor):
            return super().forward(wrap_replicate(input, mesh))  # a full tensor every rank holds
        if input.device_mesh != mesh:
            raise MeshMismatchError(
                f"{module_label(self)}: input lives on mesh {input.device_mesh} but the module on {mesh}: "
                "shard inputs with the same manager that converted the model"
            )
        d = domain_shard_dim(input)
        if d is None:
            return super().forward(input)
        if d == input.ndim - 1:  # contracting the sharded dim: move the shards to another dim (all-to-all)
            moved = off_features(input)
            if moved is None:  # a dense head on flattened features: partial sums, one all-reduce of the output
                out = row_parallel(input, self.weight, self.bias)
                if out is NotImplemented:
                    raise DomainParallelError(
                        f"{module_label(self)}: Linear over the sharded dim (input {tuple(input.shape)} sharded on "
                        f"its last dim {d}) needs a weight replicated on the input's mesh: convert the module with "
                        "the manager that shards the input"
                    )
                return out
            input, d = moved, domain_shard_dim(moved)
        w = full_operand(self.weight, mesh)
        b = None if self.bias is None else full_operand(self.bias, mesh)
        y = F.linear(input.to_local(), w, b)
        return wrap_shard(y, mesh, d, (*input.shape[:-1], self.out_features))


def block_fits(n: int, world: int, block: int) -> bool:
    """Whether every ``torch.chunk`` shard of ``n`` rows starts and ends on a multiple of ``block``."""
    if block <= 1:
        return True
    return all(s % block == 0 for s in chunk_sizes(n, world))


def _localize(t: Any) -> Any:
    """A DTensor argument as the plain local tensor its rank computes with: shards stay shards,
    replicated values are used in full and their gradient comes back ``Partial``."""
    if not isinstance(t, DTensor):
        return t
    return t.to_local() if is_sharded(t) else local_replicated(t)


@contextmanager
def _local_state(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Temporarily replace every DTensor parameter, buffer and tensor attribute (e.g. a weight
    recomputed by a weight-norm hook) of ``module``'s subtree by its local tensor; yields the local
    tensors whose gradient flows back to a DTensor."""
    saved: list[tuple[dict, str, Any]] = []
    with_grad: list[torch.Tensor] = []
    try:
        for mod in module.modules():
            for store in (mod._parameters, mod._buffers, mod.__dict__):
                for name, v in list(store.items()):
                    if isinstance(v, DTensor):
                        saved.append((store, name, v))
                        local = _localize(v) if store is not mod._buffers else v.to_local()
                        store[name] = local
                        if local.requires_grad:
                            with_grad.append(local)
        yield with_grad
    finally:
        for store, name, v in reversed(saved):
            store[name] = v


class _ZeroGradAnchor(torch.autograd.Function):
    """Outputs unchanged (cloned: they are empty where this is used); in backward, a zero gradient
    for each of ``params``. A rank whose shard is empty may compute nothing that reaches a
    parameter (e.g. a position-bias MLP whose only consumer is attention over zero windows), so
    PyTorch leaves that rank's gradient ``None`` while the others hold ``Partial`` ones: the
    optimizer step or the gradient reduction would then wait on that rank forever. Adding exact
    zeros keeps every rank's gradient defined and the sum unchanged."""

    @staticmethod
    def forward(ctx, n_out: int, *tensors: torch.Tensor):  # type: ignore[override]
        ctx.n_out = n_out
        ctx.params = [(p.shape, p.dtype, p.device) for p in tensors[n_out:]]
        ctx.outs = [(o.shape, o.dtype, o.device) for o in tensors[:n_out]]
        return tuple(o.clone() for o in tensors[:n_out])

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        outs = [g if g is not None else torch.zeros(s, dtype=dt, device=dv) for g, (s, dt, dv) in zip(grads, ctx.outs)]
        return (None, *outs, *(torch.zeros(s, dtype=dt, device=dv) for s, dt, dv in ctx.params))


def _anchor_params(out: Any, params: list[torch.Tensor]) -> Any:
    """``out`` with every tensor routed through :class:`_ZeroGradAnchor` (see there)."""
    leaves, spec = tree_flatten(out)
    idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not idx or not params:
        return out
    anchored = _ZeroGradAnchor.apply(len(idx), *(leaves[i] for i in idx), *params)
    for i, t in zip(idx, anchored):
        leaves[i] = t
    return tree_unflatten(leaves, spec)


class DomainParallelShardLocal(DomainParallelModule, nn.Module):
    """Run a module's own forward on each rank's rows (see the module docstring).

    Options (``shard_local(module, manager, block=..., dim=...)``): ``block`` -- rows that must stay
    together (window height; default: the module's ``window_size`` along H, else 1); ``dim`` --
    the tensor dim the input is sharded on when a plain tensor is passed (default: inputs must
    already be sharded DTensors). Every output tensor must keep the input's local size along the
    sharded dim (row-local computation); anything else is an error, never a silent gather.
    """

    wraps = nn.Module
    _dp_block: int = 1
    _dp_dim: int | None = None
    _dp_active: bool = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._dp_active:  # re-entrant call from inside our own forward
            return super().forward(*args, **kwargs)
        mesh = self._dp_mesh
        leaves, _ = tree_flatten((args, kwargs))
        sharded = [t for t in leaves if is_sharded(t)]
        if not sharded:
            if any(isinstance(t, DTensor) for t in leaves):
                raise DomainParallelError(
                    f"{module_label(self)}: shard-local module got a replicated input, not an H-sharded one: an "
                    "earlier operation gathered the activation (e.g. torch.roll or slicing along H); "
                    "credit_dtensor.audit.plan names it"
                )
            if self._dp_dim is None:
                raise DomainParallelError(
                    f"{module_label(self)}: shard-local module called without a sharded DTensor input: pass "
                    "activations sharded with credit_dtensor.shard_tensor (or convert with dim= to shard plain inputs)"
                )
            first = next((t for t in leaves if isinstance(t, torch.Tensor)), None)
            if first is None:
                raise DomainParallelError(f"{module_label(self)}: shard-local module called without a tensor input")
            args, kwargs = tree_map(lambda t: self._dp_input(t, self._dp_dim) if t is first else t, (args, kwargs))
            return self.forward(*args, **kwargs)
        ref = sharded[0]
        for t in leaves:
            if isinstance(t, DTensor) and t.device_mesh != mesh:
                raise MeshMismatchError(
                    f"{module_label(self)}: input on mesh {t.device_mesh} but the module on {mesh}: "
                    "use the manager that converted the model"
                )
        d = domain_shard_dim(ref)
        n, world = ref.shape[d], mesh.size()
        if not block_fits(n, world, self._dp_block):
            raise DomainParallelError(
                f"{module_label(self)}: windows of {self._dp_block} rows along dim {d} do not fit the shards "
                f"{chunk_sizes(n, world)} of {n} rows: every shard must hold whole windows (local H a multiple "
                f"of {self._dp_block}); use fewer domain ranks or an input size whose shards are multiples"
            )
        local_rows = ref.to_local().shape[d]
        largs, lkwargs = tree_map(lambda t: _localize(t) if isinstance(t, DTensor) else t, (args, kwargs))
        self._dp_active = True
        try:
            with _local_state(self) as params:
                out = super().forward(*largs, **lkwargs)
                if local_rows == 0 and torch.is_grad_enabled():
                    out = _anchor_params(out, params)
        finally:
            self._dp_active = False

        def wrap(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or isinstance(t, DTensor):
                return t
            if t.ndim <= d or t.shape[d] != local_rows:
                raise DomainParallelError(
                    f"{module_label(self)}: shard-local output of shape {tuple(t.shape)} does not keep the "
                    f"{local_rows} local rows along dim {d}: the module is not row-local; do not declare it shard-local"
                )
            shape = list(t.shape)
            shape[d] = n
            return wrap_shard(t, mesh, d, shape)

        return tree_map(wrap, out)


def shard_local(module: nn.Module, manager: Any, *, block: int | None = None, dim: int | None = None) -> nn.Module:
    """Declare ``module`` shard-local (usable as a converter: ``register_converter(T, shard_local)``)."""
    if block is None:
        block = window_height(module) or 1
    if not isinstance(block, int) or block < 1:
        raise DomainParallelError(f"shard_local({module_label(module)}): block={block!r} must be an integer >= 1")
    return DomainParallelShardLocal(module, manager, block=block, dim=dim)


def needs_conversion(module: nn.Module) -> bool:
    """Linear layers are always run locally (see the module docstring); already converted: no."""
    return not isinstance(module, DomainParallelModule)


#: torch class -> wrapper factory ``(module, manager) -> module`` (read by the converter).
LOCAL_WRAPPERS: dict[type[nn.Module], Callable[..., nn.Module]] = {nn.Linear: DomainParallelLinear}
FAMILY.converts(LOCAL_WRAPPERS, needs=needs_conversion)
