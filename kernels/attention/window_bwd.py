# Triton dK/dV kernel of the positioned window-attention block (the key-centric half of FlashAttention-2's backward,
# Dao 2023, arXiv 2307.08691), recomputing the probabilities from the stored log-sum-exp.
#
# A program owns BLOCK_N keys of one key/value head and loops over the REP query heads that share it (GQA: the sum
# over the group happens in registers, no [B, T, H, D] intermediate and no atomics), and over the queries that can
# read these keys:
# - window keys (FAR = False) at positions s = k_start + j: queries t with 0 ≤ t − s < W, i.e. the contiguous
#   query rows [s_lo, s_hi + W) — O(W + BLOCK_N) rows per key block, so O(T·W) in total;
# - global keys (FAR = True) at gathered positions: the queries that read them outside the window, t − s ≥ W, i.e.
#   every query row from s_lo + W on — O(T) per global key, the price of a token everybody reads.
# With gathered queries (the global rows, W = ∞) every query row is visited and the mask keeps t ≥ s.
# For global keys the O(T) query rows are split over a third grid axis (partial dK/dV per split, summed by the
# launcher), otherwise G keys would leave most of the GPU idle while a few programs walk the whole sequence.
#   p_ts = exp2(s·scale·log2 e − lse₂_t),  dV += pᵀ dO,  dsᵀ = pᵀ ⊙ (V dOᵀ − δ),  dK += scale · dsᵀ Q
# (lse₂ = lse·log2 e, head-major, written by the delta kernel below)
# with δ_t = Σ dO_t ⊙ O_t − ∂L/∂lse_t as in the dQ pass (kernels/attention/window_fwd.py).
"""dK/dV Triton kernel of window + global-key attention (contiguous keys or gathered global keys)."""

from __future__ import annotations

import triton
import triton.language as tl

from .window_fwd import _band, _load_full, _load_rows, _query_rows

__all__ = ["window_sparse_attn_bwd_delta_kernel", "window_sparse_attn_bwd_dkdv_kernel"]


