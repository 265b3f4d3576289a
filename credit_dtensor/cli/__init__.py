"""The ``credit-dtensor`` command (``python -m credit_dtensor.cli`` is the same).

One module per subcommand group registers its subparsers: :mod:`.info`, :mod:`.convert`
(``plan``, ``check``), :mod:`.train` (``train``, ``demo``), :mod:`.bench`. Each sets
``handler=fn(args, console) -> exit status`` and optionally ``validate=fn(args)`` for checks that
span options. One exit-status policy for all of them (see :data:`EPILOG`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler

from .. import __version__
from ..errors import DomainParallelError
from ._args import HelpFormatter, UsageError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "COMMANDS"]

EXIT_OK = 0
#: the command ran and what it checks failed (plan errors, check divergence, demo mismatch,
#: no checkpoint loads, a local rank failed)
EXIT_FAILED = 1
#: bad options or configuration, reported before anything runs (argparse's own status)
EXIT_USAGE = 2

COMMANDS = ("info", "plan", "check", "train", "demo", "bench")

EPILOG = """\
exit status:
  0  success
  1  the command ran and a check failed: plan found errors, check found a divergence or a
     layer raised, demo differs from one device, train found no checkpoint that loads, or a
     local rank failed
  2  usage error: an invalid option value or combination, --device cuda without a GPU, a model
     factory that cannot be imported, or a configuration rejected before running (the
     message names the fix)

environment:
  CREDIT_DTENSOR_PG_TIMEOUT  seconds, process-group timeout when the library creates the group
                             from torchrun's environment (train uses --pg-timeout instead)
  CREDIT_DTENSOR_GATHER      warn | raise | allow: what an implicit all-gather of an H-sharded
                             activation does
  CREDIT_DTENSOR_VERIFY      1: shard_tensor/shard_batch also compare the content across ranks

Run `credit-dtensor COMMAND --help` for a command's options; docs/usage.md has the details.
"""


def build_parser() -> argparse.ArgumentParser:
    from . import bench, convert, info, train

    parser = argparse.ArgumentParser(
        prog="credit-dtensor",
        description="Exact domain parallelism on DTensors: audit, check, train and benchmark.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (info, convert, train, bench):
        module.register(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


def _setup_logging(verbose: bool, console: Console) -> None:
    """Rich log lines for the package's own loggers (the root logger is left alone)."""
    pkg = logging.getLogger("credit_dtensor")
    for h in [h for h in pkg.handlers if getattr(h, "_credit_dtensor_cli", False)]:
        pkg.removeHandler(h)
    handler = RichHandler(console=console, show_path=False)
    handler._credit_dtensor_cli = True  # type: ignore[attr-defined]
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``credit-dtensor``; returns the exit status (usage errors raise ``SystemExit(2)``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    _setup_logging(args.verbose, console)
    try:
        validate = getattr(args, "validate", None)
        if validate is not None:
            validate(args)
        return args.handler(args, console)
    except UsageError as exc:
        _subparser(parser, args.command).error(str(exc))  # exits with EXIT_USAGE
    except DomainParallelError as exc:
        console.print(f"[red]credit-dtensor {args.command}[/red]: {exc}")
        return EXIT_USAGE
    return EXIT_FAILED  # not reached: error() exits


if __name__ == "__main__":
    sys.exit(main())
