# Triton kernels of the dense affine scan h_t = A_t h_{t-1} + b_t with A_t an n×n matrix, n ≤ 64 (DESIGN.md §4).
#
# Algorithm choice. A parallel dense scan must form products of the A_t (n³ flops each), while the sequential
# recurrence needs only matvecs (n²): the parallel form does n× more work, so it should do as little of it as
# possible and do it on the tensor cores. Candidates, per step of the sequence:
#   (a) tree scan over all T elements (Blelloch / Hillis-Steele; DEER's jax associative_scan): ≈ 2 n×n products per
#       step plus the n×n partial products written to and read from memory at every level: 2n³ flops, O(n² log T)
#       bytes per step;
#   (b) chunked three-pass (this file): every program owns CHUNK consecutive steps; pass 0 multiplies its chunk's
#       matrices into one map P = A_C⋯A_1 (one n×n `tl.dot` per step, kept in registers: n³ flops, A read once) and
#       runs the chunk from zero; the T/CHUNK chunk maps are scanned by the same op (recursively, 1/CHUNK of the
#       data); pass 1 re-runs each chunk from its carried-in state with matvecs (n², A read a second time, h written).
#       n³ + 2n² flops and 2 reads of A per step, no n×n intermediates in memory.
#   (c) (b) with pass 1 as h_t = P_t c + h⁰_t: needs every partial product P_t stored (n² floats per step): worse.
# (b) does the least work and the least memory traffic, and its one long serial chain (CHUNK dependent dots) is
# hidden by the many chunks in flight, so it is the algorithm here. n < 16 is padded to 16 (tl.dot's minimum).
#
# Structured transitions (STRUCT): A_t = diag(c0_t) + Σ_k diag(c_k,t) M_k with K ≤ 3 shared n×n matrices M_k and
# per-step coefficient vectors. The GRU Jacobian has this form (kernels/deer/gru.py), so DEER's Newton step reads
# (K+1)·n floats per step instead of n² and forms each A_t in registers: the B·T·n² Jacobians never exist in memory.
#
# Reverse (adjoint, kernels/scan/naive.py): λ_t = ḡ_t + A_{t+1}ᵀ λ_{t+1}, scanned from t = T-1 down with the shifted,
# transposed gates (A_T := I); pass 1 also writes da_t = λ_t h_{t-1}ᵀ when asked.
"""Dense (n×n) affine scan kernels, chunked three-pass, forward and reverse, with materialised or structured A_t."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dense_block", "dense_scan_triton"]


@triton.jit
def _load_A(a_ptr, coef_ptr, m1, m2, m3, bi, ta, T, n, ri, ci, vr, vc,
            REVERSE: tl.constexpr, STRUCT: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    """A_ta (forward) or A_taᵀ (reverse) as an fp32 [BLOCK, BLOCK] tile; the identity where the step is not valid.
    ``vr``/``vc``: the step's validity broadcast over rows/columns (vector masks: the interpreter mishandles
    vector & scalar masks)."""
    eye = (ri[:, None] == ci[None, :]).to(tl.float32)
    valid2 = vr[:, None] & vc[None, :]
    mask2 = (ri[:, None] < n) & (ci[None, :] < n) & valid2
    if STRUCT:
        row = bi.to(tl.int64) * T * (K + 1) * n + ta.to(tl.int64) * (K + 1) * n
        if REVERSE:  # Aᵀ[i, j] = δ_ij c0_j + Σ_k M_k[j, i] c_k[j]: coefficients scale columns (m_k come transposed)
            cidx = ci
            cm = (ci < n) & vc
        else:  # A[i, j] = δ_ij c0_i + Σ_k c_k[i] M_k[i, j]: the coefficients scale rows
            cidx = ri
            cm = (ri < n) & vr
        c0 = tl.load(coef_ptr + row + cidx, mask=cm, other=0.0).to(tl.float32)
        c1 = tl.load(coef_ptr + row + n + cidx, mask=cm, other=0.0).to(tl.float32)
        if REVERSE:
            A = eye * c0[None, :] + m1 * c1[None, :]
        else:
            A = eye * c0[:, None] + m1 * c1[:, None]
        if K >= 2:
            c2 = tl.load(coef_ptr + row + 2 * n + cidx, mask=cm, other=0.0).to(tl.float32)
            A += m2 * (c2[None, :] if REVERSE else c2[:, None])
        if K >= 3:
            c3 = tl.load(coef_ptr + row + 3 * n + cidx, mask=cm, other=0.0).to(tl.float32)
            A += m3 * (c3[None, :] if REVERSE else c3[:, None])
        A = tl.where(mask2, A, 0.0)
    else:
        base = bi.to(tl.int64) * T * n * n + ta.to(tl.int64) * n * n
        if REVERSE:
            offs = ci[None, :] * n + ri[:, None]
        else:
            offs = ri[:, None] * n + ci[None, :]
        A = tl.load(a_ptr + base + offs, mask=mask2, other=0.0).to(tl.float32)
    return tl.where(valid2, A, eye)


@triton.jit
def chunk_dense_scan_fwd_kernel(
    a_ptr, coef_ptr, mats_ptr, b_ptr, aggA_ptr, aggb_ptr, carry_ptr, h_ptr, hprev_ptr, h0_ptr, da_ptr,
    T, n, n_chunks,
    PHASE: tl.constexpr, REVERSE: tl.constexpr, STRUCT: tl.constexpr, K: tl.constexpr, HAS_CARRY: tl.constexpr,
    HAS_DA: tl.constexpr, HAS_H0_DA: tl.constexpr, PRECISION: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """PHASE 0: the chunk's map (P = Ã_C⋯Ã_1, x = its output from zero) to aggA [B, nc, n, n] / aggb [B, nc, n];
    PHASE 1: re-run the chunk from its carry [B, nc, n], storing h [B, T, n] (and da [B, T, n, n] in reverse)."""
    chunk = tl.program_id(0)
    bi = tl.program_id(1)
    ri = tl.arange(0, BLOCK)
    ci = tl.arange(0, BLOCK)
    rmask = ri < n
    mmask = (ri[:, None] < n) & (ci[None, :] < n)
    m1 = tl.zeros([BLOCK, BLOCK], tl.float32)
    m2 = tl.zeros([BLOCK, BLOCK], tl.float32)
    m3 = tl.zeros([BLOCK, BLOCK], tl.float32)
    if STRUCT:  # the shared matrices stay in registers for the whole chunk (transposed for the adjoint)
        if REVERSE:
            moffs = ci[None, :] * n + ri[:, None]
        else:
            moffs = ri[:, None] * n + ci[None, :]
        if K >= 1:
            m1 = tl.load(mats_ptr + moffs, mask=mmask, other=0.0).to(tl.float32)
        if K >= 2:
            m2 = tl.load(mats_ptr + n * n + moffs, mask=mmask, other=0.0).to(tl.float32)
        if K >= 3:
            m3 = tl.load(mats_ptr + 2 * n * n + moffs, mask=mmask, other=0.0).to(tl.float32)
    agg_off = bi.to(tl.int64) * n_chunks + chunk
    if PHASE == 0:
        P = (ri[:, None] == ci[None, :]).to(tl.float32)
        x = tl.zeros([BLOCK], tl.float32)
    else:
        if HAS_CARRY:
            x = tl.load(carry_ptr + agg_off * n + ri, mask=rmask, other=0.0).to(tl.float32)
        else:
            x = tl.zeros([BLOCK], tl.float32)
    b_base = bi.to(tl.int64) * T * n
    for i in range(CHUNK):
        s = chunk * CHUNK + i + ri * 0  # the step index, as a vector (see _load_A)
        valid = s < T
        if REVERSE:
            t = T - 1 - s
            ta = t + 1
        else:
            t = s
            ta = s
        va = valid & (ta < T)
        A = _load_A(a_ptr, coef_ptr, m1, m2, m3, bi, tl.max(ta, axis=0), T, n, ri, ci, va, va, REVERSE, STRUCT, K,
                    BLOCK)
        t64 = t.to(tl.int64)
        bt = tl.load(b_ptr + b_base + t64 * n + ri, mask=rmask & valid, other=0.0).to(tl.float32)
        x = tl.sum(A * x[None, :], axis=1) + bt
        if PHASE == 0:
            P = tl.dot(A, P, input_precision=PRECISION)
        else:
            tl.store(h_ptr + b_base + t64 * n + ri, x.to(h_ptr.dtype.element_ty), mask=rmask & valid)
            if HAS_DA:  # da_t = λ_t h_{t-1}ᵀ with h_0 the initial state
                hp = tl.load(hprev_ptr + b_base + (t64 - 1) * n + ci, mask=(ci < n) & valid & (t >= 1),
                             other=0.0).to(tl.float32)
                if HAS_H0_DA:
                    h0 = tl.load(h0_ptr + bi.to(tl.int64) * n + ci, mask=(ci < n) & valid & (t == 0), other=0.0)
                    hp += h0.to(tl.float32)
                da_off = bi.to(tl.int64) * T * n * n + t64[:, None] * n * n + ri[:, None] * n + ci[None, :]
                tl.store(da_ptr + da_off, (x[:, None] * hp[None, :]).to(da_ptr.dtype.element_ty),
                         mask=mmask & valid[:, None])
    if PHASE == 0:
        tl.store(aggA_ptr + agg_off * n * n + ri[:, None] * n + ci[None, :], P, mask=mmask)
        tl.store(aggb_ptr + agg_off * n + ri, x, mask=rmask)
    elif chunk == n_chunks - 1:  # steps past T are identities, so x is the final state (λ_0 in reverse), in fp32
        tl.store(aggb_ptr + bi.to(tl.int64) * n + ri, x, mask=rmask)


def dense_block(n: int) -> int:
    """Padded matrix side: a power of two ≥ 16 (``tl.dot``'s smallest tile)."""
    return max(16, triton.next_power_of_2(n))


def dense_scan_triton(
    a: torch.Tensor | None,
    b: torch.Tensor,
    init: torch.Tensor | None,
    *,
    coef: torch.Tensor | None = None,
    mats: torch.Tensor | None = None,
    reverse: bool = False,
    out_dtype: torch.dtype | None = None,
    h: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    want_da: bool = False,
    chunk: int = 32,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the dense scan (no autograd, no validation: the ops do both).

    Args:
        a: contiguous ``[B, T, n, n]``, or ``None`` with ``coef`` ``[B, T, K+1, n]`` and ``mats`` ``[K, n, n]``
            (structured ``A_t = diag(c0) + Σ_k diag(c_k) M_k``, K ≤ 3).
        b: contiguous ``[B, T, n]``.
        init: initial state ``[B, n]`` (reverse: ``∂L/∂h_T``) or ``None``.
        reverse: the adjoint scan ``λ_t = b_t + A_{t+1}ᵀ λ_{t+1}``.
        h, h0, want_da: forward states and initial state to also return ``da_t = λ_t h_{t-1}ᵀ`` (reverse only).
        chunk: steps per program.
        precision: ``tl.dot`` input precision of the chunk products (``"ieee"``, ``"tf32x3"`` or ``"tf32"``).

    Returns:
        ``(out [B, T, n], last [B, n] fp32 (h_T, or λ_0 in reverse), da [B, T, n, n] or None)``.
    """
    B, T, n = b.shape
    struct = a is None
    K = mats.shape[0] if struct else 0
    if struct and not 1 <= K <= 3:
        raise ValueError(f"structured transitions take 1 to 3 shared matrices, got {K}")
    BLOCK = dense_block(n)
    nc = triton.cdiv(T, chunk)
    dev = b.device
    out = torch.empty(B, T, n, device=dev, dtype=out_dtype or b.dtype)
    da = torch.empty(B, T, n, n, device=dev, dtype=a.dtype if a is not None else b.dtype) if want_da else None
    dummy = out
    kw = dict(REVERSE=reverse, STRUCT=struct, K=K, HAS_DA=want_da, HAS_H0_DA=h0 is not None, PRECISION=precision,
              CHUNK=chunk, BLOCK=BLOCK, num_warps=4 if BLOCK <= 32 else 8)
    args = (a if a is not None else dummy, coef if struct else dummy, mats if struct else dummy, b)
    tail = (h if want_da else dummy, h0 if h0 is not None else dummy, da if want_da else dummy, T, n, nc)
    last = torch.empty(B, n, device=dev, dtype=torch.float32)
    if nc == 1:
        carry = init.float().contiguous() if init is not None else None
    else:
        aggA = torch.empty(B, nc, n, n, device=dev, dtype=torch.float32)
        aggb = torch.empty(B, nc, n, device=dev, dtype=torch.float32)
        chunk_dense_scan_fwd_kernel[(nc, B)](*args, aggA, aggb, dummy, dummy, *tail, PHASE=0, HAS_CARRY=False, **kw)
        # the chunk maps are in scan order: a forward scan over them gives every chunk's end state
        ends, _, _ = dense_scan_triton(aggA, aggb, init, out_dtype=torch.float32, chunk=chunk,
                                           precision=precision)
        first = init.float().unsqueeze(1) if init is not None else aggb.new_zeros(B, 1, n)
        carry = torch.cat([first, ends[:, :-1]], dim=1).contiguous()
    chunk_dense_scan_fwd_kernel[(nc, B)](*args, dummy, last, carry if carry is not None else dummy, out, *tail,
                                         PHASE=1, HAS_CARRY=carry is not None, **kw)
    return out, last, da
