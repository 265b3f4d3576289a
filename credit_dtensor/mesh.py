"""`DomainParallelManager`: the 2-D ``("dp", "domain")`` device mesh everything runs on.

Domain ranks are contiguous (as in CREDIT's original module): with world 8 and domain 2 the
domain groups are [0,1] [2,3] [4,5] [6,7] and the dp groups [0,2,4,6] [1,3,5,7]. That is the
row-major layout of a ``(dp, domain)`` mesh, so halo traffic stays between neighbouring ranks
(usually on one node) and only data-parallel gradient traffic crosses nodes.
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from . import comm
from .errors import DomainParallelError

__all__ = [
    "DomainParallelManager",
    "initialize_domain_parallel",
    "get_domain_parallel_manager",
    "rank_layout",
    "default_device_type",
]

logger = logging.getLogger(__name__)

MESH_DIM_NAMES = ("dp", "domain")
#: Process-group timeout used when we create the default group: long enough for a slow first
#: step, short enough that a dead peer fails the job instead of hanging it for the default 30 min.
PG_TIMEOUT_ENV = "CREDIT_DTENSOR_PG_TIMEOUT"


def pg_timeout() -> timedelta:
    """The timeout from ``CREDIT_DTENSOR_PG_TIMEOUT`` (seconds, default 600), read when a group is made."""
    raw = os.environ.get(PG_TIMEOUT_ENV, "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DomainParallelError(f"{PG_TIMEOUT_ENV}={raw!r} is not a positive number of seconds: set e.g. 600")
    return timedelta(seconds=seconds)


DEFAULT_PG_TIMEOUT = timedelta(seconds=600)

_GLOBAL_MANAGER: DomainParallelManager | None = None


def default_device_type() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def rank_layout(world_size: int, domain_parallel_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Pure arithmetic: ``(domain_groups, dp_groups)`` for a world, contiguous domain ranks.

    >>> rank_layout(8, 2)
    ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]])
    """
    _check_sizes(world_size, domain_parallel_size)
    dp = world_size // domain_parallel_size
    domain_groups = [list(range(i * domain_parallel_size, (i + 1) * domain_parallel_size)) for i in range(dp)]
    dp_groups = [list(range(j, world_size, domain_parallel_size)) for j in range(domain_parallel_size)]
    return domain_groups, dp_groups


