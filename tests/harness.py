"""Multi-process gloo test harness.

A :class:`World` of ``size`` worker processes is started once (per pytest session, lazily per
size) and runs many tasks: ``world.run(fn, *args)`` calls ``fn(*args)`` on every rank and returns
the per-rank results. A rank that raises fails the call with its traceback; a rank that hangs
(e.g. its peers died inside a collective) fails it after a timeout, and the world is restarted
for the next call instead of hanging the suite.

Task functions must be module-level (they are pickled by reference). Inside a task, use
:func:`manager` to get a cached :class:`DomainParallelManager` for a domain size.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from credit_dtensor.tools.launch import free_port

TASK_TIMEOUT = float(os.environ.get("CREDIT_DTENSOR_TEST_TIMEOUT", "300"))
GRACE_AFTER_ERROR = 5.0  # once one rank failed, how long the others get to report


class RankError(AssertionError):
    pass


def _worker(rank: int, size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=120)
    )
    import credit_dtensor

    credit_dtensor.enable_rules()  # tasks that build DTensors on a raw DeviceMesh get the rules too
    results.put((rank, "ready", None))
    while True:
        item = tasks.get()
        if item is None:
            break
        task_id, fn, args, kwargs = item
        try:
            out = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            out = ("err", f"rank {rank}:\n{traceback.format_exc()}")
        results.put((rank, task_id, out))
    dist.destroy_process_group()


#: error texts of a collective that timed out or lost its peers: the ranks may no longer agree on
#: which collective comes next
_TORN_MARKS = ("Timed out", "timed out", "pair closure", "Connection closed", "Connection reset", "timeout")


class World:
    """``size`` gloo ranks waiting for tasks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        port = free_port()
        self._results: mp.Queue = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.size)]
        self._procs = [
            self._ctx.Process(target=_worker, args=(r, self.size, port, self._tasks[r], self._results), daemon=True)
            for r in range(self.size)
        ]
        for p in self._procs:
            p.start()
        ready = 0
        deadline = time.monotonic() + 180
        while ready < self.size:
            try:
                _, tag, _ = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise RuntimeError(f"world of {self.size} did not start in time") from None
            ready += tag == "ready"
        self._next_id = 0
        self.alive = True

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in getattr(self, "_procs", []):
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        self.alive = False

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = TASK_TIMEOUT, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results ordered by rank."""
        if not self.alive:
            self._start()
        pickle.dumps((fn, args, kwargs))  # fail here, not after a timeout, if the task cannot travel
        self._next_id += 1
        tid = self._next_id
        for q in self._tasks:
            q.put((tid, fn, args, kwargs))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        first_error = float("inf")
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.size:
            if errors:
                deadline = min(deadline, first_error + GRACE_AFTER_ERROR)
            remaining = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
            try:
                rank, got_id, (status, value) = self._results.get(timeout=max(0.05, min(remaining, 1.0)))
            except queue.Empty:
                if dead and not errors:
                    first_error = time.monotonic()
                    errors.update({r: f"rank {r}: process died (exit code {self._procs[r].exitcode})" for r in dead})
                if time.monotonic() >= deadline:
                    break
                continue
            if got_id != tid:
                continue  # a late answer from a task that was abandoned
            if status != "ok" and not errors:
                first_error = time.monotonic()
            (results if status == "ok" else errors)[rank] = value
        if len(results) < self.size:
            missing = [r for r in range(self.size) if r not in results and r not in errors]
            torn = any(mark in text for text in errors.values() for mark in _TORN_MARKS)
            if missing or torn or any(not p.is_alive() for p in self._procs):
                # some ranks are stuck in a collective, dead, or timed out in one (the others may
                # be at another collective now): restart next time so one failure stays one failure
                self.close()
            msg = "\n".join(errors[r] for r in sorted(errors))
            if missing:
                msg += f"\nranks {missing} did not finish within the timeout (world restarted)"
            raise RankError(f"{getattr(fn, '__name__', fn)} failed on a world of {self.size}:\n{msg}")
        return [results[r] for r in range(self.size)]


_WORLDS: dict[int, World] = {}


def get_world(size: int) -> World:
    w = _WORLDS.get(size)
    if w is None or not w.alive:
        w = _WORLDS[size] = World(size)
    return w


@atexit.register
def close_all() -> None:
    for w in _WORLDS.values():
        w.close()
    _WORLDS.clear()


# --- helpers used inside tasks -----------------------------------------------------------------

_MANAGERS: dict[int, Any] = {}


def manager(domain: int | None = None):
    """A cached DomainParallelManager on this worker (domain defaults to the whole world)."""
    import torch.distributed as dist

    from credit_dtensor import DomainParallelManager

    domain = domain or dist.get_world_size()
    if domain not in _MANAGERS:
        _MANAGERS[domain] = DomainParallelManager(domain, device_type="cpu")
    return _MANAGERS[domain]


def raises(fn: Callable[[], Any], exc_type: type[BaseException], *words: str) -> str:
    """Call ``fn`` (inside a task); it must raise ``exc_type`` with every one of ``words`` in its
    message, which is returned."""
    try:
        fn()
    except exc_type as e:  # noqa: PERF203
        msg = str(e)
        missing = [w for w in words if w not in msg]
        assert not missing, f"message lacks {missing}: {msg}"
        return msg
    raise AssertionError(f"{fn} did not raise {exc_type.__name__}")


def still_in_step() -> None:
    """A collective after an error: every rank must reach it (no rank left behind)."""
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size()
