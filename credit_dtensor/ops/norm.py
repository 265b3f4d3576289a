"""Exact group / instance / batch / layer normalization on sharded DTensors: only statistics travel.

PyTorch 2.13 all-gathers a ``Shard(H)`` activation for these ops (full-size memory on every rank)
and has no ``native_group_norm_backward`` rule without affine. Here the statistics are computed
from each rank's own rows and merged exactly across the domain group (:mod:`.norm_kernels`: Chan's
formula, counts from geometry, so uneven and empty shards are exact); the activation never moves.

``group_norm`` / ``instance_norm`` / ``batch_norm`` / ``layer_norm`` below have the signatures of
``torch.nn.functional``; the module wrappers call them, and so does ``F.group_norm`` etc. called on
a sharded DTensor (a torch-function rule). Parameters are Replicate DTensors (gradients come back
``Partial`` and are reduced once) or plain tensors (gradients summed over the domain group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from .. import comm, intercept, stats
from .._torch_versions import is_plain_shard
from ..dtensor import check_replicated, full_operand, local_of, wrap_replicate, wrap_shard
from ..errors import DomainParallelError, UnsupportedShardingError
from ..geometry import chunk_range
from ..geometry.norm import NormLayout
from . import _groups, fold
from ._autocast import cast_inputs
from ._route import route_rule
from .family import family
from .norm_fold import folded_channel_norm
from .norm_kernels import channel_norm, layer_xhat
from .relayout import to_spatial

FAMILY = family(
    "norm",
    "group, instance, batch and layer norm over sharded dims: per-rank statistics merged exactly",
    nn="credit_dtensor.nn.norm",
)

__all__ = ["group_norm", "instance_norm", "batch_norm", "layer_norm", "NormPlan", "plan_norm"]


@dataclass(frozen=True)
class NormPlan:
    """One call's geometry and communication: ``counts`` is ``None`` when statistics are local."""

    mesh: DeviceMesh
    layout: NormLayout
    dim: int | None  # sharded tensor dim, None when the input is replicated
    counts: tuple[int, ...] | None
    label: str  # names the layer in error messages
    op: str  # key of the traffic in ``comm_stats().by_op``

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    @property
    def world(self) -> int:
        return self.mesh.size()

    def local_range(self) -> tuple[int, int]:
        assert self.dim is not None
        return chunk_range(self.layout.shape[self.dim], self.world, self.rank)


def plan_norm(x: DTensor, layout: NormLayout, label: str, op: str | None = None) -> NormPlan:
    """Check ``x``'s placement (clear errors for what we cannot do exactly) and plan the call."""
    op = op or f"{layout.kind}_norm"
    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise UnsupportedShardingError(
            f"{label}: input lives on a {mesh.ndim}-D mesh with placements {x.placements}; expected a DTensor on "
            "the 1-D domain mesh: shard activations with the manager's domain mesh (shard_tensor/shard_batch)"
        )
    p = x.placements[0]
    if isinstance(p, Replicate):
        return NormPlan(mesh, layout, None, None, label, op)
    if not is_plain_shard(p):  # not type(p) is Shard: False under Dynamo on torch 2.11
        raise UnsupportedShardingError(
            f"{label}: input placement {p!r} is not supported; expected Shard(spatial dim) or Replicate: "
            "redistribute the input first"
        )
    dim = p.dim % len(layout.shape)
    if dim == layout.channel_dim:
        raise UnsupportedShardingError(
            f"{label}: input is sharded on channels (Shard(1)); a channel group's statistics would span ranks "
            "and channel sharding is not supported: shard on a spatial dim instead, e.g. "
            "x.redistribute(mesh, [Shard(2)])"
        )
    counts = layout.rank_counts(dim, mesh.size()) if mesh.size() > 1 else None
    return NormPlan(mesh, layout, dim, None if counts is None else tuple(counts), label, op)


