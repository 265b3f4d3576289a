"""Window reshapes on H-sharded tensors vs one device: ``view`` / ``reshape`` / ``flatten`` /
``unflatten`` / ``view_as`` / ``reshape_as`` splitting H into (H/w, w) windows and merging them back
(Swin's window partition / reverse, an einops ``rearrange`` written as view + permute, patch
embedding), token tensors (B, L, C) with heads split from channels, reshapes that do not touch H,
and ``permute`` / ``transpose`` / ``movedim`` / ``squeeze`` / ``unsqueeze`` (left to DTensor).

fp64, 1e-10 for the output and the input gradient, worlds 1-4, even, uneven (H=40, w=8 over 3
ranks: 2, 2, 1 windows) and tiny shards (H < ranks: empty shards), gather guard in ``raise`` mode.
Bytes received in forward and backward equal an independent count: the elements of each rank's
output shard (``torch.chunk`` of the sharded output dim) that another rank held in the input, and
the reverse in backward. A merge that cannot stay a ``torch.chunk`` shard raises the documented
error on every rank. Geometry is checked without processes against a brute-force ownership model.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from credit_dtensor.geometry import chunk_offsets
from credit_dtensor.geometry.window import (
    block_fits,
    moved_units,
    repartition,
    valid_domain_sizes,
    view_plan,
    window_fit,
)
from tests.harness import get_world, manager

TOL = 1e-10

# --- geometry, no processes ----------------------------------------------------------------------------


def _owners(shape: list[int], dim: int, world: int) -> torch.Tensor:
    """Owner rank of every element of a tensor of ``shape`` sharded torch.chunk-wise on ``dim``."""
    n = shape[dim]
    offs = chunk_offsets(n, world)
    rows = torch.tensor([next(r for r in range(world) if offs[r] <= i < offs[r + 1]) for i in range(n)] or [0])
    view = [1] * len(shape)
    view[dim] = n
    return rows[:n].reshape(view).expand(shape).contiguous()


def _brute(in_shape, out_shape, sd, od, world):
    """Per rank: (input flat indices held, output flat indices to hold, in order)."""
    idx = torch.arange(math.prod(in_shape))
    own_in = _owners(list(in_shape), sd, world).reshape(-1)
    own_out = _owners(list(out_shape), od, world).reshape(-1)
    flat_out = idx.reshape(out_shape).reshape(-1)
    return [(idx[own_in == r].tolist(), flat_out[own_out == r].tolist()) for r in range(world)]


def _reshapes(rng: random.Random):
    """Random reshapes of random shapes (split / merge / regroup around the sharded dim)."""
    for _ in range(400):
        dims = [rng.choice([1, 2, 3, 4, 5, 6, 8]) for _ in range(rng.randint(1, 4))]
        sd = rng.randrange(len(dims))
        total = math.prod(dims)
        out, rest = [], total
        while rest > 1 and len(out) < 4:
            f = rng.choice([d for d in range(1, rest + 1) if rest % d == 0])
            out.append(f)
            rest //= f
        out.append(rest)
        rng.shuffle(out)
        yield dims, out, sd, rng.randint(1, 5)


def test_view_plan_matches_brute_force_ownership():
    """local <=> every rank already holds its output shard; rechunk moves exactly the right runs;
    unsupported only where a rank's elements are not one contiguous run of the group."""
    kinds = set()
    for in_shape, out_shape, sd, world in _reshapes(random.Random(0)):
        plan = view_plan(in_shape, out_shape, sd, world)
        assert plan is not None, (in_shape, out_shape)
        kinds.add(plan.kind)
        per_rank = _brute(in_shape, out_shape, sd, plan.out_dim, world)
        if plan.kind == "local":
            assert all(a == b for a, b in per_rank), (in_shape, out_shape, sd, world, plan)
            continue
        if plan.kind == "unsupported":
            assert plan.outer and math.prod(plan.outer) > 1 and in_shape[sd] > 1 and world > 1
            continue
        # simulate: units of ``unit`` elements of the flattened group, owned per in_units / out_units
        assert plan.in_units[-1] == plan.out_units[-1]
        pre = math.prod(in_shape[: plan.start])
        post = math.prod(in_shape[plan.stop :])
        group = math.prod(in_shape[plan.start : plan.stop])
        full = torch.arange(math.prod(in_shape)).reshape(pre, group // plan.unit, plan.unit, post)
        for r, (have, want) in enumerate(per_rank):
            mine = full[:, plan.in_units[r] : plan.in_units[r + 1]].reshape(-1).tolist()
            assert sorted(mine) == sorted(have), (in_shape, out_shape, sd, world, r)
            got = full[:, plan.out_units[r] : plan.out_units[r + 1]].reshape(-1).tolist()
            assert got == want, (in_shape, out_shape, sd, world, r, plan)
    assert kinds == {"local", "rechunk", "unsupported"}


def test_window_split_is_local_exactly_when_shards_hold_whole_windows():
    for world in range(1, 7):
        for w in (1, 2, 3, 4, 8):
            for count in range(0, 13):
                n = count * w
                if n == 0:
                    continue
                plan = view_plan((2, n, 5), (2, count, w, 5), 1, world)
                fit = window_fit(n, world, w)
                assert block_fits(n, world, w) == fit.aligned and fit.divisible
                if count == 1:  # a single window row is H itself: the view stays sharded on the row dim
                    assert plan.local and plan.out_dim == (2 if n > 1 else 1), (n, w, world, plan)
                    continue
                assert plan.local == fit.aligned and plan.out_dim == 1, (n, w, world, plan)
                # rows after the split: rank r holds windows torch.chunk(count)[r]
                offs = chunk_offsets(count, world)
                assert fit.rows == tuple((w * offs[r], w * offs[r + 1]) for r in range(world))
                if not plan.local:
                    assert plan.in_units == tuple(chunk_offsets(n, world))
                    for r in range(world):
                        assert moved_units(plan.in_units, plan.out_units, r) == fit.moved[r]
    fit = window_fit(40, 3, 8)
    assert fit.windows == (2, 2, 1) and not fit.aligned and fit.moved == (2, 4, 0)
    assert "re-chunked" in fit.describe() and "2, 2, 1" in fit.describe()
    assert window_fit(10, 3, 2).aligned and window_fit(10, 3, 2).windows == (2, 2, 1)
    assert valid_domain_sizes(32, 8, 8) == [1, 2, 4] and valid_domain_sizes(40, 8, 6) == [1, 5]


def test_repartition_plan_sends_what_peers_receive():
    rng = random.Random(1)
    for _ in range(200):
        world = rng.randint(1, 5)
        total = rng.randint(0, 30)
        cuts = sorted(rng.randint(0, total) for _ in range(world - 1))
        cuts2 = sorted(rng.randint(0, total) for _ in range(world - 1))
        a, b = (0, *cuts, total), (0, *cuts2, total)
        plans = [repartition(a, b, r) for r in range(world)]
        for r, p in enumerate(plans):
            assert sum(c for _, _, c in p.pieces) == p.out_len == b[r + 1] - b[r]
            for s, _, c in p.pieces:
                if s != r:
                    assert sum(cc for d, _, cc in plans[s].sends if d == r) == c


# --- distributed: reshapes vs one device ---------------------------------------------------------------


def _cases(h: int, w: int) -> dict[str, tuple[list, bool]]:
    """name -> (steps, pure) on a (2, 4, h, 8) tensor sharded on H (h % w == 0). Each step is one
    reshape (with the permutes around it); ``pure``: only reshapes/permutes, so the bytes of each
    step are counted independently from element identities."""
    nh, nw = h // w, 8 // w

    def cl(x):  # channels-last (B, H, W, C), sharded on dim 1
        return x.permute(0, 2, 3, 1)

    def part(x):  # Swin window partition, first step (split H and W), windows on dims 1-2
        return cl(x).reshape(2, nh, w, nw, w, 4).permute(0, 1, 3, 2, 4, 5)

    def unpart(t):  # window reverse, last step: merge (nH, w) back to H
        return t.permute(0, 1, 3, 2, 4, 5).reshape(2, h, 8, 4).permute(0, 3, 1, 2)

    def patches(x):  # einops: rearrange(x, 'b c (h s1) (w s2) -> b h w (s1 s2 c)')
        return x.view(2, 4, nh, w, nw, w).permute(0, 2, 4, 3, 5, 1).reshape(2, nh, nw, -1)

    def unpatch(t):  # einops: rearrange(t, 'b h w (s1 s2 c) -> b c (h s1) (w s2)')
        return t.view(2, nh, nw, w, w, 4).permute(0, 5, 1, 3, 2, 4).reshape(2, 4, h, 8)

    def tokens(x):  # (B, L=H*W, C) sharded on L
        return x.flatten(2).transpose(1, 2)

    return {
        "view_split": ([lambda x: x.view(2, 4, nh, w, 8)], True),
        "unflatten_split": ([lambda x: x.unflatten(2, (-1, w))], True),
        "torch_unflatten": ([lambda x: torch.unflatten(x, 2, (nh, w))], True),
        "split_then_merge": ([lambda x: x.view(2, 4, nh, w, 8), lambda t: t.flatten(2, 3)], True),
        "torch_reshape_merge": ([lambda x: torch.reshape(x.view(2, 4, nh, w, 8) + 1, (2, 4, h, 8))], False),
        "window_partition": ([lambda x: part(x).contiguous()], True),
        "window_reverse": ([part, unpart], True),
        "einops_patches": ([patches], True),
        "einops_round_trip": ([patches, unpatch], True),
        "tokens": ([tokens], True),
        "tokens_heads": (
            [lambda x: tokens(x).reshape(2, h * 8, 2, 2).transpose(1, 2).reshape(2, 2, h * 8, 2) * 3],
            False,
        ),
        "tokens_back": ([lambda x: torch.flatten(x, 2).transpose(1, 2), lambda t: t.reshape(2, h, 8, 4)], True),
        "merge_cw": ([lambda x: x.permute(0, 2, 1, 3).reshape(2, h, 32)], True),  # C and W merged: local
        "split_channels": ([lambda x: x.view(2, 2, 2, h, 8).sum(1)], False),
        "view_as": ([lambda x: x.view(2, 4, nh, w, 8).view_as(x) * 2], False),
        "reshape_as": ([lambda x: x.flatten(2), lambda t: t.reshape_as(torch.empty(2, 4, h, 8))], True),
        "one_image_pixels": ([lambda x: x[:1, :1].flatten()], True),  # (1, 1, H, W) -> H*W
        "permute_transpose_movedim": ([lambda x: x.permute(0, 2, 3, 1).transpose(1, 2).movedim(2, 0) * 2], False),
        "unsqueeze_squeeze": ([lambda x: x.unsqueeze(2).squeeze(2).unsqueeze(0)[0] + 1], False),
    }


def _step_recv(fn, in_shape, sd: int, od: int, world: int, rank: int) -> tuple[int, int]:
    """Independent count (elements) of one reshape step, forward and backward: trace element
    identities through ``fn`` on an index tensor, then compare ``torch.chunk`` owners."""
    idx = torch.arange(math.prod(in_shape), dtype=torch.float64).reshape(in_shape)
    out = fn(idx)
    src_owner = _owners(list(in_shape), sd, world).reshape(-1)[out.reshape(-1).long()]
    mine_out = _owners(list(out.shape), od, world).reshape(-1) == rank
    return int((mine_out & (src_owner != rank)).sum()), int(((src_owner == rank) & ~mine_out).sum())


def _window_task(hws: list[tuple[int, int]]) -> dict[str, float]:
    import credit_dtensor as cd
    from credit_dtensor.dtensor import domain_shard_dim

    m = manager()
    world, rank = m.domain_world_size, m.domain_rank
    errors: dict[str, float] = {}
    for h, w in hws:
        g = torch.Generator().manual_seed(h * 10 + w)
        x = torch.randn(2, 4, h, 8, generator=g, dtype=torch.float64)
        for name, (steps, pure) in _cases(h, w).items():
            key = f"H={h} w={w} {name}"
            xr = yr = x.clone().requires_grad_()
            for fn in steps:
                yr = fn(yr)
            gy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
            yr.backward(gy)
            xs = y = cd.shard_tensor(x.clone(), m, 2).requires_grad_()
            expect_f = expect_b = got_f = 0
            for fn in steps:
                sd, shape = domain_shard_dim(y), tuple(y.shape)
                with cd.gather_policy("raise"), cd.comm_stats() as fwd:
                    y = fn(y)
                got_f += fwd.recv_bytes
                if pure:
                    ef, eb = _step_recv(fn, shape, sd, domain_shard_dim(y), world, rank)
                    expect_f, expect_b = expect_f + 8 * ef, expect_b + 8 * eb
            with cd.gather_policy("raise"), cd.comm_stats() as bwd:
                y.backward(cd.shard_tensor(gy, m, domain_shard_dim(y)))
            errors[f"{key}: out"] = (y.full_tensor() - yr).abs().max().item() if yr.numel() else 0.0
            errors[f"{key}: grad"] = (xs.grad.full_tensor() - xr.grad).abs().max().item()
            errors[f"{key}: shape {tuple(y.shape)} vs {tuple(yr.shape)}"] = 0.0 if y.shape == yr.shape else math.inf
            if pure:
                ok = got_f == expect_f and bwd.recv_bytes == expect_b
                errors[f"{key}: recv fwd {got_f} B / bwd {bwd.recv_bytes} B vs {expect_f} / {expect_b}"] = (
                    0.0 if ok else math.inf
                )
    return errors


#: (H, w) per world: even, uneven (40 over 3: windows 2, 2, 1), windows that fit uneven shards
#: (10 over 3), tiny (H < ranks: empty shards)
HWS = {
    1: [(16, 4)],
    2: [(12, 4), (2, 2)],
    3: [(40, 8), (10, 2)],
    4: [(24, 8), (3, 1)],
}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_window_reshapes_match_one_device(world):
    for rank, errors in enumerate(get_world(world).run(_window_task, HWS[world])):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank}, world {world}: {bad}"
        assert len(errors) > 50 * len(HWS[world]), len(errors)


