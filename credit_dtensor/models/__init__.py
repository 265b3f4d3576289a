"""Representative models of the field, in plain PyTorch, that convert exactly.

Factories take keyword arguments and return a model; ``credit-dtensor plan credit_dtensor.models:unet``
audits one. Importing :mod:`.crossformer` / :mod:`.pangu` declares their window attention
shard-local (see :func:`credit_dtensor.nn.local.shard_local`).
"""

from __future__ import annotations

from typing import Any

from .crossformer import CrossFormer
from .pangu import PanguLite
from .unet import WeatherUNet

__all__ = ["WeatherUNet", "CrossFormer", "PanguLite", "unet", "crossformer", "pangu", "MODELS"]


def unet(**kw: Any) -> WeatherUNet:
    """Weather U-Net, input ``(B, 3, H, W)``."""
    return WeatherUNet(**kw)


def crossformer(**kw: Any) -> CrossFormer:
    """CrossFormer-style encoder, input ``(B, 3, H, W)`` with H, W multiples of 8."""
    return CrossFormer(**kw)


def pangu(**kw: Any) -> PanguLite:
    """Pangu-style 3-D net, input ``(B, 3, 2, H, W)`` for ``grid=(2, H, W)`` (default 32 x 16)."""
    return PanguLite(**kw)


MODELS = {"unet": unet, "crossformer": crossformer, "pangu": pangu}
