"""``credit-dtensor info``: what this installation can do.

Torch version, distributed backends, CUDA, the mesh layout when launched under torchrun, and the
op families with what each does to H, read from their descriptors (:mod:`credit_dtensor.catalog`).
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
    p.add_argument("--functions", action="store_true", help="list every torch function of each op family")
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


def _families_table(all_functions: bool) -> Table:
    """One row per op family, from its descriptor (:mod:`credit_dtensor.catalog`)."""
    from ..catalog import effect_text, family_rows

    table = Table(title="op families (credit_dtensor/ops/<family>.py descriptors; docs/families.md)")
    table.add_column("family", style="bold")
    table.add_column("effect on H")
    table.add_column("torch functions", overflow="fold")
    table.add_column("modules converted", overflow="fold")
    for r in family_rows():
        names = [*r.functions, *r.aten]
        shown = ", ".join(names if all_functions else names[:4])
        if not all_functions and len(names) > 4:
            shown += f", ... ({len(names)} in all)"
        table.add_row(r.name, effect_text(r), shown, ", ".join(r.modules) or "-")
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
                console.print(_families_table(args.functions))
    finally:
        if manager is not None:
            manager.close()
    return 0
