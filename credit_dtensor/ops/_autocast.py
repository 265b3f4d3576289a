"""``torch.autocast`` for the rules that compute with their own kernels.

PyTorch applies autocast per aten op (a cast of the inputs before the op). Rules that end in
autocast-aware torch functions on local tensors (``F.linear``, ``matmul``, attention, losses)
follow it by themselves, and DTensor's own ops do too. Rules that run other kernels -- the halo
convolution calls ``aten.convolution``, the norms and resampling rules their own arithmetic --
would run in the input's dtype: a converted model silently trained in fp32 under
``autocast(bfloat16)``. Each of those rules calls :func:`cast_inputs` with the op's autocast
class, which casts like PyTorch does for that op on that device type:

* ``"lower"`` (convolutions and transposed convolutions on CPU and CUDA): floating inputs other
  than fp64 to the autocast dtype;
* ``"fp32"``: to float32 (``layer_norm`` / ``group_norm`` on CUDA; reflection / replication
  padding and 3-D average/max/adaptive pooling on CPU);
* otherwise unchanged (the op runs in its input dtype, as on one device).

The classes are PyTorch's documented autocast op lists (torch.amp, "Autocast Op Reference"),
restricted to the ops these rules implement. Kernels accumulate half types in float32 and return
the input dtype, as PyTorch's CPU and CUDA kernels do.
"""

from __future__ import annotations

import torch

__all__ = ["cast_inputs", "policy"]

#: op name -> {device type: "lower" | "fp32"}; a device type not listed: the input dtype
_POLICY: dict[str, dict[str, str]] = {
    **{f"conv{nd}d": {"cpu": "lower", "cuda": "lower"} for nd in (1, 2, 3)},
    **{f"conv_transpose{nd}d": {"cpu": "lower", "cuda": "lower"} for nd in (1, 2, 3)},
    "group_norm": {"cuda": "fp32"},
    "layer_norm": {"cuda": "fp32"},
    "reflection_pad1d": {"cpu": "fp32"},
    "reflection_pad2d": {"cpu": "fp32"},
    "replication_pad1d": {"cpu": "fp32"},
    "replication_pad2d": {"cpu": "fp32"},
    "replication_pad3d": {"cpu": "fp32"},
    "avg_pool3d": {"cpu": "fp32"},
    "max_pool3d": {"cpu": "fp32"},
    "adaptive_avg_pool3d": {"cpu": "fp32"},
}


def _enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older signature: CUDA only, CPU has its own query
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def policy(op: str, device_type: str) -> str | None:
    """The autocast class of ``op`` on ``device_type`` if autocast is on there, else ``None``."""
    rule = _POLICY.get(op)
    if rule is None or device_type not in rule or not _enabled(device_type):
        return None
    return rule[device_type]


def _target(kind: str, device_type: str) -> torch.dtype:
    if kind == "fp32":
        return torch.float32
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # older torch
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def cast_inputs(op: str, *tensors: torch.Tensor | None) -> tuple:
    """``tensors`` cast as autocast casts the inputs of ``op`` (unchanged when autocast is off for
    their device type, or the op runs in its input dtype there). Differentiable (``Tensor.to``)."""
    ref = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if ref is None:
        return tensors
    kind = policy(op, ref.device.type)
    if kind is None:
        return tensors
    dtype = _target(kind, ref.device.type)
    return tuple(
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.dtype != dtype
        else t
        for t in tensors
    )
