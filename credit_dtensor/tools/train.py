"""The training loop: synthetic global weather data -> domain-parallel model under FSDP2 -> AdamW.

Runs on any ``(dp x domain)`` mesh, including one process. Every step is a pure function of the
step index (data by index, no dropout), so a run resumed from a checkpoint continues
bit-identically and a 1-process run of the same config is the reference of every mesh.

Loss: the global mean squared error. ``((pred - y) ** 2).sum() / y.numel()`` on an H-sharded
DTensor is a ``Partial(sum)`` scalar whose local parts add up to the exact global value for any
(uneven, empty) shards; its backward is exact. (``.mean()`` is exact too -- measured: a
``Partial(avg)`` scalar on even shards -- but on uneven shards PyTorch 2.13 first redistributes
the whole field to ``Replicate``, an activation all-gather; ``sum() / numel`` never does.) Across dp ranks FSDP2
averages gradients, which equals the gradient of the mean over the global batch because every
dp rank gets the same number of samples.

Fault injection for tests: with ``CREDIT_DTENSOR_FAULT_STEP=k`` (and optionally
``CREDIT_DTENSOR_FAULT_RANK``, default 1) that rank SIGKILLs itself at step ``k`` on torchrun's
first attempt only (``TORCHELASTIC_RESTART_COUNT`` is 0).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .. import comm, stats
from ..mesh import DomainParallelManager
from ..models.demo import DemoNet
from ..parallelize import parallelize, reduce_gradients
from .checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from .data import WeatherDataset, sample_indices

__all__ = ["TrainConfig", "TrainResult", "build_model", "global_mse", "train", "train_reference"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


MODELS = ("demo", "unet")


@dataclass
class TrainConfig:
    steps: int = 30
    model: str = "demo"  # "demo" (models.demo.DemoNet) or "unet" (models.unet.WeatherUNet)
    nlat: int = 32
    nlon: int = 64
    channels: int = 4
    width: int = 16
    global_batch: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    dtype: str = "float32"
    fsdp: bool = True
    overlap_gradients: bool = False  # fsdp=False: reduce gradient buckets during backward
    activation_checkpointing: bool = False
    compile: str | None = None  # torch.compile every block with this backend ("inductor", "aot_eager")
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False  # newest checkpoint under checkpoint_dir that loads (damaged ones skipped)
    resume_from: str | None = None  # a specific checkpoint directory (overrides ``resume``)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def dataset(self) -> WeatherDataset:
        return WeatherDataset(self.nlat, self.nlon, self.channels, seed=self.seed, dtype=self.torch_dtype)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # global loss of every step run here
    step_times: list[float] = field(default_factory=list)
    start_step: int = 0
    config: dict = field(default_factory=dict)
    resumed_from: str | None = None  # the checkpoint directory the run continued from


def build_model(config: TrainConfig) -> nn.Module:
    """The demo model with a deterministic initialization (same on every rank and in the reference)."""
    if config.model not in MODELS:
        from ..errors import DomainParallelError

        raise DomainParallelError(f"train: unknown model {config.model!r}: choose one of {MODELS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.model == "unet":
            from ..models.unet import WeatherUNet

            model: nn.Module = WeatherUNet(config.channels, config.width)
        else:
            model = DemoNet(config.channels, config.width)
    return model.to(config.torch_dtype)


def global_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the whole (possibly H-sharded) batch: ``F.mse_loss`` as users write
    it, which credit_dtensor's loss rule makes exact for uneven shards (a ``Replicate`` scalar)."""
    return F.mse_loss(pred, target)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _loss_value(loss: torch.Tensor, manager: DomainParallelManager) -> float:
    """The global mean loss over all dp ranks (one small all-reduce over the world, labelled "loss").

    Whatever placement the loss comes back with on the domain mesh -- ``Partial(sum)`` (local
    parts add up), ``Partial(avg)`` or ``Replicate`` / a plain scalar (every domain rank holds the
    whole value) -- the world sum is scaled so that each domain group counts once.
    """
    local, per_domain = loss, manager.domain_world_size
    if isinstance(loss, DTensor):
        local = loss.to_local()
        if any(p.is_partial() and getattr(p, "reduce_op", "sum") == "sum" for p in loss.placements):
            per_domain = 1
    buf = local.detach().reshape(1).to(torch.float64).clone()
    with stats.op_label("loss"):
        comm.all_reduce_sum(buf, dist.group.WORLD)
    return float(buf) / per_domain / manager.dp_world_size


