# Forward Triton kernels of the chunked flow op (generalised rank-R delta rule).
#
# WY / UT transform of Yang et al. 2024 (arXiv 2406.06484, "Parallelizing Linear Transformers with the Delta Rule
# over Sequence Length"), generalised to rank R as in ParallelFlow (Cirone & Salvi 2025, arXiv 2504.00492, sum form)
# and DeltaProduct (Siems et al. 2025, arXiv 2502.10297, product form). Math: kernels/flow/naive.py header.
#
# A chunk holds BC tokens and BT = BC·R_PAD rows (t, r), token-major. R is padded to a power of two R_PAD: a padded
# rank row has k = v = β = 0, which is the identity step in both forms, so the padding is exact and the kernels read
# the caller's [B, T, H, R, ·] tensors in place (row (t, r) of head h is at ((b·T + t)·H + h)·R + r).
# G is the per-token cumulative log-decay inside the chunk (computed in torch, tokens past T repeat the last G, so
# G_end is simply the value at the chunk's last slot).
#
# Three kernels, as in fla's chunk_delta_rule:
#   chunk_flow_wy_fwd_kernel      (chunk_wy.py, parallel)  A = β·KKᵀ·e^{G_i−G_j} on the coupling mask, Ainv = (I+A)⁻¹,
#                                                          W = Ainv (β e^G K), U = Ainv (β V)
#   chunk_flow_state_fwd_kernel   (sequential over chunks) h_c = state at chunk start, Vn = U − W h_c,
#                                                          h_{c+1} = e^{G_end} h_c + (e^{G_end−G} K)ᵀ Vn
#   chunk_flow_output_fwd_kernel  (parallel over chunks)  O = e^{G} Q h_c + (QKᵀ ⊙ e^{G_t−G_j} ⊙ [tok j ≤ t]) Vn
"""Forward Triton kernels of the chunked flow (WY form) and their launchers."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["chunk_flow_output_fwd_kernel", "chunk_flow_state_fwd_kernel"]


@triton.jit
def _rows(i_c, T, R, BC: tl.constexpr, BT: tl.constexpr, R_PAD: tl.constexpr):
    """Rows of chunk ``i_c``: local index, token within the chunk, rank, and validity (token < T, rank < R)."""
    o_i = tl.arange(0, BT)
    tok = o_i // R_PAD
    rr = o_i % R_PAD
    ok = (i_c * BC + tok < T) & (rr < R)
    return o_i, tok, rr, ok


@triton.jit
def _row_offsets(i_b, i_h, i_c, tok, rr, T, H, R, BC: tl.constexpr):
    """Flat row index (int64) of rows (t, r) in a [B, T, H, R, ·] tensor."""
    t_abs = (i_c * BC + tok).to(tl.int64)
    return ((i_b.to(tl.int64) * T + t_abs) * H + i_h) * R + rr


@triton.jit
def chunk_flow_state_fwd_kernel(
    k, W, U, Gtok, h0, h, Vn, hT,
    T, H, R, K, V, NT,
    BT: tl.constexpr, BC: tl.constexpr, R_PAD: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
    GATED: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, DT: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_kf = tl.arange(0, BKF)
    o_v = i_v * BV + tl.arange(0, BV)
    mk, mv = o_kf < K, o_v < V
    m_kv = mk[:, None] & mv[None, :]
    bh64 = i_bh.to(tl.int64)
    p_state = o_kf[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BKF, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + bh64 * K * V + p_state, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(NT):
        o_i, tok, rr, ok = _rows(i_c, T, R, BC, BT, R_PAD)
        row = _row_offsets(i_b, i_h, i_c, tok, rr, T, H, R, BC)
        base = (bh64 * NT + i_c) * BT
        tl.store(h + (bh64 * NT + i_c) * K * V + p_state, b_h.to(h.dtype.element_ty), mask=m_kv)
        b_w = tl.load(W + (base + o_i)[:, None] * K + o_kf[None, :], mask=mk[None, :], other=0.0).to(DT)
        b_u = tl.load(U + (base + o_i)[:, None] * V + o_v[None, :], mask=mv[None, :], other=0.0)
        b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_h.to(DT))
        tl.store(Vn + (base + o_i)[:, None] * V + o_v[None, :], b_vn.to(Vn.dtype.element_ty), mask=mv[None, :])
        b_k = tl.load(k + row[:, None] * K + o_kf[None, :], mask=ok[:, None] & mk[None, :], other=0.0).to(DT)
        if GATED:
            b_G = tl.load(Gtok + bh64 * NT * BC + i_c * BC + tok)
            g_end = tl.load(Gtok + bh64 * NT * BC + i_c * BC + BC - 1)
            b_k = (b_k.to(tl.float32) * tl.exp(g_end - b_G)[:, None]).to(DT)
            b_h = b_h * tl.exp(g_end)
        b_h += tl.dot(tl.trans(b_k), b_vn.to(DT))
    if STORE_HT:
        tl.store(hT + bh64 * K * V + p_state, b_h.to(hT.dtype.element_ty), mask=m_kv)


@triton.jit
def chunk_flow_output_fwd_kernel(
    q, k, Vn, h, Gtok, o, scale,
    T, H, R, K, V, NT,
    BT: tl.constexpr, BC: tl.constexpr, BQ: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATED: tl.constexpr, DT: tl.constexpr,
):
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bh64 = i_bh.to(tl.int64)
    o_i, tok, rr, ok = _rows(i_c, T, R, BC, BT, R_PAD)
    row = _row_offsets(i_b, i_h, i_c, tok, rr, T, H, R, BC)
    o_q = tl.arange(0, BQ)
    q_ok = (o_q < BC) & (i_c * BC + o_q < T)
    q_row = (i_b.to(tl.int64) * T + i_c * BC + o_q) * H + i_h
    o_v = i_v * BV + tl.arange(0, BV)
    mv = o_v < V

    b_o = tl.zeros([BQ, BV], dtype=tl.float32)
    b_s = tl.zeros([BQ, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        b_q = tl.load(q + q_row[:, None] * K + o_k[None, :], mask=q_ok[:, None] & mk[None, :], other=0.0).to(DT)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=ok[:, None] & mk[None, :], other=0.0).to(DT)
        b_hk = tl.load(h + (bh64 * NT + i_c) * K * V + o_k[:, None] * V + o_v[None, :],
                       mask=mk[:, None] & mv[None, :], other=0.0)
        b_o += tl.dot(b_q, b_hk.to(DT))
        b_s += tl.dot(b_q, tl.trans(b_k))
    vis = (tok[None, :] <= o_q[:, None]) & q_ok[:, None]
    if GATED:
        b_Gq = tl.load(Gtok + bh64 * NT * BC + i_c * BC + o_q, mask=o_q < BC, other=0.0)
        b_G = tl.load(Gtok + bh64 * NT * BC + i_c * BC + tok)
        b_o = b_o * tl.exp(b_Gq)[:, None]
        b_s = b_s * tl.exp(tl.where(vis, b_Gq[:, None] - b_G[None, :], 0.0))
    b_s = tl.where(vis, b_s, 0.0)
    b_vn = tl.load(Vn + ((bh64 * NT + i_c) * BT + o_i)[:, None] * V + o_v[None, :], mask=mv[None, :], other=0.0)
    b_o = (b_o + tl.dot(b_s.to(DT), b_vn.to(DT))) * scale
    tl.store(o + q_row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=q_ok[:, None] & mv[None, :])
