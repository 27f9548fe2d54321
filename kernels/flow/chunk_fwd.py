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

from .chunk_io import load_mat, load_rows, store_mat, store_rows

__all__ = ["chunk_flow_output_fwd_kernel", "chunk_flow_state_fwd_kernel"]

# Intermediates are contiguous per (b·h): W [B·H, NT·BT, K], U / Vn [B·H, NT·BT, V], Ainv [B·H, NT·BT, BT],
# chunk-start states h [B·H·NT, K, V]; tiles are read through block pointers (chunk_io.py).


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
def _gates(Gtok, bh64, i_c, NT, BC: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, R_PAD: tl.constexpr):
    """Cumulative log-decay of the chunk's rows [BT], query slots [BQ] (0 past BC) and its end value."""
    base = Gtok + bh64 * NT * BC + i_c * BC
    o_q = tl.arange(0, BQ)
    b_G = tl.load(base + tl.arange(0, BT) // R_PAD)
    b_Gq = tl.load(base + o_q, mask=o_q < BC, other=0.0)
    g_end = tl.load(base + BC - 1)
    return b_G, b_Gq, g_end


@triton.jit
def chunk_flow_state_fwd_kernel(
    k, W, U, Gtok, h0, h, Vn, hT,
    T, NT, L, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, R_PAD: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
    GATED: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, MAP: tl.constexpr, DT: tl.constexpr,
    PREC: tl.constexpr,
):
    # program (i_v, i_bh, i_g) runs chunks [i_g·L, min(NT, i_g·L + L)) of one head from its group's start state
    # h0[(b·H + h)·P + g]. MAP: the state tile is [M | D] (K + V columns) from [I | 0] with values [0 | U], i.e. the
    # group's affine map S_end = M S_start + D (chunk_scan.py composes the groups); nothing else is stored.
    i_v, i_bh, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    P = tl.num_programs(2)
    i_b, i_h = i_bh // H, i_bh % H
    bh64 = i_bh.to(tl.int64)
    VW: tl.constexpr = K + V if MAP else V
    c0 = i_v * BV
    o_k = tl.arange(0, BKF)
    o_c = c0 + tl.arange(0, BV)
    if MAP:
        b_h = ((o_k[:, None] == o_c[None, :]) & (o_k < K)[:, None]).to(tl.float32)
    else:
        b_h = tl.zeros([BKF, BV], dtype=tl.float32)
        if USE_H0:
            b_h += load_mat(h0, (bh64 * P + i_g) * K * V, K, V, 0, c0, BKF, BV).to(tl.float32)
    for i_c in range(i_g * L, tl.minimum(NT, i_g * L + L)):
        if not MAP:
            store_mat(h, b_h, (bh64 * NT + i_c) * K * V, K, V, 0, c0, BKF, BV)
        b_w = load_mat(W, bh64 * NT * BT * K, NT * BT, K, i_c * BT, 0, BT, BKF).to(DT)
        if MAP:  # columns ≥ K carry U; the homogeneous columns < K see values 0
            p_u = U + (bh64 * NT * BT + i_c * BT) * V + (tl.arange(0, BT) * V)[:, None] + (o_c - K)[None, :]
            b_u = tl.load(p_u, mask=((o_c >= K) & (o_c < K + V))[None, :], other=0.0).to(tl.float32)
        else:
            b_u = load_mat(U, bh64 * NT * BT * V, NT * BT, V, i_c * BT, c0, BT, BV).to(tl.float32)
        b_vn = b_u - tl.dot(b_w, b_h.to(DT), input_precision=PREC)
        if not MAP:
            store_mat(Vn, b_vn, bh64 * NT * BT * V, NT * BT, V, i_c * BT, c0, BT, BV)
        b_k = load_rows(k, i_b, i_h, i_c * BC, T, T, H, R, K, 0, BC, R_PAD, BKF)
        if GATED:
            b_G, _, g_end = _gates(Gtok, bh64, i_c, NT, BC, BT, 16, R_PAD)
            b_k = (b_k.to(tl.float32) * tl.exp(g_end - b_G)[:, None]).to(DT)
            b_h = b_h * tl.exp(g_end)
        b_h += tl.dot(tl.trans(b_k.to(DT)), b_vn.to(DT), input_precision=PREC)
    if STORE_HT:
        store_mat(hT, b_h, (bh64 * P + i_g) * K * VW, K, VW, 0, c0, BKF, BV)


@triton.jit
def _vblock_chunk_head(V: tl.constexpr, BV: tl.constexpr):
    """``(V block, chunk, b·H + h)`` of a per-chunk program: V blocks × chunks share grid axis 0 (V blocks adjacent),
    heads take axis 1 (a second axis holds at most 65,535: chunks there capped T at 65,535 · BC tokens)."""
    nv = tl.cdiv(V, BV)
    pid = tl.program_id(0)
    return pid % nv, pid // nv, tl.program_id(1)


@triton.jit
def chunk_flow_output_fwd_kernel(
    q, k, Vn, h, Gtok, o, scale,
    T, NT, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BQ: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATED: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_c, i_bh = _vblock_chunk_head(V, BV)
    i_b, i_h = i_bh // H, i_bh % H
    bh64 = i_bh.to(tl.int64)
    t0 = i_c * BC
    t_q = tl.minimum(T, t0 + BC)  # query rows past the chunk (BQ > BC) read as zeros and are not written
    v0 = i_v * BV
    b_o = tl.zeros([BQ, BV], dtype=tl.float32)
    b_s = tl.zeros([BQ, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = load_rows(q, i_b, i_h, t0, t_q, T, H, 1, K, i_k * BK, BQ, 1, BK).to(DT)
        b_k = load_rows(k, i_b, i_h, t0, T, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(DT)
        b_hk = load_mat(h, (bh64 * NT + i_c) * K * V, K, V, i_k * BK, v0, BK, BV).to(DT)
        b_o += tl.dot(b_q, b_hk, input_precision=PREC)
        b_s += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    o_q = tl.arange(0, BQ)
    vis = (tl.arange(0, BT) // R_PAD)[None, :] <= o_q[:, None]
    if GATED:
        b_G, b_Gq, _ = _gates(Gtok, bh64, i_c, NT, BC, BT, BQ, R_PAD)
        b_o = b_o * tl.exp(b_Gq)[:, None]
        b_s = b_s * tl.exp(tl.where(vis, b_Gq[:, None] - b_G[None, :], 0.0))
    b_s = tl.where(vis, b_s, 0.0)
    b_vn = load_mat(Vn, bh64 * NT * BT * V, NT * BT, V, i_c * BT, v0, BT, BV).to(DT)
    b_o = (b_o + tl.dot(b_s.to(DT), b_vn, input_precision=PREC)) * scale
    store_rows(o, b_o, i_b, i_h, t0, t_q, T, H, 1, V, v0, BQ, 1, BV)
