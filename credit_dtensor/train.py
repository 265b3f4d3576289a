"""Deprecated alias of :mod:`credit_dtensor.tools.train` (tooling moved out of the core package).

Kept so that existing imports keep working; import ``credit_dtensor.tools.train`` instead.
"""

import sys
import warnings

from .tools import train as _module

warnings.warn(
    "credit_dtensor.train moved to credit_dtensor.tools.train; the old name will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