def _maybe_fault(step: int) -> None:
    target = os.environ.get("CREDIT_DTENSOR_FAULT_STEP")
    if target is None or int(target) != step:
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return
    if dist.get_rank() == int(os.environ.get("CREDIT_DTENSOR_FAULT_RANK", "1")):
        logger.warning("fault injection: rank %d kills itself at step %d", dist.get_rank(), step)
        os.kill(os.getpid(), signal.SIGKILL)


StepCallback = Callable[[int, float, float], None]


def setup(config: TrainConfig, manager: DomainParallelManager) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Build, parallelize and make the optimizer for ``config`` on ``manager``'s mesh."""
    if config.global_batch % manager.dp_world_size:
        from ..errors import DomainParallelError

        raise DomainParallelError(
            f"train: global batch {config.global_batch} is not divisible by dp={manager.dp_world_size}: "
            "choose --global-batch as a multiple of --dp"
        )
    model = build_model(config).to(manager.device)
    model = parallelize(
        model,
        manager,
        fsdp=config.fsdp,
        overlap_gradients=config.overlap_gradients,
        activation_checkpointing=config.activation_checkpointing,
        compile=config.compile or False,
    )
    return model, _make_optimizer(model, config)


def train(
    config: TrainConfig,
    manager: DomainParallelManager,
    *,
    on_step: StepCallback | None = None,
    model_and_optimizer: tuple[nn.Module, torch.optim.Optimizer] | None = None,
    step_context: Callable[[int], contextlib.AbstractContextManager] | None = None,
) -> TrainResult:
    """Train ``config.steps`` steps (resuming from ``config.checkpoint_dir`` if ``config.resume``).

    ``on_step(step, loss, seconds)`` is called on every rank after each step; ``step_context(step)``
    (e.g. traffic or memory instrumentation) wraps each step's forward, backward and update.
    """
    model, optimizer = model_and_optimizer or setup(config, manager)
    ds = config.dataset()
    start, ckpt = 0, None
    if config.resume_from:
        ckpt, start = config.resume_from, load_checkpoint(config.resume_from, model, optimizer)
    elif config.resume and config.checkpoint_dir:
        ckpt, start = resume_checkpoint(config.checkpoint_dir, model, optimizer)
    if ckpt is not None:
        logger.info("resumed from %s at step %d", ckpt, start)
    result = TrainResult(start_step=start, config=asdict(config), resumed_from=str(ckpt) if ckpt else None)
    for step in range(start, config.steps):
        _maybe_fault(step)
        t0 = time.perf_counter()
        idx = sample_indices(step, config.global_batch, manager.dp_rank, manager.dp_world_size)
        x, y = ds.sharded_batch(idx, manager)
        with step_context(step) if step_context is not None else contextlib.nullcontext():
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if not config.fsdp:
                reduce_gradients(model, manager)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        value = _loss_value(loss, manager)
        seconds = time.perf_counter() - t0
        result.losses.append(value)
        result.step_times.append(seconds)
        if on_step is not None:
            on_step(step, value, seconds)
        done = step + 1
        if config.checkpoint_dir and config.checkpoint_every and done % config.checkpoint_every == 0:
            save_checkpoint(config.checkpoint_dir, done, model, optimizer)
    return result


def train_reference(
    config: TrainConfig,
    *,
    on_step: StepCallback | None = None,
    step_context: Callable[[int], contextlib.AbstractContextManager] | None = None,
    model: nn.Module | None = None,
) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """The same steps on one device with the plain (unconverted) model; returns the final state_dict too."""
    model = model if model is not None else build_model(config)
    optimizer = _make_optimizer(model, config)
    ds = config.dataset()
    result = TrainResult(config=asdict(config))
    for step in range(config.steps):
        t0 = time.perf_counter()
        x, y = ds.batch(sample_indices(step, config.global_batch))
        with step_context(step) if step_context is not None else contextlib.nullcontext():
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        result.losses.append(float(loss.detach()))
        result.step_times.append(seconds)
        if on_step is not None:
            on_step(step, float(loss.detach()), seconds)
    return result, copy.deepcopy(model.state_dict())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded, plain CPU) model state on every rank (collective), original keys."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
    return out
