# The flow op: the generalised (rank-R) delta rule, chunked.
#
# ParallelFlow (Cirone & Salvi 2025, arXiv 2504.00492): linear attention as a matrix-valued SSM whose chunks are
# affine flows S_end = M S_start + D; rank-R sum form. DeltaProduct (Siems et al. 2025, arXiv 2502.10297): the
# product form. Chunked WY / UT transform: Yang et al. 2024 (arXiv 2406.06484). Math: DESIGN.md §3,
# kernels/flow/naive.py.
#
# Backends: "triton" = kernels/flow/chunk*.py (autograd in flow_autograd.py); "torch" = naive_chunk_flow with fp32
# accumulation and torch autograd (the CPU path). Inside the Triton path the inter-chunk recurrence is either one
# sequential pass per (head, V block) or, when that leaves most SMs idle (long single sequences), the second algorithm
# of DESIGN.md §3 in grouped form: chunk-group flows (M, D) in parallel, composed, then the chunk states
# (kernels/flow/chunk_scan.py; chosen per shape by num_groups, measured in benchmarks/results/flow_groups_h100.jsonl).
"""Public flow op: ``chunk_flow`` (outputs and final state) and ``flow_map`` (the sequence's affine flow)."""

from __future__ import annotations

import math

import torch

from ..kernels.common.checks import check_tensor
from ..kernels.flow.naive import _chunk_masks, _chunk_wy, naive_chunk_flow
from ..kernels.flow.shapes import FlowDims, as_rank_r, check_flow_inputs

__all__ = ["BACKENDS", "MAX_DIM", "MAX_RANK", "chunk_flow", "flow_map"]

BACKENDS = ("auto", "triton", "torch")
MAX_RANK = 8
MAX_DIM = 256
_TRITON_READY = True


