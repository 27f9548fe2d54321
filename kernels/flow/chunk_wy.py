# WY / UT factors of one chunk of the flow op (Yang et al. 2024, arXiv 2406.06484, §3; rank R as in ParallelFlow,
# Cirone & Salvi 2025, arXiv 2504.00492, and DeltaProduct, Siems et al. 2025, arXiv 2502.10297).
#
# Rows (t, r) of a chunk, token-major, BT = NB·16 of them. A_ij = β_i (k_i·k_j) e^{G_i−G_j} on the coupling mask
# (strictly earlier token: sum form; strictly earlier row: product form), Ainv = (I + A)⁻¹, W = Ainv (β e^G K),
# U = Ainv (β V).
#
# The inverse is blocked as in fla's solve_tril: the 16×16 diagonal blocks by a doubling product (see _inv16), the
# off-diagonal blocks by
#   X_ij = −X_ii Σ_{j≤m<i} A_im X_mj   (X = Ainv; off-diagonal blocks of I + A are those of A),
# with fp32 16×16×16 products. Off-diagonal blocks are fully coupled in both forms: R_PAD ≤ 8 divides 16, so every row
# of a later 16-row block belongs to a strictly later token.
"""The WY kernel of the chunked flow: (I + A)⁻¹ by 16×16 blocks, then W and U."""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import _row_offsets
from .chunk_io import load_rows, store_mat

__all__ = ["chunk_flow_wy_fwd_kernel"]


@triton.jit
def _blk(i_b, i_h, i_c, blk: tl.constexpr, beta, Gtok, T, H, R, NT, BC: tl.constexpr, R_PAD: tl.constexpr,
         GATED: tl.constexpr):
    """Rows of 16-row block ``blk``: local index, token, flat row offsets, validity, β and G."""
    o = blk * 16 + tl.arange(0, 16)
    tok = o // R_PAD
    rr = o % R_PAD
    ok = (i_c * BC + tok < T) & (rr < R)
    row = _row_offsets(i_b, i_h, i_c, tok, rr, T, H, R, BC)
    b_beta = tl.load(beta + row, mask=ok, other=0.0).to(tl.float32)
    if GATED:
        b_G = tl.load(Gtok + (i_b * H + i_h).to(tl.int64) * NT * BC + i_c * BC + tok)
    else:
        b_G = tl.zeros([16], dtype=tl.float32)
    return o, tok, row, ok, b_beta, b_G


@triton.jit
def _a_diag(gram, o, tok, b_beta, b_G, PRODUCT: tl.constexpr, GATED: tl.constexpr):
    if PRODUCT:
        coup = o[:, None] > o[None, :]
    else:
        coup = tok[:, None] > tok[None, :]
    if GATED:
        gram = gram * tl.exp(tl.where(coup, b_G[:, None] - b_G[None, :], 0.0))
    return tl.where(coup, gram * b_beta[:, None], 0.0)


@triton.jit
def _a_off(gram, b_beta_i, b_G_i, b_G_j, GATED: tl.constexpr):
    if GATED:
        gram = gram * tl.exp(b_G_i[:, None] - b_G_j[None, :])
    return gram * b_beta_i[:, None]


@triton.jit
def _inv16(A):
    """(I + A)⁻¹ of a strictly lower 16×16 fp32 tile by doubling: A is nilpotent (A¹⁶ = 0) and
    (I + A)(I − A)(I + A²)(I + A⁴)(I + A⁸) = I − A¹⁶ = I, so the four factors multiply to the inverse. Seven
    16×16×16 products instead of 15 dependent row steps, each a cross-thread reduction (measured on H100: with the row
    loop this kernel took ~0.73 ms of a 5 ms fwd+bwd at B4 T8192 H16 D128)."""
    o = tl.arange(0, 16)
    eye = (o[:, None] == o[None, :]).to(tl.float32)
    A2 = _mm(A, A)
    A4 = _mm(A2, A2)
    A8 = _mm(A4, A4)
    return _mm(_mm(_mm(eye - A, eye + A2), eye + A4), eye + A8)


