"""Deprecated alias of :mod:`credit_dtensor.tools.launch` (tooling moved out of the core package).

Kept so that existing imports keep working; import ``credit_dtensor.tools.launch`` instead.
"""

import sys
import warnings

from .tools import launch as _module

warnings.warn(
    "credit_dtensor.launch moved to credit_dtensor.tools.launch; the old name will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
