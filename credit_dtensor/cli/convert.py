"""``credit-dtensor plan`` and ``credit-dtensor check``: audit and parity-check a user's model.

    credit-dtensor plan  credit_dtensor.models:unet --input-shape 1,3,26,16 --domain 3
    credit-dtensor check credit_dtensor.models:crossformer --input-shape 1,3,32,16 --domain 4

``MODULE:FACTORY`` names an importable module (or a ``path/to/file.py``) and a callable in it
returning the plain model (``--kwargs '{"width": 16}'`` passes keyword arguments). ``plan`` needs
no processes. ``check`` runs under torchrun as launched, or else starts ``--domain`` local CPU
processes itself (gloo); every rank builds the model with the same seed.

``register(subparsers)`` adds both subcommands to the main parser; each sets ``handler`` to a
``(args, console) -> exit status`` function (0 ok, 1 plan/check failed, 2 bad arguments).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import DomainParallelError
from ..tools.launch import free_port

__all__ = ["register", "main", "load_factory", "cmd_plan", "cmd_check"]

DTYPES = ("float64", "float32")


def load_factory(target: str) -> Callable[..., Any]:
    """``"pkg.module:factory"`` or ``"path/to/file.py:factory"`` -> the callable."""
    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise DomainParallelError(f"{target!r}: expected MODULE:FACTORY, e.g. credit_dtensor.models:unet")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise DomainParallelError(f"{target!r}: no file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise DomainParallelError(f"{target!r}: cannot import {mod_name} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DomainParallelError(f"{target!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DomainParallelError(f"{target!r}: {attr} is not callable")
    return obj


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: expected integers like 1,3,32,64") from None
    if len(shape) < 3 or any(s < 0 for s in shape):
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: expected at least B,C,H")
    return shape


def _add_common(p: argparse.ArgumentParser, dtype: str) -> None:
    p.add_argument("target", metavar="MODULE:FACTORY", help="callable returning the plain model")
    p.add_argument("--input-shape", required=True, type=_shape_arg, help="full input shape, e.g. 1,3,32,64")
    p.add_argument("--domain", type=int, default=None, help="domain-parallel ranks (default: torchrun's world)")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the factory")
    p.add_argument("--dtype", choices=DTYPES, default=dtype)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plan`` and ``check`` to the ``credit-dtensor`` parser."""
    p = subparsers.add_parser("plan", help="audit a model: rule per layer, halo rows, min local H, hazards")
    _add_common(p, "float32")
    p.add_argument("--hide-local", action="store_true", help="hide layers that are plainly local")
    p.set_defaults(handler=cmd_plan)
    c = subparsers.add_parser("check", help="run the model sharded and on one device; first diverging layer")
    _add_common(c, "float64")
    c.add_argument("--atol", type=float, default=None, help="relative max error allowed (default by dtype)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-backward", action="store_true", help="compare forward outputs only")
    c.set_defaults(handler=cmd_check)


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    try:
        kw = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise DomainParallelError(f"--kwargs {args.kwargs!r} is not JSON: {exc}") from exc
    if not isinstance(kw, dict):
        raise DomainParallelError("--kwargs must be a JSON object")
    return kw


def _domain(args: argparse.Namespace) -> int:
    if args.domain is not None:
        if args.domain < 1:
            raise DomainParallelError(f"--domain {args.domain} must be >= 1")
        return args.domain
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    raise DomainParallelError("--domain N is required outside torchrun")


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    import torch

    from ..audit import plan, render_plan

    model = load_factory(args.target)(**_kwargs(args))
    p = plan(model, _domain(args), args.input_shape, dtype=getattr(torch, args.dtype))
    render_plan(p, console, show_local=not args.hide_local)
    return 0 if p.ok else 1


def _run_check(
    target: str, kwargs: dict, shape: tuple[int, ...], dtype: str, atol, seed: int, backward: bool, domain: int
):
    import torch

    from ..check import check
    from ..mesh import DomainParallelManager

    manager = DomainParallelManager(domain)
    torch.manual_seed(seed)
    model = load_factory(target)(**kwargs).to(dtype=getattr(torch, dtype), device=manager.device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=gen, dtype=getattr(torch, dtype)).to(manager.device)
    return check(model, manager, x, atol=atol, backward=backward, seed=seed)


def _worker(rank: int, world: int, port: int, job: tuple, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    try:
        report = _run_check(*job, world)
        if rank == 0:
            queue.put(("report", report))
        dist.barrier()  # all ranks done before any tears the gloo pairs down
    except DomainParallelError as exc:
        if rank == 0:
            queue.put(("error", str(exc)))
    finally:
        dist.destroy_process_group()


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    from ..check import render_check

    job = (args.target, _kwargs(args), args.input_shape, args.dtype, args.atol, args.seed, not args.no_backward)
    load_factory(args.target)  # fail early, before starting processes
    domain = _domain(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        import torch.distributed as dist

        report = _run_check(*job, domain)
        if not dist.is_initialized() or dist.get_rank() == 0:
            render_check(report, console)
        return 0 if report.ok else 1
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    console.print(f"starting {domain} local CPU processes (gloo)")
    mp.start_processes(_worker, args=(domain, free_port(), job, queue), nprocs=domain, start_method="spawn")
    kind, payload = queue.get() if not queue.empty() else ("error", "no report (a rank failed)")
    if kind == "error":
        console.print(f"[red]credit-dtensor check[/red]: {payload}")
        return 1
    render_check(payload, console)
    return 0 if payload.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m credit_dtensor.cli_convert plan ...``)."""
    parser = argparse.ArgumentParser(prog="credit-dtensor", description="Audit and check domain-parallel conversion.")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    console = Console()
    try:
        return args.handler(args, console)
    except DomainParallelError as exc:
        console.print(f"[red]credit-dtensor {args.command}[/red]: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