def _validate(q, k, v, beta, g, initial_state, rank_form, scale, chunk_size, backend) -> FlowDims:
    d = check_flow_inputs(q, k, v, beta, g, initial_state, rank_form)
    if d.R > MAX_RANK:
        raise ValueError(f"rank R must be <= {MAX_RANK}, got R={d.R} (k has shape {list(k.shape)})")
    if d.K > MAX_DIM:
        raise ValueError(f"key dim K must be <= {MAX_DIM}, got K={d.K}")
    if d.V > MAX_DIM:
        raise ValueError(f"value dim V must be <= {MAX_DIM}, got V={d.V}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return d


def _nonfinite_counts(beta: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """NaN/Inf counts of beta and g as one device tensor ``[2]``: computed before the kernels are queued, read back
    (the one host sync of ``check_finite``) only after them, so the GPU is not left idle while the host waits."""
    parts = [(~torch.isfinite(beta)).sum()]
    parts.append((~torch.isfinite(g)).sum() if g is not None else parts[0].new_zeros(()))
    return torch.stack(parts)


def _raise_if_nonfinite(counts: torch.Tensor | None, beta: torch.Tensor, g: torch.Tensor | None) -> None:
    if counts is None:
        return
    for name, x, bad in zip(("beta", "g"), (beta, g), counts.tolist()):
        if bad:
            raise ValueError(f"{name} must be finite, got {bad} non-finite value(s) of {x.numel()}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if (device.type == "cuda" and _TRITON_READY) else "torch"
    if backend == "triton" and not _TRITON_READY:
        raise NotImplementedError("backend='triton' of chunk_flow is being built (issue 4); use backend='torch'")
    if backend == "triton":
        from ..testing.triton_mode import interpreting  # noqa: PLC0415

        if device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}")
    return backend


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunk_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    rank_form: str = "sum",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generalised delta rule (rank-1 DeltaNet, gated, rank-R sum or product form), chunked, differentiable.

    Per token ``t`` (``α_t = exp(g_t)``, 1 without gate), sum form:
    ``S_t = α_t S_{t-1} + Σ_r k_{t,r} β_{t,r} (v_{t,r} − α_t S_{t-1}ᵀ k_{t,r})ᵀ``; product form: R successive rank-1
    delta steps from ``α_t S_{t-1}``; output ``o_t = S_tᵀ (scale · q_t)``.

    Args:
        q: queries ``[B, T, H, K]`` (fp32, bf16, fp16 or fp64).
        k: keys ``[B, T, H, K]`` (rank 1) or ``[B, T, H, R, K]`` (rank R ≤ 8), same dtype as q; usually
            L2-normalised by the caller.
        v: values ``[B, T, H, V]`` or ``[B, T, H, R, V]``, same dtype as q. K, V ≤ 256.
        beta: write strengths ``[B, T, H]`` or ``[B, T, H, R]``, finite (β ∈ (0, 2) keeps rank-1 steps stable).
        g: log-decay ``[B, T, H]`` (≤ 0 in practice) or ``None`` for no gate.
        rank_form: ``"sum"`` (ParallelFlow) or ``"product"`` (DeltaProduct); identical for R = 1.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token, or ``None`` (zeros). Receives gradients.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk (any T works; the last chunk may be shorter).
        backend: ``"triton"`` (the Triton kernels: CUDA tensors, or CPU with ``TRITON_INTERPRET=1``), ``"torch"``
            (the chunked WY form in plain torch, fp32 accumulation, torch autograd) or ``"auto"`` (triton on CUDA
            tensors, torch otherwise).
        check_finite: raise on NaN/Inf in ``beta`` or ``g``. The count is read back to the host after the kernels
            are queued: one device sync per call, at its end, which still stops the host from queueing the next
            call ahead (H200, B4 T8192 H16 D128 bf16 forward: 1.086 ms with the check, 0.799 ms without; 1.222 ms
            when the count was read before the kernels). Models whose gates are finite by construction (sigmoid,
            softplus) pass False so that the host can run ahead of the GPU.

    Returns:
        ``(o, final_state)``: ``o [B, T, H, V]`` in q's dtype; ``final_state [B, H, K, V]`` in float32 (float64 for
        float64 inputs) or ``None`` when ``output_final_state`` is False.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices, R > 8, K or V > 256, non-finite beta or g (when
            check_finite).

    Example::

        >>> import torch, torch.nn.functional as F
        >>> B, T, H, R, K, V = 1, 10, 2, 2, 8, 4
        >>> q = torch.randn(B, T, H, K)
        >>> k = F.normalize(torch.randn(B, T, H, R, K), dim=-1)
        >>> o, S = chunk_flow(q, k, torch.randn(B, T, H, R, V), torch.rand(B, T, H, R) / R,
        ...                   rank_form="product", output_final_state=True, backend="torch")
        >>> o.shape, S.shape
        (torch.Size([1, 10, 2, 4]), torch.Size([1, 2, 8, 4]))
    """
    d = _validate(q, k, v, beta, g, initial_state, rank_form, scale, chunk_size, backend)
    be = _resolve_backend(backend, q.device)
    counts = _nonfinite_counts(beta, g) if check_finite else None
    if be == "triton":
        from .flow_autograd import triton_chunk_flow  # noqa: PLC0415

        out = triton_chunk_flow(q, k, v, beta, g, rank_form, scale, initial_state, output_final_state, chunk_size, d)
    else:
        out = naive_chunk_flow(
            q, k, v, beta, g=g, rank_form=rank_form, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size, acc_dtype=_acc_dtype(q),
        )
    _raise_if_nonfinite(counts, beta, g)
    return out


def _torch_flow_map(k, v, beta, g, rank_form, chunk_size, d: FlowDims):
    """Chunked WY flow map in plain torch (fp32 accumulation; fp64 for fp64 inputs), torch autograd."""
    acc = _acc_dtype(k)
    k, v, beta = as_rank_r(k, v, beta)
    k, v, beta = k.to(acc), v.to(acc), beta.to(acc)
    B, T, H, R, K = d.B, d.T, d.H, d.R, d.K
    gl = g.to(acc) if g is not None else k.new_zeros(B, T, H)
    eye = torch.eye(K, dtype=acc, device=k.device)
    M, D = None, None
    for t0 in range(0, T, chunk_size):
        C = min(chunk_size, T - t0)
        n = C * R
        sl = slice(t0, t0 + C)
        kc = k[:, sl].permute(0, 2, 1, 3, 4).reshape(B, H, n, K)
        vc = v[:, sl].permute(0, 2, 1, 3, 4).reshape(B, H, n, d.V)
        bc = beta[:, sl].permute(0, 2, 1, 3).reshape(B, H, n)
        Gc = torch.cumsum(gl[:, sl].permute(0, 2, 1), dim=-1).repeat_interleave(R, dim=-1)
        coupling, _ = _chunk_masks(C, R, rank_form, k.device)
        W, U = _chunk_wy(kc, vc, bc, Gc, coupling)
        G_end = Gc[..., -1]
        k_end = (torch.exp(G_end[..., None] - Gc)[..., None] * kc).transpose(-1, -2)
        Mc = torch.exp(G_end)[..., None, None] * eye - k_end @ W
        Dc = k_end @ U
        M, D = (Mc, Dc) if M is None else (Mc @ M, Mc @ D + Dc)
    return M, D


def flow_map(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    rank_form: str = "sum",
    chunk_size: int = 64,
    backend: str = "auto",
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence's affine flow: ``S_T = M S_0 + D`` for every initial state ``S_0``; differentiable.

    This is what the sequence-parallel combine exchanges: a rank's shard maps its incoming state to its outgoing
    state by ``(M, D)`` (compose with :func:`pflow_dist.kernels.common.affine.compose`); ``sp_flow`` on the Triton
    kernels takes the map from its own grouped state passes instead of calling this.

    Args:
        k, v, beta, g, rank_form, chunk_size, backend, check_finite: as in :func:`chunk_flow` (k fixes B, T, H, R,
            K).

    Returns:
        ``(M [B, H, K, K], D [B, H, K, V])`` in float32 (float64 for float64 inputs): ``M = A_T ⋯ A_1`` and ``D`` the
        final state from ``S_0 = 0``.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> k = F.normalize(torch.randn(1, 9, 2, 8), dim=-1)
        >>> M, D = flow_map(k, torch.randn(1, 9, 2, 4), torch.rand(1, 9, 2), backend="torch")
        >>> M.shape, D.shape
        (torch.Size([1, 2, 8, 8]), torch.Size([1, 2, 8, 4]))
    """
    check_tensor("k", k, ndim=(4, 5), dims="[B, T, H, K] or [B, T, H, R, K]")
    q = k.new_empty(k.shape[:3] + (k.shape[-1],))  # only for the shared shape checks
    d = _validate(q, k, v, beta, g, None, rank_form, None, chunk_size, backend)
    be = _resolve_backend(backend, k.device)
    counts = _nonfinite_counts(beta, g) if check_finite else None
    if be == "triton":
        from .flow_autograd import triton_flow_map  # noqa: PLC0415

        out = triton_flow_map(k, v, beta, g, rank_form, chunk_size, d)
    else:
        out = _torch_flow_map(k, v, beta, g, rank_form, chunk_size, d)
    _raise_if_nonfinite(counts, beta, g)
    return out
