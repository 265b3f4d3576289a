"""``credit-dtensor info``: what this installation can do.

Torch version, distributed backends, CUDA, the mesh layout when launched under torchrun, and which
op rules are registered. Importing every ``credit_dtensor.ops`` module is part of the report: a
family that fails to import is listed, so ``info`` is the place to see it.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys

from rich.console import Console
from rich.table import Table

from ._args import HelpFormatter, UsageError, check_torchrun_env, positive_int, under_torchrun

__all__ = ["register", "cmd_info"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="versions, backends, mesh layout, registered op rules",
        description="Versions, distributed backends, CUDA, the mesh layout under torchrun and the registered op rules.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--domain",
        type=positive_int,
        default=None,
        help="domain-parallel size under torchrun (None: the whole world)",
    )
    p.set_defaults(handler=cmd_info, validate=_validate)


def _validate(args: argparse.Namespace) -> None:
    """A domain size needs that many processes: outside torchrun, ``--domain N > 1`` is a usage error
    (it would otherwise print the versions and exit 0 without a mesh)."""
    check_torchrun_env()
    if args.domain is not None and args.domain > 1 and not under_torchrun():
        raise UsageError(
            f"--domain {args.domain} describes a mesh of {args.domain} ranks but this is one process: launch "
            f"`torchrun --standalone --nproc-per-node {args.domain} -m credit_dtensor.cli info --domain {args.domain}`"
        )


def _registered_ops() -> dict[str, list[str]]:
    from ..intercept import registered_functions

    return registered_functions()


def _backends() -> str:
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed not available"
    found = []
    for n in ("gloo", "nccl", "mpi", "ucc", "xccl"):
        check = getattr(dist, f"is_{n}_available", None)
        found.append(f"{n} {'yes' if check is not None and check() else 'no'}")
    return ", ".join(found)


def _mesh_rows(domain: int | None):
    """Build the mesh from torchrun's environment; the table rows describing it, and the manager."""
    import torch.distributed as dist

    from ..mesh import DomainParallelManager, rank_layout

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


def _rules_table(ops: dict[str, list[str]]) -> Table:
    """One row per rule: how many torch functions it serves, and a few of them."""
    by_rule: dict[str, list[str]] = {}
    for fn, rules in ops.items():
        for r in rules:
            by_rule.setdefault(r, []).append(fn)
    table = Table(title="registered op rules (torch functions routed on DTensors)")
    table.add_column("rule")
    table.add_column("functions", overflow="fold")
    for rule, fns in sorted(by_rule.items()):
        shown = ", ".join(sorted(fns)[:6]) + (f", ... ({len(fns)} in all)" if len(fns) > 6 else "")
        table.add_row(rule, shown)
    return table


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    import torch

    from .. import __version__

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
        if under_torchrun():
            rows, manager = _mesh_rows(args.domain)
            for k, v in rows:
                table.add_row(k, v)
        else:
            table.add_row("mesh", "not under torchrun (`torchrun --nproc-per-node N -m credit_dtensor.cli info`)")
        ops = _registered_ops()
        table.add_row("op rules", f"{len(ops)} torch functions routed to exact rules on DTensors" if ops else "none")
        if manager is None or manager.mesh.get_rank() == 0:
            console.print(table)
            if ops:
                console.print(_rules_table(ops))
    finally:
        if manager is not None:
            manager.close()
    return 0
