"""The ``credit-dtensor`` command.

``info`` reports what this installation can do: torch version, distributed backends, CUDA, the
mesh layout when launched under torchrun, and which op rules are registered. The other
subcommands are filled in by later work; until then they say so and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import platform
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .errors import DomainParallelError
from .mesh import DomainParallelManager, rank_layout

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

#: Subcommands of the interface; a ``credit_dtensor.cli_*`` module that registers one replaces
#: its placeholder, which otherwise says "not available yet" and exits 2.
PENDING = {
    "demo": "train a small model domain-parallel and compare it with one device",
    "plan": "audit a model: which layers convert, halo sizes, constraints",
    "check": "parity check of the op rules against single-device results",
    "bench": "communication and time benchmarks",
    "train": "training entry point",
}
EXIT_NOT_AVAILABLE = 2
EXIT_BAD_CONFIG = 2  # a DomainParallelError raised by a subcommand handler

#: ``{module: error}`` for ``cli_*`` extension modules that failed to import or register.
EXTENSION_ERRORS: dict[str, str] = {}


def _register_extensions(sub: argparse._SubParsersAction) -> None:
    """Let every ``credit_dtensor.cli_*`` module with ``register(subparsers)`` add its subcommands.

    Each registered subparser sets ``handler=fn(args, console) -> status``. A module that fails is
    reported by ``info`` and its commands keep their placeholder, so one broken module cannot
    break the command as a whole.
    """
    import credit_dtensor

    EXTENSION_ERRORS.clear()
    for mod in sorted(pkgutil.iter_modules(credit_dtensor.__path__), key=lambda m: m.name):
        if not mod.name.startswith("cli_"):
            continue
        name = f"credit_dtensor.{mod.name}"
        try:
            register = getattr(importlib.import_module(name), "register", None)
            if register is not None:
                register(sub)
        except Exception as exc:  # noqa: BLE001 - report in `info`, keep the placeholders
            EXTENSION_ERRORS[name] = f"{type(exc).__name__}: {exc}"
            logger.debug("could not register %s", name, exc_info=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="credit-dtensor", description="Exact domain parallelism on DTensors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    info = sub.add_parser("info", help="versions, backends, mesh layout, registered op rules")
    info.add_argument(
        "--domain",
        type=int,
        default=None,
        help="domain-parallel size under torchrun (default: the whole world)",
    )
    _register_extensions(sub)
    for name, text in PENDING.items():
        if name not in sub.choices:
            stub = sub.add_parser(name, help=f"{text} (not available yet)")
            stub.set_defaults(placeholder=True)
    return parser


def _setup_logging(verbose: bool, console: Console) -> None:
    """Rich log lines for the package's own loggers (the root logger is left alone)."""
    pkg = logging.getLogger("credit_dtensor")
    for h in [h for h in pkg.handlers if getattr(h, "_credit_dtensor_cli", False)]:
        pkg.removeHandler(h)
    handler = RichHandler(console=console, show_path=False)
    handler._credit_dtensor_cli = True  # type: ignore[attr-defined]
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO if verbose else logging.WARNING)


def _import_op_modules() -> dict[str, str]:
    """Import every ``credit_dtensor.ops`` module (importing registers its rules).

    Returns ``{module: error}`` for modules that failed, so ``info`` still works while an op
    family is broken or half-written.
    """
    import credit_dtensor.ops as ops_pkg

    failed: dict[str, str] = {}
    for mod in pkgutil.iter_modules(ops_pkg.__path__):
        if mod.name.startswith("_"):
            continue
        name = f"{ops_pkg.__name__}.{mod.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report, do not crash `info`
            failed[name] = f"{type(exc).__name__}: {exc}"
            logger.info("could not import %s", name, exc_info=True)
    return failed


def _backends() -> str:
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed not available"
    names = ("gloo", "nccl", "mpi", "ucc", "xccl")
    found = []
    for n in names:
        check = getattr(dist, f"is_{n}_available", None)
        found.append(f"{n} {'yes' if check is not None and check() else 'no'}")
    return ", ".join(found)


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _mesh_rows(domain: int | None) -> tuple[list[tuple[str, str]], DomainParallelManager]:
    """Build the mesh from torchrun's environment; the table rows describing it, and the manager."""
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    manager = DomainParallelManager(domain or world)
    domain_groups, dp_groups = rank_layout(world, manager.domain_world_size)
    rows = [
        ("world", f"{world} ranks, backend {dist.get_backend()}"),
        ("mesh", f"dp={manager.dp_world_size} x domain={manager.domain_world_size} on {manager.device_type}"),
        ("domain groups", " ".join(str(g) for g in domain_groups)),
        ("dp groups", " ".join(str(g) for g in dp_groups)),
        ("rank 0", f"dp_rank={manager.dp_rank} domain_rank={manager.domain_rank}"),
    ]
    return rows, manager


def _short_op(name: str) -> str:
    """``aten.convolution.default`` -> ``convolution``; other overloads keep their suffix."""
    name = name.removeprefix("aten.")
    return name.removesuffix(".default")


def _rules_table(ops: dict[str, list[str]]) -> Table:
    table = Table(title="registered op rules")
    table.add_column("aten op")
    table.add_column("rule")
    for op, rules in sorted(ops.items(), key=lambda kv: _short_op(kv[0])):
        table.add_row(_short_op(op), ", ".join(rules))
    return table


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    import torch

    from . import __version__
    from .ops._dispatch import registered_ops

    table = Table(title=f"credit-dtensor {__version__}", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("torch", torch.__version__)
    table.add_row("python", f"{platform.python_version()} ({sys.executable})")
    table.add_row("backends", _backends())
    cuda = f"yes ({torch.cuda.device_count()} devices)" if torch.cuda.is_available() else "no"
    table.add_row("CUDA", cuda)

    manager = None
    try:
        if _under_torchrun():
            rows, manager = _mesh_rows(args.domain)
            for k, v in rows:
                table.add_row(k, v)
        else:
            table.add_row("mesh", "not under torchrun (`torchrun --nproc-per-node N -m credit_dtensor.cli info`)")
        failed = _import_op_modules()
        ops = registered_ops()
        table.add_row("op rules", f"{len(ops)} aten ops intercepted on H-sharded DTensors" if ops else "none yet")
        for name, err in {**failed, **EXTENSION_ERRORS}.items():
            table.add_row(f"[red]import failed[/red] {name}", err)
        if manager is None or manager.mesh.get_rank() == 0:
            console.print(table)
            if ops:
                console.print(_rules_table(ops))
    finally:
        if manager is not None:
            manager.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``credit-dtensor``; returns the process exit status."""
    parser = build_parser()
    # placeholders accept (and ignore) any options until they are implemented
    args, extra = parser.parse_known_args(argv)
    placeholder = getattr(args, "placeholder", False)
    if extra and not placeholder:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console = Console()
    _setup_logging(args.verbose, console)
    if placeholder:
        console.print(f"[yellow]credit-dtensor {args.command}[/yellow]: not available yet ({PENDING[args.command]})")
        return EXIT_NOT_AVAILABLE
    if args.command == "info":
        try:
            return cmd_info(args, console)
        except DomainParallelError as exc:
            console.print(f"[red]credit-dtensor info[/red]: {exc}")
            return 1
    try:
        return args.handler(args, console)
    except DomainParallelError as exc:
        console.print(f"[red]credit-dtensor {args.command}[/red]: {exc}")
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
