# autograd.Function of the Triton flow op (kernels/flow/chunk.py). The forward keeps the WY factors and chunk states
# for the backward when they fit comfortably (kernels/flow/chunk.py keep_intermediates), else it saves only the
# inputs and the backward recomputes them (memory O(inputs), as fla's chunk_delta_rule); then the reverse state pass
# and the per-chunk gradient kernel. Papers: see kernels/flow/chunk_fwd.py.
"""Autograd wrappers of the Triton flow kernels: ``triton_chunk_flow`` and ``triton_flow_map``."""

from __future__ import annotations

import torch

from ..kernels.flow.chunk import chunk_flow_bwd, chunk_flow_fwd, keep_intermediates, plan_chunks, token_cumsum
from ..kernels.flow.shapes import FlowDims, as_rank_r

__all__ = ["triton_chunk_flow", "triton_flow_map"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prepare_forward(ctx, q, k, v, beta, g, h0, scale, rank_form, chunk_size):
    """The kernels' view of rank-R shaped inputs: ``(plan, q, k, v, beta contiguous, G = in-chunk cumsum of g)``;
    notes on ``ctx`` what the backward needs to cast its gradients back (plan, scale, dtypes of h0 and g)."""
    B, T, H, R, K = k.shape
    p = plan_chunks(B, T, H, R, K, v.shape[-1], chunk_size, rank_form)
    ctx.plan, ctx.scale = p, scale
    ctx.h0_dtype = None if h0 is None else h0.dtype
    ctx.g_dtype = None if g is None else g.dtype
    return p, q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), token_cumsum(g, p)


class ChunkFlowFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, rank_form, output_final_state, chunk_size):
        p, q, k, v, beta, G = prepare_forward(ctx, q, k, v, beta, g, h0, scale, rank_form, chunk_size)
        h0f = None if h0 is None else h0.float().contiguous()
        keep = keep_intermediates(p, q)
        o, hT, saved = chunk_flow_fwd(q, k, v, beta, G, scale, h0f, output_final_state, p, keep=keep)
        ctx.save_for_backward(q, k, v, beta, G, h0f, *(saved or ()))
        return o, hT

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, G, h0f, *saved = ctx.saved_tensors
        p = ctx.plan
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dbeta, dg, dh0 = chunk_flow_bwd(
            q, k, v, beta, G, ctx.scale, h0f, do.contiguous(), dht, p, need_dh0=h0f is not None, saved=saved or None
        )
        dg = None if dg is None else dg.to(ctx.g_dtype)
        dh0 = None if dh0 is None else dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dbeta, dg, dh0, None, None, None, None


def _check_kernel_dtype(q: torch.Tensor) -> None:
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"backend='triton' supports float32, bfloat16 and float16 inputs, got {str(q.dtype).replace('torch.', '')}"
            " (use backend='torch' for float64)"
        )


def triton_chunk_flow(q, k, v, beta, g, rank_form, scale, initial_state, output_final_state, chunk_size,
                      d: FlowDims):
    """The Triton path of :func:`pflow_dist.ops.flow.chunk_flow` (inputs already validated)."""
    _check_kernel_dtype(q)
    scale = d.K**-0.5 if scale is None else float(scale)
    kr, vr, br = as_rank_r(k, v, beta)
    o, hT = ChunkFlowFunction.apply(q, kr, vr, br, g, initial_state, scale, rank_form, output_final_state, chunk_size)
    return o, (hT if output_final_state else None)


def triton_flow_map(k, v, beta, g, rank_form, chunk_size, d: FlowDims):
    """``(M, D)`` with ``S_T = M S_0 + D`` through the Triton op.

    The map is affine in ``S_0``, so ``D`` is the final state from ``S_0 = 0`` and ``M`` the final state of the
    homogeneous recurrence (values 0) from ``S_0 = I`` (a K×K state). Both runs are differentiable; they share one
    call (values ``[0 | v]``, state ``[I | 0]``) when ``K + V`` fits the op's limit.
    """
    _check_kernel_dtype(k)
    kr, vr, br = as_rank_r(k, v, beta)
    B, T, H, R, K = kr.shape
    V = vr.shape[-1]
    q = kr.new_zeros(B, T, H, K)  # outputs are not needed; q = 0 makes them (and dq) zeros
    eye = torch.eye(K, device=k.device, dtype=torch.float32).expand(B, H, K, K)
    if K + V <= 256:
        v2 = torch.cat([vr.new_zeros(B, T, H, R, K), vr], dim=-1)
        h0 = torch.cat([eye, eye.new_zeros(B, H, K, V)], dim=-1)
        _, S = ChunkFlowFunction.apply(q, kr, v2, br, g, h0, 1.0, rank_form, True, chunk_size)
        return S[..., :K], S[..., K:]
    _, M = ChunkFlowFunction.apply(q, kr, vr.new_zeros(B, T, H, R, K), br, g, eye.contiguous(), 1.0, rank_form, True,
                                   chunk_size)
    _, D = ChunkFlowFunction.apply(q, kr, vr, br, g, None, 1.0, rank_form, True, chunk_size)
    return M, D
