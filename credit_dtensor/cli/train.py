"""``credit-dtensor train`` and ``credit-dtensor demo``.

``train`` runs under torchrun (``torchrun --nproc-per-node N -m credit_dtensor.cli train --dp D
--domain M``) or, without torchrun, as a single process. The process-group timeout
(``--pg-timeout``) bounds how long a rank waits in a collective for a dead peer before failing:
under ``torchrun --max-restarts`` the agent usually restarts the job sooner, when it sees the dead
rank; the timeout is the backstop that keeps any rank from hanging forever.
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import DomainParallelError
from ._args import (
    HelpFormatter,
    UsageError,
    check_device,
    check_torchrun_env,
    config_from,
    existing_dir,
    nonneg_int,
    positive_float,
    positive_int,
    resolution,
)

__all__ = ["register", "add_train_arguments", "cmd_train", "cmd_demo"]

logger = logging.getLogger(__name__)

DEFAULT_PG_TIMEOUT_S = 300.0
EXIT_FAILED = 1


def _even_resolution(text: str) -> tuple[int, int]:
    h, w = resolution(text)
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"H and W must be even and >= 2 (the U-Net halves them), got {text!r}")
    return h, w


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=30, help="optimizer steps in total")
    p.add_argument("--resolution", type=_even_resolution, default="32x64", help="grid HxW (lat x lon), or H for Hx2H")
    p.add_argument("--dp", type=positive_int, default=None, help="data-parallel size (None: world // domain)")
    p.add_argument(
        "--domain", type=positive_int, default=None, help="ranks that split one sample's latitude (None: world // dp)"
    )
    p.add_argument("--global-batch", type=positive_int, default=4, help="samples per step over all dp ranks")
    p.add_argument("--model", choices=("demo", "unet"), default="demo", help="demo U-Net or models.unet.WeatherUNet")
    p.add_argument("--channels", type=positive_int, default=4, help="variables per grid point (input = output)")
    p.add_argument("--width", type=positive_int, default=16, help="model width (channels of the first level)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the model initialization and the data")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter and data dtype")
    p.add_argument("--no-fsdp", action="store_true", help="replicate parameters and all-reduce gradients instead")
    p.add_argument(
        "--overlap-gradients",
        action="store_true",
        help="with --no-fsdp: all-reduce gradient buckets during backward instead of after it",
    )
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        choices=("inductor", "aot_eager", "eager"),
        help="torch.compile every block (fullgraph, one graph each) with this backend (bare flag: inductor)",
    )
    p.add_argument("--checkpoint-dir", default=None, help="directory of the DCP checkpoints (None: no checkpoints)")
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        help="save every N steps (None: only after the last step); needs --checkpoint-dir",
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir that loads completely (damaged ones are "
        "skipped and reported; none yet: start from step 0)",
    )
    resume.add_argument(
        "--resume-from", type=existing_dir, default=None, help="continue from this checkpoint directory"
    )
    p.add_argument(
        "--pg-timeout", type=positive_float, default=DEFAULT_PG_TIMEOUT_S, help="process-group timeout in seconds"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="None: cuda if a GPU is visible, else cpu")


def check_checkpoint_dir(path: str) -> None:
    """Before the first step: ``path`` must be a directory, or creatable as one (no file on the way),
    and writable -- not a failure at the first save after training."""
    p = Path(path)
    for part in (p, *p.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == p else f"is under {part}, which is a file"
                raise UsageError(
                    f"argument --checkpoint-dir: {path} {where}: pass a directory (it is created if missing)"
                )
            if not os.access(part, os.W_OK):
                raise UsageError(f"argument --checkpoint-dir: {part} is not writable")
            return


def validate_train(args: argparse.Namespace) -> None:
    """Checks that span options or need the machine; raise :class:`UsageError`."""
    check_device(args.device)
    check_torchrun_env()
    if args.checkpoint_dir is None:
        if args.checkpoint_every is not None:
            raise UsageError("argument --checkpoint-every: needs --checkpoint-dir DIR (where checkpoints are written)")
        if args.resume:
            raise UsageError("argument --resume: needs --checkpoint-dir DIR (where checkpoints are found)")
    else:
        check_checkpoint_dir(args.checkpoint_dir)
    if args.dp is not None and args.global_batch % args.dp:
        raise UsageError(f"argument --global-batch: {args.global_batch} is not divisible by --dp {args.dp}")


def register(subparsers: Any) -> None:
    """Add ``train`` and ``demo`` to the ``credit-dtensor`` subcommands."""
    train = subparsers.add_parser(
        "train",
        help="train the demo model on synthetic global data (torchrun or 1 process)",
        description="Train a domain-parallel model on synthetic global weather data, FSDP2 over dp. "
        "Run under torchrun for several ranks, or as one process.",
        formatter_class=HelpFormatter,
    )
    add_train_arguments(train)
    train.set_defaults(handler=cmd_train, validate=validate_train)
    demo = subparsers.add_parser(
        "demo",
        help="the main job: 4 local CPU processes (2x2 mesh) vs 1 process, with a summary",
        description="Train on 4 local CPU processes (a 2 x 2 dp x domain mesh, gloo) and in one process, "
        "and compare loss curves and final parameters.",
        formatter_class=HelpFormatter,
    )
    demo.set_defaults(handler=cmd_demo)


def _elastic_store(timeout: timedelta) -> dict[str, Any]:
    """``store``/``rank``/``world_size`` for ``init_process_group`` under torchrun, with keys
    prefixed by the restart count.

    torchrun's agent keeps one TCPStore for all restarts and its workers use it without a
    per-attempt prefix, so after a restart a rank can read a peer address left by the killed
    attempt and gloo fails with "connectFullMesh ... Connection refused". A fresh prefix per
    attempt makes every attempt rendezvous from a clean namespace.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=True,
    )
    prefix = f"credit_dtensor/attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}"
    return {"store": dist.PrefixStore(prefix, store), "rank": rank, "world_size": world}


