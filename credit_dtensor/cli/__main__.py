"""``python -m credit_dtensor.cli``: the ``credit-dtensor`` command."""

import sys

from . import main

sys.exit(main())
