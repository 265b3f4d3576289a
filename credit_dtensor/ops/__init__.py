"""Exact rules for H-sharded DTensors, one module per op family. Importing a module registers
its rules through its descriptor (:mod:`.family`); :func:`_register_all` imports every family, in
the order of :data:`FAMILIES` (``import credit_dtensor`` calls it), which is also the order in
which ``credit-dtensor info`` and the docs list them."""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

FAMILIES = (
    "conv",
    "params",
    "norm",
    "pad",
    "resample",
    "reduce",
    "loss",
    "pointwise",
    "dimwise",
    "linear",
    "scan",
    "spectral",
    "move",
    "assign",
    "index_write",
    "random",
    "reshape",
    "relayout",
    "einsum",
    "attention",
    "attention_mha",
    "refuse",
)


def _register_all() -> list[str]:
    """Import every op family so its rules are registered (a family that fails is a hard error:
    silently falling back to PyTorch's own rule could give wrong numbers); returns the names."""
    for name in FAMILIES:
        importlib.import_module(f"{__name__}.{name}")
    logger.debug("op families registered: %s", ", ".join(FAMILIES))
    return list(FAMILIES)
