"""Shape checks for the flow (generalised delta rule) inputs, shared by the reference and the Triton op.

Layout (DESIGN.md §2): ``q [B, T, H, K]``; rank-1 ``k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta [B, T, H]``;
rank-R ``k [B, T, H, R, K]``, ``v [B, T, H, R, V]``, ``beta [B, T, H, R]``; log-decay ``g [B, T, H]``;
state ``[B, H, K, V]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.checks import check_same_device, check_tensor

__all__ = ["RANK_FORMS", "FlowDims", "check_flow_inputs", "as_rank_r"]

RANK_FORMS = ("sum", "product")


@dataclass(frozen=True)
class FlowDims:
    """Sizes of one flow problem. ``ranked`` is True when k/v/beta carry an explicit rank axis R."""

    B: int
    T: int
    H: int
    R: int
    K: int
    V: int
    ranked: bool


def check_flow_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    rank_form: str = "sum",
) -> FlowDims:
    """Validate flow inputs and return their sizes; raise ``ValueError``/``TypeError`` naming what was expected."""
    if rank_form not in RANK_FORMS:
        raise ValueError(f"rank_form must be one of {RANK_FORMS}, got {rank_form!r}")
    check_tensor("q", q, ndim=4, dims="[B, T, H, K]")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("q must have at least one time step (T >= 1), got T=0")
    check_tensor("k", k, ndim=(4, 5), dims="[B, T, H, K] or [B, T, H, R, K]")
    ranked = k.dim() == 5
    R = k.shape[3] if ranked else 1
    if ranked:
        check_tensor("k", k, shape=(B, T, H, R, K), dims="[B, T, H, R, K]")
        check_tensor("v", v, shape=(B, T, H, R, None), dims="[B, T, H, R, V]")
        check_tensor("beta", beta, shape=(B, T, H, R), dims="[B, T, H, R] (R taken from k)")
    else:
        check_tensor("k", k, shape=(B, T, H, K), dims="[B, T, H, K]")
        check_tensor("v", v, shape=(B, T, H, None), dims="[B, T, H, V]")
        check_tensor("beta", beta, shape=(B, T, H), dims="[B, T, H]")
    if R < 1:
        raise ValueError(f"the rank axis of k must be >= 1, got R={R}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    V = v.shape[-1]
    if g is not None:
        check_tensor("g", g, shape=(B, T, H), dims="[B, T, H] (log-decay per token)")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(B, H, K, V), dims="[B, H, K, V]")
    check_same_device(q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state)
    return FlowDims(B=B, T=T, H=H, R=R, K=K, V=V, ranked=ranked)


def as_rank_r(
    k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """View rank-1 inputs with an explicit rank axis: ``k [B,T,H,1,K]``, ``v [B,T,H,1,V]``, ``beta [B,T,H,1]``."""
    if k.dim() == 5:
        return k, v, beta
    return k.unsqueeze(3), v.unsqueeze(3), beta.unsqueeze(3)
