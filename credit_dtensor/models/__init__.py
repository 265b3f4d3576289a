"""Representative models of the field, in plain PyTorch, that convert exactly.

Factories take keyword arguments and return a model; ``credit-dtensor plan credit_dtensor.models:unet``
audits one. Importing :mod:`.crossformer` / :mod:`.pangu` declares their window attention
shard-local (see :func:`credit_dtensor.nn.local.shard_local`).
"""

from __future__ import annotations

from typing import Any

from .crossformer import CrossFormer
from .crossformer_credit import CrossFormerStage
from .fuxi import FuXiLite
from .pangu import PanguLite
from .swin import SwinNet
from .unet import WeatherUNet
from .unet_scse import UNetSCSE

__all__ = [
    "WeatherUNet",
    "CrossFormer",
    "PanguLite",
    "SwinNet",
    "CrossFormerStage",
    "FuXiLite",
    "UNetSCSE",
    "unet",
    "crossformer",
    "pangu",
    "swin",
    "crossformer_credit",
    "fuxi",
    "unet_scse",
    "MODELS",
]


def unet(**kw: Any) -> WeatherUNet:
    """Weather U-Net, input ``(B, 3, H, W)``."""
    return WeatherUNet(**kw)


def crossformer(**kw: Any) -> CrossFormer:
    """CrossFormer-style encoder, input ``(B, 3, H, W)`` with H, W multiples of 8."""
    return CrossFormer(**kw)


def pangu(**kw: Any) -> PanguLite:
    """Pangu-style 3-D net, input ``(B, 3, 2, H, W)`` for ``grid=(2, H, W)`` (default 32 x 16)."""
    return PanguLite(**kw)


def swin(**kw: Any) -> SwinNet:
    """Swin network with shifted windows, input ``(B, 3, H, W)`` with H/2, W/2 multiples of 4."""
    return SwinNet(**kw)


def crossformer_credit(**kw: Any) -> CrossFormerStage:
    """CREDIT-style CrossFormer stage, input ``(B, 3, H, W)`` with (H + 2) / 2, (W + 2) / 2 even."""
    return CrossFormerStage(**kw)


def fuxi(**kw: Any) -> FuXiLite:
    """FuXi-style cube embedding + Swin-V2 U-Transformer, input ``(B, 2, 2, H, W)`` with H/8, W/8
    multiples of 4 (``patch=(2, 2, 2)``: H/4, W/4)."""
    return FuXiLite(**kw)


def unet_scse(**kw: Any) -> UNetSCSE:
    """U-Net with scSE gates and a pooled classifier head, input ``(B, 3, H, W)``, H, W multiples
    of 4; returns ``(field, logits)``."""
    return UNetSCSE(**kw)


MODELS = {
    "unet": unet,
    "crossformer": crossformer,
    "pangu": pangu,
    "swin": swin,
    "crossformer_credit": crossformer_credit,
    "fuxi": fuxi,
    "unet_scse": unet_scse,
}
