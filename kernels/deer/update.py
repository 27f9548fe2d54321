# The per-iteration bookkeeping of DEER (DESIGN.md §5, arXiv 2309.12252): h ← h + δ and the convergence test
# max(|δ| − atol − rtol·|h|) ≤ 0, with non-finite updates counted, fused in one pass over (h, δ). In plain torch this
# is five or six passes with temporaries (abs, scale, subtract, max, isfinite); at B·T·n = 2^29 they cost more than
# the Newton step's own scan.
"""Fused DEER update: ``h += δ`` in place, max convergence violation and non-finite count (Triton + torch)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["deer_update"]


@triton.jit
def pointwise_deer_update_fwd_kernel(h_ptr, d_ptr, viol_ptr, bad_ptr, numel, atol, rtol, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    h = tl.load(h_ptr + offs, mask=m, other=0.0)
    d = tl.load(d_ptr + offs, mask=m, other=0.0)
    hn = h + d
    tl.store(h_ptr + offs, hn, mask=m)
    finite = tl.abs(d) < float("inf")  # False for ±Inf and NaN
    v = tl.abs(d) - rtol * tl.abs(hn) - atol
    tl.atomic_max(viol_ptr, tl.max(tl.where(m & finite, v, -float("inf")), axis=0))
    tl.atomic_add(bad_ptr, tl.sum((m & ~finite).to(tl.int32), axis=0))


def deer_update(h: torch.Tensor, delta: torch.Tensor, atol: float, rtol: float, use_triton: bool) -> tuple[float, int]:
    """``h += delta`` in place; return ``(max(|δ| − atol − rtol·|h_new|) over finite entries, #non-finite δ)``.

    Args:
        h, delta: contiguous tensors of one shape (float32 for the Triton path).
        use_triton: the fused kernel (CUDA, or the interpreter); else plain torch.
    """
    if use_triton and h.dtype == torch.float32:
        viol = torch.full((1,), -float("inf"), device=h.device, dtype=torch.float32)
        bad = torch.zeros(1, device=h.device, dtype=torch.int32)
        BLOCK = 4096
        grid = (triton.cdiv(h.numel(), BLOCK),)
        pointwise_deer_update_fwd_kernel[grid](h, delta, viol, bad, h.numel(), float(atol), float(rtol), BLOCK=BLOCK,
                                               num_warps=8)
        return viol.item(), int(bad.item())
    h.add_(delta)
    finite = torch.isfinite(delta)
    v = torch.where(finite, delta.abs() - rtol * h.abs() - atol, torch.full((), -float("inf"), dtype=h.dtype,
                                                                           device=h.device))
    return v.amax().item(), int((~finite).sum().item())
