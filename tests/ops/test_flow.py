"""pflow_dist.ops.flow against the float64 token-loop reference: outputs, final states and every gradient.

On CPU the Triton kernels run in the interpreter (tests/conftest.py), so the shapes are tiny but odd (T not a multiple
of the chunk, D not a power of two, R not a power of two). The same tests run natively on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pflow_dist.kernels.flow.naive import naive_flow_map, naive_recurrent_flow
from pflow_dist.ops.flow import chunk_flow, flow_map
from pflow_dist.testing import assert_close

# (id, R (0 = rank-1 layout), rank_form, gated, B, T, H, K, V, chunk_size); the Triton chunk has BT = C·R_PAD rows
# (R_PAD = next power of two of R): 16, 32 and 64 rows all occur below, with several chunks each.
VARIANTS = [
    ("delta-T37-K16", 0, "sum", False, 1, 37, 2, 16, 12, 16),
    ("gated-T63-K24", 0, "sum", True, 2, 63, 1, 24, 20, 32),
    ("gated-T100-C64", 0, "sum", True, 1, 100, 1, 24, 20, 64),
    ("sum-R2-T21", 2, "sum", False, 1, 21, 2, 16, 12, 8),
    ("sum-R3-gated-T19", 3, "sum", True, 2, 19, 1, 12, 10, 8),
    ("product-R3-gated-T19", 3, "product", True, 2, 19, 1, 12, 10, 8),
    ("product-R8-T11", 8, "product", False, 1, 11, 1, 16, 8, 8),
    ("sum-R5-T9", 5, "sum", True, 1, 9, 1, 16, 8, 8),
    ("product-R2-gated-K80-V72", 2, "product", True, 1, 20, 1, 80, 72, 8),
]
BY_ID = {v[0]: v for v in VARIANTS}
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _inputs(R, gated, B, T, H, K, V, dtype, device, h0=True):
    rk = (R,) if R else ()
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + R)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {
        "q": r(B, T, H, K),
        "k": F.normalize(r(B, T, H, *rk, K), dim=-1),
        "v": r(B, T, H, *rk, V),
        "beta": torch.rand(B, T, H, *rk, generator=gen) * (1.5 / max(R, 1)),
    }
    x = {n: t.to(device=device, dtype=dtype) for n, t in x.items()}
    if gated:
        x["g"] = F.logsigmoid(r(B, T, H) + 2.0).to(device)
    if h0:
        x["initial_state"] = r(B, H, K, V).to(device)
    return x


def _reference(x, rank_form, do, dS):
    ref = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    o, S = naive_recurrent_flow(**ref, rank_form=rank_form, output_final_state=True)
    grads = torch.autograd.grad((o * do.double()).sum() + (S * dS.double()).sum(), list(ref.values()))
    return o, S, dict(zip(ref, grads, strict=True))


def _check_against_reference(x, rank_form, chunk_size, backend, tol):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, S = chunk_flow(**leaves, rank_form=rank_form, output_final_state=True, chunk_size=chunk_size, backend=backend)
    assert o.dtype == x["q"].dtype and o.shape == x["q"].shape[:-1] + (x["v"].shape[-1],)
    assert S.dtype == torch.float32
    do, dS = torch.randn_like(o), torch.randn_like(S)
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(leaves.values()))
    ro, rS, rgrads = _reference(x, rank_form, do, dS)
    assert_close("o", ro, o, tol)
    assert_close("final_state", rS, S, tol)
    for (name, ref_grad), grad in zip(rgrads.items(), grads, strict=True):
        assert grad.shape == x[name].shape, name
        assert_close(f"d{name}", ref_grad, grad, tol)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_triton_matches_reference_fp32(variant, device):
    _, R, form, gated, B, T, H, K, V, C = variant
    x = _inputs(R, gated, B, T, H, K, V, torch.float32, device)
    _check_against_reference(x, form, C, "triton", TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["gated-T63-K24", "product-R3-gated-T19"])
def test_triton_half_precision(name, dtype, device):
    _, R, form, gated, B, T, H, K, V, C = BY_ID[name]
    x = _inputs(R, gated, B, T, H, K, V, dtype, device)
    _check_against_reference(x, form, C, "triton", TOL[dtype])


@pytest.mark.parametrize("name", ["delta-T37-K16", "product-R3-gated-T19"])
def test_torch_backend_matches_reference(name, device):
    _, R, form, gated, B, T, H, K, V, C = BY_ID[name]
    x = _inputs(R, gated, B, T, H, K, V, torch.float32, device)
    _check_against_reference(x, form, C, "torch", TOL[torch.float32])


def test_no_initial_state_no_final_state(device):
    x = _inputs(2, True, 1, 13, 2, 16, 8, torch.float32, device, h0=False)
    for backend in ("triton", "torch"):
        o, S = chunk_flow(**x, rank_form="sum", chunk_size=4, backend=backend)
        assert S is None
        ro, _ = naive_recurrent_flow(**{n: t.double() for n, t in x.items()}, rank_form="sum")
        assert_close(f"o[{backend}]", ro, o, TOL[torch.float32])


def test_sum_and_product_differ(device):
    # guards against a mask bug that would make the two forms coincide (they differ by O(β² k_i·k_j))
    x = _inputs(3, False, 1, 9, 1, 16, 8, torch.float32, device, h0=False)
    o_sum, _ = chunk_flow(**x, rank_form="sum", backend="triton")
    o_prod, _ = chunk_flow(**x, rank_form="product", backend="triton")
    assert (o_sum - o_prod).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("form", ["sum", "product"])
def test_flow_map(form, backend, device):
    x = _inputs(2, True, 1, 23, 2, 16, 12, torch.float32, device, h0=False)
    del x["q"]
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    M, D = flow_map(**leaves, rank_form=form, chunk_size=8, backend=backend)
    dM, dD = torch.randn_like(M), torch.randn_like(D)
    grads = torch.autograd.grad((M * dM).sum() + (D * dD).sum(), list(leaves.values()))
    ref = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    rM, rD = naive_flow_map(**ref, rank_form=form)
    rgrads = torch.autograd.grad((rM * dM.double()).sum() + (rD * dD.double()).sum(), list(ref.values()))
    assert_close("M", rM, M, TOL[torch.float32])
    assert_close("D", rD, D, TOL[torch.float32])
    for name, rg, gr in zip(ref, rgrads, grads, strict=True):
        assert_close(f"d{name}", rg, gr, TOL[torch.float32])


def test_flow_map_composes_with_chunk_flow(device):
    # S_T = M S_0 + D must equal the op's final state for any S_0
    x = _inputs(0, True, 2, 30, 1, 16, 8, torch.float32, device)
    _, S = chunk_flow(**x, output_final_state=True, chunk_size=16, backend="triton")
    M, D = flow_map(x["k"], x["v"], x["beta"], x["g"], chunk_size=16, backend="triton")
    assert_close("M S0 + D", S, M @ x["initial_state"] + D, TOL[torch.float32])


def _bad(**over):
    x = _inputs(2, True, 1, 5, 1, 8, 4, torch.float32, torch.device("cpu"))
    x.update(over)
    return x


@pytest.mark.parametrize(
    "case, match",
    [
        (lambda: _bad(q=torch.randn(1, 5, 8)), "q must have 4 dimensions"),
        (lambda: _bad(k=torch.randn(1, 6, 1, 2, 8)), "k must have shape"),
        (lambda: _bad(beta=torch.rand(1, 5, 1, 3)), "beta must have shape"),
        (lambda: _bad(v=torch.randn(1, 5, 1, 3, 4)), "v must have shape"),
        (lambda: _bad(beta=torch.full((1, 5, 1, 2), float("nan"))), "beta must be finite"),
        (lambda: _bad(g=torch.full((1, 5, 1), float("inf"))), "g must be finite"),
        (lambda: _bad(initial_state=torch.randn(1, 1, 8, 5)), "initial_state must have shape"),
        (lambda: _bad(q=torch.randn(1, 5, 1, 300), k=torch.randn(1, 5, 1, 2, 300), initial_state=None),
         "K must be <= 256"),
        (lambda: _bad(v=torch.randn(1, 5, 1, 2, 300), initial_state=None), "V must be <= 256"),
        (lambda: _bad(k=torch.randn(1, 5, 1, 9, 8), v=torch.randn(1, 5, 1, 9, 4), beta=torch.rand(1, 5, 1, 9)),
         "R must be <= 8"),
    ],
    ids=["q-rank", "k-T", "beta-R-mismatch", "v-R-mismatch", "nan-beta", "inf-g", "state-shape", "K>256", "V>256",
         "R>8"],
)
def test_bad_inputs_raise_value_error(case, match):
    with pytest.raises(ValueError, match=match):
        chunk_flow(**case(), backend="torch")


def test_check_finite_off_skips_the_value_check():
    # the models' path: no host sync, so NaN gates are not caught here and propagate to the output instead
    x = _bad(beta=torch.full((1, 5, 1, 2), float("nan")))
    o, _ = chunk_flow(**x, backend="torch", check_finite=False)
    assert torch.isnan(o).any()
    M, _ = flow_map(x["k"], x["v"], x["beta"], x["g"], backend="torch", check_finite=False)
    assert torch.isnan(M).any()
    with pytest.raises(ValueError, match="beta must be finite"):
        flow_map(x["k"], x["v"], x["beta"], x["g"], backend="torch")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter ran on the NaN/Inf
@pytest.mark.parametrize("name", ["beta", "g"])
def test_nonfinite_gates_raise_on_the_kernel_path(device, name):
    """The Triton path reads the NaN/Inf count after queuing its kernels: still a ValueError naming the input and the
    count, for chunk_flow and flow_map."""
    bad = torch.full((1, 5, 1, 2), float("nan")) if name == "beta" else torch.full((1, 5, 1), float("inf"))
    bad[0, 1:] = 0.5 if name == "beta" else -0.1  # one token stays non-finite: 2 values of beta, 1 of g
    x = {n: t.to(device) if t is not None else None for n, t in _bad(**{name: bad}).items()}
    count = 2 if name == "beta" else 1
    with pytest.raises(ValueError, match=f"{name} must be finite, got {count} non-finite value"):
        chunk_flow(**x, backend="triton")
    with pytest.raises(ValueError, match=f"{name} must be finite, got {count} non-finite value"):
        flow_map(x["k"], x["v"], x["beta"], x["g"], backend="triton")


def test_bad_options(device):
    x = {n: t.to(device) for n, t in _bad().items()}
    with pytest.raises(ValueError, match="rank_form must be one of"):
        chunk_flow(**x, rank_form="prod")
    with pytest.raises(ValueError, match="backend must be one of"):
        chunk_flow(**x, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunk_flow(**x, chunk_size=0)
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        chunk_flow(**{**x, "q": x["q"].half()}, backend="torch")
    with pytest.raises(TypeError, match="backend='triton' supports float32, bfloat16 and float16"):
        chunk_flow(**{n: t.double() for n, t in x.items()}, backend="triton")
    with pytest.raises(ValueError, match="k must have 4 or 5 dimensions"):
        flow_map(torch.randn(5, 8), x["v"], x["beta"])


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("name", ["gated-T63-K24", "product-R3-gated-T19", "delta-T37-K16"])
def test_grouped_state_passes(name, groups, device, monkeypatch):
    # the second algorithm (chunk_scan.py): group flows in parallel, composed, then the chunk states per group;
    # forced here (on the GPU it is chosen when the sequential pass would leave SMs idle); without a gate the
    # reverse passes compute Attᵀ dO themselves (fuse_dvl auto), with one they read it from the dvlocal kernel
    monkeypatch.setenv("FLOW_CFG", f"groups={groups}")
    _, R, form, gated, B, T, H, K, V, C = BY_ID[name]
    x = _inputs(R, gated, B, T, H, K, V, torch.float32, device)
    _check_against_reference(x, form, C // 2, "triton", TOL[torch.float32])


def test_recomputing_backward(device, monkeypatch):
    # the backward that recomputes W, Ainv, h, Vn (chosen when keeping them would take too much memory)
    monkeypatch.setenv("FLOW_CFG", "save=0")
    _, R, form, gated, B, T, H, K, V, C = BY_ID["sum-R3-gated-T19"]
    x = _inputs(R, gated, B, T, H, K, V, torch.float32, device)
    _check_against_reference(x, form, C, "triton", TOL[torch.float32])


@pytest.mark.parametrize("cfg", ["fuse_dvl=1", "fuse_dvl=0", "fuse_dvl=2,groups=3"])
@pytest.mark.parametrize("name", ["gated-T63-K24", "product-R3-gated-T19", "sum-R3-gated-T19"])
def test_local_dvn_fused_or_not(name, cfg, device, monkeypatch):
    # the reverse state pass computing Attᵀ dO itself (fuse_dvl=1, the default), reading it from the dvlocal kernel
    # (0), or the grouped passes (map and true pass of each group) computing it (2)
    monkeypatch.setenv("FLOW_CFG", cfg)
    _, R, form, gated, B, T, H, K, V, C = BY_ID[name]
    x = _inputs(R, gated, B, T, H, K, V, torch.float32, device)
    _check_against_reference(x, form, C, "triton", TOL[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA grid limits (the interpreter has none; 2^20 tokens)")
def test_more_chunks_than_a_second_grid_axis_holds():
    """Rank 4 takes 16-token chunks: T = 1,048,616 is 65,539 of them, more than a CUDA grid's second axis holds
    (65,535; the per-chunk output and local-dVn kernels once put chunks there). The whole sequence in one call
    equals two halves chained through the state: output, final state and every gradient."""
    x = _inputs(4, True, 1, 65536 * 16 + 40, 1, 16, 16, torch.float32, "cuda")
    kw = dict(rank_form="product", chunk_size=64, backend="triton")

    def run(split: bool):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        if split:
            s = x["q"].shape[1] // 2
            first = {n: (t if n == "initial_state" else t[:, :s]) for n, t in leaves.items()}
            o1, S1 = chunk_flow(**first, output_final_state=True, **kw)
            rest = {n: t[:, s:] for n, t in leaves.items() if n != "initial_state"}
            o2, S = chunk_flow(**rest, initial_state=S1, output_final_state=True, **kw)
            o = torch.cat([o1, o2], dim=1)
        else:
            o, S = chunk_flow(**leaves, output_final_state=True, **kw)
        gen = torch.Generator(device="cuda").manual_seed(1)
        do = torch.randn(o.shape, device="cuda", generator=gen)
        dS = torch.randn(S.shape, device="cuda", generator=gen)
        grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(leaves.values()))
        return {"o": o, "final_state": S, **{"d" + n: g for n, g in zip(leaves, grads, strict=True)}}

    whole, halves = run(False), run(True)
    for name, want in halves.items():
        assert_close(name, want.double(), whole[name], 1e-4)
