"""Sequence-parallel DEER (pflow_dist.dist.sp_deer) on 2, 3 and 4 real gloo processes equals single-process deer_rnn on
the whole sequence and the sequential float64 GRU / cell loop: states, the final state (last rank), the iteration
count, and every gradient (x; h0 on rank 0, zero elsewhere; the cell's parameters summed over ranks), for newton,
quasi and damped, a GRU and a generic torch.func cell, T not divisible by P, B > 1, both combine algorithms; float64
within 1e-10 relative RMS, float32 within 1e-5 (measured: ~1e-16 vs deer_rnn and ≤ 1e-12 vs the loop in float64, ≤ 1e-6
in float32, same iteration counts). Errors: a bad or mismatched input on one rank, and a cell that raises mid-solve
on one rank, make every rank raise; NaN/Inf resets are agreed by all ranks.

Every rank builds the same full inputs from one seed, computes the references on the whole sequence, runs sp_deer on
its shard and returns errors; the test asserts on every rank's errors."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.distributed as dist

from pflow_dist.dist import shard_bounds, sp_deer
from pflow_dist.kernels.deer.naive import naive_rnn
from pflow_dist.ops.deer import deer_rnn
from pflow_dist.testing import error_stats, run_distributed

pytestmark = pytest.mark.dist

F64 = torch.float64
CASES = [
    dict(cell="gru", method="newton", B=2, T=23, dtype=F64, algorithm="allgather"),
    dict(cell="gru", method="quasi", B=2, T=19, dtype=F64, algorithm="doubling"),
    dict(cell="gru", method="damped", B=1, T=17, dtype=F64, algorithm="allgather"),
    dict(cell="gru", method="newton", B=3, T=29, dtype=torch.float32, algorithm="doubling"),
    dict(cell="tanh", method="newton", B=2, T=21, dtype=F64, algorithm="allgather"),
    dict(cell="tanh", method="quasi", B=2, T=18, dtype=torch.float32, algorithm="allgather"),
    # the Triton scans (interpreter on CPU) as the inner step and in the adjoint
    dict(cell="gru", method="newton", B=2, T=22, dtype=torch.float32, algorithm="doubling", backend="triton"),
    dict(cell="gru", method="quasi", B=2, T=26, dtype=torch.float32, algorithm="allgather", backend="triton"),
]
I, N = 3, 5


class TanhCell(torch.nn.Module):
    """A vanilla tanh RNN cell h' = tanh(W [h; x] + b): the generic (torch.func) path."""

    def __init__(self, n, i):
        super().__init__()
        self.lin = torch.nn.Linear(n + i, n)

    def forward(self, h, x):
        return torch.tanh(self.lin(torch.cat([h, x], dim=-1)))


def _cell(c, dtype, seed=0):
    torch.manual_seed(seed)
    cell = torch.nn.GRU(I, N, batch_first=True) if c["cell"] == "gru" else TanhCell(N, I)
    return cell.to(dtype)