@triton.jit
def _d(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _ld(x, i_b, i_h, i_c, blk: tl.constexpr, T, H, R, D, d0, BC: tl.constexpr, R_PAD: tl.constexpr,
        BD: tl.constexpr):
    """Rows of 16-row block ``blk`` (16 // R_PAD tokens), columns [d0, d0 + BD)."""
    NTOK: tl.constexpr = 16 // R_PAD
    return load_rows(x, i_b, i_h, i_c * BC + blk * NTOK, T, T, H, R, D, d0, NTOK, R_PAD, BD)


@triton.jit
def _st(x, val, bh64, i_c, blk: tl.constexpr, NT, n_cols, c0, BT: tl.constexpr, BD: tl.constexpr):
    """Rows of 16-row block ``blk`` of the chunk in an intermediate [B·H, NT·BT, n_cols]."""
    store_mat(x, val, bh64 * NT * BT * n_cols, NT * BT, n_cols, i_c * BT + blk * 16, c0, 16, BD)


@triton.jit
def chunk_flow_wy_fwd_kernel(
    k, v, beta, Gtok, W, U, Ainv,
    T, NT, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRODUCT: tl.constexpr, GATED: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    NB: tl.constexpr = BT // 16
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o0, tok0, row0, ok0, be0, G0 = _blk(i_b, i_h, i_c, 0, beta, Gtok, T, H, R, NT, BC, R_PAD, GATED)
    g00 = tl.zeros([16, 16], dtype=tl.float32)
    if NB >= 2:
        o1, tok1, row1, ok1, be1, G1 = _blk(i_b, i_h, i_c, 1, beta, Gtok, T, H, R, NT, BC, R_PAD, GATED)
        g10 = tl.zeros([16, 16], dtype=tl.float32)
        g11 = tl.zeros([16, 16], dtype=tl.float32)
    if NB == 4:
        o2, tok2, row2, ok2, be2, G2 = _blk(i_b, i_h, i_c, 2, beta, Gtok, T, H, R, NT, BC, R_PAD, GATED)
        o3, tok3, row3, ok3, be3, G3 = _blk(i_b, i_h, i_c, 3, beta, Gtok, T, H, R, NT, BC, R_PAD, GATED)
        g20 = tl.zeros([16, 16], dtype=tl.float32)
        g21 = tl.zeros([16, 16], dtype=tl.float32)
        g22 = tl.zeros([16, 16], dtype=tl.float32)
        g30 = tl.zeros([16, 16], dtype=tl.float32)
        g31 = tl.zeros([16, 16], dtype=tl.float32)
        g32 = tl.zeros([16, 16], dtype=tl.float32)
        g33 = tl.zeros([16, 16], dtype=tl.float32)

    # Gram blocks K_i K_jᵀ (lower triangle of blocks)
    for i_k in range(tl.cdiv(K, BK)):
        k0 = _ld(k, i_b, i_h, i_c, 0, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(DT)
        g00 += _d(k0, tl.trans(k0), PREC)
        if NB >= 2:
            k1 = _ld(k, i_b, i_h, i_c, 1, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(DT)
            g10 += _d(k1, tl.trans(k0), PREC)
            g11 += _d(k1, tl.trans(k1), PREC)
        if NB == 4:
            k2 = _ld(k, i_b, i_h, i_c, 2, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(DT)
            k3 = _ld(k, i_b, i_h, i_c, 3, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(DT)
            g20 += _d(k2, tl.trans(k0), PREC)
            g21 += _d(k2, tl.trans(k1), PREC)
            g22 += _d(k2, tl.trans(k2), PREC)
            g30 += _d(k3, tl.trans(k0), PREC)
            g31 += _d(k3, tl.trans(k1), PREC)
            g32 += _d(k3, tl.trans(k2), PREC)
            g33 += _d(k3, tl.trans(k3), PREC)

    # blocked inverse
    x00 = _inv16(_a_diag(g00, o0, tok0, be0, G0, PRODUCT, GATED))
    if NB >= 2:
        x11 = _inv16(_a_diag(g11, o1, tok1, be1, G1, PRODUCT, GATED))
        a10 = _a_off(g10, be1, G1, G0, GATED)
        x10 = -_mm(x11, _mm(a10, x00))
    if NB == 4:
        x22 = _inv16(_a_diag(g22, o2, tok2, be2, G2, PRODUCT, GATED))
        x33 = _inv16(_a_diag(g33, o3, tok3, be3, G3, PRODUCT, GATED))
        a20 = _a_off(g20, be2, G2, G0, GATED)
        a21 = _a_off(g21, be2, G2, G1, GATED)
        a30 = _a_off(g30, be3, G3, G0, GATED)
        a31 = _a_off(g31, be3, G3, G1, GATED)
        a32 = _a_off(g32, be3, G3, G2, GATED)
        x21 = -_mm(x22, _mm(a21, x11))
        x32 = -_mm(x33, _mm(a32, x22))
        x20 = -_mm(x22, _mm(a20, x00) + _mm(a21, x10))
        x31 = -_mm(x33, _mm(a31, x11) + _mm(a32, x21))
        x30 = -_mm(x33, _mm(a30, x00) + _mm(a31, x10) + _mm(a32, x20))

    # store Ainv (zeros above the block diagonal: the buffer is uninitialised)
    bh64 = i_bh.to(tl.int64)
    z = tl.zeros([16, 16], dtype=tl.float32)
    _st(Ainv, x00, bh64, i_c, 0, NT, BT, 0 * 16, BT, 16)
    if NB >= 2:
        _st(Ainv, z, bh64, i_c, 0, NT, BT, 1 * 16, BT, 16)
        _st(Ainv, x10, bh64, i_c, 1, NT, BT, 0 * 16, BT, 16)
        _st(Ainv, x11, bh64, i_c, 1, NT, BT, 1 * 16, BT, 16)
    if NB == 4:
        _st(Ainv, z, bh64, i_c, 0, NT, BT, 2 * 16, BT, 16)
        _st(Ainv, z, bh64, i_c, 0, NT, BT, 3 * 16, BT, 16)
        _st(Ainv, z, bh64, i_c, 1, NT, BT, 2 * 16, BT, 16)
        _st(Ainv, z, bh64, i_c, 1, NT, BT, 3 * 16, BT, 16)
        _st(Ainv, x20, bh64, i_c, 2, NT, BT, 0 * 16, BT, 16)
        _st(Ainv, x21, bh64, i_c, 2, NT, BT, 1 * 16, BT, 16)
        _st(Ainv, x22, bh64, i_c, 2, NT, BT, 2 * 16, BT, 16)
        _st(Ainv, z, bh64, i_c, 2, NT, BT, 3 * 16, BT, 16)
        _st(Ainv, x30, bh64, i_c, 3, NT, BT, 0 * 16, BT, 16)
        _st(Ainv, x31, bh64, i_c, 3, NT, BT, 1 * 16, BT, 16)
        _st(Ainv, x32, bh64, i_c, 3, NT, BT, 2 * 16, BT, 16)
        _st(Ainv, x33, bh64, i_c, 3, NT, BT, 3 * 16, BT, 16)

    # W = Ainv (β e^G K), U = Ainv (β V), by row blocks
    c0 = (be0 * tl.exp(G0))[:, None]
    y00 = x00.to(DT)
    if NB >= 2:
        c1 = (be1 * tl.exp(G1))[:, None]
        y10, y11 = x10.to(DT), x11.to(DT)
    if NB == 4:
        c2 = (be2 * tl.exp(G2))[:, None]
        c3 = (be3 * tl.exp(G3))[:, None]
        y20, y21, y22 = x20.to(DT), x21.to(DT), x22.to(DT)
        y30, y31, y32, y33 = x30.to(DT), x31.to(DT), x32.to(DT), x33.to(DT)
    for i_k in range(tl.cdiv(K, BK)):
        k0 = (_ld(k, i_b, i_h, i_c, 0, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(tl.float32) * c0).to(DT)
        _st(W, _d(y00, k0, PREC), bh64, i_c, 0, NT, K, i_k * BK, BT, BK)
        if NB >= 2:
            k1 = (_ld(k, i_b, i_h, i_c, 1, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(tl.float32) * c1).to(DT)
            _st(W, _d(y10, k0, PREC) + _d(y11, k1, PREC), bh64, i_c, 1, NT, K, i_k * BK, BT, BK)
        if NB == 4:
            k2 = (_ld(k, i_b, i_h, i_c, 2, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(tl.float32) * c2).to(DT)
            k3 = (_ld(k, i_b, i_h, i_c, 3, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(tl.float32) * c3).to(DT)
            _st(W, _d(y20, k0, PREC) + _d(y21, k1, PREC) + _d(y22, k2, PREC), bh64, i_c, 2, NT, K, i_k * BK, BT, BK)
            w3 = _d(y30, k0, PREC) + _d(y31, k1, PREC) + _d(y32, k2, PREC) + _d(y33, k3, PREC)
            _st(W, w3, bh64, i_c, 3, NT, K, i_k * BK, BT, BK)
    for i_v in range(tl.cdiv(V, BV)):
        v0 = (_ld(v, i_b, i_h, i_c, 0, T, H, R, V, i_v * BV, BC, R_PAD, BV).to(tl.float32) * be0[:, None]).to(DT)
        _st(U, _d(y00, v0, PREC), bh64, i_c, 0, NT, V, i_v * BV, BT, BV)
        if NB >= 2:
            v1 = (_ld(v, i_b, i_h, i_c, 1, T, H, R, V, i_v * BV, BC, R_PAD, BV).to(tl.float32) * be1[:, None]).to(DT)
            _st(U, _d(y10, v0, PREC) + _d(y11, v1, PREC), bh64, i_c, 1, NT, V, i_v * BV, BT, BV)
        if NB == 4:
            v2 = (_ld(v, i_b, i_h, i_c, 2, T, H, R, V, i_v * BV, BC, R_PAD, BV).to(tl.float32) * be2[:, None]).to(DT)
            v3 = (_ld(v, i_b, i_h, i_c, 3, T, H, R, V, i_v * BV, BC, R_PAD, BV).to(tl.float32) * be3[:, None]).to(DT)
            _st(U, _d(y20, v0, PREC) + _d(y21, v1, PREC) + _d(y22, v2, PREC), bh64, i_c, 2, NT, V, i_v * BV, BT, BV)
            u3 = _d(y30, v0, PREC) + _d(y31, v1, PREC) + _d(y32, v2, PREC) + _d(y33, v3, PREC)
            _st(U, u3, bh64, i_c, 3, NT, V, i_v * BV, BT, BV)
