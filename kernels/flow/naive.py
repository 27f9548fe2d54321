# Plain-torch references for the flow op (generalised delta rule), computed in float64.
#
# Recurrence (fla orientation, S ∈ R^{K×V}; DESIGN.md §3, research/flow.md §7):
#   sum form (ParallelFlow, Cirone & Salvi 2025, arXiv 2504.00492): every rank term of token t reads the same
#       α_t S_{t-1}:   S_t = α_t S_{t-1} + Σ_r k_{t,r} β_{t,r} (v_{t,r} − α_t S_{t-1}ᵀ k_{t,r})ᵀ
#   product form (DeltaProduct, Siems et al. 2025): R successive rank-1 steps, Z ← Z + k_r β_r (v_r − Zᵀ k_r)ᵀ
#       starting from Z = α_t S_{t-1}; S_t = Z.
#   output o_t = S_tᵀ (scale · q_t), read after the whole update of token t; α_t = exp(g_t) (1 when g is None).
# For R = 1 both forms are DeltaNet (gated: Gated DeltaNet), identical to fla's delta_rule / gated_delta_rule.
#
# Chunked form (WY / UT transform, Yang et al. 2024; flow.md §3, checked there against the loop to 1e-15): inside a
# chunk of C tokens with rows (t, r), G_t = Σ_{s≤t} g_s (cumulative within the chunk),
#   A[(t,r),(s,r')] = β_{t,r} (k_{t,r}·k_{s,r'}) e^{G_t−G_s}   kept for s < t (sum) or (s,r') < (t,r) (product)
#   W = (I + A)^{-1} (β e^{G} K),  U = (I + A)^{-1} (β V),  U' = U − W S_0
#   O_t = e^{G_t} q_tᵀ S_0 + Σ_{(s,r'): s ≤ t} (q_t·k_{s,r'}) e^{G_t−G_s} U'_{(s,r')}
#   S_C = e^{G_C} S_0 + (e^{G_C−G} ⊙ K)ᵀ U'
# so the chunk's flow is S_C = M S_0 + D with M = e^{G_C} I − (e^{G_C−G} ⊙ K)ᵀ W and D = (e^{G_C−G} ⊙ K)ᵀ U.
"""Float64 references of the flow op: the token loop, the chunked WY form and the chunk flow map ``(M, D)``."""

from __future__ import annotations

import torch

from ..common.affine import AffineMap, compose
from .shapes import as_rank_r, check_flow_inputs

__all__ = ["naive_chunk_flow", "naive_chunk_flow_map", "naive_flow_map", "naive_recurrent_flow"]

_F64 = torch.float64


def _prepare(q, k, v, beta, g, scale, initial_state, rank_form, acc=_F64):
    d = check_flow_inputs(q, k, v, beta, g, initial_state, rank_form)
    scale = d.K**-0.5 if scale is None else float(scale)
    k, v, beta = as_rank_r(k, v, beta)
    q = q.to(acc) * scale
    k, v, beta = k.to(acc), v.to(acc), beta.to(acc)
    g = None if g is None else g.to(acc)
    if initial_state is None:
        S = q.new_zeros(d.B, d.H, d.K, d.V)
    else:
        S = initial_state.to(acc)
    return d, q, k, v, beta, g, S


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return _F64 if q.dtype == _F64 else torch.float32


def _token_step(S: torch.Tensor, k_t, v_t, beta_t, alpha_t, rank_form: str) -> torch.Tensor:
    """One token of the recurrence: ``S [B,H,K,V]``, ``k_t [B,H,R,K]``, ``v_t [B,H,R,V]``, ``beta_t [B,H,R]``."""
    if alpha_t is not None:
        S = alpha_t[..., None, None] * S
    if rank_form == "sum":
        pred = torch.einsum("bhrk,bhkv->bhrv", k_t, S)
        return S + torch.einsum("bhrk,bhrv->bhkv", k_t, beta_t[..., None] * (v_t - pred))
    for r in range(k_t.shape[2]):
        kr, vr, br = k_t[:, :, r], v_t[:, :, r], beta_t[:, :, r]
        pred = torch.einsum("bhk,bhkv->bhv", kr, S)
        S = S + torch.einsum("bhk,bhv->bhkv", kr, br[..., None] * (vr - pred))
    return S