@triton.jit
def window_sparse_attn_bwd_delta_kernel(O, DO, LSE, DLSE, DELTA, LSE2, n_rows, Tq, H, DVD, HAS_DLSE: tl.constexpr,
                                        BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Per-row statistics of the backward, over the rows r = (b, t, h) of contiguous [B, Tq, H, DVD] tensors:
    δ = Σ_d dO ⊙ O − ∂L/∂lse (fp32 accumulation in registers: one read of O and dO, no fp32 copies) and
    lse₂ = lse · log2 e (0 for rows without keys, whose probabilities the mask zeroes anyway), both stored head-major
    [B, H, Tq] so that the dQ and dK/dV passes read a block of rows as one contiguous vector."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_DV)
    ok = r < n_rows
    m = ok[:, None] & (d < DVD)[None, :]
    off = r[:, None] * DVD + d[None, :]
    o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + r, mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + r, mask=ok, other=0.0)
    lse2 = tl.where(lse > float("-inf"), lse * 1.4426950408889634, 0.0)
    h = r % H
    bt = r // H
    dst = ((bt // Tq) * H + h) * Tq + bt % Tq
    tl.store(DELTA + dst, delta, mask=ok)
    tl.store(LSE2 + dst, lse2, mask=ok)


@triton.jit
def _key_rows(KPOS, k_start, n0, Tk, BLOCK_N: tl.constexpr, FAR: tl.constexpr):
    j = n0 + tl.arange(0, BLOCK_N)
    ok = j < Tk
    last = tl.minimum(n0 + BLOCK_N, Tk) - 1
    if FAR:
        s = tl.load(KPOS + j, mask=ok, other=0)
        s_lo = tl.load(KPOS + n0)
        s_hi = tl.load(KPOS + last)
    else:
        s = k_start + j
        s_lo = k_start + n0
        s_hi = k_start + last
    return j, ok, s, s_lo, s_hi


@triton.jit
def _dkdv_step(q_base, do_base, LSE2, DELTA, QPOS, k, v, s, k_ok, dk, dv, i0, i_hi, b64, h, H, Tq, q_start, sqt, sdot,
               window, qk_scale, offs_d, offs_dv, D, DVD, GATHERED: tl.constexpr,
               FAR: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, EVEN: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """Add one block of BLOCK_M query rows (from ``i0``) to this key tile's dK, dV."""
    i, row_ok, t, _, _ = _query_rows(QPOS, q_start, i0, Tq, BLOCK_M, GATHERED)
    row_off = (b64 * H + h) * Tq + i  # head-major row statistics (delta kernel)
    if MASK:
        row_ok = row_ok & (i < i_hi)
        q = _load_rows(q_base, i, row_ok, sqt, offs_d, D, DT, EVEN)
        do = _load_rows(do_base, i, row_ok, sdot, offs_dv, DVD, DT, EVEN)
        lse2 = tl.load(LSE2 + row_off, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
    else:  # interior block: every row is in range
        q = _load_full(q_base, i, sqt, offs_d, D, DT, EVEN)
        do = _load_full(do_base, i, sdot, offs_dv, DVD, DT, EVEN)
        lse2 = tl.load(LSE2 + row_off)
        delta = tl.load(DELTA + row_off)
    sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    pT = tl.exp2(sT - lse2[None, :])
    if MASK:
        diff = t[None, :] - s[:, None]  # [BLOCK_N, BLOCK_M]
        if FAR:
            allowed = diff >= window
        else:
            allowed = (diff >= 0) & (diff < window)
        pT = tl.where(allowed & k_ok[:, None] & row_ok[None, :], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def window_sparse_attn_bwd_dkdv_kernel(
    Q, K, V, QPOS, KPOS, DO, LSE2, DELTA, DK, DV,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdk_split, sdv_split,
    Tq, Tk, H, HKV, REP, q_start, k_start, window, qk_scale, scale, split_len, D, DVD,
    GATHERED: tl.constexpr, FAR: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr, EVEN: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """ACCUMULATE: add to the dK/dV already in DK/DV (one split only) instead of overwriting them."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b64 = b.to(tl.int64)
    j, k_ok, s, s_lo, s_hi = _key_rows(KPOS, k_start, pid_n * BLOCK_N, Tk, BLOCK_N, FAR)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b64 * skb + hk * skh, j, k_ok, skt, offs_d, D, DT, EVEN)
    v = _load_rows(V + b64 * svb + hk * svh, j, k_ok, svt, offs_dv, DVD, DT, EVEN)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    if GATHERED:
        i_lo = 0
        i_hi = Tq
    elif FAR:
        i_lo = tl.maximum(s_lo + window - q_start, 0)
        i_hi = Tq
    else:
        i_lo = tl.maximum(s_lo - q_start, 0)
        i_hi = tl.minimum(s_hi + window - q_start, Tq)
    pid_s = tl.program_id(2)  # query split: global keys are read by O(T) queries, split them over programs
    i_lo = tl.maximum(i_lo, pid_s * split_len)
    i_hi = tl.minimum(i_hi, (pid_s + 1) * split_len)
    # query blocks that read every key of the tile (window keys, contiguous queries) skip the mask
    if GATHERED or FAR:
        mid_lo = i_hi
        mid_hi = i_hi
    else:
        mid_lo, mid_hi = _band(i_lo, i_hi, s_hi - q_start, s_lo + window - q_start, BLOCK_M)
    for r in range(0, REP):
        h = hk * REP + r
        q_base = Q + b64 * sqb + h * sqh
        do_base = DO + b64 * sdob + h * sdoh
        for i0 in range(i_lo, mid_lo, BLOCK_M):
            dk, dv = _dkdv_step(q_base, do_base, LSE2, DELTA, QPOS, k, v, s, k_ok, dk, dv, i0, i_hi, b64, h, H, Tq,
                                q_start, sqt, sdot, window, qk_scale, offs_d, offs_dv, D, DVD, GATHERED, FAR, True,
                                PREC, DT, EVEN, BLOCK_M)
        for i0 in range(mid_lo, mid_hi, BLOCK_M):
            dk, dv = _dkdv_step(q_base, do_base, LSE2, DELTA, QPOS, k, v, s, k_ok, dk, dv, i0, i_hi, b64, h, H, Tq,
                                q_start, sqt, sdot, window, qk_scale, offs_d, offs_dv, D, DVD, GATHERED, FAR, False,
                                PREC, DT, EVEN, BLOCK_M)
        for i0 in range(mid_hi, i_hi, BLOCK_M):
            dk, dv = _dkdv_step(q_base, do_base, LSE2, DELTA, QPOS, k, v, s, k_ok, dk, dv, i0, i_hi, b64, h, H, Tq,
                                q_start, sqt, sdot, window, qk_scale, offs_d, offs_dv, D, DVD, GATHERED, FAR, True,
                                PREC, DT, EVEN, BLOCK_M)

    s64 = pid_s.to(tl.int64)
    dk = dk * scale
    dk_ptr = DK + s64 * sdk_split + b64 * skb + hk * skh + j.to(tl.int64)[:, None] * skt + offs_d[None, :]
    dk_mask = k_ok[:, None] & (offs_d < D)[None, :]
    dv_ptr = DV + s64 * sdv_split + b64 * svb + hk * svh + j.to(tl.int64)[:, None] * svt + offs_dv[None, :]
    dv_mask = k_ok[:, None] & (offs_dv < DVD)[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptr, mask=dk_mask, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptr, mask=dv_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=dv_mask)