def _make(c, seed=0):
    cell = _cell(c, c["dtype"], seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(c["B"], c["T"], I, generator=gen, dtype=F64).to(c["dtype"])
    h0 = torch.randn(c["B"], N, generator=gen, dtype=F64).to(c["dtype"])
    g = torch.randn(c["B"], c["T"], N, generator=gen, dtype=F64)
    gT = torch.randn(c["B"], N, generator=gen, dtype=F64)
    return cell, x, h0, g, gT


def _grads(cell, x, h0, run, g, gT, last=True):
    """Outputs and gradients (x, h0, parameters) of loss = <h, g> + <h_T, gT> (the h_T term only where ``last``)."""
    x, h0 = x.clone().requires_grad_(True), h0.clone().requires_grad_(True)
    h, hT, *info = run(cell, x, h0)
    loss = (h.double() * g).sum() + ((hT.double() * gT).sum() if last else 0)
    grads = torch.autograd.grad(loss, [x, h0, *cell.parameters()])
    return h.detach(), hT.detach(), grads, (info[0] if info else None)


def _sequential(cell, x, h0):
    if isinstance(cell, torch.nn.GRU):
        h, hT = cell(x, h0[None])
        return h, hT[0]
    return naive_rnn(cell, x, h0)


def _sp_run(cell, x, h0, s, e, **kw):
    return sp_deer(cell, x[:, s:e], h0, group=dist.group.WORLD, **kw)


def _worker(rank, world, cases):
    out = []
    for c in cases:
        cell, x, h0, g, gT = _make(c)
        tol = dict(atol=1e-11, rtol=0.0) if c["dtype"] == F64 else dict(atol=1e-6, rtol=1e-6)
        kw = dict(method=c["method"], **tol)
        ref = _grads(cell, x, h0, functools.partial(deer_rnn, **kw), g, gT)
        seq = _grads(_cell(c, F64), x.double(), h0.double(), _sequential, g, gT)
        s, e = shard_bounds(c["T"], world)[rank]
        last = rank == world - 1
        # sp_deer sees only its shard: slice x inside run so dx comes back full-size (zeros outside the shard)
        run = functools.partial(_sp_run, s=s, e=e, algorithm=c["algorithm"], backend=c.get("backend", "auto"), **kw)
        h, hT, grads, info = _grads(cell, x, h0, run, g[:, s:e], gT, last)
        err = {}
        for name, r in (("deer", ref), ("seq", seq)):
            err[f"h~{name}"] = error_stats(r[0][:, s:e], h).rms_ratio
            err[f"dx~{name}"] = error_stats(r[2][0][:, s:e], grads[0][:, s:e]).rms_ratio
            if last:
                err[f"hT~{name}"] = error_stats(r[1], hT).rms_ratio
        err["dx outside shard"] = float(grads[0][:, :s].abs().sum() + grads[0][:, e:].abs().sum())
        out.append(dict(err=err, dh0=grads[1], dparams=[p_.double() for p_ in grads[2:]],
                        ref_dh0=seq[2][1], ref_dparams=list(seq[2][2:]), iters=(info.iterations, ref[3].iterations),
                        converged=info.converged, resets=info.resets))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sp_deer_equals_single_process_and_sequential(world):
    per_rank = run_distributed(_worker, world, CASES, timeout_s=300)
    for i, c in enumerate(CASES):
        tol = 1e-10 if c["dtype"] == F64 else 1e-5
        for rank in range(world):
            r = per_rank[rank][i]
            bad = {k: v for k, v in r["err"].items() if not v < (1e-12 if k == "dx outside shard" else tol)}
            assert not bad, f"rank {rank} case {c}: {bad} (tolerance {tol:g})"
            assert r["converged"] and r["resets"] == 0
            it, it_ref = r["iters"]
            assert abs(it - it_ref) <= 1, f"rank {rank} case {c}: {it} iterations vs {it_ref} single-process"
            assert r["iters"][0] == per_rank[0][i]["iters"][0], "every rank reports the same iteration count"
            if rank > 0:  # h0 is read on rank 0 only
                assert float(r["dh0"].abs().max()) == 0.0
        assert error_stats(per_rank[0][i]["ref_dh0"], per_rank[0][i]["dh0"]).rms_ratio < tol, f"dh0 {c}"
        summed = [sum(parts) for parts in zip(*(per_rank[r][i]["dparams"] for r in range(world)))]
        for j, (ref, got) in enumerate(zip(per_rank[0][i]["ref_dparams"], summed)):
            assert error_stats(ref, got).rms_ratio < tol, f"case {c}: parameter {j} gradient summed over ranks"


def exploding_cell(h, x):
    return 3.0 * h + x  # overflows float32 past t ≈ 80: NaN/Inf in the iterates


def _failure_worker(rank, world):
    """Each scenario runs on every rank; return each rank's error message (or None)."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(I, N, batch_first=True)
    x, h0 = torch.randn(2, 6, I), torch.randn(2, N)
    W = dist.group.WORLD

    def msg(fn):
        try:
            fn()
            return None
        except Exception as e:  # noqa: BLE001 - the test inspects every rank's error
            return f"{type(e).__name__}: {e}"

    def tanh_cell(h, x_):
        return torch.tanh(h + x_.sum(-1, keepdim=True))

    def raising_cell(h, x_):
        if rank == 1:  # inside the Newton iteration (linearisation), after the set-up collective
            raise FloatingPointError("cell exploded on purpose")
        return tanh_cell(h, x_)

    out = {
        "bad_method": msg(lambda: sp_deer(gru, x, method="gauss" if rank == 1 else "newton", group=W)),
        "mismatched_B": msg(lambda: sp_deer(gru, x[: 1 + rank], group=W)),
        "mismatched_n": msg(lambda: sp_deer(tanh_cell, x, h0[:, : N - rank], group=W)),
        "bad_algorithm": msg(lambda: sp_deer(gru, x, group=W, algorithm="ring")),
        "raising_cell": msg(lambda: sp_deer(raising_cell, x, h0, group=W)),
        "not_converged": msg(lambda: sp_deer(exploding_cell, torch.randn(1, 100, 2), torch.zeros(1, 2), "quasi",
                                             group=W, max_iter=4)),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, _, info = sp_deer(exploding_cell, torch.randn(1, 100, 2), torch.zeros(1, 2), "quasi", group=W,
                             max_iter=4, strict=False)
    warned = any("did not converge" in str(w.message) for w in caught)
    out["resets"] = (info.resets, info.iterations, bool(torch.isfinite(h).all()), warned)
    return out


def test_sp_deer_errors_raise_on_every_rank():
    r0, r1 = run_distributed(_failure_worker, 2, timeout_s=120, collective_timeout_s=30)
    assert "invalid inputs on rank(s) [1]" in r0["bad_method"] and "method must be one of" in r1["bad_method"]
    for r in (r0, r1):
        assert "B must be the same on every rank, got [1.0, 2.0]" in r["mismatched_B"]
        assert "n must be the same on every rank, got [5.0, 4.0]" in r["mismatched_n"]
        assert "algorithm must be one of ('auto', 'allgather', 'doubling'), got 'ring'" in r["bad_algorithm"]
        assert r["not_converged"].startswith("DEERConvergenceError: DEER (quasi) did not converge in 4 iterations")
        resets, iters, finite, warned = r["resets"]
        assert resets >= 1 and iters == 4 and finite and warned  # all ranks agree on resets; nothing non-finite out
    assert r0["resets"] == r1["resets"]
    assert "RuntimeError: sp_deer: the cell raised on rank(s) [1]" in r0["raising_cell"]
    assert "FloatingPointError: cell exploded on purpose" in r1["raising_cell"]


def test_sp_deer_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        sp_deer(torch.nn.GRU(I, N, batch_first=True), torch.randn(1, 4, I), group=None)

