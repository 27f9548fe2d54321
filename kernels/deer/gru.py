# The GRU's Newton terms for DEER (Lim et al., ICLR 2024, arXiv 2309.12252; quasi-DEER: Gonzalez et al., NeurIPS
# 2024, arXiv 2407.19115), with torch.nn.GRU semantics (kernels/deer/naive.py). At step t, with h = h_{t-1},
# gi = W_i x_t + b_i and gh = W_h h + b_h split in (r, z, n) blocks, u = gh_n:
#   r = σ(gi_r + gh_r), z = σ(gi_z + gh_z), n = tanh(gi_n + r ⊙ u), f = (1 − z) ⊙ n + z ⊙ h
# and the Jacobian ∂f/∂h (checked against autograd in tests/ops/test_deer.py) is
#   J = diag(z) + diag(c_r) W_hr + diag(c_z) W_hz + diag(c_n) W_hn,
#   c_z = (h − n) ⊙ z(1 − z),  c_n = (1 − z)(1 − n²) ⊙ r,  c_r = c_n ⊙ u ⊙ (1 − r)
# since ∂z/∂h = diag(z(1−z)) W_hz, ∂r/∂h = diag(r(1−r)) W_hr and ∂n/∂h = diag(1−n²)[diag(u) ∂r/∂h + diag(r) W_hn].
# So J_t is "diagonal plus row-scaled shared matrices": 4n numbers per step (coef [B, T, 4, n], with the shared
# matrices W_hh.view(3, n, n)) instead of n², which the structured dense scan (kernels/scan/dense.py) expands in
# registers: the B·T·n² Jacobians never exist in memory. Its diagonal (quasi-DEER) is
#   d = z + c_r ⊙ diag(W_hr) + c_z ⊙ diag(W_hz) + c_n ⊙ diag(W_hn)   (elk's gru_diagonal_derivative).
# The pointwise kernel below reads gi, gh, the iterate h and h_0 once and writes the Newton residual f − h and either
# d or the coefficients, scaled by `scale` (1 − damping; the ELK-style damped variant shrinks the linearisation).
"""GRU cell terms for DEER: residual, diagonal or structured Jacobian (Triton pointwise kernel and its torch twin)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gru_linearize_torch", "gru_linearize_triton"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2σ(2x) − 1, stable for large |x| (exp overflows to inf, giving ±1)
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _shifted_gh(G_ptr, gh0_ptr, bias_ptr, g3, g0, cols, cm, mp, m0, t, n, k: tl.constexpr):
    """Block k (r, z or n) of gh_t = W_hh h_{t-1} + b_hh: G_{t-1} + bias for t ≥ 1, gh0 at t = 0."""
    bias = tl.load(bias_ptr + k * n + cols, mask=cm, other=0.0).to(tl.float32)
    prev = tl.load(G_ptr + g3 - 3 * n + k * n, mask=mp, other=0.0).to(tl.float32) + bias[None, :]
    first = tl.load(gh0_ptr + g0 + k * n, mask=m0, other=0.0).to(tl.float32)
    return tl.where((t == 0)[:, None], first, prev)


@triton.jit
def pointwise_gru_linearize_fwd_kernel(
    gi_ptr, G_ptr, gh0_ptr, bias_ptr, h_ptr, h0_ptr, wdiag_ptr, res_ptr, out_ptr,
    R, T, n, scale,
    HAS_H0: tl.constexpr, STRUCT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows are the B·T steps. res = f(h_{t-1}) − h_t; out = scale·d [R, n] (quasi) or scale·coef [R, 4, n].
    gh_t = W_hh h_{t-1} + b_hh is read as G_{t-1} + bias with G = h W_hhᵀ of the iterate itself (so no shifted
    copy of h is made), and gh0 [B, 3n] at t = 0."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < R
    cm = cols < n
    m = rm[:, None] & cm[None, :]
    r64 = rows.to(tl.int64)
    g3 = r64[:, None] * 3 * n + cols[None, :]
    i_r = tl.load(gi_ptr + g3, mask=m, other=0.0).to(tl.float32)
    i_z = tl.load(gi_ptr + g3 + n, mask=m, other=0.0).to(tl.float32)
    i_n = tl.load(gi_ptr + g3 + 2 * n, mask=m, other=0.0).to(tl.float32)
    t = rows % T
    b = rows // T
    mp = m & (t >= 1)[:, None]
    m0 = m & (t == 0)[:, None]
    g0 = b.to(tl.int64)[:, None] * 3 * n + cols[None, :]
    h_r = _shifted_gh(G_ptr, gh0_ptr, bias_ptr, g3, g0, cols, cm, mp, m0, t, n, 0)
    h_z = _shifted_gh(G_ptr, gh0_ptr, bias_ptr, g3, g0, cols, cm, mp, m0, t, n, 1)
    u = _shifted_gh(G_ptr, gh0_ptr, bias_ptr, g3, g0, cols, cm, mp, m0, t, n, 2)
    h1 = r64[:, None] * n + cols[None, :]
    h = tl.load(h_ptr + h1, mask=m, other=0.0).to(tl.float32)
    hp = tl.load(h_ptr + h1 - n, mask=m & (t >= 1)[:, None], other=0.0).to(tl.float32)
    if HAS_H0:
        h0 = tl.load(h0_ptr + b.to(tl.int64)[:, None] * n + cols[None, :], mask=m0, other=0.0)
        hp += h0.to(tl.float32)
    r = _sigmoid(i_r + h_r)
    z = _sigmoid(i_z + h_z)
    nn = _tanh(i_n + r * u)
    f = (1.0 - z) * nn + z * hp
    tl.store(res_ptr + h1, f - h, mask=m)
    c_z = (hp - nn) * z * (1.0 - z)
    c_n = (1.0 - z) * (1.0 - nn * nn) * r
    c_r = c_n * u * (1.0 - r)
    if STRUCT:
        c4 = r64[:, None] * 4 * n + cols[None, :]
        tl.store(out_ptr + c4, scale * z, mask=m)
        tl.store(out_ptr + c4 + n, scale * c_r, mask=m)
        tl.store(out_ptr + c4 + 2 * n, scale * c_z, mask=m)
        tl.store(out_ptr + c4 + 3 * n, scale * c_n, mask=m)
    else:
        w_r = tl.load(wdiag_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        w_z = tl.load(wdiag_ptr + n + cols, mask=cm, other=0.0).to(tl.float32)
        w_n = tl.load(wdiag_ptr + 2 * n + cols, mask=cm, other=0.0).to(tl.float32)
        d = z + c_r * w_r[None, :] + c_z * w_z[None, :] + c_n * w_n[None, :]
        tl.store(out_ptr + h1, scale * d, mask=m)


def gru_linearize_triton(
    gi: torch.Tensor, G: torch.Tensor, gh0: torch.Tensor, bias: torch.Tensor, h: torch.Tensor,
    h0: torch.Tensor | None, wdiag: torch.Tensor, structured: bool, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of the GRU Newton terms; outputs as :func:`gru_linearize_torch`, but gh is given unshifted:
    ``G = h W_hhᵀ`` ``[B, T, 3n]`` of the iterate, ``gh0 = W_hh h_0 + b_hh`` ``[B, 3n]``, ``bias = b_hh`` ``[3n]``."""
    B, T, n = h.shape
    R = B * T
    res = torch.empty(B, T, n, device=h.device, dtype=torch.float32)
    out = torch.empty(B, T, 4, n, device=h.device, dtype=torch.float32) if structured else torch.empty_like(res)
    bn = min(64, triton.next_power_of_2(n))
    br = max(1, 2048 // bn)
    grid = (triton.cdiv(R, br), triton.cdiv(n, bn))
    pointwise_gru_linearize_fwd_kernel[grid](
        gi, G, gh0, bias, h, h0 if h0 is not None else h, wdiag, res, out, R, T, n, float(scale),
        HAS_H0=h0 is not None, STRUCT=structured, BLOCK_R=br, BLOCK_N=bn, num_warps=8,
    )
    return res, out


def gru_linearize_torch(
    gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, wdiag: torch.Tensor,
    structured: bool, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRU's Newton residual and Jacobian terms at the iterate ``h``, in plain torch.

    Args:
        gi: ``W_ih x_t + b_ih`` ``[B, T, 3n]`` (rows r, z, n).
        gh: ``W_hh h_{t-1} + b_hh`` ``[B, T, 3n]`` at the iterate's previous states.
        h: the iterate ``[B, T, n]``; ``h_{t-1}`` is ``h0`` (zeros when ``None``) at t = 0.
        wdiag: diagonals of ``W_hr, W_hz, W_hn`` ``[3, n]``.
        structured: return the coefficients ``[B, T, 4, n]`` (``J = diag(c0) + Σ_k diag(c_k) W_hh[k]``) instead of
            the diagonal ``d [B, T, n]``.
        scale: multiplies the Jacobian terms (1 − damping).

    Returns:
        ``(f(h_{t-1}, x_t) − h_t [B, T, n], d or coef)`` in ``h``'s dtype.
    """
    first = h.new_zeros(h.shape[0], 1, h.shape[2]) if h0 is None else h0.to(h.dtype).unsqueeze(1)
    hp = torch.cat([first, h[:, :-1]], dim=1)
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, u = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    nn = torch.tanh(i_n + r * u)
    f = (1 - z) * nn + z * hp
    c_z = (hp - nn) * z * (1 - z)
    c_n = (1 - z) * (1 - nn * nn) * r
    c_r = c_n * u * (1 - r)
    if structured:
        return f - h, scale * torch.stack([z, c_r, c_z, c_n], dim=2)
    d = z + c_r * wdiag[0] + c_z * wdiag[1] + c_n * wdiag[2]
    return f - h, scale * d
