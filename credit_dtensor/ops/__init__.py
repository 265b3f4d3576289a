"""Exact rules for H-sharded DTensors, one module per op family. Importing a module registers
its aten rules; :func:`_register_all` imports every family (``import credit_dtensor`` calls it)."""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

FAMILIES = ("conv", "params", "norm", "pad", "resample")


def _register_all() -> list[str]:
    """Import every op family so its rules are registered; returns the loaded names."""
    loaded = []
    for name in FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:  # a family under development must not break the others
            logger.debug("op family %s not available: %s", name, e)
            continue
        loaded.append(name)
    return loaded
