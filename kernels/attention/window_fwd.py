# Triton kernels of the positioned window-attention block (forward and the dQ pass of the backward).
#
# FlashAttention-2 (Dao 2023, arXiv 2307.08691) online softmax, restricted to the keys a query block can read: a
# block of queries at positions t ∈ [t_lo, t_hi] visits only the contiguous keys s ∈ [t_lo − W + 1, t_hi] (window W,
# ⌈(W + BLOCK_M) / BLOCK_N⌉ key blocks, so the cost is O(T·W) instead of O(T²)), then the separately passed global
# keys, which count only where they lie outside the window (t − j ≥ W) so that no pair is read twice. The same kernel
# serves the global *rows* (full causal rows of the global queries): queries gathered by position, W = ∞, no global
# keys. kernels/attention/naive.py (naive_window_attention) is the reference of exactly this block.
#
# Scores are kept in base 2 (qk_scale = scale·log2 e, exp2 is one MUFU op); the log-sum-exp is stored in natural
# units for the backward and for merging partial results across ranks. m starts at −1e30, not −inf, so a key block
# that is fully masked for some rows leaves them untouched (exp2(−inf − m) = 0, α = 1) instead of producing NaN; a row
# that read no key at all ends with l = 0 and gets o = 0, lse = −inf.
#
# dQ pass (FlashAttention-2 backward, query-centric half): p = exp2(s − lse·log2 e) recomputed from the stored lse
# (read as lse₂ = lse·log2 e, head-major [B, H, Tq], from the delta kernel),
# ds = p ⊙ (dO Vᵀ − δ) with δ_t = Σ dO_t ⊙ O_t − ∂L/∂lse_t (the lse term is how a merged partial result passes its
# gradient back: ∂lse/∂s = p), dq = scale · ds K.
"""Forward and dQ Triton kernels of window + global-key attention over positioned queries."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["window_sparse_attn_bwd_dq_kernel", "window_sparse_attn_fwd_kernel"]


@triton.jit
def _query_rows(QPOS, q_start, m0, Tq, BLOCK_M: tl.constexpr, GATHERED: tl.constexpr):
    """Row indices of this block, their validity, positions, and the first/last valid position (rows sorted)."""
    i = m0 + tl.arange(0, BLOCK_M)
    ok = i < Tq
    last = tl.minimum(m0 + BLOCK_M, Tq) - 1
    if GATHERED:
        t = tl.load(QPOS + i, mask=ok, other=-1)
        t_lo = tl.load(QPOS + m0)
        t_hi = tl.load(QPOS + last)
    else:
        t = q_start + i
        t_lo = q_start + m0
        t_hi = q_start + last
    return i, ok, t, t_lo, t_hi


@triton.jit
def _load_rows(ptr, rows, ok, stride_t, offs, n, DT: tl.constexpr, EVEN: tl.constexpr):
    """Rows ``rows`` (valid where ``ok``) of a [T, n] head slice as DT; EVEN: the tile is exactly n wide (no column
    mask, so the loads stay fully vectorised)."""
    if EVEN:
        mask = ok[:, None]
    else:
        mask = ok[:, None] & (offs < n)[None, :]
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * stride_t + offs[None, :], mask=mask, other=0.0)
    return x.to(DT)


@triton.jit
def _load_full(ptr, rows, stride_t, offs, n, DT: tl.constexpr, EVEN: tl.constexpr):
    """Like :func:`_load_rows` for rows known to be in range (interior blocks): no row mask, so with EVEN no mask."""
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride_t + offs[None, :]
    if EVEN:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs < n)[None, :], other=0.0)
    return x.to(DT)


@triton.jit
def _band(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Blocks start at ``lo, lo + BLOCK, ...`` below ``hi``; return ``[mid_lo, mid_hi)``, the run of those starts whose
    whole block lies in ``[full_lo, full_hi)``: the blocks every row of the tile may read, which skip the mask."""
    n_skip = tl.maximum(tl.cdiv(full_lo - lo, BLOCK), 0)
    mid_lo = tl.minimum(lo + n_skip * BLOCK, hi)
    mid_hi = mid_lo + tl.maximum((tl.minimum(full_hi, hi) - mid_lo) // BLOCK, 0) * BLOCK
    return mid_lo, mid_hi


@triton.jit
def _window_keys(t, k_start, j0, j_hi, row_ok, window, BLOCK_N: tl.constexpr):
    j = j0 + tl.arange(0, BLOCK_N)
    k_ok = j < j_hi
    diff = t[:, None] - (k_start + j)[None, :]
    return j, k_ok, (diff >= 0) & (diff < window) & k_ok[None, :] & row_ok[:, None]


@triton.jit
def _fwd_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, PREC: tl.constexpr, MASK: tl.constexpr):
    # raw scores: the scale (> 0) goes on the row maxima and into the exp2 argument as one FMA per score, instead of
    # a separate multiply of the whole [BLOCK_M, BLOCK_N] tile (softmax, not the MMAs, bounds this loop on Hopper)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def window_sparse_attn_fwd_kernel(
    Q, K, V, KG, VG, GPOS, QPOS, O, LSE,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sgkb, sgkt, sgkh, sgvb, sgvt, sgvh, sob, sot, soh, so_split,
    Tq, Tk, NG, H, REP, q_start, k_start, window, qk_scale, split_len, D, DV,
    GATHERED: tl.constexpr, HAS_GLOBAL: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // REP
    i, row_ok, t, t_lo, t_hi = _query_rows(QPOS, q_start, pid_m * BLOCK_M, Tq, BLOCK_M, GATHERED)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    q = _load_rows(Q + b64 * sqb + h * sqh, i, row_ok, sqt, offs_d, D, DT, EVEN)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    k_base = K + b64 * skb + hk * skh
    v_base = V + b64 * svb + hk * svh
    pid_s = tl.program_id(2)  # key split (flash-decoding style, for the few long global rows); 0 of 1 otherwise
    j_lo = tl.maximum(tl.maximum(t_lo - window + 1 - k_start, 0), pid_s * split_len)
    j_hi = tl.minimum(tl.minimum(t_hi + 1 - k_start, Tk), (pid_s + 1) * split_len)
    # key blocks every row reads (causal for the first row, inside the window of the last) skip the mask
    mid_lo, mid_hi = _band(j_lo, j_hi, t_hi - window + 1 - k_start, t_lo + 1 - k_start, BLOCK_N)
    for j0 in range(j_lo, mid_lo, BLOCK_N):
        j, k_ok, allowed = _window_keys(t, k_start, j0, j_hi, row_ok, window, BLOCK_N)
        k = _load_rows(k_base, j, k_ok, skt, offs_d, D, DT, EVEN)
        v = _load_rows(v_base, j, k_ok, svt, offs_dv, DV, DT, EVEN)
        m_i, l_i, acc = _fwd_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, PREC, True)
    for j0 in range(mid_lo, mid_hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        k = _load_full(k_base, j, skt, offs_d, D, DT, EVEN)
        v = _load_full(v_base, j, svt, offs_dv, DV, DT, EVEN)
        m_i, l_i, acc = _fwd_step(q, k, v, row_ok, m_i, l_i, acc, qk_scale, PREC, False)
    for j0 in range(mid_hi, j_hi, BLOCK_N):
        j, k_ok, allowed = _window_keys(t, k_start, j0, j_hi, row_ok, window, BLOCK_N)
        k = _load_rows(k_base, j, k_ok, skt, offs_d, D, DT, EVEN)
        v = _load_rows(v_base, j, k_ok, svt, offs_dv, DV, DT, EVEN)
        m_i, l_i, acc = _fwd_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, PREC, True)
    if HAS_GLOBAL:
        kg_base = KG + b64 * sgkb + hk * sgkh
        vg_base = VG + b64 * sgvb + hk * sgvh
        for g0 in range(0, NG, BLOCK_N):
            gi = g0 + tl.arange(0, BLOCK_N)
            g_ok = gi < NG
            gp = tl.load(GPOS + gi, mask=g_ok, other=0)
            k = _load_rows(kg_base, gi, g_ok, sgkt, offs_d, D, DT, EVEN)
            v = _load_rows(vg_base, gi, g_ok, sgvt, offs_dv, DV, DT, EVEN)
            allowed = ((t[:, None] - gp[None, :]) >= window) & g_ok[None, :] & row_ok[:, None]
            m_i, l_i, acc = _fwd_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, PREC, True)

    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural units
    s64 = pid_s.to(tl.int64)
    o_ptr = O + s64 * so_split + b64 * sob + h * soh + i.to(tl.int64)[:, None] * sot + offs_dv[None, :]
    tl.store(o_ptr, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    # lse: a contiguous [S, B, Tq, H] fp32 tensor (num_programs(1) = B·H)
    tl.store(LSE + s64 * tl.num_programs(1) * Tq + (b64 * Tq + i) * H + h, lse, mask=row_ok)


@triton.jit
def _dq_step(q, do, k, v, allowed, lse2, delta, dq, qk_scale, PREC: tl.constexpr, MASK: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASK:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def window_sparse_attn_bwd_dq_kernel(
    Q, K, V, KG, VG, GPOS, QPOS, DO, LSE2, DELTA, DQ,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sgkb, sgkt, sgkh, sgvb, sgvt, sgvh, sdob, sdot, sdoh, sdq_split,
    Tq, Tk, NG, H, REP, q_start, k_start, window, qk_scale, scale, split_len, D, DV,
    GATHERED: tl.constexpr, HAS_GLOBAL: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // REP
    i, row_ok, t, t_lo, t_hi = _query_rows(QPOS, q_start, pid_m * BLOCK_M, Tq, BLOCK_M, GATHERED)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    q = _load_rows(Q + b64 * sqb + h * sqh, i, row_ok, sqt, offs_d, D, DT, EVEN)
    do = _load_rows(DO + b64 * sdob + h * sdoh, i, row_ok, sdot, offs_dv, DV, DT, EVEN)
    row_off = (b64 * H + h) * Tq + i  # head-major row statistics (kernels/attention/window_bwd.py delta kernel)
    lse2 = tl.load(LSE2 + row_off, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_base = K + b64 * skb + hk * skh
    v_base = V + b64 * svb + hk * svh
    pid_s = tl.program_id(2)  # key split (flash-decoding style, for the few long global rows); 0 of 1 otherwise
    j_lo = tl.maximum(tl.maximum(t_lo - window + 1 - k_start, 0), pid_s * split_len)
    j_hi = tl.minimum(tl.minimum(t_hi + 1 - k_start, Tk), (pid_s + 1) * split_len)
    mid_lo, mid_hi = _band(j_lo, j_hi, t_hi - window + 1 - k_start, t_lo + 1 - k_start, BLOCK_N)  # as forward
    for j0 in range(j_lo, mid_lo, BLOCK_N):
        j, k_ok, allowed = _window_keys(t, k_start, j0, j_hi, row_ok, window, BLOCK_N)
        k = _load_rows(k_base, j, k_ok, skt, offs_d, D, DT, EVEN)
        v = _load_rows(v_base, j, k_ok, svt, offs_dv, DV, DT, EVEN)
        dq = _dq_step(q, do, k, v, allowed, lse2, delta, dq, qk_scale, PREC, True)
    for j0 in range(mid_lo, mid_hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        k = _load_full(k_base, j, skt, offs_d, D, DT, EVEN)
        v = _load_full(v_base, j, svt, offs_dv, DV, DT, EVEN)
        dq = _dq_step(q, do, k, v, row_ok, lse2, delta, dq, qk_scale, PREC, False)
    for j0 in range(mid_hi, j_hi, BLOCK_N):
        j, k_ok, allowed = _window_keys(t, k_start, j0, j_hi, row_ok, window, BLOCK_N)
        k = _load_rows(k_base, j, k_ok, skt, offs_d, D, DT, EVEN)
        v = _load_rows(v_base, j, k_ok, svt, offs_dv, DV, DT, EVEN)
        dq = _dq_step(q, do, k, v, allowed, lse2, delta, dq, qk_scale, PREC, True)
    if HAS_GLOBAL:
        kg_base = KG + b64 * sgkb + hk * sgkh
        vg_base = VG + b64 * sgvb + hk * sgvh
        for g0 in range(0, NG, BLOCK_N):
            gi = g0 + tl.arange(0, BLOCK_N)
            g_ok = gi < NG
            gp = tl.load(GPOS + gi, mask=g_ok, other=0)
            k = _load_rows(kg_base, gi, g_ok, sgkt, offs_d, D, DT, EVEN)
            v = _load_rows(vg_base, gi, g_ok, sgvt, offs_dv, DV, DT, EVEN)
            allowed = ((t[:, None] - gp[None, :]) >= window) & g_ok[None, :] & row_ok[:, None]
            dq = _dq_step(q, do, k, v, allowed, lse2, delta, dq, qk_scale, PREC, True)
    dq_ptr = DQ + pid_s.to(tl.int64) * sdq_split + b64 * sqb + h * sqh + i.to(tl.int64)[:, None] * sqt
    dq_ptr += offs_d[None, :]
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])
