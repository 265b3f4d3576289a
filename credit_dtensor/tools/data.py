"""A deterministic synthetic global weather-like dataset, generated on the fly (no downloads).

Each channel is a sum of smooth "spherical-harmonic-like" waves on a lat x lon grid,
``A(lat) * cos(m * (lon - u * t) + phase)`` with ``A(lat) = cos(lat)^m * cos(n * lat + ...)``,
advected eastward at a per-wave speed. Sample ``i`` is the pair (state at ``t_i``, state at
``t_i + dt``): a model learns one time step, like CREDIT's forecast models.

Why this shape: every latitude factor and longitude factor is a 1-D vector computed on the full
grid, and the field is a sum of their outer products (exact float multiplications), so a rank
can build only its own rows and get bit-for-bit the same values as slicing the full field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from ..geometry import chunk_range
from ..mesh import DomainParallelManager
from ..sharding import wrap_local

__all__ = ["WeatherDataset", "sample_indices"]


@dataclass(frozen=True)
class _Waves:
    m: torch.Tensor  # zonal wavenumbers (K,)
    n: torch.Tensor  # meridional wavenumbers (K,)
    amp: torch.Tensor  # (C, K)
    phase: torch.Tensor  # (C, K)
    lat_phase: torch.Tensor  # (K,)
    speed: torch.Tensor  # (K,) radians of longitude per unit time
    offset: torch.Tensor  # (C,)


class WeatherDataset:
    """``len`` samples of ``(x, y)``, each ``(channels, nlat, nlon)`` float tensors.

    Args:
        nlat, nlon: grid size (H, W).
        channels: number of variables.
        waves: waves per channel.
        length: number of samples (indices wrap modulo ``length``).
        dt: time between ``x`` and ``y`` (and between consecutive samples).
        seed: fixes the wave parameters; the dataset is a pure function of (seed, index).
    """

    def __init__(
        self,
        nlat: int = 32,
        nlon: int = 64,
        channels: int = 4,
        *,
        waves: int = 6,
        length: int = 100_000,
        dt: float = 0.05,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.nlat, self.nlon, self.channels, self.length, self.dt, self.dtype = nlat, nlon, channels, length, dt, dtype
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self._w = _Waves(
            m=torch.randint(1, 6, (waves,), generator=g).to(f64),
            n=torch.randint(1, 5, (waves,), generator=g).to(f64),
            amp=torch.randn(channels, waves, generator=g, dtype=f64) / math.sqrt(waves),
            phase=torch.rand(channels, waves, generator=g, dtype=f64) * 2 * math.pi,
            lat_phase=torch.rand(waves, generator=g, dtype=f64) * math.pi,
            speed=(torch.rand(waves, generator=g, dtype=f64) - 0.3) * 2.0,
            offset=torch.randn(channels, generator=g, dtype=f64) * 0.1,
        )
        # cell-centred latitudes (-90, 90) and longitudes [0, 360)
        self.lat = (torch.arange(nlat, dtype=f64) + 0.5) / nlat * math.pi - math.pi / 2
        self.lon = torch.arange(nlon, dtype=f64) / nlon * 2 * math.pi
        w = self._w
        # (K, nlat): cos(lat)^m * cos(n * lat + phase); full grid, sliced per rank
        self._lat_factor = torch.cos(self.lat)[None, :] ** w.m[:, None] * torch.cos(
            w.n[:, None] * self.lat[None, :] + w.lat_phase[:, None]
        )

    def __len__(self) -> int:
        return self.length

    def state(self, t: float, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The field at time ``t``: ``(channels, rows, nlon)`` (all rows by default)."""
        w = self._w
        a, b = rows if rows is not None else (0, self.nlat)
        lat_f = self._lat_factor[:, a:b]  # (K, h)
        # (C, K, nlon): amp * cos(m * (lon - speed * t) + phase)
        arg = w.m[None, :, None] * (self.lon[None, None, :] - (w.speed * t)[None, :, None]) + w.phase[:, :, None]
        lon_f = w.amp[:, :, None] * torch.cos(arg)
        # an explicit sum over waves (not a matmul): the same float ops for every row slicing
        field = w.offset[:, None, None].expand(-1, b - a, self.nlon).clone()
        for k in range(lat_f.shape[0]):
            field += lat_f[k][None, :, None] * lon_f[:, k, None, :]
        return field.to(self.dtype)

    def sample(self, index: int, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of sample ``index`` (optionally only latitude rows ``[a, b)``)."""
        t = (index % self.length) * self.dt
        return self.state(t, rows), self.state(t + self.dt, rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(index)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full ``(B, C, H, W)`` inputs and targets."""
        xs, ys = zip(*(self.sample(i) for i in indices), strict=True)
        return torch.stack(xs), torch.stack(ys)

    def sharded_batch(self, indices: Sequence[int], manager: DomainParallelManager) -> tuple[DTensor, DTensor]:
        """``(B, C, H, W)`` DTensors ``Shard(2)`` on the domain mesh; each rank builds only its rows."""
        mesh = manager.domain_mesh
        rows = chunk_range(self.nlat, mesh.size(), mesh.get_local_rank())
        xs, ys = zip(*(self.sample(i, rows) for i in indices), strict=True)
        shape = (len(indices), self.channels, self.nlat, self.nlon)
        device = manager.device
        x = torch.stack(xs).to(device)
        y = torch.stack(ys).to(device)
        return wrap_local(x, mesh, 2, shape), wrap_local(y, mesh, 2, shape)


def sample_indices(step: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> list[int]:
    """Indices of step ``step`` for data-parallel rank ``dp_rank``: the global batch of the step
    is ``[step * global_batch, (step + 1) * global_batch)``, split into ``dp_size`` contiguous parts.
    One process with ``dp_size=1`` sees exactly the union of what the dp ranks see."""
    if global_batch % dp_size:
        raise ValueError(f"global batch {global_batch} is not divisible by dp={dp_size}")
    per = global_batch // dp_size
    start = step * global_batch + dp_rank * per
    return list(range(start, start + per))
