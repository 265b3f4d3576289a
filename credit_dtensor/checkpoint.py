"""Deprecated alias of :mod:`credit_dtensor.tools.checkpoint` (tooling moved out of the core package).

Kept so that existing imports keep working; import ``credit_dtensor.tools.checkpoint`` instead.
"""

import sys
import warnings

from .tools import checkpoint as _module

warnings.warn(
    "credit_dtensor.checkpoint moved to credit_dtensor.tools.checkpoint; the old name will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
