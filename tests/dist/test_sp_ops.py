"""Sequence-parallel flow and scan on 2, 3 and 4 real gloo processes equal the single-process op on the whole sequence:
outputs, the final state (last rank), and every gradient (q, k, v, beta, g, initial state / a, b, h0), with T not
divisible by P, B > 1, H > 1, R > 1, gated and not; float64 tight, float32 within 1e-4 relative RMS.

Every rank builds the same full inputs from one seed, runs the single-process reference on the whole sequence, then the
sequence-parallel op on its shard, and returns its errors; the test asserts on all ranks' errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pflow_dist.dist import shard_bounds, sp_flow, sp_scan
from pflow_dist.kernels.flow.naive import naive_chunk_flow
from pflow_dist.kernels.scan.naive import naive_scan
from pflow_dist.testing import error_stats, interpreting, run_distributed

pytestmark = pytest.mark.dist

FLOW_CASES = [
    dict(B=2, T=23, H=2, R=1, K=4, V=3, gated=False, rank_form="sum", dtype=torch.float64),
    dict(B=1, T=19, H=2, R=3, K=4, V=5, gated=True, rank_form="sum", dtype=torch.float64),
    dict(B=2, T=17, H=1, R=2, K=3, V=3, gated=True, rank_form="product", dtype=torch.float64),
    dict(B=2, T=21, H=2, R=2, K=4, V=4, gated=True, rank_form="sum", dtype=torch.float32),
]
# the Triton kernels (interpreter on CPU): the combine inside the grouped state passes, one group per shard (whose
# reverse passes compute Attᵀ dO themselves, gated or not) or more (FLOW_CFG groups=2), the backward that keeps or
# recomputes the intermediates (save=0), gated, product form, R > 1
TRITON_CASES = [
    dict(B=2, T=45, H=2, R=1, K=16, V=12, gated=False, rank_form="sum", dtype=torch.float32, backend="triton", C=8),
    dict(B=1, T=37, H=2, R=2, K=16, V=8, gated=True, rank_form="sum", dtype=torch.float32, backend="triton", C=8),
    dict(B=1, T=50, H=1, R=2, K=16, V=8, gated=True, rank_form="product", dtype=torch.float32, backend="triton",
         C=8, flow_cfg="groups=2"),
    dict(B=1, T=41, H=2, R=3, K=12, V=10, gated=True, rank_form="sum", dtype=torch.float32, backend="triton", C=8,
         flow_cfg="groups=3,save=0"),
]
SCAN_CASES = [
    dict(B=2, T=23, N=3, diagonal=True, dtype=torch.float64),
    dict(B=1, T=18, N=3, diagonal=False, dtype=torch.float64),
    dict(B=2, T=29, N=4, diagonal=True, dtype=torch.float32),
]
# the diagonal Triton scan (interpreter on CPU) under the sequence-parallel path: the shard's map from one read
# (several tiles: T = 300 on up to 3 ranks, 100-step shards), one scan forward, the reverse combine + one adjoint back
TRITON_SCAN_CASES = [dict(B=2, T=300, N=5, diagonal=True, dtype=torch.float32, backend="triton")]


def _flow_inputs(c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    B, T, H, R, K, V = (c[x] for x in "BTHRKV")
    inp = dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, R, K), dim=-1), v=r(B, T, H, R, V),
               beta=torch.rand(B, T, H, R, generator=gen, dtype=torch.float64) / R,
               g=F.logsigmoid(r(B, T, H) + 2) if c["gated"] else None, initial_state=r(B, H, K, V))
    grads = dict(o=r(B, T, H, V), S=r(B, H, K, V))
    cast = lambda x: None if x is None else x.to(c["dtype"])  # noqa: E731
    return {k: cast(v) for k, v in inp.items()}, grads


def _flow_worker(rank, world, cases):
    errors = []
    for c in cases:
        inp, up = _flow_inputs(c)
        names = [n for n in ("q", "k", "v", "beta", "g", "initial_state") if inp[n] is not None]
        full = {n: inp[n].clone().requires_grad_(True) for n in names}
        o, S = naive_chunk_flow(**{**inp, **full}, rank_form=c["rank_form"], output_final_state=True, chunk_size=4)
        loss = (o.double() * up["o"]).sum() + (S.double() * up["S"]).sum()
        ref_grads = torch.autograd.grad(loss, [full[n] for n in names])
        start, end = shard_bounds(c["T"], world)[rank]
        loc = {n: (inp[n] if n == "initial_state" else inp[n][:, start:end]).clone().requires_grad_(True)
               for n in names}
        os.environ["FLOW_CFG"] = c.get("flow_cfg", "")
        o_p, S_p = sp_flow(**loc, group=dist.group.WORLD, rank_form=c["rank_form"], output_final_state=True,
                           chunk_size=c.get("C", 4), backend=c.get("backend", "auto"))
        last = rank == world - 1
        loss_p = (o_p.double() * up["o"][:, start:end]).sum() + ((S_p.double() * up["S"]).sum() if last else 0)
        grads = torch.autograd.grad(loss_p, [loc[n] for n in names])
        err = {"o": error_stats(o[:, start:end], o_p).rms_ratio}
        if last:
            err["S"] = error_stats(S, S_p).rms_ratio
        for n, rg, gp in zip(names, ref_grads, grads):
            err["d" + n] = error_stats(rg if n == "initial_state" else rg[:, start:end], gp).rms_ratio
        errors.append(err)
    return errors


def _scan_worker(rank, world, cases):
    errors = []
    for c in cases:
        gen = torch.Generator().manual_seed(1)
        B, T, N = c["B"], c["T"], c["N"]
        a = (torch.rand(B, T, N, generator=gen) if c["diagonal"] else torch.randn(B, T, N, N, generator=gen) * 0.4)
        b, h0 = torch.randn(B, T, N, generator=gen), torch.randn(B, N, generator=gen)
        gh = torch.randn(B, T, N, generator=gen, dtype=torch.float64)
        gT = torch.randn(B, N, generator=gen, dtype=torch.float64)
        a, b, h0 = (x.to(c["dtype"]) for x in (a, b, h0))
        full = [x.clone().requires_grad_(True) for x in (a, b, h0)]
        h, hT = naive_scan(*full, output_final_state=True)
        ref_grads = torch.autograd.grad((h.double() * gh).sum() + (hT.double() * gT).sum(), full)
        s, e = shard_bounds(T, world)[rank]
        loc = [a[:, s:e].clone().requires_grad_(True), b[:, s:e].clone().requires_grad_(True),
               h0.clone().requires_grad_(True)]
        h_p, hT_p = sp_scan(*loc, group=dist.group.WORLD, output_final_state=True, backend=c.get("backend", "auto"))
        last = rank == world - 1
        loss = (h_p.double() * gh[:, s:e]).sum() + ((hT_p.double() * gT).sum() if last else 0)
        grads = torch.autograd.grad(loss, loc)
        err = {"h": error_stats(h[:, s:e], h_p).rms_ratio, "da": error_stats(ref_grads[0][:, s:e], grads[0]).rms_ratio,
               "db": error_stats(ref_grads[1][:, s:e], grads[1]).rms_ratio,
               "dh0": error_stats(ref_grads[2], grads[2]).rms_ratio}
        if last:
            err["hT"] = error_stats(hT, hT_p).rms_ratio
        errors.append(err)
    return errors


def _check(per_rank, cases):
    for rank, errs in enumerate(per_rank):
        for c, err in zip(cases, errs):
            tol = 1e-10 if c["dtype"] == torch.float64 else 1e-4
            bad = {k: v for k, v in err.items() if not v < tol}
            assert not bad, f"rank {rank} case {c}: {bad} (tolerance {tol:g})"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sp_flow_equals_single_process(world):
    _check(run_distributed(_flow_worker, world, FLOW_CASES, timeout_s=240), FLOW_CASES)


@pytest.mark.skipif(not interpreting(), reason="CPU ranks run the Triton kernels through the interpreter only")
@pytest.mark.parametrize("world", [2, 3])
def test_sp_flow_triton_equals_single_process(world):
    _check(run_distributed(_flow_worker, world, TRITON_CASES, timeout_s=400), TRITON_CASES)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sp_scan_equals_single_process(world):
    _check(run_distributed(_scan_worker, world, SCAN_CASES, timeout_s=240), SCAN_CASES)


@pytest.mark.skipif(not interpreting(), reason="CPU ranks run the Triton kernels through the interpreter only")
@pytest.mark.parametrize("world", [2, 3])
def test_sp_scan_triton_equals_single_process(world):
    _check(run_distributed(_scan_worker, world, TRITON_SCAN_CASES, timeout_s=300), TRITON_SCAN_CASES)


def _bad_shard_on_rank_one(rank, world):
    q = torch.randn(1, 4, 1, 3)
    k = F.normalize(torch.randn(1, 4, 1, 3), dim=-1)
    beta = torch.rand(1, 4 if rank == 0 else 5, 1)  # rank 1 passes a wrong shape
    return sp_flow(q, k, torch.randn(1, 4, 1, 2), beta, group=dist.group.WORLD)[0].shape


def test_a_failing_rank_fails_the_run_with_its_error():
    from pflow_dist.testing import DistributedRunError

    with pytest.raises(DistributedRunError, match=r"rank 1 of 2 failed(.|\n)*beta must have shape \[1, 4, 1\]"):
        run_distributed(_bad_shard_on_rank_one, 2, timeout_s=60, collective_timeout_s=10)
