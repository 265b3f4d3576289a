"""Conv wrappers and functional rules: placements, parametrizations, state_dict, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from tests.harness import get_world, manager
from tests.parity import assert_parity, parity


def _placements_task() -> dict:
    from credit_dtensor import DomainParallelConv2d, shard_tensor

    m = manager()
    mesh = m.domain_mesh
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 4, 3, padding=1).double()
    mod = DomainParallelConv2d(copy.deepcopy(ref), m)
    x = torch.randn(2, 3, 10, 6, dtype=torch.float64)
    out = {}
    # Replicate input: computes locally, stays Replicate
    y = mod(distribute_tensor(x, mesh, [Replicate()]))
    out["replicate"] = (tuple(y.placements) == (Replicate(),), (y.full_tensor() - ref(x)).abs().max().item())
    # batch-sharded: no halo needed, stays Shard(0)
    y = mod(distribute_tensor(x, mesh, [Shard(0)]))
    out["batch"] = (tuple(y.placements) == (Shard(0),), (y.full_tensor() - ref(x)).abs().max().item())
    # plain tensor input is sharded on H and the output is an H-sharded DTensor
    y = mod(x)
    out["plain"] = (
        isinstance(y, DTensor) and tuple(y.placements) == (Shard(2),),
        (y.full_tensor() - ref(x)).abs().max().item(),
    )
    # the module is still an nn.Conv2d with the same state_dict keys
    out["isinstance"] = isinstance(mod, nn.Conv2d)
    out["keys"] = list(mod.state_dict()) == list(ref.state_dict())
    # functional conv with a plain weight: gradient summed over the domain
    xs = shard_tensor(x, m, 2).requires_grad_()
    w = ref.weight.detach().clone().requires_grad_()
    F.conv2d(xs, w, padding=1).sum().backward()
    wr = ref.weight.detach().clone().requires_grad_()
    F.conv2d(x, wr, padding=1).sum().backward()
    out["plain_weight_grad"] = (w.grad - wr.grad).abs().max().item()
    return out


def _parametrized_task() -> None:
    from credit_dtensor import DomainParallelConv2d, DomainParallelConvTranspose2d  # noqa: I001

    m = manager()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 11, 5, dtype=torch.float64)
    for train, make in (
        (True, lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1).double())),
        (False, lambda: nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1).double())),
        (True, lambda: nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1).double())),
        (True, lambda: nn.utils.weight_norm(nn.Conv2d(3, 4, 3, padding=1).double())),  # forward pre-hook style
        (True, lambda: nn.utils.spectral_norm(nn.Conv2d(3, 4, 3, padding=1).double())),  # forward pre-hook style
        (
            True,
            lambda: nn.utils.parametrizations.weight_norm(nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1).double()),
        ),
    ):
        torch.manual_seed(2)
        ref = make()
        ref.train(train)  # train: spectral norm runs its power iteration on both sides
        torch.manual_seed(2)
        dist_mod = make().train(train)  # old-style weight_norm cannot be deep-copied: build twice
        wrapper = DomainParallelConvTranspose2d if isinstance(ref, nn.ConvTranspose2d) else DomainParallelConv2d
        dist_mod = wrapper(dist_mod, m)
        assert list(dist_mod.state_dict()) == list(ref.state_dict())
        errs = parity(
            m,
            ref,
            dist_mod,
            [x],
            shard_dims=[2],
            out_dim=2,
            ref_params=dict(ref.named_parameters()),
            dist_params=dict(dist_mod.named_parameters()),
        )
        assert_parity(errs, torch.float64, type(ref).__name__)


def _bad_input_task() -> dict:
    from credit_dtensor import DomainParallelConv2d, DomainParallelError, DomainParallelManager, shard_tensor

    m = manager()
    mesh = m.domain_mesh
    x = torch.randn(2, 4, 8, 6)
    w = torch.randn(4, 4, 3, 3)
    msgs = {}

    def expect(name, fn):
        try:
            fn()
        except DomainParallelError as e:
            msgs[name] = (type(e).__name__, str(e))
        else:
            msgs[name] = None

    # channel-sharded input (heads merged back into channels): re-laid out onto H, exact
    xg = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    wg = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    yc = F.conv2d(distribute_tensor(xg, mesh, [Shard(1)]), distribute_tensor(wg, mesh, [Replicate()]), padding=1)
    msgs["channels"] = (str(yc.placements), (yc.full_tensor() - F.conv2d(xg, wg, padding=1)).abs().max().item())
    # sharded weight
    expect("weight", lambda: F.conv2d(shard_tensor(x, m, 2), distribute_tensor(w, mesh, [Shard(0)])))
    # input and module on different meshes
    other = DomainParallelManager(1, device_type="cpu")
    mod = DomainParallelConv2d(nn.Conv2d(4, 4, 3, padding=1), other)
    expect("mesh", lambda: mod(shard_tensor(x, m, 2)))
    # reflect padding wider than the input (PyTorch rejects it too)
    mod2 = DomainParallelConv2d(nn.Conv2d(4, 4, 5, padding=2, padding_mode="reflect"), m)
    expect("reflect", lambda: mod2(shard_tensor(torch.randn(1, 4, 2, 6), m, 2)))
    return msgs


@pytest.mark.parametrize("size", [2, 3])
def test_placements_and_plain_weights(size):
    for r in get_world(size).run(_placements_task):
        assert r["replicate"][0] and r["replicate"][1] < 1e-12
        assert r["batch"][0] and r["batch"][1] < 1e-12
        assert r["plain"][0] and r["plain"][1] < 1e-12
        assert r["isinstance"] and r["keys"]
        assert r["plain_weight_grad"] < 1e-12


@pytest.mark.parametrize("size", [3])
def test_parametrizations_and_hooks(size):
    get_world(size).run(_parametrized_task)


def test_bad_input_errors():
    """Every rank raises the specific DomainParallelError subclass, naming the constraint and the fix."""
    expect = {
        "weight": ("UnsupportedShardingError", ("weight placements", "Replicate")),
        "mesh": ("MeshMismatchError", ("mesh", "same manager")),
        "reflect": ("DomainParallelError", ("reflect padding", "must be < input size")),
    }
    for rank, r in enumerate(get_world(2).run(_bad_input_task)):
        assert r["channels"][0] == "(Shard(dim=2),)" and r["channels"][1] < 1e-5, (rank, r["channels"])
        for key, (cls, words) in expect.items():
            assert r[key] is not None, (rank, key, "no error raised")
            got_cls, msg = r[key]
            assert got_cls == cls and all(w in msg for w in words), (rank, key, got_cls, msg)


def test_interior_rows_are_the_ones_that_need_no_halo():
    """The overlap split (interior rows computed while the halo travels) against brute force: the
    interior output rows read only own rows, the edge pieces cover the rest exactly."""
    from credit_dtensor.halo import own_rows
    from credit_dtensor.ops.conv_ops import _interior, _setup, encode
    from credit_dtensor.ops.conv_spec import ConvSpec

    x = torch.empty(1, 1, 13, 4)
    for k, s, d, p in [(3, 1, 1, 1), (5, 1, 1, 2), (3, 2, 1, 1), (3, 1, 2, 2), (4, 2, 1, 1), (1, 2, 1, 0)]:
        spec = ConvSpec(2, False, (k, 1), (s, 1), (p, 0), (p, 0), (d, 1), (0, 0), 1, "zeros")
        for world in (2, 3, 4):
            for rank in range(world):
                _, hplan, loc = _setup(x, encode(spec), 13, 2, world, rank)
                split = _interior(spec, hplan, loc)
                if split is None:
                    continue
                j0, j1, x0, rows = split
                pos, start, count = own_rows(hplan)
                assert 0 <= j0 < j1 <= loc.out_rows
                for j in range(j0, j1):  # ext rows [j*s, j*s + d*(k-1)] lie in the own run
                    assert pos <= j * s and j * s + d * (k - 1) < pos + count, (k, s, d, world, rank, j)
                assert start <= x0 and x0 + rows <= start + count
                assert (rows - d * (k - 1) - 1) // s + 1 == j1 - j0
