"""The float64 flow references are the oracle of every flow kernel, so they are checked three ways:
(1) against a hand-written loop that builds each transition matrix explicitly (a different formulation from the
reference's delta form); (2) against properties: chunked == token loop for any chunk size, two halves == one pass,
S_T = M S_0 + D, the product form == rank-1 on the interleaved sequence, sum == product for R = 1; (3) gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pflow_dist.kernels.common.affine import apply_map, prefix_compose
from pflow_dist.kernels.flow.naive import naive_chunk_flow, naive_flow_map, naive_recurrent_flow
from pflow_dist.testing import assert_close

F64 = torch.float64


def make_inputs(B=2, T=9, H=2, R=2, K=5, V=3, gated=True, h0=True, ranked=True, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    kshape = (B, T, H, R, K) if ranked else (B, T, H, K)
    vshape = (B, T, H, R, V) if ranked else (B, T, H, V)
    bshape = (B, T, H, R) if ranked else (B, T, H)
    inp = dict(
        q=r(B, T, H, K), k=F.normalize(r(*kshape), dim=-1), v=r(*vshape),
        beta=torch.rand(*bshape, generator=gen, dtype=F64) * (0.9 if ranked else 1.5),
        g=F.logsigmoid(r(B, T, H) + 2) if gated else None,
        initial_state=r(B, H, K, V) if h0 else None,
    )
    return {k: (None if v is None else v.to(dtype)) for k, v in inp.items()}


def explicit_loop(q, k, v, beta, g, initial_state, rank_form, scale=None):
    """S_t = A_t S_{t-1} + B_t with A_t, B_t written out as matrices, per batch and head."""
    B, T, H, K = q.shape
    if k.dim() == 4:
        k, v, beta = k.unsqueeze(3), v.unsqueeze(3), beta.unsqueeze(3)
    R, V = k.shape[3], v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    o = torch.zeros(B, T, H, V, dtype=F64)
    S_out = torch.zeros(B, H, K, V, dtype=F64)
    eye = torch.eye(K, dtype=F64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, V, dtype=F64) if initial_state is None else initial_state[b, h].double()
            for t in range(T):
                alpha = 1.0 if g is None else torch.exp(g[b, t, h].double())
                ks, vs, bs = k[b, t, h].double(), v[b, t, h].double(), beta[b, t, h].double()
                if rank_form == "sum":
                    A = alpha * (eye - sum(bs[r] * torch.outer(ks[r], ks[r]) for r in range(R)))
                    Bt = sum(bs[r] * torch.outer(ks[r], vs[r]) for r in range(R))
                    S = A @ S + Bt
                else:
                    S = alpha * S
                    for r in range(R):
                        S = (eye - bs[r] * torch.outer(ks[r], ks[r])) @ S + bs[r] * torch.outer(ks[r], vs[r])
                o[b, t, h] = S.T @ (scale * q[b, t, h].double())
            S_out[b, h] = S
    return o, S_out


CASES = [
    pytest.param(dict(R=1, ranked=False, gated=False), "sum", id="rank1"),
    pytest.param(dict(R=1, ranked=False, gated=True), "sum", id="rank1-gated"),
    pytest.param(dict(R=3, gated=False), "sum", id="R3-sum"),
    pytest.param(dict(R=3, gated=True), "sum", id="R3-sum-gated"),
    pytest.param(dict(R=3, gated=False), "product", id="R3-product"),
    pytest.param(dict(R=2, gated=True, h0=False), "product", id="R2-product-gated-noh0"),
]


@pytest.mark.parametrize("cfg, rank_form", CASES)
def test_recurrent_matches_explicit_loop(cfg, rank_form):
    inp = make_inputs(**cfg)
    o, S = naive_recurrent_flow(**inp, rank_form=rank_form, output_final_state=True)
    o_ref, S_ref = explicit_loop(**inp, rank_form=rank_form)
    assert_close("o", o_ref, o, 1e-12)
    assert_close("S", S_ref, S, 1e-12)


@pytest.mark.parametrize("cfg, rank_form", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_chunked_matches_recurrent(cfg, rank_form, chunk_size):
    inp = make_inputs(T=13, **cfg)
    o, S = naive_recurrent_flow(**inp, rank_form=rank_form, output_final_state=True)
    o_c, S_c = naive_chunk_flow(**inp, rank_form=rank_form, output_final_state=True, chunk_size=chunk_size)
    assert_close("o", o, o_c, 1e-12)
    assert_close("S", S, S_c, 1e-12)


@pytest.mark.parametrize("cfg, rank_form", CASES)
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_sigdelta_chunks_match_recurrent_values_and_gradients(cfg, rank_form, chunk_size):
    # the second algorithm of the paper (grid recursion instead of the triangular solve): same flow, same gradients
    inp = make_inputs(T=13, **cfg)
    leaves = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
    o, S = naive_recurrent_flow(**inp, rank_form=rank_form, output_final_state=True)
    o_s, S_s = naive_chunk_flow(**inp, rank_form=rank_form, output_final_state=True, chunk_size=chunk_size,
                                wy="sigdelta")
    assert_close("o", o, o_s, 1e-12)
    assert_close("S", S, S_s, 1e-12)
    cot = torch.randn_like(o)
    want = torch.autograd.grad((o * cot).sum() + S.sum(), list(leaves.values()))
    got = torch.autograd.grad((o_s * cot).sum() + S_s.sum(), list(leaves.values()))
    for name, a, b in zip(leaves, want, got, strict=True):
        assert_close(f"d{name}", a, b, 1e-11)
    with pytest.raises(ValueError, match="wy must be one of"):
        naive_chunk_flow(**inp, wy="lu")


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 12), split=st.integers(0, 12), R=st.integers(1, 3), C=st.integers(1, 6),
       rank_form=st.sampled_from(["sum", "product"]), gated=st.booleans(), seed=st.integers(0, 2**16))
def test_two_halves_equal_one_pass_and_flow_maps_compose(T, split, R, C, rank_form, gated, seed):
    split = min(split, T - 1) if T > 1 else 0
    inp = make_inputs(B=1, T=T, H=2, R=R, K=4, V=3, gated=gated, seed=seed)
    o, S = naive_recurrent_flow(**inp, rank_form=rank_form, output_final_state=True)
    if split > 0:
        first = {k: (v[:, :split] if v is not None and k != "initial_state" else v) for k, v in inp.items()}
        second = {k: (v[:, split:] if v is not None and k != "initial_state" else v) for k, v in inp.items()}
        o1, S1 = naive_recurrent_flow(**first, rank_form=rank_form, output_final_state=True)
        second["initial_state"] = S1
        o2, S2 = naive_recurrent_flow(**second, rank_form=rank_form, output_final_state=True)
        assert_close("o (two halves)", o, torch.cat([o1, o2], dim=1), 1e-12)
        assert_close("S (two halves)", S, S2, 1e-12)
    # the sequence flow: S_T = M S_0 + D, and the chunk flows compose to it
    maps_args = {k: inp[k] for k in ("k", "v", "beta", "g")}
    M, D = naive_flow_map(**maps_args, rank_form=rank_form)
    assert_close("M S0 + D", S, apply_map((M, D), inp["initial_state"]), 1e-12)
    _, _, chunk_maps = naive_chunk_flow(**inp, rank_form=rank_form, chunk_size=C, return_chunk_maps=True)
    Mc, Dc = prefix_compose(chunk_maps, exclusive=False)[-1]
    assert_close("M (chunks)", M, Mc, 1e-12)
    assert_close("D (chunks)", D, Dc, 1e-12, atol=1e-14)


def test_flow_map_is_linear_in_initial_state():
    inp = make_inputs(T=6, R=2)
    S0 = inp.pop("initial_state")
    _, S_a = naive_recurrent_flow(**inp, initial_state=S0, output_final_state=True)
    _, S_b = naive_recurrent_flow(**inp, initial_state=2 * S0, output_final_state=True)
    _, S_z = naive_recurrent_flow(**inp, output_final_state=True)
    assert_close("linearity", S_b - S_z, 2 * (S_a - S_z), 1e-12)


def test_rank1_sum_equals_product_and_rank_r_forms_differ():
    inp = make_inputs(R=1)
    o_s, S_s = naive_recurrent_flow(**inp, rank_form="sum", output_final_state=True)
    o_p, S_p = naive_recurrent_flow(**inp, rank_form="product", output_final_state=True)
    assert torch.equal(o_s, o_p) and torch.equal(S_s, S_p)
    inp = make_inputs(R=3)
    o_s, _ = naive_recurrent_flow(**inp, rank_form="sum")
    o_p, _ = naive_recurrent_flow(**inp, rank_form="product")
    assert (o_s - o_p).abs().max() > 1e-3  # the cross terms O(β² k_i·k_j) are visible


def test_product_form_is_rank1_on_the_interleaved_sequence():
    """DeltaProduct == rank-1 delta rule on T·R steps with q only at the last sub-step and g only at the first."""
    B, T, H, R, K, V = 2, 5, 2, 3, 4, 3
    inp = make_inputs(B=B, T=T, H=H, R=R, K=K, V=V, gated=True)
    o, S = naive_recurrent_flow(**inp, rank_form="product", output_final_state=True)
    k = inp["k"].permute(0, 1, 3, 2, 4).reshape(B, T * R, H, K)
    v = inp["v"].permute(0, 1, 3, 2, 4).reshape(B, T * R, H, V)
    beta = inp["beta"].permute(0, 1, 3, 2).reshape(B, T * R, H)
    q = torch.zeros(B, T, R, H, K, dtype=F64)
    q[:, :, -1] = inp["q"]
    g = torch.zeros(B, T, R, H, dtype=F64)
    g[:, :, 0] = inp["g"]
    o_i, S_i = naive_recurrent_flow(q.reshape(B, T * R, H, K), k, v, beta, g.reshape(B, T * R, H),
                                    initial_state=inp["initial_state"], output_final_state=True)
    assert_close("o", o, o_i.reshape(B, T, R, H, V)[:, :, -1], 1e-12)
    assert_close("S", S, S_i, 1e-12)


def test_scale_and_dtypes():
    inp = make_inputs(R=2, dtype=torch.float32)
    o, S = naive_recurrent_flow(**inp, output_final_state=True)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    o2, _ = naive_recurrent_flow(**inp, scale=2 * inp["q"].shape[-1] ** -0.5)
    assert_close("scale is linear in o", 2 * o.double(), o2.double(), 1e-6)
    o_bf, _ = naive_recurrent_flow(**make_inputs(R=2, dtype=torch.bfloat16))
    assert o_bf.dtype == torch.bfloat16


@pytest.mark.parametrize("rank_form", ["sum", "product"])
@pytest.mark.parametrize("fn", [naive_recurrent_flow, naive_chunk_flow], ids=["recurrent", "chunked"])
def test_gradcheck(fn, rank_form):
    inp = make_inputs(B=1, T=5, H=1, R=2, K=3, V=2, gated=True)
    names = ["q", "k", "v", "beta", "g", "initial_state"]
    leaves = [inp[n].clone().requires_grad_(True) for n in names]
    kwargs = {"rank_form": rank_form, "output_final_state": True}
    if fn is naive_chunk_flow:
        kwargs["chunk_size"] = 2

    def f(*args):
        o, S = fn(**dict(zip(names, args)), **kwargs)
        return o, S

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=torch.zeros(2, 9, 2)), ValueError, r"q must have 4 dimensions \[B, T, H, K\], got shape \(2, 9, 2\)"),
        (dict(k=torch.zeros(2, 9, 2, 2, 4, dtype=F64)), ValueError, r"k must have shape \[2, 9, 2, 2, 5\]"),
        (dict(beta=torch.zeros(2, 9, 2, 3, dtype=F64)), ValueError, r"beta must have shape \[2, 9, 2, 2\]"),
        (dict(v=torch.zeros(2, 9, 2, 3, 3, dtype=F64)), ValueError, r"v must have shape \[2, 9, 2, 2, \*\]"),
        (dict(g=torch.zeros(2, 9, 3, dtype=F64)), ValueError, r"g must have shape \[2, 9, 2\]"),
        (dict(initial_state=torch.zeros(2, 2, 5, 4, dtype=F64)), ValueError, r"initial_state must have shape"),
        (dict(v=torch.zeros(2, 9, 2, 2, 3, dtype=torch.float32)), TypeError, r"q, k and v must share one dtype"),
        (dict(beta=torch.zeros(2, 9, 2, 2, dtype=torch.int64)), TypeError, r"beta must have dtype in"),
        (dict(k=[1, 2]), TypeError, r"k must be a torch.Tensor, got list"),
        (dict(g=torch.zeros(2, 9, 2, dtype=F64, device="meta")), ValueError, r"all inputs must be on one device"),
        (dict(rank_form="tensor"), ValueError, r"rank_form must be one of \('sum', 'product'\), got 'tensor'"),
    ],
    ids=["q-rank", "k-shape", "beta-R", "v-R", "g-shape", "h0-shape", "dtype-mix", "beta-int", "k-list", "device",
         "rank-form"],
)
def test_bad_input_is_named(change, error, match):
    inp = make_inputs()
    inp["rank_form"] = "sum"
    inp.update(change)
    with pytest.raises(error, match=match):
        naive_recurrent_flow(**inp)


def test_empty_sequence_and_bad_chunk_size():
    inp = make_inputs(T=3)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        naive_chunk_flow(**inp, chunk_size=0)
    empty = {k: (v[:, :0] if v is not None and k != "initial_state" else v) for k, v in inp.items()}
    with pytest.raises(ValueError, match="T >= 1"):
        naive_recurrent_flow(**empty)