def _check_sizes(world_size: int, domain_parallel_size: int) -> None:
    if not isinstance(domain_parallel_size, int) or domain_parallel_size < 1:
        raise DomainParallelError(
            f"domain_parallel_size={domain_parallel_size!r} must be an integer >= 1: "
            "pass the number of ranks that split one sample's H axis"
        )
    if world_size < 1:
        raise DomainParallelError(f"world_size={world_size} must be >= 1")
    if world_size % domain_parallel_size != 0:
        raise DomainParallelError(
            f"domain_parallel_size={domain_parallel_size} does not divide world_size={world_size}: "
            f"choose a divisor of {world_size} (e.g. {_divisors(world_size)})"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def _resolve_device_type(device_type: str | None) -> str:
    if device_type is None:
        return default_device_type()
    if device_type not in SUPPORTED_DEVICE_TYPES:
        raise DomainParallelError(
            f"DomainParallelManager: device_type={device_type!r} is not supported: pass 'cpu' (gloo), 'cuda' "
            "(nccl) or None to pick by availability"
        )
    if device_type == "cuda" and not torch.cuda.is_available():
        raise DomainParallelError(
            "DomainParallelManager: device_type='cuda' but no GPU is visible: "
            "pass device_type='cpu' (gloo) or None to pick by availability"
        )
    return device_type


def _init_default_group(device_type: str) -> None:
    """Create the default process group from torchrun's environment, or explain what is missing."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DomainParallelError(
            "no torch.distributed process group is initialized and the torchrun environment is "
            f"incomplete (missing {', '.join(missing)}): launch with `torchrun --nproc-per-node N ...` "
            "or call torch.distributed.init_process_group(...) before creating the manager"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    logger.info("initializing process group backend=%s from the torchrun environment", backend)
    dist.init_process_group(backend=backend, timeout=pg_timeout())


class DomainParallelManager:
    """Owns the ``("dp", "domain")`` :class:`DeviceMesh` and answers rank questions about it.

    Args:
        domain_parallel_size: ranks that split one sample along H (the ``"domain"`` mesh dim).
            ``dp`` size is ``world_size // domain_parallel_size``.
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (nccl); ``None`` picks by availability.
        shard_dim: deprecated and ignored (a ``DeprecationWarning``): the sharded dim is chosen per
            call (``shard_tensor(x, manager, dim)``, ``convert_to_domain_parallel(shard_dim=)``);
            kept as the ``shard_dim`` attribute (default ``-2``) for code that reads it.
    """

    def __init__(
        self, domain_parallel_size: int, *, device_type: str | None = None, shard_dim: int | None = None
    ) -> None:
        if shard_dim is not None:
            _warn_shard_dim("DomainParallelManager")
        if not isinstance(domain_parallel_size, int) or domain_parallel_size < 1:
            _check_sizes(1, domain_parallel_size)
        self.device_type = _resolve_device_type(device_type)
        from . import intercept  # the rules turn on where a domain-parallel program starts

        intercept.ensure_enabled()
        #: True when this manager created the default process group (then :meth:`close` destroys it).
        self.owns_process_group = not dist.is_initialized()
        #: Set by :meth:`close`; a closed manager refuses to be used (its group may be gone).
        self.closed = False
        if self.owns_process_group:
            _init_default_group(self.device_type)
        world = dist.get_world_size()
        _check_sizes(world, domain_parallel_size)
        self.shard_dim = -2 if shard_dim is None else shard_dim
        self.mesh: DeviceMesh = init_device_mesh(
            self.device_type, (world // domain_parallel_size, domain_parallel_size), mesh_dim_names=MESH_DIM_NAMES
        )
        self.domain_mesh: DeviceMesh = self.mesh["domain"]
        self.dp_mesh: DeviceMesh = self.mesh["dp"]
        logger.info(
            "domain-parallel mesh %s on %s: dp=%d x domain=%d (rank %d: dp_rank=%d domain_rank=%d)",
            MESH_DIM_NAMES,
            self.device_type,
            self.dp_world_size,
            self.domain_world_size,
            dist.get_rank(),
            self.dp_rank,
            self.domain_rank,
        )

    # --- ranks and groups -------------------------------------------------------------------
    @property
    def domain_rank(self) -> int:
        return self.domain_mesh.get_local_rank()

    @property
    def domain_world_size(self) -> int:
        return self.domain_mesh.size()

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def dp_world_size(self) -> int:
        return self.dp_mesh.size()

    @property
    def domain_group(self) -> dist.ProcessGroup:
        return self.domain_mesh.get_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.dp_mesh.get_group()

    @property
    def is_first_domain_rank(self) -> bool:
        return self.domain_rank == 0

    @property
    def is_last_domain_rank(self) -> bool:
        return self.domain_rank == self.domain_world_size - 1

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    def close(self) -> None:
        """Destroy the default process group if this manager created it (idempotent).

        Call it at the end of a torchrun script: a process that exits with a live gloo group can
        abort ("terminate called without an active exception"). A group created by the caller is
        left alone.
        """
        if self.owns_process_group and dist.is_initialized():
            # every rank must be past its last message before any tears its connections down:
            # gloo aborts a peer whose pair closes while it is still draining
            dist.barrier()
            dist.destroy_process_group()
            comm.forget_groups()  # no group object may outlive the interpreter's own teardown
            gc.collect()
        self.owns_process_group = False
        self.closed = True

    def check_open(self, where: str) -> None:
        """Raise a clear error when a closed manager is used (instead of a raw process-group error)."""
        if self.closed:
            raise DomainParallelError(
                f"{where}: this DomainParallelManager was closed (close() ends its process group): "
                "create a new DomainParallelManager, and call close() only at the end of the job"
            )

    def __enter__(self) -> DomainParallelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DomainParallelManager(dp={self.dp_world_size}, domain={self.domain_world_size}, "
            f"device_type={self.device_type!r}, shard_dim={self.shard_dim})"
        )


def _warn_shard_dim(where: str) -> None:
    warnings.warn(
        f"{where}(shard_dim=...) is deprecated and ignored: no op reads it; pass the dim per call "
        "(shard_tensor(x, manager, dim), convert_to_domain_parallel(model, manager, shard_dim=-2))",
        DeprecationWarning,
        stacklevel=3,
    )


def initialize_domain_parallel(
    world_size: int, domain_parallel_size: int, shard_dim: int | None = None, *, device_type: str | None = None
) -> DomainParallelManager:
    """Original-API convenience: build a manager and remember it for :func:`get_domain_parallel_manager`.

    ``world_size`` is checked against the process group (it must match) before any mesh is built,
    so a mismatch fails identically on every rank. No op reads the remembered manager: every
    function takes a manager or reads the mesh from its DTensor argument.
    """
    global _GLOBAL_MANAGER
    _check_sizes(world_size, domain_parallel_size)
    if not dist.is_initialized():
        _init_default_group(_resolve_device_type(device_type))
    if dist.get_world_size() != world_size:
        raise DomainParallelError(
            f"initialize_domain_parallel(world_size={world_size}) but the process group has "
            f"{dist.get_world_size()} ranks: pass the launched world size"
        )
    if shard_dim is not None:
        _warn_shard_dim("initialize_domain_parallel")
    manager = DomainParallelManager(domain_parallel_size, device_type=device_type)
    manager.shard_dim = -2 if shard_dim is None else shard_dim
    _GLOBAL_MANAGER = manager
    return _GLOBAL_MANAGER


def get_domain_parallel_manager() -> DomainParallelManager | None:
    """The manager made by :func:`initialize_domain_parallel`, or ``None``."""
    return _GLOBAL_MANAGER
