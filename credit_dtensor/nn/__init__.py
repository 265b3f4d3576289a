"""DTensor-aware module wrappers (one file per op family)."""

from ._base import DomainParallelModule, replicate_parameters

__all__ = ["DomainParallelModule", "replicate_parameters"]
