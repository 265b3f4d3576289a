"""The one local process launcher of the CLI, the demo, the benchmarks and the scripts.

:class:`LocalWorld` starts ``world`` processes on this machine, each in a gloo process group
(rendezvous on 127.0.0.1), runs ``fn(rank_ctx, *args)`` in each, and collects what every rank
returns. A rank may also stream messages (``ctx.post(value)``, e.g. per-step progress). A rank
that raises, dies or outlives the deadline fails the whole launch with :class:`LaunchError` and the
other ranks are killed, so a failure never leaves the caller waiting on a dead peer.

``fn`` must be importable by name (a module-level function) when the start method is ``spawn``.
The pytest harness keeps its own persistent worlds (one per size for the whole session).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["free_port", "LaunchError", "RankContext", "LocalWorld", "run_ranks"]

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchError(RuntimeError):
    """A local rank raised, died or timed out. ``domain_error`` marks a ``DomainParallelError``."""

    def __init__(self, message: str, *, rank: int = -1, detail: str = "", domain_error: bool = False) -> None:
        super().__init__(message)
        self.rank, self.detail, self.domain_error = rank, detail, domain_error


@dataclass
class RankContext:
    """What a rank's function receives: its rank, the world size and a channel to the parent."""

    rank: int
    world: int
    _queue: Any

    def post(self, value: Any) -> None:
        """Send ``value`` to the parent's ``on_message(rank, value)`` while the rank runs."""
        self._queue.put(("msg", self.rank, value))


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results: Any, threads: int, pg_s: float):
    import torch
    import torch.distributed as dist

    from ..errors import DomainParallelError

    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=pg_s),
        )
        value = fn(RankContext(rank, world, results), *args)
        results.put(("done", rank, value))
        dist.barrier()  # every rank past its last message before any tears the gloo pairs down
    except BaseException as exc:  # noqa: BLE001 - report to the parent instead of hanging it
        kind = "domain_error" if isinstance(exc, DomainParallelError) else "error"
        results.put((kind, rank, (f"{type(exc).__name__}: {exc}", traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class LocalWorld:
    """``world`` local gloo processes running ``fn(ctx, *args)``; started at construction.

    Start it before this process starts threads (e.g. rich's live display) when ``method`` is
    ``"fork"``; ``collect`` may run under such a display.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        world: int,
        args: Sequence[Any] = (),
        *,
        method: str | None = None,
        threads: int = 1,
        pg_timeout: float = 300.0,
    ) -> None:
        if method is None:
            method = "spawn"
        if method == "fork" and not sys.platform.startswith("linux"):
            method = "spawn"  # macOS/Windows: fork is unsafe or missing
        ctx = mp.get_context(method)
        self.world = world
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_entry,
                args=(r, world, port, fn, tuple(args), self._results, threads, pg_timeout),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self._procs:
            p.start()

    def collect(self, *, timeout: float = 1800.0, on_message: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Wait for every rank; their return values by rank. Raises :class:`LaunchError`."""
        done: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(done) < self.world:
                try:
                    kind, rank, value = self._results.get(timeout=1.0)
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(self._procs) if p.exitcode not in (None, 0) and r not in done]
                    if dead:
                        codes = [self._procs[r].exitcode for r in dead]
                        raise LaunchError(f"ranks {dead} died (exit codes {codes})", rank=dead[0]) from None
                    if time.monotonic() > deadline:
                        raise LaunchError(f"no result from every rank within {timeout:.0f} s") from None
                    continue
                if kind == "msg":
                    if on_message is not None:
                        on_message(rank, value)
                elif kind == "done":
                    done[rank] = value
                else:
                    message, detail = value
                    raise LaunchError(
                        f"rank {rank} failed: {message}", rank=rank, detail=detail, domain_error=kind == "domain_error"
                    )
            for p in self._procs:
                p.join(timeout=30)
        finally:
            self.close()
        return [done[r] for r in range(self.world)]

    def close(self) -> None:
        """Kill every rank still running (idempotent)."""
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    args: Sequence[Any] = (),
    *,
    method: str | None = None,
    threads: int = 1,
    timeout: float = 1800.0,
    pg_timeout: float = 300.0,
    on_message: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Start ``world`` local gloo ranks running ``fn(ctx, *args)``; return their results by rank."""
    launched = LocalWorld(fn, world, args, method=method, threads=threads, pg_timeout=pg_timeout)
    return launched.collect(timeout=timeout, on_message=on_message)
