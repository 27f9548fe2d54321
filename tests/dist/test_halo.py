"""The halo exchange on 2, 3 and 4 real gloo processes: every rank receives exactly the ``width`` tokens before its
shard (zeros before the sequence start), with halos wider than a shard (spanning several previous ranks), width 0, and
T not divisible by P; the gradient of each halo token goes back to its owner, so every rank's gradient equals its slice
of the single-process gradient. A short causal conv fed the halo equals the conv of the whole sequence (values and
gradients), on a subgroup of the world as well (global-rank addressing). Bad arguments raise."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pflow_dist.dist import shard_bounds
from pflow_dist.dist.halo import HaloPlan, halo_exchange
from pflow_dist.models.layers import ShortConv
from pflow_dist.testing import error_stats, run_distributed

pytestmark = pytest.mark.dist

CASES = [(2, 11, 3), (2, 9, 0), (3, 5, 3), (3, 13, 4), (4, 7, 5), (4, 9, 1)]  # (P, T, width)


def _halo_worker(rank, world, cases):
    out = []
    for P, T, width in cases:
        if P != world:
            continue
        gen = torch.Generator().manual_seed(T * 100 + width)
        x = torch.randn(2, T, 3, generator=gen, dtype=torch.float64)
        ups = [torch.randn(2, width, 3, generator=gen, dtype=torch.float64) for _ in range(P)]
        bounds = shard_bounds(T, P)
        # reference on the whole sequence: halo_p = x_padded[:, a_p : a_p + width]
        xr = x.clone().requires_grad_(True)
        xpad = F.pad(xr, (0, 0, width, 0))
        loss = sum((xpad[:, a:a + width] * ups[p]).sum() for p, (a, _) in enumerate(bounds))
        (gref,) = torch.autograd.grad(loss, xr)
        a, b = bounds[rank]
        x_p = x[:, a:b].clone().requires_grad_(True)
        halo = halo_exchange(x_p, width, dist.group.WORLD)
        (halo * ups[rank]).sum().backward()
        out.append({"case": (P, T, width), "halo_exact": torch.equal(halo.detach(), xpad[:, a:a + width].detach()),
                    "shape": tuple(halo.shape), "dx": error_stats(gref[:, a:b], x_p.grad).max_abs})
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_halo_values_and_gradients(world: int) -> None:
    res = run_distributed(_halo_worker, world, CASES)
    n_cases = sum(1 for c in CASES if c[0] == world)
    for rank, rows in enumerate(res):
        assert len(rows) == n_cases
        for r in rows:
            P, T, width = r["case"]
            assert r["shape"] == (2, width, 3), r
            assert r["halo_exact"], f"rank {rank} {r['case']}: wrong halo"
            assert r["dx"] < 1e-14, f"rank {rank} {r['case']}: halo gradient {r['dx']}"


def _conv_subgroup_worker(rank, world):
    """Ranks {1, 2} of 3 form the group (rank 0 is outside it): global ranks must be addressed correctly."""
    groups = [dist.new_group([0]), dist.new_group([1, 2])]
    if rank == 0:
        return None
    group = groups[1]
    torch.manual_seed(0)
    conv = ShortConv(5, 4).double()
    x = torch.randn(1, 7, 5, dtype=torch.float64)
    up = torch.randn(1, 7, 5, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    y = conv(xr)
    (y * up).sum().backward()
    ref_dw = conv.weight.grad.clone()
    conv.zero_grad()
    g_rank = dist.get_rank(group)
    a, b = shard_bounds(7, 2)[g_rank]
    x_p = x[:, a:b].clone().requires_grad_(True)
    y_p = conv(x_p, cache=halo_exchange(x_p, 3, group))
    (y_p * up[:, a:b]).sum().backward()
    dw = conv.weight.grad.clone()
    dist.all_reduce(dw, group=group)
    return {"y": error_stats(y[:, a:b], y_p).max_abs, "dx": error_stats(xr.grad[:, a:b], x_p.grad).max_abs,
            "dw": error_stats(ref_dw, dw).max_abs}


def test_short_conv_with_halo_on_a_subgroup() -> None:
    res = run_distributed(_conv_subgroup_worker, 3)
    assert res[0] is None
    for r in res[1:]:
        assert max(r.values()) < 1e-14, r


def _bad_worker(rank, world):
    x = torch.zeros(1, 3, 2)
    errors = []
    for kw in (dict(width=-1), dict(width=2.5), dict(width=2, bounds=((0, 2), (2, 4)))):
        try:
            halo_exchange(x, group=dist.group.WORLD, **kw)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_bad_arguments_raise() -> None:
    res = run_distributed(_bad_worker, 2)
    for errors in res:
        assert len(errors) == 3, errors
        assert "width must be an int >= 0" in errors[0] and "width must be an int >= 0" in errors[1]
        assert "do not match this rank's shard" in errors[2]
    with pytest.raises(ValueError, match="halo width must be >= 0"):
        HaloPlan(None, 0, ((0, 3),), -1)
