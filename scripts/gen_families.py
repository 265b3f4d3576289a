"""Rewrite docs/families.md from the op-family descriptors (tests/test_docs.py checks it is current)."""

from __future__ import annotations

import pathlib

import credit_dtensor  # noqa: F401 - registers every family
from credit_dtensor.catalog import markdown

if __name__ == "__main__":
    path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "families.md"
    path.write_text(markdown())
    print(f"wrote {path}")
