"""Exact interpolation, pooling and pixel (un)shuffle on DTensors sharded on a spatial dim: the
resampling family, one module per kind (this module gathers their public functions).

Each op is separable along the sharded axis: every output row reads a few input rows with known
weights (:mod:`credit_dtensor.geometry.resample`, bit-identical to PyTorch's CPU index/weight
formulas). For each rank the output chunk is its ``torch.chunk`` slice of the *global* output,
the input rows it reads are gathered with the halo primitive (only those rows, from whichever
rank owns them), and the op runs on them as a :class:`~._rows.RowOp` (explicit forward and
adjoint inside one custom op):

* :mod:`.interpolate` -- ``F.interpolate`` / ``nn.Upsample`` (every mode but antialiased ones);
* :mod:`.pool` -- avg / adaptive avg pooling and the public pooling functions; :mod:`.max_pool`
  -- max / adaptive max pooling (``return_indices`` with *global* flat indices);
* :mod:`.pixel_shuffle` -- ``pixel_shuffle`` / ``pixel_unshuffle`` sharded on H or W.

The module wrappers, these functions and ``F.*`` called on a sharded DTensor (torch-function
rules, registered when each module is imported) all run the same ops.
"""

from __future__ import annotations

from torch.nn.modules.pooling import _LPPoolNd

from .family import family
from .interpolate import InterpOp, interpolate, upsample
from .max_pool import AdaptiveMaxPoolOp, MaxPoolOp
from .pixel_shuffle import PixelShuffleOp, pixel_shuffle, pixel_unshuffle
from .pool import (
    AdaptiveAvgPoolOp,
    AvgPoolOp,
    adaptive_avg_pool1d,
    adaptive_avg_pool2d,
    adaptive_avg_pool3d,
    adaptive_max_pool1d,
    adaptive_max_pool2d,
    adaptive_max_pool3d,
    avg_pool1d,
    avg_pool2d,
    avg_pool3d,
    max_pool1d,
    max_pool2d,
    max_pool3d,
)

FAMILY = family(
    "resample",
    "interpolate, pooling and pixel (un)shuffle: the input rows of each output row, gathered by halo",
    nn="credit_dtensor.nn.resample",
)
FAMILY.refuses_modules({_LPPoolNd: "LP pooling has no exact rule yet: gather explicitly, or use AvgPool of x**p"})

__all__ = [
    "interpolate",
    "upsample",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "pixel_shuffle",
    "pixel_unshuffle",
    "InterpOp",
    "MaxPoolOp",
    "AvgPoolOp",
    "AdaptiveAvgPoolOp",
    "AdaptiveMaxPoolOp",
    "PixelShuffleOp",
]