def _param_local(p: torch.Tensor | None, plan: NormPlan, name: str) -> torch.Tensor | None:
    """Local value of a parameter whose gradient is exact: a sharded input leaves each rank part
    of it (``Partial`` for DTensors, summed over the domain group for plain tensors); with a
    replicated input every rank computes all of it."""
    if p is None:
        return None
    check_replicated(p, plan.mesh, plan.label, name)
    if plan.dim is None:
        return _local(p)
    return full_operand(p, plan.mesh)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """Local tensor of a DTensor (buffers: in-place updates reach the DTensor), else ``t``."""
    return local_of(t) if isinstance(t, DTensor) else t


def _locals(input: DTensor, plan: NormPlan, weight, bias, running_mean=None, running_var=None) -> tuple:
    """``(x, w, b, running_mean, running_var)`` of this rank, the parameters and buffers checked."""
    check_replicated(running_mean, plan.mesh, plan.label, "running_mean")
    check_replicated(running_var, plan.mesh, plan.label, "running_var")
    w, b = _param_local(weight, plan, "weight"), _param_local(bias, plan, "bias")
    return local_of(input), w, b, _local(running_mean), _local(running_var)


def _wrap(local: torch.Tensor, plan: NormPlan, shape: Sequence[int], carry=None) -> DTensor:
    if plan.dim is None:
        return wrap_replicate(local, plan.mesh)
    out = wrap_shard(local, plan.mesh, plan.dim, shape)
    if carry is not None:
        fold.attach(out, carry)
    return out


def _channel(x: torch.Tensor, w, b, plan: NormPlan, eps: float, weight) -> tuple:
    """``(y, mean, var, carry)``: :func:`channel_norm` with distributed statistics, which also
    borrows the halo rows of the convolution that reads its output once that is known
    (:mod:`.fold`; ``carry`` is then a :class:`~.fold.Carry`, a :class:`~.fold.Probe` on the first
    call, else ``None``)."""
    if plan.dim is None or plan.dim < 2 or plan.world < 2 or not fold.enabled(x):
        return (*channel_norm(x, w, b, plan, eps), None)
    lay = plan.layout
    key = (plan.label, lay.kind, lay.groups, lay.shape, plan.dim, _groups.name_of(plan.mesh), float(eps))
    got = fold.decide(key, weight, plan.group)
    if (
        isinstance(got, (fold.ConvKey, fold.RowKey))
        and got.dim == plan.dim
        and got.shape[: plan.dim + 1] == lay.shape[: plan.dim + 1]
    ):
        return folded_channel_norm(x, w, b, plan, eps, got)
    return (*channel_norm(x, w, b, plan, eps), got if isinstance(got, fold.Probe) else None)


