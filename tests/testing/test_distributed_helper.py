"""run_distributed spawns real gloo process groups: results per rank, a failing rank is reported with its traceback,
and a rank stuck in a collective whose peer died fails on the collective timeout instead of hanging."""

import time

import pytest
import torch
import torch.distributed as dist

from pflow_dist.testing import DistributedRunError, run_distributed

pytestmark = pytest.mark.dist


def _all_reduce(rank: int, world: int, scale: float):
    t = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(t)
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    return t.item(), [g.item() for g in gathered], dist.get_backend()


def _rank_one_raises(rank: int, world: int):
    if rank == 1:
        raise ValueError("bad shard on rank 1")
    dist.barrier()  # rank 0 would wait forever for rank 1 without the failure path
    return rank


def _rank_one_sleeps(rank: int, world: int):
    if rank == 1:
        time.sleep(60)
    dist.barrier()
    return rank


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_and_results(world):
    out = run_distributed(_all_reduce, world, 2.0)
    total = 2.0 * world * (world + 1) / 2
    assert [o[0] for o in out] == [total] * world
    assert all(o[1] == [float(r) for r in range(world)] for o in out)
    assert out[0][2] == "gloo"


def test_failing_rank_is_reported():
    with pytest.raises(DistributedRunError, match=r"rank 1 of 2 failed:(.|\n)*ValueError: bad shard on rank 1"):
        run_distributed(_rank_one_raises, 2, timeout_s=60)


def test_stuck_run_times_out():
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError, match="timed out|failed"):
        run_distributed(_rank_one_sleeps, 2, timeout_s=8, collective_timeout_s=4)
    assert time.monotonic() - t0 < 30


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        run_distributed(_all_reduce, 0, 1.0)


def test_root_cause_is_reported_first():
    from pflow_dist.testing.distributed import _describe

    errors = {0: "Traceback ...\n  File distributed_c10d.py\nRuntimeError: Connection reset by peer",
              1: "Traceback ...\nValueError: bad shard on rank 1"}
    msg = _describe(errors, 2)
    assert msg.startswith("rank 1 of 2 failed:") and "(rank 0 also failed: RuntimeError: Connection reset" in msg


def _return_tensor(rank: int, world: int):
    return {"t": torch.full((3,), float(rank))}


def test_tensors_come_back_by_value():
    out = run_distributed(_return_tensor, 2)
    assert [o["t"].tolist() for o in out] == [[0.0] * 3, [1.0] * 3]
