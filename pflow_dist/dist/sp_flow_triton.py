# The Triton path of sp_flow: the cross-rank combine runs *inside* the flow's grouped state passes.
#
# The state passes of the chunked flow (kernels/flow/chunk_scan.py) already split a long sequence into groups of
# chunks: every group's affine map (M_g, D_g) in parallel, the group-start states by composing the maps, then every
# group again from its true start. Ranks are one more level of the same tree: the composition of a rank's group maps is
# its shard's map (M_p, D_p), the combine (combine.py) turns the ranks' maps into this rank's incoming state, and the
# groups continue from it. So the shard's map costs no kernel beyond the grouped pass itself (the composition is P_g
# small K×K products), where the generic path (sp_ops.sp_flow on the torch backend) runs the whole flow op once more
# with K + V columns for it, and its backward once more too.
#
# Backward, per rank p (u_p = the gradient of the state returned at the end of this shard, λ_p = ∂L/∂S_in,p): the
# reverse state pass gives the shard's map dS_in = Φ_p dS_out + E_p; the true dS_out is μ_p = u_p + λ_{p+1} with
# λ_q = Φ_q μ_q + E_q = Φ_q λ_{q+1} + (Φ_q u_q + E_q), an exclusive suffix combine of the maps (Φ_q, Φ_q u_q + E_q)
# over the ranks after p. The pass then continues from μ_p, and every gradient of the shard comes out of the one
# ordinary backward. ∂L/∂S_0 is λ_0, all-reduced so that every rank holds it (S_0 is replicated), as in combine.py.
"""Sequence-parallel flow on the Triton kernels, the combine fused into the grouped state passes (fwd + bwd)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..kernels.common.affine import apply_map
from ..kernels.flow.chunk import chunk_flow_bwd, chunk_flow_fwd, keep_intermediates
from ..kernels.flow.shapes import as_rank_r
from ..ops.flow_autograd import prepare_forward
from .combine import _combine
from .comm import group_rank_size

__all__ = ["triton_sp_flow"]


class _SPFlowFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, rank_form, chunk_size, group, algorithm):
        p, q, k, v, beta, G = prepare_forward(ctx, q, k, v, beta, g, h0, scale, rank_form, chunk_size)
        h0f = None if h0 is None else h0.float()
        start: list[torch.Tensor] = []

        def incoming(M: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
            start.append(_combine(M, D, h0f, group, False, False, algorithm))
            return start[0]

        o, hT, saved = chunk_flow_fwd(q, k, v, beta, G, scale, None, True, p, keep=keep_intermediates(p, q),
                                      boundary=incoming)
        ctx.save_for_backward(q, k, v, beta, G, start[0], *(saved or ()))
        ctx.group, ctx.algorithm = group, algorithm
        return o, hT

    @staticmethod
    def backward(ctx, do, dhT):
        q, k, v, beta, G, S_in, *saved = ctx.saved_tensors
        group, algorithm = ctx.group, ctx.algorithm
        u = torch.zeros_like(S_in) if dhT is None else dhT.float()

        def outgoing(Phi: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
            Phi = Phi.contiguous()
            lam_next = _combine(Phi, apply_map((Phi, E), u), None, group, True, False, algorithm)
            return u + lam_next

        need_dh0 = ctx.h0_dtype is not None and group_rank_size(group)[0] == 0
        dq, dk, dv, dbeta, dg, dS_in = chunk_flow_bwd(
            q, k, v, beta, G, ctx.scale, S_in, do.contiguous(), None, ctx.plan, need_dh0=need_dh0,
            saved=saved or None, boundary=outgoing,
        )
        dh0 = None
        if ctx.h0_dtype is not None:
            dh0 = dS_in if need_dh0 else torch.zeros_like(S_in)
            dist.all_reduce(dh0, op=dist.ReduceOp.SUM, group=group)
            dh0 = dh0.to(ctx.h0_dtype)
        dg = None if dg is None else dg.to(ctx.g_dtype)
        return dq, dk, dv, dbeta, dg, dh0, None, None, None, None, None


def triton_sp_flow(q, k, v, beta, g, rank_form: str, scale: float, initial_state, chunk_size: int,
                   group: ProcessGroup | None, algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, T_p, H, V], state at the end of this shard [B, H, K, V] fp32)`` of :func:`~.sp_ops.sp_flow` on the
    Triton kernels; inputs already validated (float32, bfloat16 or float16), ``algorithm`` resolved."""
    kr, vr, br = as_rank_r(k, v, beta)
    return _SPFlowFunction.apply(q, kr, vr, br, g, initial_state, scale, rank_form, chunk_size, group, algorithm)
