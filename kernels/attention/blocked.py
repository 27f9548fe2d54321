# The positioned window-attention block (semantics: naive.py, naive_window_attention) in plain torch, O(T·W) memory
# and time, differentiable by torch autograd: the CPU training path and the fallback for float64.
#
# Queries are cut into blocks of C rows; block b (positions t ∈ [t_b, t_b + C)) reads the key slab
# [t_b − W + 1, t_b + C), i.e. C + W − 1 keys, taken as a strided `unfold` view of the (padded) keys: scores are
# [T/C, C, C + W − 1] instead of [T, T]. The global keys are a second, small score block [T, G] masked to t − j ≥ W,
# concatenated before one softmax. C trades score memory T·(C + W) against slab copies T·(1 + W/C)·D, so C ≈ D..128.
# Queries at gathered positions (the global rows, a handful) use one dense [Tq, Tk] block instead.
"""Plain-torch O(T·W) window + global-key attention over positioned queries (returns ``(o, lse)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["blocked_window_attention"]


def _block_size(w_eff: int) -> int:
    return max(16, min(128, w_eff))


def _softmax_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim and its log-sum-exp, with rows that are fully masked (−inf) giving ``p = 0`` and
    ``lse = −inf`` without NaN in the forward or the backward (logsumexp's backward is NaN on such rows)."""
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    has = den > 0
    den_safe = torch.where(has, den, torch.ones_like(den))
    lse = torch.where(has, m + torch.log(den_safe), torch.full_like(den, float("-inf")))
    return e / den_safe, lse.squeeze(-1)


def _global_scores(qb, kg, t, g_pos, window, scale):
    """Scores of queries ``qb [B, n, C, Hkv, rep, D]`` (positions ``t [n, C]``) against global keys ``[B, G, Hkv, D]``
    masked to ``t − j ≥ window``: ``[B, n, Hkv, rep, C, G]``."""
    s = torch.einsum("bncgrd,bmgd->bngrcm", qb, kg) * scale
    allowed = (t[:, :, None] - g_pos[None, None, :]) >= window
    return s.masked_fill(~allowed[None, :, None, None], float("-inf"))


def blocked_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int = 0,
    q_pos: torch.Tensor | None = None,
    k_start: int = 0,
    window: int,
    kg: torch.Tensor | None = None,
    vg: torch.Tensor | None = None,
    g_pos: torch.Tensor | None = None,
    scale: float,
    acc_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window + global-key attention of queries at ``q_start + i`` (or ``q_pos``) over keys at ``k_start + j``.

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` (validated by the caller).
        q_start / q_pos: contiguous query positions, or a sorted ``[Tq]`` position tensor (dense path).
        k_start: position of ``k[:, 0]``.
        window: ``W ≥ 1``; query t reads key s iff ``0 ≤ t − s < W``.
        kg, vg, g_pos: global keys ``[B, G, Hkv, D]``, values, positions ``[G]``; read iff ``t − j ≥ W``.
        scale: softmax scale.
        acc_dtype: compute dtype (float32, or float64 for float64 inputs).

    Returns:
        ``(o [B, Tq, H, Dv] acc_dtype, lse [B, Tq, H] acc_dtype)``; rows without keys: ``o = 0``, ``lse = −inf``.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep = H // Hkv
    dev = q.device
    q, k, v = q.to(acc_dtype), k.to(acc_dtype), v.to(acc_dtype)
    has_g = kg is not None and kg.shape[1] > 0
    if has_g:
        kg, vg, g_pos = kg.to(acc_dtype), vg.to(acc_dtype), g_pos.to(dev)
    if q_pos is not None:  # few rows: one dense block
        t = q_pos.to(dev)[None, :]  # [1, Tq] as n=1 block
        C, n = Tq, 1
        s_pos = k_start + torch.arange(Tk, device=dev)
        diff = t[0][:, None] - s_pos[None, :]
        qb = q.view(B, 1, Tq, Hkv, rep, D)
        sw = torch.einsum("bncgrd,bsgd->bngrcs", qb, k) * scale
        sw = sw.masked_fill(~((diff >= 0) & (diff < window))[None, None, None, None], float("-inf"))
        parts = [sw]
        if has_g:
            parts.append(_global_scores(qb, kg, t, g_pos, window, scale))
        p, lse = _softmax_lse(torch.cat(parts, dim=-1))
        o = torch.einsum("bngrcs,bsgd->bncgrd", p[..., :Tk], v)
        if has_g:
            o = o + torch.einsum("bngrcm,bmgd->bncgrd", p[..., Tk:], vg)
        return o.reshape(B, Tq, H, Dv), lse.permute(0, 1, 4, 2, 3).reshape(B, Tq, H)

    # the largest t − s + 1 any pair can have: a window beyond it changes nothing and only costs padding
    w_eff = max(1, min(window, q_start + Tq - k_start))
    C = _block_size(w_eff)
    n = -(-Tq // C)
    L = C + w_eff - 1
    qb = F.pad(q, (0, 0, 0, 0, 0, n * C - Tq)).view(B, n, C, Hkv, rep, D)
    t = q_start + torch.arange(n * C, device=dev).view(n, C)
    # slab of block b: key positions t_b − w_eff + 1 + l (l < L), i.e. key index j = first + bC + l
    first = q_start - k_start - w_eff + 1
    front = max(0, -first)
    back = max(0, first + (n - 1) * C + L - Tk)
    kp = F.pad(k, (0, 0, 0, 0, front, back)).narrow(1, first + front, (n - 1) * C + L)
    vp = F.pad(v, (0, 0, 0, 0, front, back)).narrow(1, first + front, (n - 1) * C + L)
    ks = kp.unfold(1, L, C)  # [B, n, Hkv, D, L]
    vs = vp.unfold(1, L, C)
    j = first + torch.arange(n, device=dev)[:, None] * C + torch.arange(L, device=dev)[None, :]  # [n, L]
    i = torch.arange(C, device=dev)
    diff = (w_eff - 1) + i[:, None] - torch.arange(L, device=dev)[None, :]  # t − s, the same for every block
    allowed = ((diff >= 0) & (diff < window))[None] & ((j >= 0) & (j < Tk))[:, None, :]  # [n, C, L]
    sw = torch.einsum("bncgrd,bngdl->bngrcl", qb, ks) * scale
    sw = sw.masked_fill(~allowed[None, :, None, None], float("-inf"))
    parts = [sw]
    if has_g:
        parts.append(_global_scores(qb, kg, t, g_pos, window, scale))
    p, lse = _softmax_lse(torch.cat(parts, dim=-1))
    o = torch.einsum("bngrcl,bngdl->bncgrd", p[..., :L], vs)
    if has_g:
        o = o + torch.einsum("bngrcm,bmgd->bncgrd", p[..., L:], vg)
    o = o.reshape(B, n * C, H, Dv)[:, :Tq]
    lse = lse.permute(0, 1, 4, 2, 3).reshape(B, n * C, H)[:, :Tq]
    return o, lse