def naive_recurrent_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    rank_form: str = "sum",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generalised delta rule, one token at a time, in float64 (the oracle for every flow kernel).

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]`` (rank 1) or ``[B, T, H, R, K]`` (rank R). Not normalised here: pass
            L2-normalised keys for the usual DeltaNet semantics.
        v: values ``[B, T, H, V]`` or ``[B, T, H, R, V]``.
        beta: write strengths ``[B, T, H]`` or ``[B, T, H, R]``.
        g: log-decay per token ``[B, T, H]`` (α_t = exp(g_t)); ``None`` means no gate.
        rank_form: ``"sum"`` (ParallelFlow: all R terms read the same previous state) or ``"product"``
            (DeltaProduct: R successive rank-1 steps). Identical for R = 1.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token (zeros when ``None``).
        output_final_state: whether to return the state after the last token.

    Returns:
        ``(o, final_state)``: ``o [B, T, H, V]`` in ``q.dtype``; ``final_state [B, H, K, V]`` (float64 for float64
        inputs, else float32) or ``None``. Differentiable by autograd.

    Example::

        >>> B, T, H, K, V = 1, 5, 2, 4, 3
        >>> q, k = torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
        >>> o, S = naive_recurrent_flow(q, k, torch.randn(B, T, H, V), torch.rand(B, T, H), output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([1, 5, 2, 3]), torch.Size([1, 2, 4, 3]))
    """
    d, qs, k, v, beta, g, S = _prepare(q, k, v, beta, g, scale, initial_state, rank_form)
    outs = []
    for t in range(d.T):
        alpha = None if g is None else torch.exp(g[:, t])
        S = _token_step(S, k[:, t], v[:, t], beta[:, t], alpha, rank_form)
        outs.append(torch.einsum("bhk,bhkv->bhv", qs[:, t], S))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (S.to(_state_dtype(q)) if output_final_state else None)


def naive_flow_map(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    rank_form: str = "sum",
) -> AffineMap:
    """The flow of a whole sequence, ``S_T = M S_0 + D``, by the token loop in float64.

    Args:
        k, v, beta, g, rank_form: as in :func:`naive_recurrent_flow` (``k`` fixes B, T, H, K).

    Returns:
        ``(M [B, H, K, K], D [B, H, K, V])`` in float64: ``M = A_T ⋯ A_1`` with
        ``A_t = α_t (I − Σ_r β k kᵀ)`` (sum form) or the product of the R rank-1 factors, and ``D`` the final state
        from ``S_0 = 0``.
    """
    q = torch.zeros(k.shape[:3] + (k.shape[-1],), dtype=k.dtype, device=k.device)
    d, _, k, v, beta, g, _ = _prepare(q, k, v, beta, g, None, None, rank_form)
    M = torch.eye(d.K, dtype=_F64, device=k.device).expand(d.B, d.H, d.K, d.K).clone()
    D = k.new_zeros(d.B, d.H, d.K, d.V)
    zeros_v = k.new_zeros(d.B, d.H, d.R, d.K)
    for t in range(d.T):
        alpha = None if g is None else torch.exp(g[:, t])
        M = _token_step(M, k[:, t], zeros_v, beta[:, t], alpha, rank_form)  # homogeneous part: v = 0
        D = _token_step(D, k[:, t], v[:, t], beta[:, t], alpha, rank_form)
    return M, D


def _chunk_masks(C: int, R: int, rank_form: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row masks over the C·R rows (t, r) of a chunk: ``coupling`` (A's strict mask) and ``visible`` (s ≤ t)."""
    tok = torch.arange(C, device=device).repeat_interleave(R)
    row = torch.arange(C * R, device=device)
    if rank_form == "sum":
        coupling = tok[:, None] > tok[None, :]
    else:
        coupling = row[:, None] > row[None, :]
    visible = tok[:, None] >= tok[None, :]  # [C·R, C·R]; queries use the rows of their own token
    return coupling, visible


