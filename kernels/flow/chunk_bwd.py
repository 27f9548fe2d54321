# Backward Triton kernels of the chunked flow op (rank-R delta rule, WY form). Papers: see chunk_fwd.py.
#
# Per chunk, with incoming state S (h_c), scaled queries qs = scale·q, row decays Γ_i = e^{G_i}, κ_i = e^{G_end−G_i}:
#   forward   Kβ = diag(βΓ) K, Vβ = diag(β) V, W = Ainv Kβ, U = Ainv Vβ, Vn = U − W S,
#             O_t = e^{G_t} qs_t S + Σ_j Att_tj Vn_j   (Att_tj = (qs_t·k_j) e^{G_t−G_j} [tok j ≤ t]),
#             S' = e^{G_end} S + Σ_j κ_j k_j Vn_jᵀ
#   backward  (given dO and dS' = the gradient of the chunk-end state)
#     dVn  = Attᵀ dO + diag(κ) K dS'                            (state kernel; Attᵀ dO from the dvlocal kernel
#                                                                  when the state pass runs in groups)
#     dS   = e^{G_end} dS' + (e^{G} qs)ᵀ dO − Wᵀ dVn            (state kernel, reverse over chunks)
#     dW   = −dVn Sᵀ,  dKβ = Ainvᵀ dW,  dVβ = Ainvᵀ dVn          (grads kernel, below)
#     dA   = −(dKβ Wᵀ + dVβ Uᵀ) on the coupling mask             (d(I+A)⁻¹ = −Ainv dA Ainv)
#          = −dVβ Vnᵀ   (dKβ Wᵀ = −Ainvᵀ dVn (W S)ᵀ and W S = U − Vn: no pass over K, no U or W needed)
#     with A_ij = β_i (k_i·k_j) e^{G_i−G_j} and P = dA ⊙ β_i e^{G_i−G_j}:
#     dk   = scale·DpDᵀ q + diag(κ) Vn dS'ᵀ + diag(βΓ) dKβ + P K + Pᵀ K,     Dp = dO Vnᵀ, DpD = Dp ⊙ e^{G_t−G_j} ⊙ vis
#     dq   = scale·(e^{G} ⊙ dO Sᵀ + DpD K),  dv = diag(β) dVβ,
#     dβ   = rowsum(dVβ ⊙ V) + Γ rowsum(dKβ ⊙ K) + rowsum(dA ⊙ KKᵀ ⊙ e^{G_i−G_j})
#     dG (per row / query slot; summed and reverse-cumsummed to dg in torch):
#       rows    rowsum(dA⊙A) − colsum(dA⊙A) − colsum(Dp⊙Att) + βΓ rowsum(dKβ⊙K) − κ rowsum(K ⊙ Vn dS'ᵀ)
#       queries rowsum(Dp⊙Att) + e^{G_t} qs_t·(S dO_t),   last slot += e^{G_end}⟨S, dS'⟩ + Σ_j κ_j k_j·(dS' Vn_j)
"""Backward Triton kernels of the chunked flow: local dVn, the reverse state pass, the per-chunk gradients."""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import _gates, _row_offsets, _rows, _vblock_chunk_head
from .chunk_io import load_mat, load_rows, store_mat, store_rows

__all__ = ["chunk_flow_dvlocal_bwd_kernel", "chunk_flow_grads_bwd_kernel", "chunk_flow_state_bwd_kernel"]


