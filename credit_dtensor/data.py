"""Deprecated alias of :mod:`credit_dtensor.tools.data` (tooling moved out of the core package).

Kept so that existing imports keep working; import ``credit_dtensor.tools.data`` instead.
"""

import sys
import warnings

from .tools import data as _module

warnings.warn(
    "credit_dtensor.data moved to credit_dtensor.tools.data; the old name will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
