"""The float64 scan references: the sequential scan against the closed form h_t = Σ_s (A_t⋯A_{s+1}) b_s + (A_t⋯A_1) h_0,
the chunked (associative) form against the sequential one, the adjoint identities against autograd, gradcheck,
associativity of the combine, and named errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pflow_dist.kernels.common.affine import compose
from pflow_dist.kernels.scan.naive import (
    naive_chunked_scan,
    naive_scan,
    naive_scan_adjoint,
    naive_scan_backward,
)
from pflow_dist.testing import assert_close

F64 = torch.float64


def make(B=2, T=11, N=4, diagonal=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, N, generator=gen, dtype=F64) if diagonal else torch.randn(B, T, N, N, generator=gen,
                                                                                     dtype=F64) * 0.4
    return a, torch.randn(B, T, N, generator=gen, dtype=F64), torch.randn(B, N, generator=gen, dtype=F64)


def closed_form(a, b, h0):
    B, T, N = b.shape
    mats = torch.diag_embed(a) if a.dim() == 3 else a
    out = torch.zeros(B, T, N, dtype=F64)
    for t in range(T):
        P = torch.eye(N, dtype=F64).expand(B, N, N)
        acc = torch.zeros(B, N, dtype=F64)
        for s in range(t, -1, -1):  # P = A_t ⋯ A_{s+1}
            acc = acc + (P @ b[:, s, :, None])[..., 0]
            P = P @ mats[:, s]
        out[:, t] = acc + (P @ h0[..., None])[..., 0]
    return out


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
def test_scan_matches_closed_form(diagonal):
    a, b, h0 = make(diagonal=diagonal)
    h, hT = naive_scan(a, b, h0, output_final_state=True)
    ref = closed_form(a, b, h0)
    assert_close("h", ref, h, 1e-12)
    assert_close("h_T", ref[:, -1], hT, 1e-12)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 40), chunk=st.integers(1, 17), diagonal=st.booleans(), seed=st.integers(0, 2**16),
       with_h0=st.booleans())
def test_chunked_scan_equals_sequential(T, chunk, diagonal, seed, with_h0):
    a, b, h0 = make(B=2, T=T, N=3, diagonal=diagonal, seed=seed)
    h0 = h0 if with_h0 else None
    h, hT = naive_scan(a, b, h0, output_final_state=True)
    hc, hTc = naive_chunked_scan(a, b, h0, output_final_state=True, chunk_size=chunk)
    assert_close("h", h, hc, 1e-12)
    assert_close("h_T", hT, hTc, 1e-12)


@settings(max_examples=20, deadline=None)
@given(diagonal=st.booleans(), seed=st.integers(0, 2**16))
def test_combine_is_associative(diagonal, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 4) if diagonal else (3, 4, 4)
    maps = [(torch.randn(*shape, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64))
            for _ in range(3)]
    left = compose(compose(maps[0], maps[1], diagonal), maps[2], diagonal)
    right = compose(maps[0], compose(maps[1], maps[2], diagonal), diagonal)
    for x, y in zip(left, right):
        assert_close("assoc", x, y, 1e-13)


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
@pytest.mark.parametrize("with_final", [True, False], ids=["dhT", "no-dhT"])
def test_adjoint_backward_matches_autograd(diagonal, with_final):
    a, b, h0 = make(T=9, diagonal=diagonal)
    a_, b_, h0_ = (x.clone().requires_grad_(True) for x in (a, b, h0))
    h, hT = naive_scan(a_, b_, h0_, output_final_state=True)
    gh, gT = torch.randn_like(h), torch.randn_like(hT)
    loss = (h * gh).sum() + ((hT * gT).sum() if with_final else 0)
    loss.backward()
    da, db, dh0 = naive_scan_backward(a, h.detach(), h0, gh, gT if with_final else None)
    assert_close("da", a_.grad, da, 1e-12)
    assert_close("db", b_.grad, db, 1e-12)
    assert_close("dh0", h0_.grad, dh0, 1e-12)


def test_adjoint_is_the_reverse_scan_with_shifted_gates():
    """λ = reverse scan of ḡ with gates a_{t+1}: the same forward scan run on flipped, shifted inputs."""
    a, _, _ = make(T=10)
    g = torch.randn(2, 10, 4, dtype=F64)
    lam = naive_scan_adjoint(a, g)
    shifted = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)  # a_{t+1}, 0 past the end
    rev, _ = naive_scan(shifted.flip(1), g.flip(1))
    assert_close("lambda", lam, rev.flip(1), 1e-13)


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
def test_gradcheck(diagonal):
    a, b, h0 = (x.requires_grad_(True) for x in make(B=1, T=5, N=2, diagonal=diagonal))
    assert torch.autograd.gradcheck(lambda *x: naive_scan(*x, output_final_state=True), (a, b, h0))
    assert torch.autograd.gradcheck(lambda *x: naive_chunked_scan(*x, chunk_size=2)[0], (a, b, h0))


def test_dtypes_and_t1():
    a, b, h0 = make(T=1)
    h, hT = naive_scan(a.float(), b.float(), h0.float(), output_final_state=True)
    assert h.dtype == torch.float32 and hT.dtype == torch.float32
    assert_close("T=1", a[:, 0] * h0 + b[:, 0], h[:, 0].double(), 1e-6)


@pytest.mark.parametrize(
    "a_shape, b_shape, h0_shape, match",
    [
        ((2, 5, 3), (2, 5), None, r"b must have 3 dimensions \[B, T, N\], got shape \(2, 5\)"),
        ((2, 5, 4), (2, 5, 3), None, r"a must have shape \[2, 5, 3\]"),
        ((2, 5, 3, 2), (2, 5, 3), None, r"a must have shape \[2, 5, 3, 3\]"),
        ((2, 5, 3), (2, 5, 3), (2, 4), r"initial_state must have shape \[2, 3\]"),
        ((2, 0, 3), (2, 0, 3), None, r"at least one time step"),
    ],
    ids=["b-rank", "a-diag", "a-dense", "h0", "T0"],
)
def test_bad_shapes_are_named(a_shape, b_shape, h0_shape, match):
    h0 = None if h0_shape is None else torch.zeros(h0_shape)
    with pytest.raises(ValueError, match=match):
        naive_scan(torch.zeros(a_shape), torch.zeros(b_shape), h0)


def test_bad_dtype_is_named():
    with pytest.raises(TypeError, match="a must have dtype in"):
        naive_scan(torch.zeros(1, 2, 3, dtype=torch.int32), torch.zeros(1, 2, 3))