# --- the error for merges that cannot stay a torch.chunk shard ---------------------------------------


class _SwinPartitionAttention(nn.Module):
    """Window attention that does the whole partition itself (merging (B, nH, nW)), not shard-local."""

    def __init__(self, window_size: int = 4) -> None:
        super().__init__()
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window_size
        t = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        t = t.softmax(1)
        return t.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _merge_task() -> dict[str, str]:
    """Window partition merging (B, nH, nW) with B = 2: H is merged *under* the batch, so no rank's
    elements can be a torch.chunk shard of the merged dim. The merge runs where the merged dims are
    whole (the shards move to a dim outside the group, then to the merged one: two all-to-alls, no
    gather), exact; shard_local (windows inside shards) needs no communication. With every other
    dim smaller than the domain, a DomainParallelError names the module, the window and the fix."""
    import torch.distributed as dist

    import credit_dtensor as cd

    m = manager()
    out: dict[str, str] = {}
    x = torch.randn(2, 16, 8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = cd.convert_to_domain_parallel(nn.Sequential(_SwinPartitionAttention()), m)
    ref = nn.Sequential(_SwinPartitionAttention())
    xs = cd.shard_tensor(x, m, 1).requires_grad_()
    xr = x.clone().requires_grad_()
    with cd.gather_policy("raise"), cd.comm_stats() as st:
        y = model(xs)
        y.pow(2).sum().backward()
    ref(xr).pow(2).sum().backward()
    err = max((y.full_tensor() - ref(x)).abs().max().item(), (xs.grad.full_tensor() - xr.grad).abs().max().item())
    out["merge_err"] = str(err)
    share = x.numel() * x.element_size() / dist.get_world_size()
    out["merge_bytes_ok"] = str(st.recv_bytes <= 8 * share)  # 2 all-to-alls per reshape, 2 reshapes, fwd + bwd
    out["shard_local_err"] = "0"
    if dist.get_world_size() in (1, 2, 4):  # shards of 16 rows hold whole windows of 4
        shard_local = cd.convert_to_domain_parallel(
            nn.Sequential(_SwinPartitionAttention()), m, custom_converters={_SwinPartitionAttention: cd.shard_local}
        )
        with cd.gather_policy("raise"):
            y = shard_local(cd.shard_tensor(x, m, 1))
        out["shard_local_err"] = str((y.full_tensor() - ref(x)).abs().max().item())
    tiny = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    small = cd.convert_to_domain_parallel(nn.Sequential(_SwinPartitionAttention(window_size=2)), m)
    try:
        with cd.gather_policy("raise"):
            small(cd.shard_tensor(tiny, m, 1))
        out["tiny"] = "ran"
    except cd.DomainParallelError as exc:
        out["tiny"] = str(exc)
    return out


def test_merge_under_batch_is_exact_and_tiny_dims_raise_with_the_fix():
    for rank, out in enumerate(get_world(2).run(_merge_task)):
        assert float(out["merge_err"]) < TOL and out["merge_bytes_ok"] == "True", (rank, out)
        assert float(out["shard_local_err"]) < TOL, (rank, out)
        assert out["tiny"] == "ran", (rank, out)  # 2 ranks: every other dim has >= 2 entries
    for rank, out in enumerate(get_world(3).run(_merge_task)):
        assert float(out["merge_err"]) < TOL, (rank, out)
        msg = out["tiny"]
        for needle in ("0 (_SwinPartitionAttention)", "merged under dims of size 2", "shard_local", "this run: 3"):
            assert needle in msg, (rank, needle, msg)
