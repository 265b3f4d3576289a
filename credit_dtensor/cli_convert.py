"""Deprecated alias: ``plan``/``check`` moved to :mod:`credit_dtensor.cli.convert`.

``main(argv)`` runs the ``credit-dtensor`` command; import :mod:`credit_dtensor.cli` instead.
"""

import warnings

from .cli import main

warnings.warn(
    "credit_dtensor.cli_convert moved to credit_dtensor.cli; the old name will be removed",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["main"]
