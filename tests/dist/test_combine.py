"""The cross-rank combine (pflow_dist.dist.combine.incoming_state) on 2, 3 and 4 real gloo processes: the all-gather and
the recursive-doubling algorithms, forward (prefix) and reverse (suffix), equal the single-process fold of all ranks'
maps, value and every gradient (M, D of the own rank; S_0 summed over the group), for dense maps on vector and matrix
states, diagonal maps, with and without S_0, on the world group and on a subgroup of ranks 1-3, float64 within 1e-12
and float32 within 1e-6 relative RMS. sp_scan with
the Triton scan (interpreter) and the doubling combine equals the sequential scan.

Every rank builds all ranks' maps from one seed, computes the reference by autograd through a plain loop, runs the
combine on its own map and returns its errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pflow_dist.dist import shard_bounds, sp_scan
from pflow_dist.dist.combine import incoming_state
from pflow_dist.kernels.common.affine import apply_map
from pflow_dist.kernels.scan.naive import naive_scan
from pflow_dist.testing import error_stats, run_distributed

pytestmark = pytest.mark.dist

F64 = torch.float64
# (name, M shape, D shape, diagonal, with S_0, dtype)
CASES = [
    ("dense-vector", (2, 4, 4), (2, 4), False, True, F64),
    ("dense-matrix", (1, 2, 3, 3), (1, 2, 3, 5), False, False, F64),
    ("diag-vector", (2, 6), (2, 6), True, True, F64),
    ("diag-matrix", (2, 3), (2, 3, 4), True, True, F64),
    ("dense-fp32", (2, 5, 5), (2, 5), False, True, torch.float32),
]


def _maps(world, m_shape, d_shape, diagonal, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if diagonal:
        Ms = torch.rand(world, *m_shape, generator=gen, dtype=F64) + 0.5
    else:
        Ms = torch.randn(world, *m_shape, generator=gen, dtype=F64) / m_shape[-1] ** 0.5
    Ds = torch.randn(world, *d_shape, generator=gen, dtype=F64)
    S0 = torch.randn(*d_shape, generator=gen, dtype=F64)
    ups = torch.randn(world, *d_shape, generator=gen, dtype=F64)
    return Ms.to(dtype), Ds.to(dtype), S0.to(dtype), ups


def _reference(Ms, Ds, S0, ups, diagonal, reverse):
    """Every rank's incoming state by a plain loop, and the gradients of Σ_p <ups_p, S_in,p>."""
    Ms, Ds = Ms.clone().requires_grad_(True), Ds.clone().requires_grad_(True)
    S0 = None if S0 is None else S0.clone().requires_grad_(True)
    world = Ms.shape[0]
    order = list(range(world))[::-1] if reverse else list(range(world))
    S = torch.zeros_like(Ds[0]) if S0 is None else S0
    outs = {}
    for p in order:
        outs[p] = S
        S = apply_map((Ms[p], Ds[p]), S, diagonal)
    loss = sum((outs[p].double() * ups[p]).sum() for p in range(world))
    grads = torch.autograd.grad(loss, [Ms, Ds] + ([S0] if S0 is not None else []))
    return [outs[p].detach() for p in range(world)], grads


def _combine_errors(rank, world, group):
    """``rank`` and ``world`` inside ``group``."""
    errors = {}
    for i, (name, m_shape, d_shape, diagonal, with_s0, dtype) in enumerate(CASES):
        Ms, Ds, S0, ups = _maps(world, m_shape, d_shape, diagonal, dtype, seed=i)
        S0 = S0 if with_s0 else None
        for reverse in (False, True):
            ref, ref_grads = _reference(Ms, Ds, S0, ups, diagonal, reverse)
            for algorithm in ("allgather", "doubling"):
                M, D = Ms[rank].clone().requires_grad_(True), Ds[rank].clone().requires_grad_(True)
                s0 = None if S0 is None else S0.clone().requires_grad_(True)
                S = incoming_state(M, D, s0, group, diagonal, reverse=reverse, algorithm=algorithm)
                grads = torch.autograd.grad((S.double() * ups[rank]).sum(), [M, D] + ([s0] if s0 is not None else []),
                                            allow_unused=True)
                key = f"{name}/{'reverse' if reverse else 'forward'}/{algorithm}"
                err = {"S": error_stats(ref[rank], S).rms_ratio}
                for gname, r, gt in zip(("dM", "dD", "dS0"), ref_grads, grads):
                    r = r[rank] if gname != "dS0" else r
                    # the last map in the order is read by no rank: its gradient is exactly zero (or unused)
                    err[gname] = (error_stats(r, gt).rms_ratio if gt is not None
                                  else float(r.abs().max()))
                errors[key] = (err, dtype)
    return errors


