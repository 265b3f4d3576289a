"""NCAR CREDIT's own models (installed ``miles-credit`` package): tiny configurations and inputs.

Every entry of :data:`CASES` names one model class of ``credit.models`` that takes a gridded field,
with a configuration small enough to run forward + backward in seconds on one CPU core, and the
field sizes to try. Each configuration keeps the model's structure (every stage, every attention
type, padding, spectral norm, interpolation, decoder) and only shrinks widths and depths.

Nothing here imports ``credit`` at module level: the test module skips itself when miles-credit is
not installed, and worker processes import the model classes only when a case runs.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

#: variables per time step: channels * levels + surface (+ input-only on input / output-only on output)
CHANNELS, LEVELS, SURFACE, INPUT_ONLY = 2, 2, 1, 1
C_IN = CHANNELS * LEVELS + SURFACE + INPUT_ONLY  # 6
C_OUT = CHANNELS * LEVELS + SURFACE  # 5
VARS = {"channels": CHANNELS, "levels": LEVELS, "surface_channels": SURFACE, "input_only_channels": INPUT_ONLY}

#: the default field sizes (H, W); every case runs each on every world
FIELDS = ((32, 64), (64, 128))
WORLDS = (2, 3, 4)


@dataclass(frozen=True)
class Case:
    """One model configuration: ``build(h, w)`` -> model; ``inputs(h, w, gen, dtype)`` -> (x, extra args)."""

    build: Callable[[int, int], nn.Module]
    inputs: Callable[[int, int, torch.Generator, torch.dtype], tuple[torch.Tensor, tuple]]
    dtype: torch.dtype = torch.float64
    hdim: int = 3  # H of (B, C, T, H, W)
    fields: tuple[tuple[int, int], ...] = FIELDS
    what: str = ""  # the patterns the model exercises
    notes: dict = field(default_factory=dict)

    prepare: Callable[[nn.Module], None] | None = None  # after the dtype cast (mixed-dtype models)


def tol_for(dtype: torch.dtype) -> float:
    """Relative tolerance for a tensor of ``dtype``: fp64 1e-10, anything else 1e-5."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def _modules_to(model: nn.Module, class_name: str, dtype: torch.dtype) -> None:
    for m in model.modules():
        if type(m).__name__ == class_name:
            m.to(dtype)


def _stale_spectral_weights(model: nn.Module) -> None:
    """Cast the plain ``weight`` attribute spectral norm leaves on a module to its ``weight_orig``'s dtype."""
    for m in model.modules():
        orig = getattr(m, "weight_orig", None)
        w = m.__dict__.get("weight")
        if isinstance(orig, nn.Parameter) and isinstance(w, torch.Tensor) and w.dtype != orig.dtype:
            m.weight = w.detach().to(orig.dtype)


def _field(frames: int, channels: int = C_IN):
    def make(h: int, w: int, gen: torch.Generator, dtype: torch.dtype):
        return torch.randn(1, channels, frames, h, w, generator=gen, dtype=dtype), ()

    return make