def _chunk_rows(k, v, beta, gl, sl: slice):
    """The rows (t, r) of one chunk, token-major: ``k [B,H,n,K]``, ``v [B,H,n,V]``, ``beta [B,H,n]``, the per-token
    cumulative log-decay ``G_tok [B,H,C]`` and its per-row copy ``G [B,H,n]`` (n = C·R)."""
    B, _, H, R, K = k.shape
    kc = k[:, sl].permute(0, 2, 1, 3, 4).reshape(B, H, -1, K)
    vc = v[:, sl].permute(0, 2, 1, 3, 4).reshape(B, H, kc.shape[2], v.shape[-1])
    bc = beta[:, sl].permute(0, 2, 1, 3).reshape(B, H, kc.shape[2])
    G_tok = torch.cumsum(gl[:, sl].permute(0, 2, 1), dim=-1)
    return kc, vc, bc, G_tok, G_tok.repeat_interleave(R, dim=-1)


WY_METHODS = ("inverse", "sigdelta")


def _sigdelta_solve(A: torch.Tensor, Y: torch.Tensor, group: int) -> torch.Tensor:
    """``(I + A)⁻¹ Y`` for ``A [..., n, n]`` strictly lower by blocks of ``group`` rows, by the grid recursion of
    ParallelFlow's signature-inspired algorithm (Cirone & Salvi 2025, Thm 3.5, "sigDelta"), no inverse formed.

    Grid cell (m, j) holds row j pushed through the blocks before m: ``X(m+1, j) = X(m, j) − A[j, m] X(m, m)``
    (the 2-D recursion of the paper summed over its increments). Block m is final after m steps and every later row
    advances together, so the depth is the number of blocks (C tokens in the sum form, C·R rows in the product
    form) and the work O(n² (K + V)), with no triangular solve.
    """
    n = A.shape[-1]
    done, pending = [], Y
    for r0 in range(0, n, group):
        r1 = min(r0 + group, n)
        block = pending[..., : r1 - r0, :]  # final: nothing earlier is left to push into it
        done.append(block)
        if r1 < n:
            pending = pending[..., r1 - r0:, :] - A[..., r1:, r0:r1] @ block
    return torch.cat(done, dim=-2)


def _chunk_wy(kc, vc, bc, Gc, coupling, method: str = "inverse", group: int = 1):
    """W, U of one chunk. ``kc [B,H,n,K]``, ``vc [B,H,n,V]``, ``bc [B,H,n]``, ``Gc [B,H,n]`` (row-wise cumsum).
    ``method``: ``"inverse"`` (triangular solve: the tensorInv form the kernels use) or ``"sigdelta"`` (the grid
    recursion of :func:`_sigdelta_solve` over blocks of ``group`` mutually uncoupled rows)."""
    n = kc.shape[2]
    decay = torch.exp(Gc[..., :, None] - Gc[..., None, :]).masked_fill(~coupling, 0.0)
    A = bc[..., None] * (kc @ kc.transpose(-1, -2)) * decay
    rhs_w, rhs_u = bc[..., None] * torch.exp(Gc)[..., None] * kc, bc[..., None] * vc
    if method == "sigdelta":
        X = _sigdelta_solve(A, torch.cat([rhs_w, rhs_u], dim=-1), group)
        return X[..., : kc.shape[-1]], X[..., kc.shape[-1]:]
    I_plus_A = A + torch.eye(n, dtype=A.dtype, device=A.device)
    W = torch.linalg.solve_triangular(I_plus_A, rhs_w, upper=False)
    U = torch.linalg.solve_triangular(I_plus_A, rhs_u, upper=False)
    return W, U