def _init_process_group(device_type: str, timeout: timedelta) -> bool:
    """Create the default group (torchrun env or a 1-process store); returns whether we created it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout, **_elastic_store(timeout))
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return True


def _sizes(world: int, dp: int | None, domain: int | None) -> tuple[int, int]:
    if dp is None and domain is None:
        domain = world
    if domain is None:
        domain = world // dp if dp and world % dp == 0 else 0
    if dp is None:
        dp = world // domain if domain and world % domain == 0 else 0
    if dp * domain != world:
        raise DomainParallelError(
            f"train: --dp {dp or '?'} x --domain {domain or '?'} does not match the world size {world}: launch "
            "dp*domain processes (torchrun --nproc-per-node ...) or change the flags"
        )
    return dp, domain


def _config(args: argparse.Namespace):
    from ..tools.train import TrainConfig

    h, w = args.resolution
    every = args.checkpoint_every if args.checkpoint_every is not None else args.steps
    return config_from(
        TrainConfig,
        args,
        nlat=h,
        nlon=w,
        fsdp=not args.no_fsdp,
        checkpoint_every=every if args.checkpoint_dir else 0,
        resume_from=str(args.resume_from) if args.resume_from else None,
    )


def _progress(console: Any, rank0: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("step {task.fields[dt]}"),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console, disable=not rank0)


def main_train(args: argparse.Namespace, console: Any) -> int:
    import torch
    import torch.distributed as dist

    from ..mesh import DomainParallelManager, default_device_type
    from ..tools.train import train

    device_type = args.device or default_device_type()
    created = _init_process_group(device_type, timedelta(seconds=args.pg_timeout))
    try:
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # small per-rank work: intra-op threads only contend with the other ranks (set
            # OMP_NUM_THREADS to override)
            torch.set_num_threads(1)
        dp, domain = _sizes(dist.get_world_size(), args.dp, args.domain)
        manager = DomainParallelManager(domain, device_type=device_type)
        cfg = _config(args)
        rank0 = dist.get_rank() == 0
        if rank0:
            console.print(
                f"[bold]credit-dtensor train[/bold]: world {dist.get_world_size()} = dp {dp} x domain {domain} "
                f"on {device_type}, grid {cfg.nlat}x{cfg.nlon}, {cfg.steps} steps, restart "
                f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            )
        with _progress(console, rank0) as progress:
            task = progress.add_task("train", total=cfg.steps, loss="-", dt="-")

            def on_step(step: int, loss: float, seconds: float) -> None:
                progress.update(task, completed=step + 1, loss=f"{loss:.6f}", dt=f"{seconds * 1e3:.0f} ms")
                logger.info("step %d loss %.8f time %.3f s", step + 1, loss, seconds)

            result = train(cfg, manager, on_step=on_step)
        if rank0:
            final = repr(result.losses[-1]) if result.losses else "n/a (nothing left to train)"
            # one machine-readable line: tests and scripts parse it
            if result.resumed_from:
                console.print(f"resumed from {result.resumed_from}")
            console.print(f"final step {cfg.steps} loss {final} (started at step {result.start_step})")
        if created and dist.is_initialized():
            dist.barrier()  # all ranks done before any tears the gloo pairs down
        return 0
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def cmd_train(args: argparse.Namespace, console: Any) -> int:
    from ..tools.checkpoint import CheckpointError

    try:
        return main_train(args, console)
    except CheckpointError as exc:  # the run itself was fine; its checkpoints are not
        console.print(f"[red]credit-dtensor train[/red]: {exc}")
        return EXIT_FAILED


def cmd_demo(args: argparse.Namespace, console: Any) -> int:
    from ..tools.demo import run_demo
    from ..tools.launch import LaunchError

    try:
        return 0 if run_demo(console=console).ok else EXIT_FAILED
    except LaunchError as exc:
        console.print(f"[red]credit-dtensor demo[/red]: the 4-process run failed: {exc}")
        if exc.detail:
            logger.warning("rank %d traceback:\n%s", exc.rank, exc.detail)
        return EXIT_FAILED
