"""Row-moving ops on H-sharded tensors vs one device, written as models write them: ``torch.roll``
(Swin's shifted windows), slicing, ``narrow``, ``index_select``, ``flip``, ``split``/``chunk``,
``cat``, ``repeat_interleave``, ``repeat``, ``tensor_split``, functional ``F.pad`` in every mode on H and on W (CREDIT's periodic longitude padding).

fp64 1e-10 for output and input gradient, worlds 1-4, even / uneven / empty shards, gather guard in
``raise`` mode, and the bytes received equal an independent count: the rows of each rank's output
chunk (``torch.chunk`` of the output length) whose source row another rank owns.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import get_world, manager

TOL = 1e-10


def _chunk(n: int, world: int, r: int) -> tuple[int, int]:
    size = -(-n // world) if n else 0
    return min(r * size, n), min((r + 1) * size, n)


def _min_recv_rows(sources: list[int | None], n_in: int, world: int, rank: int) -> int:
    """Rows of rank's output chunk whose source is owned by another rank (each distinct row once)."""
    o0, o1 = _chunk(len(sources), world, rank)
    a, b = _chunk(n_in, world, rank)
    return len({s for s in sources[o0:o1] if s is not None and not a <= s < b})


# name -> (function, sources along H for an input of H rows, or None when H is not moved)
def _cases(h: int):
    return {
        "roll_h": (lambda x: torch.roll(x, 3, 2), [(i - 3) % h for i in range(h)]),
        "roll_hw": (lambda x: torch.roll(x, shifts=(-2, 1), dims=(2, 3)), [(i + 2) % h for i in range(h)]),
        "roll_w": (lambda x: x.roll(1, -1), None),
        "flip_h": (lambda x: torch.flip(x, dims=(2,)), list(range(h - 1, -1, -1))),
        "flip_hw_method": (lambda x: x.flip(2, 3), list(range(h - 1, -1, -1))),
        "slice_h": (lambda x: x[:, :, 1 : h - 1], list(range(1, h - 1))),
        "slice_step": (lambda x: x[..., ::2, 1:], list(range(0, h, 2))),
        "slice_none": (lambda x: x[:, None, :, 2:4], None),
        "slice_c_int": (lambda x: x[:, 1], None),
        "narrow": (lambda x: x.narrow(2, h // 3, h - h // 3 - 1), list(range(h // 3, h - 1))),
        "index_select": (lambda x: torch.index_select(x, 2, torch.tensor([h - 1, 0, 1, 0])), [h - 1, 0, 1, 0]),
        "split_cat": (lambda x: torch.cat(list(reversed(torch.split(x, 3, dim=2))), dim=2), None),
        "chunk_sum": (lambda x: sum(c.sum() for c in x.chunk(3, dim=2)), None),
        "cat_plain": (lambda x: torch.cat([x, torch.ones(2, 3, 2, 5, dtype=x.dtype)], dim=2), None),
        "cat_channels": (lambda x: torch.cat([x, x * 2], dim=1), None),
        "pad_circular_w": (lambda x: F.pad(x, (2, 2, 0, 0), mode="circular"), None),
        "periodic_then_reflect": (
            lambda x: F.pad(F.pad(x, (1, 1, 0, 0), mode="circular"), (0, 0, 1, 1), mode="reflect"),
            None,
        ),
        "pad_circular_h": (lambda x: F.pad(x, (0, 0, 2, 1), mode="circular"), None),
        "pad_replicate": (lambda x: F.pad(x, (1, 0, 2, 2), mode="replicate"), None),
        "pad_constant": (lambda x: F.pad(x, (0, 1, 1, 3), value=0.5), None),
        # nearest upsampling by hand: output row j is input row j // r
        "repeat_interleave_h": (lambda x: x.repeat_interleave(2, dim=2), [i // 2 for i in range(2 * h)]),
        "repeat_interleave_hw": (
            lambda x: torch.repeat_interleave(x, 3, dim=-2).repeat_interleave(2, dim=3),
            [i // 3 for i in range(3 * h)],
        ),
        "repeat_interleave_c": (lambda x: x.repeat_interleave(2, 1), None),
        # tiling: output row j is input row j % n
        "repeat_h": (lambda x: x.repeat(1, 1, 2, 1), list(range(h)) * 2),
        "repeat_chw": (lambda x: x.repeat((1, 2, 3, 2)), list(range(h)) * 3),
        "repeat_w": (lambda x: x.repeat(1, 1, 1, 3), None),
        "repeat_is_a_copy": (lambda x: (lambda y: (y.repeat(1, 1, 1, 1).mul_(3), y)[1])(x * 1), None),
        # a list of lists: the rows of every piece tensor_split makes (the minimum counts them all)
        "tensor_split_piece": (lambda x: torch.tensor_split(x, 3, dim=2)[1], _sections(h, 3)),
        "tensor_split_indices": (
            lambda x: x.tensor_split([2, 7, 40], dim=-2)[1],
            [list(range(min(a, h), min(b, h))) for a, b in zip([0, 2, 7, 40], [2, 7, 40, h])],
        ),
        "tensor_split_sum": (lambda x: sum((i + 1) * p.sum() for i, p in enumerate(x.tensor_split(5, 2))), None),
        "tensor_split_write": (lambda x: (lambda y: (y.tensor_split(3, dim=2)[1].mul_(2), y)[1])(x * 1), None),
        # one row broadcast against every row (a pole or boundary row): it travels from its owner
        "sub_first_row": (lambda x: x - x[:, :, :1], ("row", 0, 8)),
        "mul_last_row": (lambda x: x * x[:, :, -1:], ("row", h - 1, 8)),
        "where_row": (lambda x: torch.where(x[:, :, 1:2] > 0, x, -x), ("row", 1, 1)),  # a bool mask row
        "expand_row": (lambda x: x[:, :, 1:2].expand_as(x) * 2, ("row", 1, 8)),
        "broadcast_row": (lambda x: torch.broadcast_to(x[:, :, -1:], (2, 3, h, 5)) + x, ("row", h - 1, 8)),
        "isub_first_row": (lambda x: (x * 1).sub_(x[:, :, :1]), ("row", 0, 8)),
        "imul_last_row": (lambda x: (x + 0).mul_(x[:, :, -1:]), ("row", h - 1, 8)),
        "readout_token": (
            lambda x: (lambda t: torch.cat([t[:, 1:], t[:, :1].expand_as(t[:, 1:])], dim=2))(x.flatten(2).mT),
            None,
        ),
    }


def _sections(n: int, k: int) -> list[list[int]]:
    """The rows of ``torch.tensor_split(range(n), k)``'s pieces (the first ``n % k`` one longer)."""
    sizes = [n // k + (i < n % k) for i in range(k)]
    return [list(range(sum(sizes[:i]), sum(sizes[: i + 1]))) for i in range(k)]


def _task(h: int, only: str | None = None) -> dict[str, float]:
    import credit_dtensor as cd

    m = manager()
    world, rank = m.domain_world_size, m.domain_rank
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, h, 5, generator=g, dtype=torch.float64)
    errors: dict[str, float] = {}
    for name, (fn, sources) in _cases(h).items():
        if only and name != only:
            continue
        if name in ("pad_circular_h",) and h < 2:
            continue
        if name.startswith("periodic") and h < 2:
            continue
        xr = x.clone().requires_grad_()
        yr = fn(xr)
        gy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
        yr.backward(gy)
        xs = cd.shard_tensor(x.clone(), m, 2).requires_grad_()
        with cd.gather_policy("raise"), cd.comm_stats() as s:
            y = fn(xs)
        if cd.dtensor.domain_shard_dim(y) is None:  # a scalar, or a row expanded on every rank
            gys = cd.dtensor.wrap_replicate(gy, m.domain_mesh)
        else:
            gys = cd.shard_tensor(gy, m, cd.dtensor.domain_shard_dim(y))
        with cd.gather_policy("raise"):
            y.backward(gys)
        errors[f"{name}: out"] = (y.full_tensor() - yr).abs().max().item() if yr.numel() else 0.0
        errors[f"{name}: grad"] = (xs.grad.full_tensor() - xr.grad).abs().max().item()
        if isinstance(sources, tuple):
            # ("row", r, bytes per element): the slice puts row r on rank 0 (torch.chunk's owner of a
            # one-row tensor), which broadcasts it: rank 0 receives it unless it owns it, the others once
            owner = next(q for q in range(world) if _chunk(h, world, q)[0] <= sources[1] < _chunk(h, world, q)[1])
            if rank == 0:
                expect = 0 if owner == 0 else x.numel() // h * 8  # the sliced (float) row
            else:
                expect = x.numel() // h * sources[2]  # the broadcast row (a bool mask's is 1 byte)
            errors[f"{name}: recv {s.recv_bytes} B != one row {expect} B"] = 0.0 if s.recv_bytes == expect else math.inf
        elif sources is not None:
            row_bytes = x.numel() // h * 8
            pieces = sources if sources and isinstance(sources[0], list) else [sources]  # every piece is made
            expect = sum(_min_recv_rows(p, h, world, rank) for p in pieces) * row_bytes
            errors[f"{name}: recv {s.recv_bytes} B != minimum {expect} B"] = 0.0 if s.recv_bytes == expect else math.inf
    return errors


def _check(world: int, h: int) -> None:
    for rank, errors in enumerate(get_world(world).run(_task, h)):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank}, world {world}, H={h}: {bad}"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [12, 13])
def test_row_ops_match_one_device(world, h):
    _check(world, h)


@pytest.mark.parametrize("world", [3, 4])
def test_row_ops_with_empty_shards(world):
    _check(world, 2)


def _roll_slice_task(h: int, shift: int, start: int, step: int) -> bool:
    import credit_dtensor as cd

    m = manager()
    x = torch.arange(2 * h * 3, dtype=torch.float64).reshape(1, 2, h, 3)
    xs = cd.shard_tensor(x, m, 2)
    with cd.gather_policy("raise"):
        ok = torch.equal(torch.roll(xs, shift, 2).full_tensor(), torch.roll(x, shift, 2))
        ok = ok and torch.equal(xs[:, :, start:, :][:, :, ::step].full_tensor(), x[:, :, start:, :][:, :, ::step])
    return ok


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    world=st.integers(2, 4),
    h=st.integers(1, 17),
    shift=st.integers(-20, 20),
    start=st.integers(-3, 8),
    step=st.integers(1, 3),
)
def test_roll_and_slice_property(world, h, shift, start, step):
    assert all(get_world(world).run(_roll_slice_task, h, shift, start, step))