def _check_shapes(label: str, expected: tuple[int, ...], what: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != expected:
            raise DomainParallelError(f"{label}: {name} shape {tuple(t.shape)} != {expected} {what}")


def _running_update(running: torch.Tensor | None, value: torch.Tensor, momentum: float) -> None:
    """``running = momentum * value + (1 - momentum) * running`` in place (plain or DTensor buffer)."""
    if running is None:
        return
    with torch.no_grad():
        r = _local(running)
        r.copy_(momentum * value.to(r.dtype) + (1 - momentum) * r)


def _unbiased(var: torch.Tensor, n: int) -> torch.Tensor:
    """torch tracks the unbiased variance (normalizes with the biased one)."""
    return var * (n / max(n - 1, 1))


def _batch_mean(t: torch.Tensor, plan: NormPlan) -> torch.Tensor:
    """Mean over the (possibly batch-sharded) dim 0 of per-sample statistics ``(N_local, C)``."""
    s = t.sum(0)
    if plan.dim == 0 and plan.world > 1:
        with stats.op_label(plan.op):
            comm.all_reduce_sum(s, plan.group)
    return s / plan.layout.shape[0]


def _verify_size(shape: Sequence[int], first: int, what: str, label: str) -> None:
    """torch's ``_verify_batch_size`` / ``_verify_spatial_size`` on the *global* shape."""
    prod = shape[0] if first == 0 else 1
    for s in shape[2:]:
        prod *= s
    if prod == 1:
        raise DomainParallelError(f"{label}: expected more than 1 {what} when training, got input size {list(shape)}")


def _off_channels(x: DTensor) -> DTensor:
    """A channel-sharded input (heads merged back into channels after attention) moves to H first:
    channel statistics mix every channel of a group."""
    return to_spatial(x, x.ndim - 2) if x.ndim > 2 else x


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    label: str = "group_norm",
) -> torch.Tensor:
    """``F.group_norm`` for a DTensor sharded on a spatial dim (or replicated); exact, autograd-aware."""
    if not isinstance(input, DTensor):
        return F.group_norm(input, num_groups, weight, bias, eps)
    input, weight, bias = cast_inputs("group_norm", input, weight, bias)  # torch.autocast (CUDA: fp32)
    input = _off_channels(input)
    with intercept.suspended():  # checks, local tensors and our own rounds: no rule applies below
        shape = tuple(input.shape)
        if len(shape) < 2 or num_groups < 1 or shape[1] % num_groups:
            raise DomainParallelError(
                f"{label}: {shape[1] if len(shape) > 1 else '?'} channels of input {shape} are not divisible "
                f"by num_groups={num_groups}: choose a divisor of the channel count"
            )
        _check_shapes(label, (shape[1],), "(channels)", weight=weight, bias=bias)
        plan = plan_norm(input, NormLayout("group", shape, groups=num_groups), label, "group_norm")
        x, w, b, _, _ = _locals(input, plan, weight, bias)
        if plan.counts is None:  # statistics are local: torch's own kernel
            return _wrap(F.group_norm(x, num_groups, w, b, eps), plan, shape)
        y, _, _, carry = _channel(x, w, b, plan, eps, weight)
        return _wrap(y, plan, shape, carry)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    label: str = "batch_norm",
) -> torch.Tensor:
    """``F.batch_norm`` on a sharded DTensor: training statistics over (N, H, W, ...) across the domain
    group; running stats (unbiased variance, as torch) updated identically on every rank."""
    if not isinstance(input, DTensor):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    input = _off_channels(input)
    with intercept.suspended():  # checks, local tensors and our own rounds: no rule applies below
        shape = tuple(input.shape)
        if len(shape) < 2:
            raise DomainParallelError(f"{label}: expected (N, C, ...) input, got shape {shape}")
        _check_shapes(
            label,
            (shape[1],),
            "(channels)",
            weight=weight,
            bias=bias,
            running_mean=running_mean,
            running_var=running_var,
        )
        plan = plan_norm(input, NormLayout("batch", shape), label, "batch_norm")
        x, w, b, rm, rv = _locals(input, plan, weight, bias, running_mean, running_var)
        if not training and (rm is None or rv is None):
            raise DomainParallelError(f"{label}: running_mean and running_var are required when training=False")
        if training:
            _verify_size(shape, 0, "value per channel", label)
            if eps <= 0:
                raise DomainParallelError(f"{label}: batch_norm eps must be positive during training, got {eps}")
        if not training or plan.counts is None:  # running statistics (pointwise) or local statistics
            return _wrap(F.batch_norm(x, rm, rv, w, b, training, momentum, eps), plan, shape)
        y, mean, var, carry = _channel(x, w, b, plan, eps, weight)
        _running_update(rm, mean, momentum)
        _running_update(rv, _unbiased(var, plan.layout.count()), momentum)
        return _wrap(y, plan, shape, carry)


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    label: str = "instance_norm",
) -> torch.Tensor:
    """``F.instance_norm`` on a sharded DTensor (group norm with one channel per group, plus running
    stats averaged over the batch exactly like torch)."""
    if not isinstance(input, DTensor):
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    input = _off_channels(input)
    with intercept.suspended():  # checks, local tensors and our own rounds: no rule applies below
        shape = tuple(input.shape)
        if len(shape) < 3:
            raise DomainParallelError(f"{label}: expected (N, C, *spatial) input, got shape {shape}")
        c = shape[1]
        _check_shapes(
            label, (c,), "(channels)", weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
        )
        layout = NormLayout("group", shape, groups=c)
        plan = plan_norm(input, layout, label, "instance_norm")
        x, w, b, rm, rv = _locals(input, plan, weight, bias, running_mean, running_var)
        if not use_input_stats and (rm is None or rv is None):
            raise DomainParallelError(f"{label}: running_mean and running_var are required when use_input_stats=False")
        if use_input_stats:
            _verify_size(shape, 2, "spatial element", label)
        tracked = rm is not None or rv is not None
        batch_split = plan.dim == 0 and plan.world > 1  # running stats average over the global batch
        if not use_input_stats or (plan.counts is None and not (tracked and batch_split)):
            return _wrap(F.instance_norm(x, rm, rv, w, b, use_input_stats, momentum, eps), plan, shape)
        y, mean, var, carry = _channel(x, w, b, plan, eps, weight)
        if tracked:
            nl, n = x.shape[0], layout.count()
            _running_update(rm, _batch_mean(mean.view(nl, c), plan), momentum)
            _running_update(rv, _batch_mean(_unbiased(var, n).view(nl, c), plan), momentum)
        return _wrap(y, plan, shape, carry)