@triton.jit
def chunk_flow_dvlocal_bwd_kernel(
    q, k, do, Gtok, dVn, scale,
    T, NT, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BQ: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATED: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_c, i_bh = _vblock_chunk_head(V, BV)
    i_b, i_h = i_bh // H, i_bh % H
    bh64 = i_bh.to(tl.int64)
    t0 = i_c * BC
    t_q = tl.minimum(T, t0 + BC)
    b_s = tl.zeros([BQ, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = load_rows(q, i_b, i_h, t0, t_q, T, H, 1, K, i_k * BK, BQ, 1, BK).to(DT)
        b_k = load_rows(k, i_b, i_h, t0, T, T, H, R, K, i_k * BK, BC, R_PAD, BK).to(DT)
        b_s += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    o_q = tl.arange(0, BQ)
    vis = (tl.arange(0, BT) // R_PAD)[None, :] <= o_q[:, None]
    if GATED:
        b_G, b_Gq, _ = _gates(Gtok, bh64, i_c, NT, BC, BT, BQ, R_PAD)
        b_s = b_s * tl.exp(tl.where(vis, b_Gq[:, None] - b_G[None, :], 0.0))
    b_s = tl.where(vis, b_s * scale, 0.0)
    b_do = load_rows(do, i_b, i_h, t0, t_q, T, H, 1, V, i_v * BV, BQ, 1, BV).to(DT)
    b_dv = tl.dot(tl.trans(b_s).to(DT), b_do, input_precision=PREC)
    store_mat(dVn, b_dv, bh64 * NT * BT * V, NT * BT, V, i_c * BT, i_v * BV, BT, BV)


@triton.jit
def chunk_flow_state_bwd_kernel(
    q, k, W, do, Gtok, dht, dh, dVn, dh0, scale,
    T, NT, L, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BQ: tl.constexpr, R_PAD: tl.constexpr, BKF: tl.constexpr,
    BV: tl.constexpr, GATED: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, MAP: tl.constexpr,
    FUSE_DVL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    # reverse over chunks [i_g·L, min(NT, i_g·L + L)) from the group's end gradient dht[(b·H + h)·P + g].
    # dS_start = Φ dS_end + E with Φ = e^{G_end} I − Wᵀ diag(κ) K per chunk, E = (e^G qs)ᵀ dO − Wᵀ dVn_local.
    # MAP: the tile is [Φ | E] over the group (K + V columns, from [I | 0]); dh and dVn are not stored.
    # FUSE_DVL: dVn_local = Attᵀ dO is computed here (the dvlocal kernel's work, off the recurrence's critical path)
    # instead of read from dVn, which is then only written (not at all in MAP mode).
    i_v, i_bh, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    P = tl.num_programs(2)
    i_b, i_h = i_bh // H, i_bh % H
    bh64 = i_bh.to(tl.int64)
    VW: tl.constexpr = K + V if MAP else V
    c0 = i_v * BV
    o_k = tl.arange(0, BKF)
    o_c = c0 + tl.arange(0, BV)
    m_inh = ((o_c >= K) & (o_c < K + V))[None, :]  # MAP: columns carrying the inhomogeneous part
    if MAP:
        b_dh = ((o_k[:, None] == o_c[None, :]) & (o_k < K)[:, None]).to(tl.float32)
    else:
        b_dh = tl.zeros([BKF, BV], dtype=tl.float32)
        if USE_DHT:
            b_dh += load_mat(dht, (bh64 * P + i_g) * K * V, K, V, 0, c0, BKF, BV).to(tl.float32)
    c_lo = i_g * L
    c_hi = tl.minimum(NT, c_lo + L)
    for i_r in range(c_hi - c_lo):
        i_c = c_hi - 1 - i_r
        t0 = i_c * BC
        t_q = tl.minimum(T, t0 + BC)
        if not MAP:
            store_mat(dh, b_dh, (bh64 * NT + i_c) * K * V, K, V, 0, c0, BKF, BV)
        b_k = load_rows(k, i_b, i_h, t0, T, T, H, R, K, 0, BC, R_PAD, BKF)
        b_q = load_rows(q, i_b, i_h, t0, t_q, T, H, 1, K, 0, BQ, 1, BKF)
        if GATED:
            b_G, b_Gq, g_end = _gates(Gtok, bh64, i_c, NT, BC, BT, BQ, R_PAD)
        if FUSE_DVL:
            b_s = tl.dot(b_q.to(DT), tl.trans(b_k.to(DT)), input_precision=PREC)
            vis = (tl.arange(0, BT) // R_PAD)[None, :] <= tl.arange(0, BQ)[:, None]
            if GATED:
                b_s = b_s * tl.exp(tl.where(vis, b_Gq[:, None] - b_G[None, :], 0.0))
            b_s = tl.where(vis, b_s * scale, 0.0)
        if GATED:
            b_k = (b_k.to(tl.float32) * tl.exp(g_end - b_G)[:, None]).to(DT)
            b_q = (b_q.to(tl.float32) * (scale * tl.exp(b_Gq))[:, None]).to(DT)
        else:
            b_k = b_k.to(DT)
            b_q = (b_q.to(tl.float32) * scale).to(DT)
        if MAP:
            p_do = do + ((i_b.to(tl.int64) * T + t0) * H + i_h) * V
            p_do += (tl.arange(0, BQ) * (H * V))[:, None] + (o_c - K)[None, :]
            b_do = tl.load(p_do, mask=(t0 + tl.arange(0, BQ) < t_q)[:, None] & m_inh, other=0.0).to(DT)
            if FUSE_DVL:  # b_do is zero in the Φ columns, so is Attᵀ dO there
                b_dvn = tl.dot(tl.trans(b_s).to(DT), b_do, input_precision=PREC)
            else:
                p_rv = (bh64 * NT * BT + i_c * BT) * V + (tl.arange(0, BT) * V)[:, None] + (o_c - K)[None, :]
                b_dvn = tl.load(dVn + p_rv, mask=m_inh, other=0.0).to(tl.float32)
            b_dvn += tl.dot(b_k, b_dh.to(DT), input_precision=PREC)
        else:
            b_do = load_rows(do, i_b, i_h, t0, t_q, T, H, 1, V, c0, BQ, 1, BV).to(DT)
            if FUSE_DVL:
                b_dvn = tl.dot(tl.trans(b_s).to(DT), b_do, input_precision=PREC)
            else:
                b_dvn = load_mat(dVn, bh64 * NT * BT * V, NT * BT, V, i_c * BT, c0, BT, BV).to(tl.float32)
            b_dvn += tl.dot(b_k, b_dh.to(DT), input_precision=PREC)
            store_mat(dVn, b_dvn, bh64 * NT * BT * V, NT * BT, V, i_c * BT, c0, BT, BV)
        b_w = load_mat(W, bh64 * NT * BT * K, NT * BT, K, i_c * BT, 0, BT, BKF).to(DT)
        if GATED:
            b_dh = b_dh * tl.exp(g_end)
        b_dh += tl.dot(tl.trans(b_q), b_do, input_precision=PREC)
        b_dh -= tl.dot(tl.trans(b_w), b_dvn.to(DT), input_precision=PREC)
    if STORE_DH0:
        store_mat(dh0, b_dh, (bh64 * P + i_g) * K * VW, K, VW, 0, c0, BKF, BV)


@triton.jit
def chunk_flow_grads_bwd_kernel(
    q, k, v, beta, Gtok, Ainv, h, dh, Vn, dVn, do,
    dq, dk, dv, dbeta, dG_row, dG_q, scale,
    T, NT, H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BQ: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PRODUCT: tl.constexpr, GATED: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bh64 = i_bh.to(tl.int64)
    o_i, tok, rr, ok = _rows(i_c, T, R, BC, BT, R_PAD)
    row = _row_offsets(i_b, i_h, i_c, tok, rr, T, H, R, BC)
    o_q = tl.arange(0, BQ)
    t0 = i_c * BC
    t_q = tl.minimum(T, t0 + BC)
    r0 = i_c * BT
    bV = bh64 * NT * BT * V  # base of the [B·H, NT·BT, V] intermediates
    sbase = (bh64 * NT + i_c) * K * V

    b_beta = tl.load(beta + row, mask=ok, other=0.0).to(tl.float32)
    vis = (tok[None, :] <= o_q[:, None]) & (o_q < BC)[:, None]
    if PRODUCT:
        coup = o_i[:, None] > o_i[None, :]
    else:
        coup = tok[:, None] > tok[None, :]
    b_Ai = load_mat(Ainv, bh64 * NT * BT * BT, NT * BT, BT, r0, 0, BT, BT).to(DT)

    # pass over V: Dp = dO Vnᵀ, dVβ = Ainvᵀ dVn (-> dv, dβ), dA = −dVβ Vnᵀ
    b_Dp = tl.zeros([BQ, BT], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        v0 = i_v * BV
        b_do = load_rows(do, i_b, i_h, t0, t_q, T, H, 1, V, v0, BQ, 1, BV).to(DT)
        b_vn = load_mat(Vn, bV, NT * BT, V, r0, v0, BT, BV).to(DT)
        b_dvn = load_mat(dVn, bV, NT * BT, V, r0, v0, BT, BV).to(DT)
        b_v = load_rows(v, i_b, i_h, t0, T, T, H, R, V, v0, BC, R_PAD, BV)
        b_Dp += tl.dot(b_do, tl.trans(b_vn), input_precision=PREC)
        b_dvb = tl.dot(tl.trans(b_Ai), b_dvn, input_precision=PREC)
        b_dA -= tl.dot(b_dvb.to(DT), tl.trans(b_vn), input_precision=PREC)
        b_db += tl.sum(b_dvb * b_v.to(tl.float32), 1)
        store_rows(dv, b_dvb * b_beta[:, None], i_b, i_h, t0, T, T, H, R, V, v0, BC, R_PAD, BV)

    # first pass over K: scores QKᵀ (gated only), Gram KKᵀ
    b_s = tl.zeros([BQ, BT], dtype=tl.float32)
    b_gram = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        k0 = i_k * BK
        b_k = load_rows(k, i_b, i_h, t0, T, T, H, R, K, k0, BC, R_PAD, BK).to(DT)
        if GATED:
            b_q = load_rows(q, i_b, i_h, t0, t_q, T, H, 1, K, k0, BQ, 1, BK).to(DT)
            b_s += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        b_gram += tl.dot(b_k, tl.trans(b_k), input_precision=PREC)

    if GATED:
        b_G, b_Gq, g_end = _gates(Gtok, bh64, i_c, NT, BC, BT, BQ, R_PAD)
        dec_q = tl.where(vis, tl.exp(tl.where(vis, b_Gq[:, None] - b_G[None, :], 0.0)), 0.0)
        dec_a = tl.where(coup, tl.exp(tl.where(coup, b_G[:, None] - b_G[None, :], 0.0)), 0.0)
        b_gam = tl.exp(b_G)
        b_kap = tl.exp(g_end - b_G)
        b_gq = tl.exp(b_Gq)
    else:
        dec_q = vis.to(tl.float32)
        dec_a = coup.to(tl.float32)
        b_gam = tl.full([BT], 1.0, dtype=tl.float32)
        b_kap = tl.full([BT], 1.0, dtype=tl.float32)
        b_gq = tl.full([BQ], 1.0, dtype=tl.float32)
    b_DpD = b_Dp * dec_q
    b_dA = tl.where(coup, b_dA, 0.0)
    b_Ad = b_gram * dec_a  # A = diag(β) b_Ad
    b_db += tl.sum(b_dA * b_Ad, 1)
    b_P = b_dA * dec_a * b_beta[:, None]
    if GATED:
        b_dAA = b_dA * b_Ad * b_beta[:, None]
        b_DpA = b_DpD * b_s * scale
        b_dGr = tl.sum(b_dAA, 1) - tl.sum(b_dAA, 0) - tl.sum(b_DpA, 0)
        b_dGq = tl.sum(b_DpA, 1)
        b_end = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)
    b_DpDd = b_DpD.to(DT)
    b_Pd = b_P.to(DT)

    # second pass over K: dq, dk (every term), the K parts of dβ and dG
    for i_k in range(tl.cdiv(K, BK)):
        k0 = i_k * BK
        b_q = load_rows(q, i_b, i_h, t0, t_q, T, H, 1, K, k0, BQ, 1, BK).to(DT)
        b_k = load_rows(k, i_b, i_h, t0, T, T, H, R, K, k0, BC, R_PAD, BK).to(DT)
        b_dW = tl.zeros([BT, BK], dtype=tl.float32)
        b_dqi = tl.zeros([BQ, BK], dtype=tl.float32)
        b_kds = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            v0 = i_v * BV
            b_h = load_mat(h, sbase, K, V, k0, v0, BK, BV).to(DT)
            b_dhc = load_mat(dh, sbase, K, V, k0, v0, BK, BV).to(DT)
            b_do = load_rows(do, i_b, i_h, t0, t_q, T, H, 1, V, v0, BQ, 1, BV).to(DT)
            b_vn = load_mat(Vn, bV, NT * BT, V, r0, v0, BT, BV).to(DT)
            b_dvn = load_mat(dVn, bV, NT * BT, V, r0, v0, BT, BV).to(DT)
            b_dW -= tl.dot(b_dvn, tl.trans(b_h), input_precision=PREC)
            b_dqi += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
            b_kds += tl.dot(b_vn, tl.trans(b_dhc), input_precision=PREC)
            if GATED:
                b_end += tl.sum(tl.sum(b_h.to(tl.float32) * b_dhc.to(tl.float32), 1), 0) * tl.exp(g_end)
        b_dkb = tl.dot(tl.trans(b_Ai), b_dW.to(DT), input_precision=PREC)
        b_dq = (b_dqi * b_gq[:, None] + tl.dot(b_DpDd, b_k, input_precision=PREC)) * scale
        b_dk = tl.dot(tl.trans(b_DpDd), b_q, input_precision=PREC) * scale + b_kds * b_kap[:, None]
        b_dk += b_dkb * (b_beta * b_gam)[:, None]
        b_dk += tl.dot(b_Pd, b_k, input_precision=PREC) + tl.dot(tl.trans(b_Pd), b_k, input_precision=PREC)
        b_kf = b_k.to(tl.float32)
        b_dkk = tl.sum(b_dkb * b_kf, 1)
        b_db += b_gam * b_dkk
        if GATED:
            b_t2 = tl.sum(b_kf * b_kds, 1) * b_kap
            b_dGr += b_dkk * b_beta * b_gam - b_t2
            b_end += tl.sum(b_t2, 0)
            b_dGq += b_gq * scale * tl.sum(b_q.to(tl.float32) * b_dqi, 1)
        store_rows(dq, b_dq, i_b, i_h, t0, t_q, T, H, 1, K, k0, BQ, 1, BK)
        store_rows(dk, b_dk, i_b, i_h, t0, T, T, H, R, K, k0, BC, R_PAD, BK)
    tl.store(dbeta + row, b_db.to(dbeta.dtype.element_ty), mask=ok)
    if GATED:
        b_dGq += tl.where(o_q == BC - 1, b_end, 0.0)
        tl.store(dG_row + bh64 * NT * BT + i_c * BT + o_i, b_dGr)
        tl.store(dG_q + bh64 * NT * BC + i_c * BC + o_q, b_dGq, mask=o_q < BC)
