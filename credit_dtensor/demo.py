"""Deprecated alias of :mod:`credit_dtensor.tools.demo` (tooling moved out of the core package).

Kept so that existing imports keep working; import ``credit_dtensor.tools.demo`` instead.
"""

import sys
import warnings

from .tools import demo as _module

warnings.warn(
    "credit_dtensor.demo moved to credit_dtensor.tools.demo; the old name will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
