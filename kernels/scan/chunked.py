# Plain-torch chunked scan: the CPU path of pflow_dist.ops.scan (and the GPU fallback for float64), so CPU users are
# not stuck on the Triton interpreter. Same algorithm as the Triton kernels (DESIGN.md §4), built on the one combine of
# kernels/common/affine.py:
#   1. split T into chunks of C steps; compose each chunk's C maps into one by a log2(C)-deep tree of `compose`
#      (vectorised over all chunks: log2(C) torch calls instead of C);
#   2. scan the chunk maps (T/C of them) with the same function, recursively, until one chunk is left;
#   3. re-run each chunk from its carried-in state: C calls of `apply_map`, vectorised over all chunks.
# Work O(T) per level (diagonal; dense O(T n³) for the chunk products, the price of parallel dense scans), about
# 2C + log2(C) torch calls per level and log_C(T) levels: T = 2^24 takes 4 levels at C = 64.
# The adjoint λ_t = ḡ_t + A_{t+1}ᵀ λ_{t+1} (derived in kernels/scan/naive.py) is the forward scan over the reversed
# sequence of shifted, transposed gates (`adjoint_gates`), with ∂L/∂h_T as its initial state.
"""Chunked, log-depth affine scans in plain torch (diagonal and dense), forward and adjoint."""

from __future__ import annotations

import torch

from ..common.affine import apply_map, compose

__all__ = ["adjoint_gates", "torch_scan", "torch_scan_adjoint"]


def _identity_gates(like: torch.Tensor, B: int, T: int, N: int, diagonal: bool) -> torch.Tensor:
    if diagonal:
        return like.new_ones(B, T, N)
    return torch.eye(N, dtype=like.dtype, device=like.device).expand(B, T, N, N)


def _sequential(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, diagonal: bool) -> torch.Tensor:
    out = torch.empty_like(b)
    for t in range(b.shape[1]):
        h = apply_map((a[:, t], b[:, t]), h, diagonal)
        out[:, t] = h
    return out


def torch_scan(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, chunk_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_t = A_t h_{t-1} + b_t`` by the chunked algorithm, computed in ``b``'s dtype (callers upcast).

    Args:
        a: ``[B, T, N]`` (diagonal) or ``[B, T, N, N]`` (dense).
        b: ``[B, T, N]``.
        h0: ``[B, N]`` or ``None`` (zeros).
        chunk_size: a power of two ≥ 2.

    Returns:
        ``(h [B, T, N], h_T [B, N])``.
    """
    if chunk_size < 2 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 2, got {chunk_size}")
    diagonal = a.dim() == 3
    B, T, N = b.shape
    h = b.new_zeros(B, N) if h0 is None else h0.to(b.dtype)
    if T <= chunk_size:
        out = _sequential(a, b, h, diagonal)
        return out, out[:, -1]
    C = chunk_size
    nc = -(-T // C)
    pad = nc * C - T
    if pad:  # identity maps (1 or I, 0) past the end leave every state unchanged
        a = torch.cat([a, _identity_gates(a, B, pad, N, diagonal)], dim=1)
        b = torch.cat([b, b.new_zeros(B, pad, N)], dim=1)
    tail = (N,) if diagonal else (N, N)
    a_c = a.reshape(B, nc, C, *tail)
    b_c = b.reshape(B, nc, C, N)
    # 1. chunk maps by a pairwise tree: (first = even, second = odd) at every level
    ma, mb = a_c, b_c
    while ma.shape[2] > 1:
        ma, mb = compose((ma[:, :, 0::2], mb[:, :, 0::2]), (ma[:, :, 1::2], mb[:, :, 1::2]), diagonal)
    # 2. states at the end of every chunk (the same scan over the chunk maps), shifted to carries
    ends, h_T = torch_scan(ma[:, :, 0], mb[:, :, 0], h, chunk_size)
    carry = torch.cat([h.unsqueeze(1), ends[:, :-1]], dim=1)
    # 3. re-run every chunk from its carry
    out = torch.empty_like(b_c)
    x = carry
    for i in range(C):
        x = apply_map((a_c[:, :, i], b_c[:, :, i]), x, diagonal)
        out[:, :, i] = x
    return out.reshape(B, nc * C, N)[:, :T], h_T


def adjoint_gates(a: torch.Tensor) -> torch.Tensor:
    """The gates of the adjoint scan in reversed time: entry s is ``A_{t+1}ᵀ`` for ``t = T-1-s`` (``A_T := I``).

    Args:
        a: ``[B, T, N]`` or ``[B, T, N, N]``.

    Returns:
        A tensor of ``a``'s shape.
    """
    diagonal = a.dim() == 3
    B, T, N = a.shape[:3]
    nxt = a[:, 1:] if diagonal else a[:, 1:].transpose(-1, -2)
    return torch.cat([nxt, _identity_gates(a, B, 1, N, diagonal)], dim=1).flip(1)


def torch_scan_adjoint(
    a: torch.Tensor, grad_h: torch.Tensor, grad_final: torch.Tensor | None = None, chunk_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``λ_T = ḡ_T + ∂L/∂h_T``, ``λ_t = ḡ_t + A_{t+1}ᵀ λ_{t+1}`` by the chunked forward scan over reversed time.

    Returns:
        ``(λ [B, T, N], λ_0 [B, N])`` in ``grad_h``'s dtype.
    """
    lam_rev, lam0 = torch_scan(adjoint_gates(a).to(grad_h.dtype), grad_h.flip(1), grad_final, chunk_size)
    return lam_rev.flip(1), lam0
