# The cross-device prefix combine (DESIGN.md §6; LASP-2 style: one all-gather of per-rank states, then a local prefix).
#
# Rank p holds a contiguous shard and computes, from a zero state, its shard's flow (M_p, D_p): S_end = M_p S_start
# + D_p. Every rank needs its true incoming state, the exclusive prefix of the maps applied to S_0:
#     S_in,p = (M_{p-1}, D_{p-1}) ∘ ... ∘ (M_0, D_0) applied to S_0            (forward order)
# or, with reverse=True, the exclusive *suffix* (ranks P-1, ..., p+1 in that order: adjoint recurrences, which run
# backwards in time). Two algorithms, same result (the maps are composed with kernels/common/affine.py, written once):
#   "allgather": one all-gather of the (M_p, D_p) (size independent of T: K² + K·V per head for flow, n² + n for a
#       dense scan, 2n for a diagonal one), then each rank folds the ≤ P−1 maps before it onto S_0 (fla CP, LASP-2).
#   "doubling": Hillis–Steele recursive doubling over ranks with point-to-point messages: in round d = 1, 2, 4, ...
#       rank p sends its partial x_p (covering ranks (p−d, p]) to p+d and receives x_{p−d}; it keeps the received
#       pieces (together they cover [0, p−1]) and composes x_p ← x_p ∘ x_{p−d} only while it still has a rank to send
#       to. ceil(log2 P) rounds, one map sent per round; at the end the pieces are applied to S_0, earliest first.
# Backward of either (autograd-correct by construction): with λ_p = ∂L/∂S_in,p, the gradient of this rank's output
# state S_out,p = M_p S_in,p + D_p obeys μ_p = λ_{p+1} + M_{p+1}ᵀ μ_{p+1}, μ_{P−1} = 0 — the *opposite-direction*
# combine of the maps (M_qᵀ, λ_q) from zero, the same routine. Then dD_p = μ_p, dM_p = μ_p S_in,pᵀ, and ∂L/∂S_0 =
# λ_0 + M_0ᵀ μ_0 on the first rank, all-reduced so every rank holds it (S_0 is one tensor replicated on all ranks).
#
# Which one (`python -m pflow_dist.bench combine --world 2 4 8 --rep 30 [--shape 16 1 32 1]`, rows in
# benchmarks/results/combine_cpu.jsonl): gloo on this 2-core CPU box (one thread per rank, so P = 8 is 4×
# oversubscribed; load average 1.7-3.5 before each world size), median over 30 calls of the slowest rank, ms,
# allgather vs doubling:
#                                 P=2 fwd / fwd+bwd          P=4 fwd / fwd+bwd           P=8 fwd / fwd+bwd
#   flow B1 H16 K=V=128 fp32    5.7 / 19.4 vs 2.5 / 10.8   20.8 / 55.7 vs 12.4 / 36.9   67.0 / 163 vs 37.7 / 117
#   DEER B16 n=32 fp32          0.60 / 2.3 vs 0.35 / 1.5   3.8 / 12.0 vs 1.4 / 11.6     13.9 / 57 vs 8.3 / 38
# Doubling wins at every P: 1.4-2.3× on the flow maps, up to 2.6× on the small DEER maps (fwd+bwd 1.0-1.5×); an
# earlier run under load 5-8 ranked them the same. With the all-gather the busiest rank receives P−1 maps and folds
# P−1 of them (for a matrix state an application costs a K×K·K×V product, as much as a composition); with doubling it
# receives ceil(log2 P) maps and does ≤ ceil(log2 P) applications and fewer compositions, and on CPU both the copies
# through loopback and the products lie on the critical path. So algorithm="auto" picks doubling on gloo. On NCCL the
# fold is a few µs of GPU time and one collective avoids log2 P dependent point-to-point latencies (fla CP and LASP-2
# all-gather), so "auto" keeps allgather there until it is measured (`python -m pflow_dist.bench combine --cuda`).
"""The cross-device prefix combine: each rank's incoming state from the flows of the ranks before (or after) it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..kernels.common.affine import apply_map, compose
from .comm import group_rank_size, send_recv

__all__ = ["ALGORITHMS", "incoming_state", "resolve_algorithm"]

ALGORITHMS = ("auto", "allgather", "doubling")


def resolve_algorithm(algorithm: str, group: ProcessGroup | None) -> str:
    """``"auto"`` → ``"doubling"`` on gloo (measured faster, see the header), ``"allgather"`` otherwise (NCCL: one
    collective, the choice of fla CP and LASP-2; not yet measured here). Other names pass through after validation.

    Raises:
        ValueError: an unknown algorithm.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm != "auto":
        return algorithm
    return "doubling" if dist.get_backend(group) == "gloo" else "allgather"


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


def _allgather(M, D, S, group, rank, world, reverse, diagonal) -> torch.Tensor:
    Ms, Ds = _flat_all_gather([M.contiguous(), D.contiguous()], group, world)
    for j in (range(world - 1, rank, -1) if reverse else range(rank)):
        S = apply_map((Ms[j], Ds[j]), S, diagonal)
    return S


