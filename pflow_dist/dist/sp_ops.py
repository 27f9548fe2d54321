"""Differentiable sequence-parallel ops: each rank passes its contiguous shard and the group; the result on every rank
equals the matching slice of the single-device op on the whole sequence (outputs, states and every gradient).

Sequence parallelism is a keyword, not a forked op: the local work is the single-device op itself, run once for the
shard's flow and once (or a cheap correction) with the incoming state from :func:`~pflow_dist.dist.combine.incoming_state`.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from ..kernels.scan.naive import check_scan_inputs, naive_scan
from ..ops.flow import chunk_flow, flow_map
from .combine import incoming_state

__all__ = ["sp_flow", "sp_scan"]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sp_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    group: ProcessGroup | None,
    rank_form: str = "sum",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence-parallel flow (generalised delta rule) over the ranks of ``group``.

    Args:
        q, k, v, beta, g: this rank's contiguous shard, layouts as in the flow op (``q [B, T_p, H, K]``, rank-R
            ``k [B, T_p, H, R, K]`` ...); shards are in rank order along time.
        group: the sequence-parallel process group (``None`` = the default group).
        initial_state: the sequence's initial state ``[B, H, K, V]``, identical on every rank.
        output_final_state: return the state at the end of *this rank's* shard (on the last rank: the sequence's
            final state).
        rank_form, scale, chunk_size, backend: as in :func:`pflow_dist.ops.flow.chunk_flow` (the local work is that
            op: once for the shard's flow map, once from the incoming state).

    Returns:
        ``(o [B, T_p, H, V], final_state [B, H, K, V] or None)``.
    """
    M, D = flow_map(k, v, beta, g, rank_form, chunk_size=chunk_size, backend=backend)
    S_in = incoming_state(M, D, initial_state, group)
    o, S = chunk_flow(q, k, v, beta, g, rank_form, scale, S_in, output_final_state=True, chunk_size=chunk_size,
                      backend=backend)
    return o, (S if output_final_state else None)


def _ordered_product(a: torch.Tensor) -> torch.Tensor:
    """``A_T ⋯ A_1`` of ``a [B, T, n, n]`` by a log-depth tree of batched matmuls."""
    while a.shape[1] > 1:
        if a.shape[1] % 2:
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand(a.shape[0], 1, *a.shape[2:])
            a = torch.cat([a, eye], dim=1)
        a = a[:, 1::2] @ a[:, 0::2]
    return a[:, 0]


def sp_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    group: ProcessGroup | None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence-parallel affine scan ``h_t = A_t h_{t-1} + b_t`` over the ranks of ``group``.

    Diagonal scans need one local pass: ``h = h^0 + (Π_{s≤t} a_s) ⊙ h_in`` (the correction is linear in ``h_in``).
    Dense scans run the local scan twice (from zero for the flow, then from ``h_in``) rather than materialise the
    ``T`` cumulative ``n × n`` products.

    Args:
        a: this rank's shard of the transitions, ``[B, T_p, N]`` (diagonal) or ``[B, T_p, N, N]`` (dense).
        b: this rank's shard of the inputs ``[B, T_p, N]``.
        initial_state: ``h_0 [B, N]``, identical on every rank.
        group: the sequence-parallel process group.
        output_final_state: also return the state at the end of this rank's shard.

    Returns:
        ``(h [B, T_p, N], h_end [B, N] or None)``.
    """
    diagonal = check_scan_inputs(a, b, initial_state)
    acc = _acc_dtype(b)
    a_, b_ = a.to(acc), b.to(acc)
    h_zero, _ = naive_scan(a_, b_)
    h_zero = h_zero.to(acc)
    if diagonal:
        P = torch.cumprod(a_, dim=1)
        h_in = incoming_state(P[:, -1], h_zero[:, -1], initial_state, group, diagonal=True)
        h = h_zero + P * h_in.unsqueeze(1)
    else:
        h_in = incoming_state(_ordered_product(a_), h_zero[:, -1], initial_state, group)
        h, _ = naive_scan(a_, b_, h_in)
        h = h.to(acc)
    return h.to(b.dtype), (h[:, -1] if output_final_state else None)
