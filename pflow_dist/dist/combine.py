# The cross-device prefix combine (DESIGN.md §6; LASP-2 style: one all-gather of per-rank states, then a local prefix).
#
# Rank p holds a contiguous shard and computes, from a zero state, its shard's flow (M_p, D_p): S_end = M_p S_start
# + D_p. One all-gather of the flows (size independent of T: K² + K·V per head for flow, n² + n for a dense scan, 2n for
# a diagonal one) lets every rank compose the exclusive prefix and get its true incoming state
#     S_in,p = (M_{p-1}, D_{p-1}) ∘ ... ∘ (M_0, D_0) applied to S_0,
# after which the local op runs (or is corrected) with initial_state = S_in,p. The backward pass is autograd through
# exactly these steps: ∂L/∂S_in,p flows into the maps of ranks j < p with the transposed maps (the adjoint of the
# composition), and the all-gather's backward returns to each rank the summed gradient of its own (M_p, D_p).
#
# Why all-gather + local prefix and not a log-depth (Hillis–Steele) exchange over ranks: with P ranks the all-gather
# moves P maps per rank in one collective, a log-depth scan moves log2(P) maps per rank but in log2(P) dependent
# rounds of point-to-point latency. The maps are small (a 128×128 fp32 map per head is 64 KiB), so up to the P of one
# or a few nodes the single collective wins on latency; the composition is O(P) tiny matmuls.
"""The cross-device prefix combine: each rank's incoming state from the all-gathered flows of the ranks before it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..kernels.common.affine import apply_map
from .comm import group_rank_size

__all__ = ["incoming_state"]


def _flat_all_gather(tensors: list[torch.Tensor], group: ProcessGroup | None, world: int) -> list[torch.Tensor]:
    """All-gather several tensors in one collective; returns each as ``[P, *shape]``."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    out = flat.new_empty(world, flat.numel())
    dist.all_gather(list(out.unbind(0)), flat, group=group)
    parts, start = [], 0
    for t in tensors:
        parts.append(out[:, start:start + t.numel()].reshape(world, *t.shape))
        start += t.numel()
    return parts


def _map_vjp(M: torch.Tensor, S: torch.Tensor, lam: torch.Tensor, diagonal: bool):
    """Adjoint of ``S ↦ M S + D`` at ``S``: returns ``(dM, dS)`` for the output gradient ``lam`` (``dD = lam``)."""
    if diagonal:
        dM = lam * S if lam.dim() == M.dim() else (lam * S).sum(-1)
        dS = (M if lam.dim() == M.dim() else M.unsqueeze(-1)) * lam
        return dM, dS
    if lam.dim() == M.dim() - 1:  # vector states [..., n]
        return lam.unsqueeze(-1) * S.unsqueeze(-2), (M.transpose(-1, -2) @ lam.unsqueeze(-1)).squeeze(-1)
    return lam @ S.transpose(-1, -2), M.transpose(-1, -2) @ lam


class _IncomingState(torch.autograd.Function):
    """Forward: all-gather (M_p, D_p), compose the exclusive prefix on S_0. Backward: the same walk with transposed
    maps, then one all-reduce that hands every rank the summed gradient of its own map and of S_0."""

    @staticmethod
    def forward(ctx, M, D, S0, group, diagonal):
        rank, world = group_rank_size(group)
        Ms, Ds = _flat_all_gather([M.contiguous(), D.contiguous()], group, world)
        S = torch.zeros_like(D) if S0 is None else S0.to(D.dtype)
        states = []
        for j in range(rank):
            states.append(S)
            S = apply_map((Ms[j], Ds[j]), S, diagonal)
        ctx.group, ctx.diagonal, ctx.rank, ctx.world = group, diagonal, rank, world
        ctx.has_s0 = S0 is not None
        ctx.s0_dtype = None if S0 is None else S0.dtype
        ctx.save_for_backward(Ms, *states)
        return S

    @staticmethod
    def backward(ctx, lam):
        Ms, *states = ctx.saved_tensors
        rank, world = ctx.rank, ctx.world
        dMs = Ms.new_zeros(Ms.shape)
        dDs = lam.new_zeros((world, *lam.shape))
        for j in range(rank - 1, -1, -1):
            dDs[j] = lam
            dMs[j], lam = _map_vjp(Ms[j], states[j], lam, ctx.diagonal)
        # lam is now this rank's contribution to dS0; one all-reduce carries every rank's contributions to all maps
        flat = torch.cat([dMs.reshape(-1), dDs.reshape(-1), lam.reshape(-1)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
        nM, nD = dMs.numel(), dDs.numel()
        dM = flat[:nM].reshape(Ms.shape)[rank]
        dD = flat[nM:nM + nD].reshape(dDs.shape)[rank]
        dS0 = flat[nM + nD:].reshape(lam.shape).to(ctx.s0_dtype) if ctx.has_s0 else None
        return dM, dD, dS0, None, None


def incoming_state(
    M: torch.Tensor,
    D: torch.Tensor,
    initial_state: torch.Tensor | None,
    group: ProcessGroup | None = None,
    diagonal: bool = False,
) -> torch.Tensor:
    """The state entering this rank's shard, differentiably (every rank must call it, and backpropagate through it).

    Args:
        M: this shard's transition, ``[..., n, n]`` (dense) or ``[..., n]`` (diagonal).
        D: this shard's end state from a zero start, ``[..., n]`` or ``[..., n, m]`` (e.g. flow ``[B, H, K, V]``).
        initial_state: the sequence's initial state, the same tensor on every rank (``None`` = zeros). Its gradient
            is summed over the group, so every rank receives the full gradient.
        group: the sequence-parallel process group (ranks in sequence order).
        diagonal: whether ``M`` is stored as its diagonal.

    Returns:
        ``S_in`` with the shape of ``D``: ``initial_state`` on rank 0, the composed prefix on the others.
    """
    if M.dtype != D.dtype:
        raise TypeError(f"M and D must share one dtype, got M={M.dtype}, D={D.dtype}")
    return _IncomingState.apply(M, D, initial_state, group, diagonal)
