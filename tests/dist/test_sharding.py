"""Sharding along time: contiguous bounds for any T ≥ P, zigzag pieces, and shard → gather round trips on real gloo
process groups (uneven last shards included)."""

import pytest
import torch
import torch.distributed as dist

from pflow_dist.dist import gather_sequence, shard_bounds, shard_sequence, zigzag_indices
from pflow_dist.testing import run_distributed


@pytest.mark.parametrize("T, P", [(10, 3), (7, 7), (64, 4), (5, 1)])
def test_shard_bounds_cover_t_in_order(T, P):
    b = shard_bounds(T, P)
    assert b[0][0] == 0 and b[-1][1] == T and all(b[i][1] == b[i + 1][0] for i in range(P - 1))
    sizes = [e - s for s, e in b]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_bounds_errors():
    with pytest.raises(ValueError, match="cannot shard T=2 tokens over 3 ranks"):
        shard_bounds(2, 3)
    with pytest.raises(ValueError, match="zigzag sharding needs T divisible by 2\\*world_size=4, got T=6"):
        zigzag_indices(6, 2, 0)


def test_zigzag_is_a_permutation():
    idx = torch.cat([zigzag_indices(16, 4, r) for r in range(4)])
    assert sorted(idx.tolist()) == list(range(16))
    assert zigzag_indices(16, 4, 0).tolist() == [0, 1, 14, 15]


def _round_trip(rank, world, T, layout):
    x = torch.arange(2 * T * 3, dtype=torch.float32).reshape(2, T, 3)
    local = shard_sequence(x, dist.group.WORLD, dim=1, layout=layout)
    back = gather_sequence(local, dist.group.WORLD, dim=1, layout=layout)
    return torch.equal(back, x), local.shape[1]


@pytest.mark.dist
@pytest.mark.parametrize("world, T, layout", [(3, 10, "contiguous"), (2, 8, "zigzag")])
def test_shard_gather_round_trip(world, T, layout):
    out = run_distributed(_round_trip, world, T, layout)
    assert all(ok for ok, _ in out)
    assert sum(n for _, n in out) == T