def _doubling(M, D, S, group, rank, world, reverse, diagonal) -> torch.Tensor:
    real = (lambda v: world - 1 - v) if reverse else (lambda v: v)  # noqa: E731  position in the chain -> rank
    v = real(rank)
    x, pieces, d = (M, D), [], 1
    while d < world:
        send = [(real(v + d), torch.cat([x[0].reshape(-1), x[1].reshape(-1)]))] if v + d < world else []
        buf = M.new_empty(M.numel() + D.numel()) if v - d >= 0 else None
        send_recv(send, [(real(v - d), buf)] if buf is not None else [], group)
        if buf is not None:
            piece = (buf[:M.numel()].view_as(M), buf[M.numel():].view_as(D))  # covers chain positions (v-2d, v-d]
            pieces.append(piece)
            if v + 2 * d < world:  # x is sent again next round: extend it to (v-2d, v]
                x = compose(piece, x, diagonal)
        d *= 2
    for piece in reversed(pieces):  # earliest ranks first
        S = apply_map(piece, S, diagonal)
    return S


def _combine(M, D, S0, group, reverse: bool, diagonal: bool, algorithm: str) -> torch.Tensor:
    """The exclusive prefix (suffix if ``reverse``) of the ranks' maps applied to ``S0`` (zeros when ``None``)."""
    rank, world = group_rank_size(group)
    S = torch.zeros_like(D) if S0 is None else S0.to(D.dtype)
    fn = _doubling if algorithm == "doubling" else _allgather
    return fn(M, D, S, group, rank, world, reverse, diagonal)


class _IncomingState(torch.autograd.Function):
    """Forward: the combine. Backward: the opposite-direction combine of the transposed maps carrying ∂L/∂S_in, then
    one all-reduce for the replicated ``S_0`` (see the header for the derivation)."""

    @staticmethod
    def forward(ctx, M, D, S0, group, diagonal, reverse, algorithm):
        S = _combine(M, D, S0, group, reverse, diagonal, algorithm)
        ctx.args = (group, diagonal, reverse, algorithm)
        ctx.s0_dtype = None if S0 is None else S0.dtype
        ctx.save_for_backward(M, S)
        return S

    @staticmethod
    def backward(ctx, lam):
        M, S_in = ctx.saved_tensors
        group, diagonal, reverse, algorithm = ctx.args
        Mt = M if diagonal else M.transpose(-1, -2)
        mu = _combine(Mt, lam.contiguous(), None, group, not reverse, diagonal, algorithm)  # ∂L/∂S_out of this rank
        dM, dS_in = _map_vjp(M, S_in, mu, diagonal)
        dS0 = None
        if ctx.s0_dtype is not None:
            rank, world = group_rank_size(group)
            first = rank == (world - 1 if reverse else 0)
            dS0 = (lam + dS_in) if first else torch.zeros_like(lam)
            dist.all_reduce(dS0, op=dist.ReduceOp.SUM, group=group)
            dS0 = dS0.to(ctx.s0_dtype)
        return dM, mu, dS0, None, None, None, None


def incoming_state(
    M: torch.Tensor,
    D: torch.Tensor,
    initial_state: torch.Tensor | None,
    group: ProcessGroup | None = None,
    diagonal: bool = False,
    *,
    reverse: bool = False,
    algorithm: str = "auto",
) -> torch.Tensor:
    """The state entering this rank's shard, differentiably (every rank must call it, and backpropagate through it).

    Args:
        M: this shard's transition, ``[..., n, n]`` (dense) or ``[..., n]`` (diagonal); same shape on every rank.
        D: this shard's end state from a zero start, ``[..., n]`` or ``[..., n, m]`` (e.g. flow ``[B, H, K, V]``),
            same dtype as ``M``.
        initial_state: the sequence's initial state, the same tensor on every rank (``None`` = zeros, on every rank).
            Its gradient is summed over the group, so every rank receives the full gradient.
        group: the sequence-parallel process group (ranks in sequence order).
        diagonal: whether ``M`` is stored as its diagonal.
        reverse: combine the ranks *after* this one, last rank first (a recurrence running backwards in time, e.g.
            an adjoint): ``initial_state`` then enters the last rank.
        algorithm: ``"allgather"`` (one all-gather, then a local fold of ≤ P−1 maps), ``"doubling"`` (recursive
            doubling, ceil(log2 P) rounds of point-to-point messages) or ``"auto"`` (doubling on gloo, allgather on
            NCCL: :func:`resolve_algorithm`); equal results up to rounding.

    Returns:
        ``S_in`` with the shape and dtype of ``D``: ``initial_state`` on the first rank (rank 0; the last one when
        ``reverse``), the composed prefix (suffix) on the others.

    Raises:
        TypeError: ``M`` and ``D`` of different dtypes. ValueError: an unknown algorithm.
    """
    if not isinstance(M, torch.Tensor) or not isinstance(D, torch.Tensor):
        raise TypeError(f"M and D must be tensors, got {type(M).__name__} and {type(D).__name__}")
    if M.dtype != D.dtype:
        raise TypeError(f"M and D must share one dtype, got M={M.dtype}, D={D.dtype}")
    algorithm = resolve_algorithm(algorithm, group)
    return _IncomingState.apply(M, D, initial_state, group, diagonal, bool(reverse), algorithm)
