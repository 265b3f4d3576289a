"""Distributed checkpoints (``torch.distributed.checkpoint``): model + optimizer + step + RNG.

A checkpoint is a directory ``<root>/step_00000012`` holding DCP shards: every rank writes only
its own parameter/optimizer shards, and the metadata records global shapes, so it loads on any
mesh -- ``(2 x 2)`` -> ``(1 x 4)``, ``(4 x 1)`` -- and, without any process group, into a plain
unconverted model with the original module keys (:func:`load_plain_state_dict`).

Model and optimizer states go through ``torch.distributed.checkpoint.state_dict``'s
``get_state_dict``/``set_state_dict`` (FQNs of the original modules, FSDP2- and DTensor-aware).
The step is a tensor; each rank's torch RNG state is stored under its own key and restored only
when the world size is unchanged (after a reshard there is no rank-to-rank correspondence).

Writes are atomic: DCP writes into ``step_N.tmp`` and rank 0 renames it after a barrier, so a
rank killed mid-save leaves no directory that :func:`latest_checkpoint` would pick up.
"""

from __future__ import annotations

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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import DomainParallelError

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_plain_state_dict", "checkpoint_path"]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


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


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The completed checkpoint with the highest step under ``root`` (``None`` if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


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


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write ``<root>/step_<step>`` on every rank (collective); returns its path."""
    final = checkpoint_path(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        # leftovers of saves interrupted by a crash, and an older checkpoint of the same step
        for stale in [*Path(root).glob("step_*.tmp"), final] if Path(root).is_dir() else []:
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "app": _app_state(step),
        "rng": _rng_state(),
    }
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        os.replace(tmp, final)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Load a checkpoint into a (parallelized) model and optimizer on any mesh; returns the step.

    Collective: every rank calls it. The RNG state is restored only if the world size matches.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise DomainParallelError(
            f"load_checkpoint: {path} is not a complete DCP checkpoint (no .metadata): pass a directory "
            "written by save_checkpoint, e.g. latest_checkpoint(root)"
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


def load_plain_state_dict(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's full ``state_dict`` with the original module keys, in one process, no process group.

    With ``model`` (a plain, unconverted instance) its ``state_dict`` is filled from the
    checkpoint and loaded into it; without, every ``model.*`` entry of the checkpoint is read.
    """
    path = Path(path)
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
