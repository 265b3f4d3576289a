"""``credit-dtensor plan`` and ``credit-dtensor check``: audit and parity-check a user's model.

    credit-dtensor plan  credit_dtensor.models:unet --input-shape 1,3,26,16 --domain 3
    credit-dtensor check credit_dtensor.models:crossformer --input-shape 1,3,32,16 --domain 4

``MODULE:FACTORY`` names an importable module (or a ``path/to/file.py``) and a callable in it
returning the plain model (``--kwargs '{"width": 16}'`` passes keyword arguments). ``plan`` needs
no processes. ``check`` runs under torchrun as launched, or else starts ``--domain`` local CPU
processes itself (gloo); every rank builds the model with the same seed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import DomainParallelError
from ._args import HelpFormatter, UsageError, check_torchrun_env, json_object, nonneg_int, positive_float, positive_int

__all__ = ["register", "load_factory", "cmd_plan", "cmd_check"]

logger = logging.getLogger(__name__)

DTYPES = ("float64", "float32")
EXIT_FAILED, EXIT_USAGE = 1, 2


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
        raise argparse.ArgumentTypeError(f"expected integers like 1,3,32,64, got {text!r}") from None
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"expected at least B,C,H, every size >= 1, got {text!r}")
    return shape


def _add_common(p: argparse.ArgumentParser, dtype: str) -> None:
    p.add_argument("target", metavar="MODULE:FACTORY", help="callable returning the plain model")
    p.add_argument("--input-shape", required=True, type=_shape_arg, help="full input shape, e.g. 1,3,32,64")
    p.add_argument(
        "--domain", type=positive_int, default=None, help="domain-parallel ranks (None: torchrun's world size)"
    )
    p.add_argument("--kwargs", type=json_object, default="{}", help="JSON object of keyword arguments for the factory")
    p.add_argument("--dtype", choices=DTYPES, default=dtype, help="parameter and input dtype")


def _validate(args: argparse.Namespace) -> None:
    check_torchrun_env()
    if args.domain is None and "WORLD_SIZE" not in os.environ:
        raise UsageError("argument --domain: required outside torchrun (the number of ranks that split H)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``plan`` and ``check`` to the ``credit-dtensor`` parser."""
    p = subparsers.add_parser(
        "plan",
        help="audit a model: rule per layer, halo rows, min local H, hazards",
        description="Audit a model before running it: the rule each layer runs under, halo rows, the minimum "
        "local H and the operations whose meaning changes when H is split. Exit 1 when the plan has errors.",
        formatter_class=HelpFormatter,
    )
    _add_common(p, "float32")
    p.add_argument("--hide-local", action="store_true", help="hide layers that are plainly local")
    p.set_defaults(handler=cmd_plan, validate=_validate)
    c = subparsers.add_parser(
        "check",
        help="run the model sharded and on one device; first diverging layer",
        description="Run the model sharded and on one device on the same input, compare every layer's output "
        "and every gradient, and record every implicit all-gather of an H-sharded activation. Exit 1 when a "
        "layer diverges or raises (or, with --fail-on-gather, when an activation was gathered).",
        formatter_class=HelpFormatter,
    )
    _add_common(c, "float64")
    c.add_argument(
        "--atol", type=positive_float, default=None, help="relative max error allowed (None: 1e-10 fp64, 1e-5 fp32)"
    )
    c.add_argument("--seed", type=nonneg_int, default=0, help="seed of the model and the input")
    c.add_argument("--no-backward", action="store_true", help="compare forward outputs only")
    c.add_argument(
        "--fail-on-gather",
        action="store_true",
        help="exit 1 when an H-sharded activation was all-gathered implicitly (forward or backward)",
    )
    c.set_defaults(handler=cmd_check, validate=_validate)


def build_model(target: str, kwargs: dict) -> Any:
    """``load_factory(target)(**kwargs)``; a factory that rejects the arguments or raises is one
    line naming it (and ``--kwargs`` for argument errors), not a traceback."""
    factory = load_factory(target)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise DomainParallelError(
            f"{target}: {exc}; pass the factory's keyword arguments as --kwargs '{{\"name\": value}}'"
        ) from exc
    except ValueError:
        pass  # no signature to check (a builtin): the call itself will tell
    try:
        return factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code: one line, the traceback at -v
        logger.info("%s raised", target, exc_info=True)
        hint = "; check --kwargs against the factory's signature" if isinstance(exc, TypeError) else ""
        raise DomainParallelError(f"{target}(**{kwargs!r}) raised {type(exc).__name__}: {exc}{hint}") from exc


def _domain(args: argparse.Namespace) -> int:
    return args.domain if args.domain is not None else int(os.environ["WORLD_SIZE"])


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    import torch

    from ..audit import plan, render_plan

    model = build_model(args.target, args.kwargs)
    p = plan(model, _domain(args), args.input_shape, dtype=getattr(torch, args.dtype))
    render_plan(p, console, show_local=not args.hide_local)
    return 0 if p.ok else EXIT_FAILED


def _run_check(
    target: str, kwargs: dict, shape: tuple[int, ...], dtype: str, atol, seed: int, backward: bool, domain: int
):
    import torch

    from ..check import check
    from ..mesh import DomainParallelManager

    manager = DomainParallelManager(domain)
    torch.manual_seed(seed)
    model = build_model(target, kwargs).to(dtype=getattr(torch, dtype), device=manager.device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=gen, dtype=getattr(torch, dtype)).to(manager.device)
    return check(model, manager, x, atol=atol, backward=backward, seed=seed)


def _check_rank(ctx: Any, job: tuple) -> Any:
    report = _run_check(*job, ctx.world)
    return report if ctx.rank == 0 else None


def _status(report: Any, args: argparse.Namespace) -> int:
    if not report.ok:
        return EXIT_FAILED
    if getattr(args, "fail_on_gather", False) and (report.gather_events or report.gathered):
        return EXIT_FAILED
    return 0


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    from ..check import render_check
    from ..tools.launch import LaunchError, run_ranks

    job = (args.target, args.kwargs, args.input_shape, args.dtype, args.atol, args.seed, not args.no_backward)
    load_factory(args.target)  # fail early, before starting processes
    domain = _domain(args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        import torch.distributed as dist

        report = _run_check(*job, domain)
        if not dist.is_initialized() or dist.get_rank() == 0:
            render_check(report, console)
        return _status(report, args)
    console.print(f"starting {domain} local CPU processes (gloo)")
    try:
        report = run_ranks(_check_rank, domain, (job,), timeout=1800)[0]
    except LaunchError as exc:
        console.print(f"[red]credit-dtensor check[/red]: {exc}")
        logger.info("rank %d traceback:\n%s", exc.rank, exc.detail)
        return EXIT_USAGE if exc.domain_error else EXIT_FAILED
    render_check(report, console)
    return _status(report, args)
