"""The CREDIT tier is opt-in: its tests run only when selected with ``-m credit`` (``make test-credit``).

A plain ``pytest`` (``make test``, CI) skips them even where miles-credit happens to be installed;
where it is not installed the test module skips itself at import.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    if "credit" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in CREDIT model tier: run `make test-credit` (pytest tests/credit -m credit)")
    for item in items:
        if item.get_closest_marker("credit") is not None:
            item.add_marker(skip)