def _layer_param_slice(t: torch.Tensor, plan: NormPlan) -> torch.Tensor:
    """This rank's rows of a layer-norm weight when the sharded dim is a normalized dim."""
    lead = len(plan.layout.shape) - plan.layout.norm_ndim
    if plan.dim is None or plan.dim < lead:
        return t
    a, b = plan.local_range()
    return t.narrow(plan.dim - lead, a, b - a)


def _check_normalized_shape(shape: Sequence[int], normalized_shape: Sequence[int] | int, label: str) -> tuple[int, ...]:
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    if not ns or len(ns) > len(shape) or tuple(shape[len(shape) - len(ns) :]) != ns:
        raise DomainParallelError(
            f"{label}: normalized_shape {list(ns)} does not match the trailing dims of the input shape "
            f"{list(shape)}: it must equal input.shape[-{max(len(ns), 1)}:]"
        )
    return ns


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    label: str = "layer_norm",
) -> torch.Tensor:
    """``F.layer_norm`` on a sharded DTensor. Exact across ranks when the sharded dim is normalized
    over; purely local (torch's kernel, no communication) when it is a leading dim (e.g. over C)."""
    if not isinstance(input, DTensor):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    input, weight, bias = cast_inputs("layer_norm", input, weight, bias)  # torch.autocast (CUDA: fp32)
    with intercept.suspended():  # checks, local tensors and our own rounds: no rule applies below
        shape = tuple(input.shape)
        ns = _check_normalized_shape(shape, normalized_shape, label)
        _check_shapes(label, ns, "(normalized_shape)", weight=weight, bias=bias)
        plan = plan_norm(input, NormLayout("layer", shape, norm_ndim=len(ns)), label, "layer_norm")
        x, w, b, _, _ = _locals(input, plan, weight, bias)
        w = None if w is None else _layer_param_slice(w, plan)
        b = None if b is None else _layer_param_slice(b, plan)
        if plan.counts is None:
            y = F.layer_norm(x, x.shape[x.ndim - len(ns) :], w, b, eps)
        else:
            y = layer_xhat(x, plan, eps)
            if w is not None:
                y = y * w
            if b is not None:
                y = y + b
        return _wrap(y, plan, shape)


_NORM_ROUTES = {
    F.group_norm: (group_norm, None, {}),
    F.batch_norm: (batch_norm, None, {}),
    F.instance_norm: (instance_norm, None, {}),
    F.layer_norm: (layer_norm, None, {}),
}
FAMILY.rule(_NORM_ROUTES, h="stats", note="statistics merged exactly over the ranks (Chan)")(
    route_rule("norm_rule", _NORM_ROUTES)
)
