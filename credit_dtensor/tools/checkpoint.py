"""Distributed checkpoints (``torch.distributed.checkpoint``): model + optimizer + step + RNG.

A checkpoint is a directory ``<root>/step_00000012`` holding DCP shards: every rank writes only
its own parameter/optimizer shards, and the metadata records global shapes, so it loads on any
mesh -- ``(2 x 2)`` -> ``(1 x 4)``, ``(4 x 1)`` -- and, without any process group, into a plain
unconverted model with the original module keys (:func:`load_plain_state_dict`).

Model and optimizer states go through ``torch.distributed.checkpoint.state_dict``'s
``get_state_dict``/``set_state_dict`` (FQNs of the original modules, FSDP2- and DTensor-aware).
The step is a tensor; each rank's torch RNG state is stored under its own key and restored only
when the world size is unchanged (after a reshard there is no rank-to-rank correspondence).

Why a completion marker: a crash, a full disk or a copy cut short can leave a directory that has
the right name and some of the files. Saves write into ``step_N.tmp``; after every rank's shards
and DCP's ``.metadata`` are on disk, rank 0 writes :data:`MARKER` (the name and size of every
file) and only then renames the directory. Only directories whose marker matches their files and
whose ``.metadata`` reads count as checkpoints; :func:`resume_checkpoint` also falls back past
one that fails to load, and says which it skipped and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import DomainParallelError

__all__ = [
    "CheckpointError",
    "MARKER",
    "save_checkpoint",
    "load_checkpoint",
    "resume_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "checkpoint_problem",
    "load_plain_state_dict",
    "checkpoint_path",
]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
#: written last into a checkpoint directory: ``{"step", "world_size", "files": {name: bytes}}``
MARKER = "COMPLETE.json"


class CheckpointError(DomainParallelError):
    """A checkpoint is incomplete or damaged, or none under a directory loads."""


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def checkpoint_path(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Every ``step_NNNNNNNN`` directory under ``root``, newest first, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete checkpoint (``None`` if it is): cheap checks, no tensor read."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    try:
        marker = json.loads((path / MARKER).read_text())
        files = dict(marker["files"])
    except FileNotFoundError:
        return f"no {MARKER} (an interrupted save, or not a credit-dtensor checkpoint)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MARKER} ({type(exc).__name__})"
    for name, size in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written (truncated or overwritten)"
    try:
        dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a damaged file
        return f"unreadable .metadata ({type(exc).__name__}: {_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _cause(exc: BaseException) -> str:
    """``Type: first line`` of the error, for DCP's wrapper the first rank's underlying error."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (inner, _trace) = min(exc.failures.items(), key=lambda kv: kv[0])
        return f"rank {rank}: {type(inner).__name__}: {_first_line(inner)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint (:func:`checkpoint_problem` is ``None``) with the highest step."""
    return next((p for p in list_checkpoints(root) if checkpoint_problem(p) is None), None)


def _app_state(step: int) -> dict[str, Any]:
    return {
        "step": torch.tensor(step, dtype=torch.int64),
        "world_size": torch.tensor(_world(), dtype=torch.int64),
    }


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's CPU (and current CUDA device's) RNG state, keyed by global rank."""
    state = {f"rank{_rank()}": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"cuda_rank{_rank()}"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    if f"rank{_rank()}" in state:
        torch.set_rng_state(state[f"rank{_rank()}"])
    if f"cuda_rank{_rank()}" in state:
        torch.cuda.set_rng_state(state[f"cuda_rank{_rank()}"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories cannot be opened on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(tmp: Path, step: int) -> None:
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file() and f.name != MARKER}
    part = tmp / (MARKER + ".part")
    with open(part, "w") as fh:
        json.dump({"step": step, "world_size": _world(), "files": files}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, tmp / MARKER)
    _fsync_dir(tmp)


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write ``<root>/step_<step>`` on every rank (collective); returns its path.

    Atomic: shards and metadata go to ``step_<step>.tmp``, rank 0 adds :data:`MARKER` once all
    are written and renames the directory; a crash at any point leaves no complete-looking
    ``step_*`` directory.
    """
    final = checkpoint_path(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        # leftovers of saves interrupted by a crash, and an older (possibly damaged) one of this step
        for stale in [*Path(root).glob("step_*.tmp"), final] if Path(root).is_dir() else []:
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "app": _app_state(step), "rng": _rng_state()}
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        _write_marker(tmp, step)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Load a checkpoint into a (parallelized) model and optimizer on any mesh; returns the step.

    Collective: every rank calls it. The RNG state is restored only if the world size matches.
    Raises :class:`CheckpointError` if ``path`` is not a complete checkpoint.
    """
    path = Path(path)
    problem = _agreed(checkpoint_problem(path) if _rank() == 0 else None)  # every rank raises, or none
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or damaged: {problem}; pass a step_NNNNNNNN directory of a completed save"
        )
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "app": _app_state(0)}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model), "app": _app_state(0)}
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
    step = int(state["app"]["step"])
    saved_world = int(state["app"]["world_size"])
    if saved_world == _world():
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        rng = {"rng": {k: v for k, v in _rng_state().items() if f"rng.{k}" in saved}}
        dcp.load(rng, checkpoint_id=str(path))
        _set_rng_state(rng["rng"])
    else:
        logger.info("checkpoint world %d != %d: RNG states not restored", saved_world, _world())
    logger.info("loaded checkpoint %s (step %d)", path, step)
    return step


def _agreed(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (file-system views may differ in timing)."""
    if not _dist() or _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resume_checkpoint(
    root: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[Path | None, int]:
    """Load the newest checkpoint under ``root`` that loads completely; ``(path, step)``.

    Damaged or incomplete ones are skipped, each with a warning naming the reason. ``(None, 0)``
    when ``root`` holds no ``step_*`` directory at all (a fresh start); :class:`CheckpointError`
    listing every reason when there are some but none loads. Collective.
    """
    candidates = _agreed([(str(p), checkpoint_problem(p)) for p in list_checkpoints(root)] if _rank() == 0 else None)
    skipped: list[str] = []
    for name, problem in candidates:
        if problem is None:
            try:
                return Path(name), load_checkpoint(name, model, optimizer)
            # DCP raises on every rank alike (its CheckpointException is a BaseException)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - try the next one
                problem = f"failed to load ({_cause(exc)})"
        skipped.append(f"{Path(name).name}: {problem}")
        if _rank() == 0:
            logger.warning("skipping checkpoint %s: %s", name, problem)
    if candidates:
        raise CheckpointError(
            f"no checkpoint under {root} loads completely ({'; '.join(skipped)}): remove the damaged "
            "directories to start from step 0, or restore a good copy"
        )
    return None, 0


def load_plain_state_dict(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's full ``state_dict`` with the original module keys, in one process, no process group.

    With ``model`` (a plain, unconverted instance) its ``state_dict`` is filled from the
    checkpoint and loaded into it; without, every ``model.*`` entry of the checkpoint is read.
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {problem}")
    if model is not None:
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state = {"model": sd}
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
        model.load_state_dict(state["model"])
        return state["model"]
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    sd = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            sd[key[len("model.") :]] = torch.empty(md.size, dtype=md.properties.dtype)
    state = {"model": sd}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state["model"]
