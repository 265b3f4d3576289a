import pytest
import torch

from tests.harness import RankError, get_world, manager


def _roundtrip(h: int) -> list[int]:
    from credit_dtensor import gather_tensor, shard_tensor

    m = manager()
    x = torch.arange(2 * 3 * h * 4, dtype=torch.float64).reshape(2, 3, h, 4)
    dt = shard_tensor(x, m, 2)
    assert torch.equal(gather_tensor(dt, m), x)
    return list(dt.to_local().shape)


def _boom() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_roundtrip(size):
    shapes = get_world(size).run(_roundtrip, 5)
    assert sum(s[2] for s in shapes) == 5


def test_failing_rank_fails_fast():
    with pytest.raises(RankError, match="boom on purpose"):
        get_world(2).run(_boom, timeout=60)
    # the world is usable again afterwards
    assert len(get_world(2).run(_roundtrip, 3)) == 2