def naive_chunk_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    rank_form: str = "sum",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
    return_chunk_maps: bool = False,
    acc_dtype: torch.dtype = _F64,
    wy: str = "inverse",
):
    """Chunked (WY / UT transform) reference in float64: same signature and result as :func:`naive_recurrent_flow`.

    The algebra the Triton kernels implement, kept in plain torch so it can be checked against the loop.
    Any ``T`` works (the last chunk is shorter).

    Args:
        chunk_size: tokens per chunk ``C`` (each chunk has ``C·R`` rows).
        return_chunk_maps: also return the flow of every chunk.
        acc_dtype: the accumulation dtype (float64 for the reference; float32 gives a plain-torch baseline).
        wy: how each chunk's W, U are computed: ``"inverse"`` (triangular solve, the tensorInv / UT form) or
            ``"sigdelta"`` (ParallelFlow's signature-inspired grid recursion, depth C, no inverse).
        (others): as in :func:`naive_recurrent_flow`.

    Returns:
        ``(o, final_state)``, or ``(o, final_state, maps)`` with ``maps`` a list (one per chunk) of
        ``(M [B, H, K, K], D [B, H, K, V])`` in ``acc_dtype`` such that chunk state ``S_end = M S_start + D``.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if wy not in WY_METHODS:
        raise ValueError(f"wy must be one of {WY_METHODS}, got {wy!r}")
    d, qs, k, v, beta, g, S = _prepare(q, k, v, beta, g, scale, initial_state, rank_form, acc_dtype)
    B, T, H, R, K = d.B, d.T, d.H, d.R, d.K
    gl = g if g is not None else qs.new_zeros(B, T, H)
    outs, maps = [], []
    for t0 in range(0, T, chunk_size):
        C = min(chunk_size, T - t0)
        sl = slice(t0, t0 + C)
        kc, vc, bc, G_tok, Gc = _chunk_rows(k, v, beta, gl, sl)  # rows (t, r) token-major: [B, H, C·R, ·]
        qc = qs[:, sl].permute(0, 2, 1, 3)  # [B, H, C, K]
        coupling, visible = _chunk_masks(C, R, rank_form, k.device)
        W, U = _chunk_wy(kc, vc, bc, Gc, coupling, wy, R if rank_form == "sum" else 1)
        U_new = U - W @ S
        vis = visible[::R]  # [C, n]: query token t sees rows of tokens ≤ t
        attn = (qc @ kc.transpose(-1, -2)) * torch.exp(G_tok[..., :, None] - Gc[..., None, :]).masked_fill(~vis, 0.0)
        outs.append(torch.exp(G_tok)[..., None] * (qc @ S) + attn @ U_new)
        G_end = G_tok[..., -1]
        k_end = torch.exp(G_end[..., None] - Gc)[..., None] * kc  # [B, H, n, K]
        if return_chunk_maps:
            eye = torch.eye(K, dtype=acc_dtype, device=k.device)
            k_end_t = k_end.transpose(-1, -2)
            maps.append((torch.exp(G_end)[..., None, None] * eye - k_end_t @ W, k_end_t @ U))
        S = torch.exp(G_end)[..., None, None] * S + k_end.transpose(-1, -2) @ U_new
    o = torch.cat(outs, dim=2).permute(0, 2, 1, 3).to(q.dtype)
    final = S.to(_state_dtype(q) if acc_dtype == _F64 else torch.float32) if output_final_state else None
    return (o, final, maps) if return_chunk_maps else (o, final)



def naive_chunk_flow_map(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    rank_form: str = "sum",
    chunk_size: int = 16,
    acc_dtype: torch.dtype = _F64,
) -> AffineMap:
    """The sequence's flow ``S_T = M S_0 + D`` by the chunked WY form (no outputs computed): per chunk
    ``M_c = e^{G_C} I − K̃ᵀ W``, ``D_c = K̃ᵀ U``, composed in order. Same result as :func:`naive_flow_map`.

    Returns:
        ``(M [B, H, K, K], D [B, H, K, V])`` in ``acc_dtype``; differentiable by autograd.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    q = torch.zeros(k.shape[:3] + (k.shape[-1],), dtype=k.dtype, device=k.device)
    d, _, k, v, beta, g, _ = _prepare(q, k, v, beta, g, None, None, rank_form, acc_dtype)
    B, T, H, R, K, V = d.B, d.T, d.H, d.R, d.K, d.V
    gl = g if g is not None else k.new_zeros(B, T, H)
    eye = torch.eye(K, dtype=acc_dtype, device=k.device)
    M = eye.expand(B, H, K, K)
    D = k.new_zeros(B, H, K, V)
    for t0 in range(0, T, chunk_size):
        C = min(chunk_size, T - t0)
        kc, vc, bc, _, Gc = _chunk_rows(k, v, beta, gl, slice(t0, t0 + C))
        coupling, _ = _chunk_masks(C, R, rank_form, k.device)
        W, U = _chunk_wy(kc, vc, bc, Gc, coupling)
        G_end = Gc[..., -1]
        k_end = torch.exp(G_end[..., None] - Gc)[..., None] * kc
        Mc = torch.exp(G_end)[..., None, None] * eye - k_end.transpose(-1, -2) @ W
        M, D = compose((M, D), (Mc, k_end.transpose(-1, -2) @ U))
    return M, D
