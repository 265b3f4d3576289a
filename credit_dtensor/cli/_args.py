"""Argument types and checks shared by the subcommands.

Every value is checked where argparse parses it (``type=``), so a bad value is a usage error
(exit status 2) with argparse's ``argument --steps: ...`` message instead of a traceback later.
Checks that need more than one option, or the machine (``--device cuda``), raise
:class:`UsageError` from a subcommand's ``validate`` function; ``main`` turns it into the same
argparse-style message and status.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "HelpFormatter",
    "UsageError",
    "positive_int",
    "nonneg_int",
    "positive_float",
    "int_list",
    "resolution",
    "resolutions",
    "json_object",
    "existing_file",
    "existing_dir",
    "choices_list",
    "check_device",
    "check_torchrun_env",
]


class UsageError(Exception):
    """A bad option value or combination: reported like an argparse error, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after every option's help; descriptions and epilogs keep their line breaks
    (each line is wrapped on its own, at its own indentation)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for line in text.splitlines():
            lead = line[: len(line) - len(line.lstrip())]
            wrapped = textwrap.fill(line.strip(), width, initial_indent=indent + lead, subsequent_indent=indent + lead)
            out.append(wrapped if line.strip() else "")
        return "\n".join(out)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer (>= 0), got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number (> 0), got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4), each a positive integer."""
    items = [v for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return tuple(positive_int(v.strip()) for v in items)


def resolution(text: str) -> tuple[int, int]:
    """``"32x64"`` -> (32, 64); ``"32"`` -> (32, 64) (a 1:2 lat-lon grid); both positive."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 32x64) or H, got {text!r}") from None
    if len(parts) == 1:
        parts.append(2 * parts[0])
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive H and W (e.g. 32x64), got {text!r}")
    return parts[0], parts[1]


def resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """``"32x64,64x128"`` -> ((32, 64), (64, 128))."""
    items = [v for v in text.split(",") if v.strip()]
    if not items or any("x" not in v.lower() for v in items):
        raise argparse.ArgumentTypeError(f"expected HxW[,HxW...] (e.g. 32x64,64x128), got {text!r}")
    return tuple(resolution(v.strip()) for v in items)


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 16}}', got {text!r}")
    return value


def existing_file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return Path(text)


def existing_dir(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return Path(text)


def choices_list(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """A type for comma-separated names out of ``allowed``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"unknown {'name' if len(bad) == 1 else 'names'} {', '.join(bad) or repr(text)}: "
                f"choose from {','.join(allowed)}"
            )
        return names

    return parse


def check_device(device: str | None) -> None:
    """``--device cuda`` on a machine without a visible GPU is a usage error, not an NCCL failure."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("argument --device: cuda requested but no CUDA GPU is visible: use --device cpu")


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_torchrun_env() -> None:
    """RANK/WORLD_SIZE set without the rest of torchrun's environment is a launch mistake."""
    if not under_torchrun():
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(
            f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "missing: launch with `torchrun --nproc-per-node N -m credit_dtensor.cli ...`, "
            "or unset RANK and WORLD_SIZE to run as one process"
        )


def read_jsonl(path: str, flag: str, what: str) -> list[dict]:
    """The JSON objects of a JSON-lines file; a line that is not one is a usage error naming ``flag``."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{flag} {path}: line {n} is not JSON ({exc.msg}): expected {what}") from exc
        if not isinstance(row, dict):
            raise UsageError(f"{flag} {path}: line {n} is not a JSON object: expected {what}")
        rows.append(row)
    return rows


def config_from(cls: type, args: argparse.Namespace, defaults: tuple[str, ...] = (), **overrides: Any) -> Any:
    """``cls(...)`` (a config dataclass) from the parsed flags: every field takes the flag of the
    same name (``--global-batch`` -> ``global_batch``), ``overrides`` the ones named otherwise or
    computed; a field with neither, or named in ``defaults`` (a flag of that name means something
    else for this command), keeps its default. So a new config field is one flag, not a
    hand-written copy per command."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(cls):
        if f.name in defaults:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)
