"""Compare a sharded computation with the single-device truth: outputs, input grads, param grads.

Used inside harness tasks by every op test. The reference runs on the full tensors on every rank
(same seed everywhere), the sharded run on H-sharded DTensor leaves; both get the same random
output gradient. Errors are max-abs differences; :func:`assert_parity` raises with all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor, Shard

from credit_dtensor.sharding import shard_tensor

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Max-abs difference over ``max(1, |b|max)`` (DTensors gathered; ``None`` only matches ``None``,
    a shape mismatch is ``inf``)."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    if isinstance(a, DTensor):
        a = a.full_tensor()
    if isinstance(b, DTensor):
        b = b.full_tensor()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    scale = max(1.0, b.abs().max().item())
    return (a - b).abs().max().item() / scale


def parity(
    manager,
    ref_fn: Callable[..., torch.Tensor],
    dist_fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    shard_dims: Sequence[int | None],
    out_dim: int | None,
    ref_params: dict[str, torch.Tensor] | None = None,
    dist_params: dict[str, torch.Tensor] | None = None,
    seed: int = 1234,
) -> dict[str, float]:
    """Run both sides forward and backward; return ``{name: relative max error}``."""
    ref_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    y_ref = ref_fn(*ref_in)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(y_ref.shape, generator=gen, dtype=y_ref.dtype)
    y_ref.backward(g)

    dist_in = []
    for x, d in zip(inputs, shard_dims):
        if d is None:
            dist_in.append(x.detach().clone().requires_grad_(x.is_floating_point()))
        else:
            dist_in.append(shard_tensor(x.detach().clone(), manager, d).requires_grad_(x.is_floating_point()))
    y = dist_fn(*dist_in)
    errors: dict[str, float] = {}
    if out_dim is not None:
        if not isinstance(y, DTensor):
            errors["output is not a DTensor"] = float("inf")
            return errors
        if tuple(y.placements) != (Shard(out_dim),):
            errors[f"output placement {y.placements} != Shard({out_dim})"] = float("inf")
    gd = shard_tensor(g, manager, out_dim) if out_dim is not None else g
    if isinstance(y, DTensor) and out_dim is None:
        from torch.distributed.tensor import Replicate, distribute_tensor

        gd = distribute_tensor(g, y.device_mesh, [Replicate()])
    y.backward(gd)
    errors["out"] = rel_err(y, y_ref)
    for i, (a, b) in enumerate(zip(dist_in, ref_in)):
        if b.requires_grad:
            errors[f"grad_in{i}"] = rel_err(a.grad, b.grad)
    for name, p in (ref_params or {}).items():
        q = (dist_params or {})[name]
        errors[f"grad_{name}"] = rel_err(q.grad, p.grad)
    return errors


def assert_parity(errors: dict[str, float], dtype: torch.dtype, context: object = "") -> None:
    tol = TOL[dtype]
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        raise AssertionError(f"sharded != single device (tol {tol}) for {context}: {bad} (all: {errors})")
