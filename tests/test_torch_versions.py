"""credit_dtensor._torch_versions: the one place that knows which torch release runs (2.11-2.14).

The suite as a whole runs on 2.11, 2.13 (CI) and 2.14 (docs/testing.md); this file tests the shim
module itself and the one DTensor behaviour it back-fills on 2.11/2.12.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard

import credit_dtensor as cd
from credit_dtensor import DomainParallelError, _torch_versions
from tests.harness import get_world, manager


def test_version_parse_and_compare():
    assert _torch_versions._parse("2.11.0+cu130") == (2, 11)
    assert _torch_versions._parse("2.14.1") == (2, 14)
    assert _torch_versions._parse("2.13.0a0+git1234") == (2, 13)
    assert _torch_versions.TORCH_VERSION == _torch_versions._parse(torch.__version__)
    assert _torch_versions.TORCH_VERSION >= _torch_versions.MIN_TORCH
    assert _torch_versions.at_least(*_torch_versions.MIN_TORCH)
    assert not _torch_versions.at_least(99, 0)


def test_require_names_the_release_needed():
    _torch_versions.require(*_torch_versions.MIN_TORCH, "anything")  # the running torch has it
    with pytest.raises(DomainParallelError, match=r"time travel needs torch>=99\.1; this is torch 2\."):
        _torch_versions.require(99, 1, "time travel")


def test_min_torch_matches_pyproject():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    low = re.search(r'"torch>=(\d+)\.(\d+),<', text)
    assert low and (int(low.group(1)), int(low.group(2))) == _torch_versions.MIN_TORCH


def test_ieee_fp32_turns_tf32_off_and_restores():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    with _torch_versions.ieee_fp32():
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        assert matmul.fp32_precision == "ieee"  # what inductor reads
    assert (matmul.allow_tf32, cudnn.allow_tf32) == before


def test_backfills_only_where_needed():
    expected = () if _torch_versions.at_least(2, 13) else ("leaf_gradient_stride", "replicated_conv_backward")
    assert _torch_versions.installed() == expected
    _torch_versions.install()  # idempotent
    assert _torch_versions.installed() == expected


def _leaf_grad_task(h: int) -> list:
    """Gradients of unevenly sharded / empty-shard leaves stay Shard(2) with no all-gather."""
    m = manager()
    x = torch.randn(2, 3, h, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = []
    for name, fn in (
        ("mul", lambda t: t * 2),
        ("silu", torch.nn.functional.silu),
        ("mean", lambda t: t.mean()),
        ("flatten", lambda t: t.flatten(2)),
    ):
        xs = cd.shard_tensor(x, m, 2).requires_grad_()
        xr = x.clone().requires_grad_()
        with cd.gather_policy("raise"):
            y = fn(xs)
            y.backward(torch.ones_like(y))
        fn(xr).backward(torch.ones_like(fn(xr)))
        g = xs.grad
        out.append(
            (
                name,
                isinstance(g, DTensor) and tuple(g.placements) == (Shard(2),),
                tuple(g.stride()) == tuple(xs.stride()),
                float((g.full_tensor() - xr.grad).abs().max()),
            )
        )
    return out


@pytest.mark.parametrize("world,h", [(2, 13), (3, 2)])
def test_uneven_leaf_gradient_stays_sharded(world, h):
    for rank, res in enumerate(get_world(world).run(_leaf_grad_task, h)):
        for name, sharded, strided, exact in res:
            assert sharded and strided and exact <= 1e-10, (world, h, rank, name, sharded, strided, exact)


@pytest.mark.skipif(
    _torch_versions.at_least(2, 13), reason="2.13+ compiles converted blocks as one graph (tests/test_compile.py)"
)
def test_fullgraph_block_compile_is_refused_before_2_13():
    from credit_dtensor.parallelize import apply_compile

    block = torch.nn.Linear(2, 2)
    forward = block.forward
    with pytest.raises(DomainParallelError, match=r"needs torch>=2\.13; this is torch 2\.1[12]"):
        apply_compile([block])
    assert block.forward == forward  # nothing was wrapped


def test_flop_counter_counts_the_same_total():
    from torch.utils.flop_counter import FlopCounterMode

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with _torch_versions.flop_counter(FlopCounterMode(display=False)) as fc:
        torch.mm(a, b)
    assert fc.get_total_flops() == 2 * 4 * 8 * 3


def test_is_plain_shard():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    assert _torch_versions.is_plain_shard(Shard(2))
    assert not _torch_versions.is_plain_shard(Replicate())
    assert not _torch_versions.is_plain_shard(Partial())
    assert not _torch_versions.is_plain_shard(_StridedShard(2, split_factor=2))


class _Gate(torch.nn.Module):
    """Squeeze-excitation: global pooling over H (Replicate), 1x1 convs on the pooled tensor, a gate."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.squeeze, self.excite = torch.nn.Conv2d(c, 2, 1), torch.nn.ConvTranspose2d(2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.excite(torch.relu(self.squeeze(self.pool(x)))))


def _replicated_conv_task(h: int) -> dict:
    import copy

    m = manager()
    torch.manual_seed(0)
    ref = _Gate().double()
    dp = cd.convert_to_domain_parallel(copy.deepcopy(ref), m)
    x = torch.randn(2, 4, h, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.randn(2, 4, h, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref(x).backward(g)
    with cd.gather_policy("raise"):
        dp(cd.shard_tensor(x, m, 2)).backward(cd.shard_tensor(g, m, 2))
    return {
        n: float((p.grad.full_tensor() - q.grad).abs().max() / q.grad.abs().max())
        for (n, p), q in zip(dp.named_parameters(), ref.parameters())
    }


@pytest.mark.parametrize("world,h", [(2, 13), (3, 16)])
def test_convolution_of_a_replicated_activation_has_exact_weight_gradients(world, h):
    """torch 2.11's DTensor returns N x the weight gradient here (its rule declares it Partial)."""
    for rank, errs in enumerate(get_world(world).run(_replicated_conv_task, h)):
        assert errs and max(errs.values()) < 1e-12, (world, rank, errs)
