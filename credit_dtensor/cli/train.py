"""``credit-dtensor train`` and ``credit-dtensor demo``.

``register(subparsers)`` adds both subcommands; each sets ``handler=fn`` with
``fn(args, console) -> exit status``, so ``cli.main`` runs ``args.handler(args, console)``.

``train`` runs under torchrun (``torchrun --nproc-per-node N -m credit_dtensor.cli train --dp D
--domain M``) or, without torchrun, as a single process. The process-group timeout
(``--pg-timeout``, default 300 s) bounds how long a rank waits in a collective for a dead peer
before failing: under ``torchrun --max-restarts`` the agent usually restarts the job sooner, when
it sees the dead rank; the timeout is the backstop that keeps any rank from hanging forever.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta
from typing import Any

__all__ = ["register", "add_train_arguments", "cmd_train", "cmd_demo", "main_train"]

logger = logging.getLogger(__name__)

DEFAULT_PG_TIMEOUT_S = 300


def _resolution(text: str) -> tuple[int, int]:
    """``"32x64"`` -> (32, 64); ``"32"`` -> (32, 64) (a 1:2 lat-lon grid)."""
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
        else:
            h = int(text)
            w = 2 * h
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resolution {text!r}: expected HxW (e.g. 32x64) or H") from None
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(
            f"--resolution {text!r}: H and W must be even and >= 2 (the U-Net halves them)"
        )
    return h, w


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=30, help="optimizer steps in total (default 30)")
    p.add_argument("--resolution", type=_resolution, default=(32, 64), help="grid HxW (lat x lon), default 32x64")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (default: world // domain)")
    p.add_argument(
        "--domain", type=int, default=None, help="ranks that split one sample's latitude (default: world // dp)"
    )
    p.add_argument("--global-batch", type=int, default=4, help="samples per step over all dp ranks (default 4)")
    p.add_argument("--model", choices=("demo", "unet"), default="demo", help="demo U-Net or models.unet.WeatherUNet")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--width", type=int, default=16, help="model width (channels of the first level)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-fsdp", action="store_true", help="replicate parameters and all-reduce gradients instead")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--checkpoint-dir", default=None, help="directory for DCP checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--resume-from", default=None, help="continue from this checkpoint directory")
    p.add_argument(
        "--pg-timeout", type=float, default=DEFAULT_PG_TIMEOUT_S, help="process-group timeout in seconds (default 300)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")


def register(subparsers: Any) -> None:
    """Add ``train`` and ``demo`` to the ``credit-dtensor`` subcommands."""
    train = subparsers.add_parser("train", help="train the demo model on synthetic global data (torchrun or 1 process)")
    add_train_arguments(train)
    train.set_defaults(handler=cmd_train)
    demo = subparsers.add_parser(
        "demo", help="the main job: 4 local CPU processes (2x2 mesh) vs 1 process, with a summary"
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
    from ..errors import DomainParallelError

    if dp is None and domain is None:
        domain = world
    if domain is None:
        domain = world // dp if dp and world % dp == 0 else 0
    if dp is None:
        dp = world // domain if domain and world % domain == 0 else 0
    if dp * domain != world:
        raise DomainParallelError(
            f"train: --dp {dp} x --domain {domain} != world size {world}: launch dp*domain processes "
            f"(torchrun --nproc-per-node ...) or change the flags"
        )
    return dp, domain


def main_train(args: argparse.Namespace, console: Any) -> int:
    import torch
    import torch.distributed as dist
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..mesh import DomainParallelManager, default_device_type
    from ..tools.train import TrainConfig, train

    device_type = args.device or default_device_type()
    created = _init_process_group(device_type, timedelta(seconds=args.pg_timeout))
    try:
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # small per-rank work: intra-op threads only contend with the other ranks (set
            # OMP_NUM_THREADS to override)
            torch.set_num_threads(1)
        dp, domain = _sizes(dist.get_world_size(), args.dp, args.domain)
        manager = DomainParallelManager(domain, device_type=device_type)
        h, w = args.resolution
        cfg = TrainConfig(
            steps=args.steps,
            model=args.model,
            nlat=h,
            nlon=w,
            channels=args.channels,
            width=args.width,
            global_batch=args.global_batch,
            lr=args.lr,
            seed=args.seed,
            dtype=args.dtype,
            fsdp=not args.no_fsdp,
            activation_checkpointing=args.activation_checkpointing,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            resume_from=args.resume_from,
        )
        rank0 = dist.get_rank() == 0
        if rank0:
            console.print(
                f"[bold]credit-dtensor train[/bold]: world {dist.get_world_size()} = dp {dp} x domain {domain} "
                f"on {device_type}, grid {h}x{w}, {cfg.steps} steps, restart "
                f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            )
        columns = (
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("step {task.fields[dt]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, disable=not rank0) as progress:
            task = progress.add_task("train", total=cfg.steps, loss="-", dt="-")

            def on_step(step: int, loss: float, seconds: float) -> None:
                progress.update(task, completed=step + 1, loss=f"{loss:.6f}", dt=f"{seconds * 1e3:.0f} ms")
                logger.info("step %d loss %.8f time %.3f s", step + 1, loss, seconds)

            result = train(cfg, manager, on_step=on_step)
        if rank0:
            final = repr(result.losses[-1]) if result.losses else "n/a (nothing left to train)"
            # one machine-readable line: tests and scripts parse it
            console.print(f"final step {cfg.steps} loss {final} (started at step {result.start_step})")
        if created and dist.is_initialized():
            dist.barrier()  # all ranks done before any tears the gloo pairs down
        return 0
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def cmd_train(args: argparse.Namespace, console: Any) -> int:
    from ..errors import DomainParallelError

    try:
        return main_train(args, console)
    except DomainParallelError as exc:
        console.print(f"[red]credit-dtensor train[/red]: {exc}")
        return 1


def cmd_demo(args: argparse.Namespace, console: Any) -> int:
    from ..tools.demo import run_demo

    return 0 if run_demo(console=console).ok else 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m credit_dtensor.cli_train train ...``) until cli.py wires us in."""
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="credit-dtensor")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.handler(args, Console())


if __name__ == "__main__":
    sys.exit(main())
