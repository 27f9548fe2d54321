"""Sequence-parallel sparse attention on 2, 3 and 4 real gloo processes equals the single-process op on the whole
sequence: outputs and the gradients of q, k, v on every rank (halo gradients returned to their owners), with T not
divisible by P, windows reaching over several previous ranks, windows longer than T, global tokens owned by one rank
or several (and ranks owning none), GQA, the torch backend in float64 (tight) and the Triton kernels (interpreter) in
float32. Bad or inconsistent inputs make every rank raise instead of deadlocking.

Every rank builds the same full inputs from one seed, runs the single-process op on the whole sequence, then the
sequence-parallel op on its shard, and returns its errors; the test asserts on all ranks' errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pflow_dist.dist import shard_bounds
from pflow_dist.dist.sp_attention import sp_sparse_attention
from pflow_dist.ops.sparse_attention import sparse_attention
from pflow_dist.testing import error_stats, run_distributed

pytestmark = pytest.mark.dist

F64, F32 = torch.float64, torch.float32


def _case(B, T, H, Hkv, D, Dv, W, dtype, backend, global_idx=None, n_global=0):
    return dict(B=B, T=T, H=H, Hkv=Hkv, D=D, Dv=Dv, W=W, dtype=dtype, backend=backend, global_idx=global_idx,
                n_global=n_global)


CASES = {
    2: [
        _case(2, 23, 2, 2, 5, 4, 5, F64, "torch", global_idx=[0, 12, 20]),
        _case(1, 16, 2, 1, 4, 4, 40, F64, "torch"),  # W > T: full causal, the halo is the whole first shard
        _case(1, 21, 2, 1, 6, 6, 6, F32, "triton", global_idx=[3, 15]),
    ],
    3: [
        _case(1, 10, 4, 2, 4, 3, 8, F64, "torch", n_global=2),  # shards 4,3,3: rank 2's halo spans ranks 0 and 1
        _case(1, 14, 2, 2, 8, 8, 6, F32, "triton", global_idx=[5, 13]),
    ],
    4: [
        _case(2, 13, 2, 1, 4, 4, 9, F64, "torch", global_idx=[1, 7, 12]),  # halo over three ranks
        _case(1, 13, 2, 2, 4, 4, 3, F32, "triton", global_idx=[6]),
    ],
}
TOL = {F64: 1e-12, F32: 1e-5}


def _inputs(c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    B, T, H, Hkv, D, Dv = (c[x] for x in ("B", "T", "H", "Hkv", "D", "Dv"))
    ins = [x.to(c["dtype"]) for x in (r(B, T, H, D), r(B, T, Hkv, D), r(B, T, Hkv, Dv))]
    return ins, r(B, T, H, Dv).to(c["dtype"])


def _worker(rank, world, cases):
    errors = []
    for c in cases:
        (q, k, v), do = _inputs(c)
        gkw = dict(global_idx=c["global_idx"], n_global=c["n_global"])
        full = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o = sparse_attention(*full, c["W"], **gkw, backend=c["backend"])
        ref_grads = torch.autograd.grad(o, full, do)
        start, end = shard_bounds(c["T"], world)[rank]
        loc = [x[:, start:end].clone().requires_grad_(True) for x in (q, k, v)]
        o_p = sp_sparse_attention(*loc, window=c["W"], **gkw, group=dist.group.WORLD, backend=c["backend"])
        grads = torch.autograd.grad(o_p, loc, do[:, start:end])
        err = {"o": error_stats(o[:, start:end], o_p).rms_ratio}
        for n, rg, gp in zip(("dq", "dk", "dv"), ref_grads, grads, strict=True):
            err[n] = error_stats(rg[:, start:end], gp).rms_ratio
        errors.append(err)
    return errors


@pytest.mark.parametrize("world", [2, 3, 4], ids=["P2", "P3", "P4"])
def test_sp_sparse_attention_matches_single_process(world):
    results = run_distributed(_worker, world, CASES[world])
    for rank, errs in enumerate(results):
        for c, err in zip(CASES[world], errs, strict=True):
            tol = TOL[c["dtype"]]
            bad = {k: e for k, e in err.items() if not e < tol}
            assert not bad, f"rank {rank}/{world}, case {c}: errors {bad} exceed {tol}"


def _error_worker(rank, world):
    """Each scenario returns every rank's error message (or None); no rank may hang."""
    out = []
    q = torch.randn(1, 4, 2, 4)
    for scenario in ("window-differs", "bad-d-on-rank-1", "global-out-of-range", "flex"):
        kw = dict(window=3, group=dist.group.WORLD)
        k = q
        if scenario == "window-differs":
            kw["window"] = 3 + rank
        elif scenario == "bad-d-on-rank-1" and rank == 1:
            k = torch.randn(1, 4, 2, 5)
        elif scenario == "global-out-of-range":
            kw["global_idx"] = [2, 8]  # T = 8 over two ranks
        elif scenario == "flex":
            kw["backend"] = "flex"
        try:
            sp_sparse_attention(q, k, q, **kw)
            out.append(None)
        except (ValueError, TypeError) as e:
            out.append(str(e))
    return out


def test_sp_sparse_attention_errors_raise_on_every_rank():
    r0, r1 = run_distributed(_error_worker, 2)
    assert "window must be the same on every rank" in r0[0] and "window must be the same" in r1[0]
    assert "invalid inputs on rank(s) [1]" in r0[1] and "k must have shape" in r1[1]
    assert "global_idx must lie in [0, T=8)" in r0[2] and "global_idx must lie in [0, T=8)" in r1[2]
    assert "under sequence parallelism" in r0[3] and "under sequence parallelism" in r1[3]