def _sp_scan_errors(rank, world):
    """sp_scan with the Triton scan (interpreter) and the doubling combine vs the sequential scan, with gradients."""
    gen = torch.Generator().manual_seed(3)
    B, T, N = 2, 13, 3
    out = {}
    for diagonal in (True, False):
        a = torch.rand(B, T, N, generator=gen) if diagonal else torch.randn(B, T, N, N, generator=gen) * 0.4
        b, h0 = torch.randn(B, T, N, generator=gen), torch.randn(B, N, generator=gen)
        gh = torch.randn(B, T, N, generator=gen)
        full = [x.clone().requires_grad_(True) for x in (a, b, h0)]
        h, _ = naive_scan(*full)
        ref = torch.autograd.grad((h * gh).sum(), full)
        s, e = shard_bounds(T, world)[rank]
        loc = [a[:, s:e].clone().requires_grad_(True), b[:, s:e].clone().requires_grad_(True),
               h0.clone().requires_grad_(True)]
        hp, _ = sp_scan(*loc, group=dist.group.WORLD, backend="triton", algorithm="doubling")
        grads = torch.autograd.grad((hp * gh[:, s:e]).sum(), loc)
        kind = "diag" if diagonal else "dense"
        out[f"{kind}/h"] = error_stats(h[:, s:e], hp).rms_ratio
        out[f"{kind}/da"] = error_stats(ref[0][:, s:e], grads[0]).rms_ratio
        out[f"{kind}/db"] = error_stats(ref[1][:, s:e], grads[1]).rms_ratio
        out[f"{kind}/dh0"] = error_stats(ref[2], grads[2]).rms_ratio
    return out


def _worker(rank, world, with_scan):
    combine = _combine_errors(rank, world, dist.group.WORLD)
    if world == 4:  # a subgroup whose ranks are not the global ones: point-to-point must address global ranks
        sub = dist.new_group([1, 2, 3])
        if rank > 0:
            combine.update({f"subgroup/{k}": v for k, v in _combine_errors(rank - 1, 3, sub).items()})
    return combine, (_sp_scan_errors(rank, world) if with_scan else {})


@pytest.mark.parametrize("world", [2, 3, 4])
def test_doubling_and_allgather_equal_the_single_process_fold(world):
    # sp_scan through the Triton interpreter costs seconds per rank: checked on 3 ranks (uneven shards) only
    for rank, (combine, scan) in enumerate(run_distributed(_worker, world, world == 3, timeout_s=240)):
        assert (world == 4 and rank > 0) == any(k.startswith("subgroup/") for k in combine)
        for key, (err, dtype) in combine.items():
            tol = 1e-12 if dtype == F64 else 1e-6
            bad = {k: v for k, v in err.items() if not v < tol}
            assert not bad, f"rank {rank} {key}: {bad} (tolerance {tol:g})"
        bad = {k: v for k, v in scan.items() if not v < 1e-5}  # float32 through the Triton scan
        assert not bad, f"rank {rank} sp_scan triton/doubling: {bad}"


def test_incoming_state_errors():
    M = torch.randn(2, 3, 3)
    with pytest.raises(TypeError, match="M and D must share one dtype"):
        incoming_state(M, torch.randn(2, 3, dtype=F64), None)
    with pytest.raises(ValueError, match=r"algorithm must be one of \('auto', 'allgather', 'doubling'\), got 'tree'"):
        incoming_state(M, torch.randn(2, 3), None, algorithm="tree")