@contextlib.contextmanager
def _quiet():
    """CREDIT's constructors log and print (UnetDiffusion prints its channel count)."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(level)


# --- CrossFormer family --------------------------------------------------------------------------

#: four stages of stride 2 (H/2 .. H/16), one block per stage, local windows of 2, long-distance
#: groups of 4, 2, 1, 1 -- CREDIT's layout, shrunk
_CROSS = {
    "frames": 2,
    "dim": (16, 32, 64, 128),
    "depth": (1, 1, 1, 1),
    "dim_head": 16,
    "global_window_size": (4, 2, 1, 1),
    "local_window_size": 2,
    "cross_embed_kernel_sizes": ((4, 8), (2, 4), (2, 4), (2, 4)),
    "cross_embed_strides": (2, 2, 2, 2),
    "attn_dropout": 0.0,
    "ff_dropout": 0.0,
    **VARS,
}


def _earth(h: int, w: int) -> dict:
    # pad so that the padded field still divides by 16 (four stride-2 stages) and by the windows
    return {"activate": True, "mode": "earth", "pad_lat": [16, 16], "pad_lon": [16, 16]}


def _mirror(h: int, w: int) -> dict:
    return {"activate": True, "mode": "mirror", "pad_lat": [16, 16], "pad_lon": [16, 16]}


def crossformer(*, padding: Callable | None = None, **over) -> Callable[[int, int], nn.Module]:
    def build(h: int, w: int) -> nn.Module:
        from credit.models.crossformer import CrossFormer

        kw = {**_CROSS, "image_height": h, "image_width": w, **over}
        if padding is not None:
            kw["padding_conf"] = padding(h, w)
        return CrossFormer(**kw)

    return build


def wxformer(*, padding: Callable | None = None, **over) -> Callable[[int, int], nn.Module]:
    def build(h: int, w: int) -> nn.Module:
        from credit.models.wxformer.crossformer import CrossFormer

        kw = {**_CROSS, "image_height": h, "image_width": w, **over}
        if padding is not None:
            kw["padding_conf"] = padding(h, w)
        return CrossFormer(**kw)

    return build


def nextgen(**over) -> Callable[[int, int], nn.Module]:
    def build(h: int, w: int) -> nn.Module:
        from credit.models.wxformer.wxformer_next import NextGenWXFormer

        kw = {
            **{k: v for k, v in _CROSS.items() if k not in ("attn_dropout", "ff_dropout")},
            "image_height": h,
            "image_width": w,
            "col_attn_heads": 1,
            "num_spectral_nodes": 8,
            **over,
        }
        return NextGenWXFormer(**kw)

    return build


def camulator(**over) -> Callable[[int, int], nn.Module]:
    def build(h: int, w: int) -> nn.Module:
        from credit.models.camulator import Camulator

        return Camulator(**{**_CROSS, "image_height": h, "image_width": w, **over})

    return build


# --- FuXi, Swin ----------------------------------------------------------------------------------


def fuxi(window: int = 2, **over) -> Callable[[int, int], nn.Module]:
    def build(h: int, w: int) -> nn.Module:
        from credit.models.fuxi import Fuxi

        kw = {
            "image_height": h,
            "image_width": w,
            "patch_height": 4,
            "patch_width": 4,
            "frames": 2,
            "frame_patch_size": 2,
            "dim": 16,
            "num_groups": 4,
            "num_heads": 2,
            "depth": 2,
            "window_size": window,
            "proj_drop": 0,
            "attn_drop": 0,
            "drop_path": 0,
            **VARS,
            **over,
        }
        return Fuxi(**kw)

    return build


def swin(**over) -> Callable[[int, int], nn.Module]:
    def build(h: int, w: int) -> nn.Module:
        from credit.models.swin import SwinTransformerV2Cr

        kw = {
            "img_size": (h, w),
            "patch_size": 4,
            "window_size": 4,
            "frames": 1,
            "embed_dim": 16,
            "depths": (2, 2),
            "num_heads": (2, 2),
            **VARS,
            **over,
        }
        return SwinTransformerV2Cr(**kw)

    return build


# --- U-Nets, debugger ----------------------------------------------------------------------------


def segmentation(name: str, **arch) -> Callable[[int, int], nn.Module]:
    def build(h: int, w: int) -> nn.Module:
        from credit.models.unet import SegmentationModel

        architecture = {"name": name, "encoder_name": "resnet18", "encoder_weights": None, **arch}
        return SegmentationModel(image_height=h, image_width=w, frames=2, architecture=architecture, **VARS)

    return build


def unet_diffusion(**over) -> Callable[[int, int], nn.Module]:
    def build(h: int, w: int) -> nn.Module:
        from credit.models.unet_diffusion import UnetDiffusion

        kw = {
            "image_height": h,
            "image_width": w,
            "frames": 1,
            "dim": (8,),
            "dim_mults": (1, 2, 4, 8),
            "attn_heads": 2,
            "attn_dim_head": 8,
            "dropout": 0.0,
            "flash_attn": False,
            "padding_conf": {"activate": False},
            **VARS,
            **over,
        }
        return UnetDiffusion(**kw)

    return build


def _diffusion_inputs(h: int, w: int, gen: torch.Generator, dtype: torch.dtype):
    x = torch.randn(1, C_OUT, 1, h, w, generator=gen, dtype=dtype)
    time = torch.tensor([37.0], dtype=dtype)  # a plain (B,) diffusion step, the same on every rank
    return x, (time,)


def debugger(h: int, w: int) -> nn.Module:
    from credit.models.debugger_model import DebuggerModel

    return DebuggerModel(image_height=h, image_width=w, frames=2, **VARS)


# --- the matrix ----------------------------------------------------------------------------------

_CROSS_WHAT = (
    "CrossEmbed strided convs (even kernels), short (window) + long (strided groups over all of H) "
    "einsum attention after einops rearrange, channel LayerNorm, ConvTranspose/PixelShuffle decoder, "
    "GroupNorm, view of (b, c*t, h, w) into (b, c, t, h, w)"
)

CASES: dict[str, Case] = {
    "crossformer": Case(
        crossformer(use_spectral_norm=False, interp=False),
        _field(2),
        what=_CROSS_WHAT + "; (B, C, T, H, W) reshaped to (B, C*T, H, W)",
    ),
    "crossformer_sn_interp": Case(
        crossformer(use_spectral_norm=True, interp=True),
        _field(2),
        what="CrossFormer defaults: spectral norm on every conv/linear, bilinear F.interpolate to (H, W)",
    ),
    "crossformer_earth": Case(
        crossformer(padding=_earth, use_spectral_norm=False, interp=True),
        _field(2),
        what="earth padding: torch.roll by W/2, flip of pole rows, cat on H, circular F.pad on W; unpad slicing",
    ),
    "crossformer_mirror": Case(
        crossformer(padding=_mirror, use_spectral_norm=False, interp=True),
        _field(2),
        what="mirror padding: circular F.pad on W, reflect F.pad on H (16 rows, wider than a shard)",
    ),
    "crossformer_upsample": Case(
        crossformer(use_spectral_norm=False, interp=False, upsample_v_conv=True, attention_type="scse_standard"),
        _field(2),
        what="decoder nn.Upsample(bilinear) + conv instead of ConvTranspose, scSE attention gates",
    ),
    "wxformer": Case(
        wxformer(),
        _field(2),
        what="CREDIT's main model (wxformer_base): ZeroPad2d + conv CrossEmbed branches, spectral norm, "
        "PixelShuffle decoder, interp",
    ),
    "wxformer_earth": Case(
        wxformer(padding=_earth),
        _field(2),
        what="wxformer with earth padding",
    ),
    "nextgen_wxformer": Case(
        nextgen(),
        _field(2),
        what="level embedding, column attention (nn.MultiheadAttention over levels at each (h, w): "
        "reshape/permute to (B*H*W, L, C)), Linear q/k/v window attention, spectral GNN bottleneck "
        "(einsum over all H*W nodes with an (K, H*W) parameter), bilinear interpolate to skip sizes",
    ),
    "camulator": Case(
        camulator(),
        _field(2),
        # its DynamicPositionBias is fed rel_pos.float(): those MLPs stay fp32 (their biases are added to
        # fp64 logits), everything else runs in fp64; fp32 tensors are compared within 1e-5
        prepare=lambda model: _modules_to(model, "DynamicPositionBias", torch.float32),
        what="CrossFormer variant: avg_pool3d over T, PixelShuffle decoder; mixed dtypes (fp32 position-bias "
        "MLP, fp64 rest)",
    ),
    "fuxi": Case(
        fuxi(window=2, use_spectral_norm=False),
        _field(2),
        what="Conv3d cube embedding (T folded), LayerNorm over (B, T*H*W, C) after reshape, stride-2 conv, "
        "timm SwinTransformerV2Stage (window partition views, roll, cosine attention), ConvTranspose, "
        "Linear head + reshape/permute of patches into H",
    ),
    "fuxi_window3": Case(
        fuxi(window=3, use_spectral_norm=False),
        _field(2),
        what="FuXi with a window (3) that does not divide the latent H: ZeroPad2d to a window multiple, slice back",
    ),
    "fuxi_sn": Case(
        fuxi(window=2, use_spectral_norm=True),
        _field(2),
        # timm's SwinV2 attention calls F.linear(x, self.qkv.weight, ...) without running qkv's forward, so
        # spectral norm's pre-hook never refreshes qkv.weight: it stays the plain fp32 tensor made at init
        # (a constant, never trained); cast it with the model so the model runs in fp64
        prepare=_stale_spectral_weights,
        what="FuXi defaults (spectral norm on every conv/linear; timm attention reads a stale plain-tensor qkv.weight)",
    ),
    "swin": Case(
        swin(),
        _field(1),
        what="SwinTransformerV2Cr: patch embed conv, window_partition views, shifted windows (torch.roll), "
        "Linear head + einsum('nhwpqc->nchpwq') + reshape of patches into H",
    ),
    "unet": Case(
        segmentation("unet", encoder_depth=4, decoder_channels=(64, 32, 16, 16)),
        _field(2),
        what="smp.Unet resnet18 encoder (BatchNorm in train mode, max-pool), nearest upsampling, scSE gates, "
        "avg_pool3d over T",
    ),
    "fpn": Case(
        segmentation(
            "fpn",
            encoder_depth=4,
            upsampling=2,
            decoder_pyramid_channels=32,
            decoder_segmentation_channels=32,
            decoder_dropout=0.0,
        ),
        _field(2),
        what="smp.FPN resnet18: nearest-upsampled pyramid sums, GroupNorm, bilinear upsampling head",
    ),
    "unet_diffusion": Case(
        unet_diffusion(),
        _diffusion_inputs,
        what="forward(x, time): sinusoidal time embedding (plain (B,) tensor) -> scale/shift broadcast; "
        "pixel-unshuffle Downsample via einops, RMSNorm (F.normalize over C), LinearAttention "
        "(einsum over all H*W positions), full Attention (einsum) at the bottom, PeriodicConv2d "
        "(circular W + reflect H pads), nearest Upsample",
    ),
    "debugger": Case(
        debugger,
        _field(2),
        what="permute to channels-last, Linear over C, permute back",
    ),
}


def build_model(name: str, h: int, w: int) -> nn.Module:
    """The model of ``name`` for an (h, w) field: dropout off, parameters perturbed (seeded), in its
    case's dtype, train mode."""
    case = CASES[name]
    torch.manual_seed(1000 + h + w)
    with _quiet():
        model = case.build(h, w)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    model = model.to(case.dtype).train()
    if case.prepare is not None:
        case.prepare(model)
    # zero-initialised weights (Swin's post-norm scale, ICNR/zero biases, ...) would leave whole
    # branches without gradient: perturb every parameter a little so every gradient is exercised
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def matrix(names=None, worlds=WORLDS) -> list[tuple[str, int, tuple[int, int]]]:
    """Every (model, world, field) of the tier."""
    return [(n, world, f) for n in (names or CASES) for world in worlds for f in CASES[n].fields]
