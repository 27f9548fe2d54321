"""Differentiable sequence-parallel ops: each rank passes its contiguous shard and the group; the result on every rank
equals the matching slice of the single-device op on the whole sequence (outputs, states and every gradient).

Sequence parallelism is a keyword, not a forked op: the local work is the single-device op itself, run once for the
shard's flow and once (or a cheap correction) with the incoming state from
:func:`~pflow_dist.dist.combine.incoming_state`; the flow on the Triton kernels folds the two into one op
(:mod:`~pflow_dist.dist.sp_flow_triton`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed import ProcessGroup

from ..kernels.common.affine import compose, identity_map
from ..kernels.scan.naive import check_scan_inputs
from ..ops.flow import _nonfinite_counts, _raise_if_nonfinite, _resolve_backend, _validate, chunk_flow, flow_map
from ..ops.scan import resolve_backend, scan, scan_adjoint, scan_forward, scan_map
from .combine import incoming_state, resolve_algorithm
from .comm import group_rank_size

__all__ = ["ordered_product", "shard_map", "sp_affine", "sp_flow", "sp_scan"]


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
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence-parallel flow (generalised delta rule) over the ranks of ``group``.

    Args:
        q, k, v, beta, g: this rank's contiguous shard, layouts as in the flow op (``q [B, T_p, H, K]``, rank-R
            ``k [B, T_p, H, R, K]`` ...); shards are in rank order along time.
        group: the sequence-parallel process group (``None`` = the default group).
        initial_state: the sequence's initial state ``[B, H, K, V]``, identical on every rank.
        output_final_state: return the state at the end of *this rank's* shard (on the last rank: the sequence's
            final state).
        rank_form, scale, chunk_size, backend, check_finite: as in :func:`pflow_dist.ops.flow.chunk_flow`.

    The local work: on the Triton backend, the flow kernels with the combine inside their grouped state passes
    (:mod:`~pflow_dist.dist.sp_flow_triton`: the shard's map comes from the pass itself, fwd and bwd); on the torch
    backend (float64 references, CPU), the op once for the shard's map (:func:`~pflow_dist.ops.flow.flow_map`) and
    once from the incoming state. A group of one rank runs the op alone.

    Returns:
        ``(o [B, T_p, H, V], final_state [B, H, K, V] or None)``.
    """
    if group_rank_size(group)[1] == 1:
        return chunk_flow(q, k, v, beta, g, rank_form, scale, initial_state, output_final_state, chunk_size, backend,
                          check_finite)
    if _resolve_backend(backend, q.device) == "triton":
        from ..ops.flow_autograd import _check_kernel_dtype  # noqa: PLC0415 - kernels import only when used
        from .sp_flow_triton import triton_sp_flow  # noqa: PLC0415

        d = _validate(q, k, v, beta, g, initial_state, rank_form, scale, chunk_size, backend)
        _check_kernel_dtype(q)
        counts = _nonfinite_counts(beta, g) if check_finite else None
        o, S = triton_sp_flow(q, k, v, beta, g, rank_form, d.K**-0.5 if scale is None else float(scale),
                              initial_state, chunk_size, group, resolve_algorithm("auto", group))
        _raise_if_nonfinite(counts, beta, g)
        return o, (S if output_final_state else None)
    M, D = flow_map(k, v, beta, g, rank_form, chunk_size=chunk_size, backend=backend, check_finite=check_finite)
    S_in = incoming_state(M, D, initial_state, group)
    o, S = chunk_flow(q, k, v, beta, g, rank_form, scale, S_in, output_final_state=True, chunk_size=chunk_size,
                      backend=backend, check_finite=False)
    return o, (S if output_final_state else None)


def shard_map(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard's flow ``(M, D)``: ``h_T = M h_0 + D`` for ``h_t = A_t h_{t-1} + b_t``, by a log-depth tree of
    :func:`~pflow_dist.kernels.common.affine.compose` (differentiable by autograd).

    Args:
        a: ``[B, T, n]`` (diagonal) or ``[B, T, n, n]``; b: ``[B, T, n]``.

    Returns:
        ``(M [B, n] or [B, n, n], D [B, n])``.
    """
    diagonal = a.dim() == 3
    while a.shape[1] > 1:
        if a.shape[1] % 2:  # an identity map at the end leaves the composition unchanged
            ia, ib = identity_map((a[:, -1:], b[:, -1:]), diagonal)
            a, b = torch.cat([a, ia], dim=1), torch.cat([b, ib], dim=1)
        a, b = compose((a[:, 0::2], b[:, 0::2]), (a[:, 1::2], b[:, 1::2]), diagonal)
    return a[:, 0], b[:, 0]


def ordered_product(a: torch.Tensor) -> torch.Tensor:
    """``A_T ⋯ A_1`` of ``a [B, T, n, n]`` by a log-depth tree of batched matmuls."""
    while a.shape[1] > 1:
        if a.shape[1] % 2:
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand(a.shape[0], 1, *a.shape[2:])
            a = torch.cat([a, eye], dim=1)
        a = a[:, 1::2] @ a[:, 0::2]
    return a[:, 0]


LocalScan = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
LocalMap = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sp_affine(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None, group: ProcessGroup | None,
              local_scan: LocalScan, algorithm: str = "auto",
              local_map: LocalMap | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence-parallel affine scan on top of a local scan ``local_scan(a, b, h0) -> h`` (the differentiable
    scan op for :func:`sp_scan`, the no-autograd ``scan_forward`` for the DEER Newton step).

    The shard's flow ``(M, D)``, combined across ranks into ``h_in``, then one local scan from ``h_in``. Diagonal:
    ``M = Π_t a_t`` by a reduction and ``D`` from a local scan from zero. (The correction ``h = h⁰ + (Π_{s≤t} a_s) ⊙
    h_in`` needs ``torch.cumprod`` along time, which CUDA runs as one sequential loop per channel: with it,
    ``sp_deer`` on one H200 took 2.34 s for fwd+bwd at T = 2^20, n = 8, 260 ms per Newton iteration.) Dense:
    :func:`shard_map` (a tree of n × n products, the price of any parallel dense scan) rather than materialise the
    ``T`` cumulative products. ``local_map(a, b) -> (M, D)`` (diagonal only) replaces the reduction and the scan from
    zero, e.g. :func:`~pflow_dist.ops.scan.scan_map` without autograd (one read of the shard, no h written).

    A group of one rank runs one local scan from ``initial_state``.

    Returns:
        ``(h [B, T_p, n], h_in [B, n])`` in ``b``'s dtype (``h_in``: the state entering this shard).
    """
    if group_rank_size(group)[1] == 1:
        h0 = None if initial_state is None else initial_state.to(b.dtype)
        return local_scan(a, b, h0), (b.new_zeros(b.shape[0], b.shape[-1]) if h0 is None else h0)
    diagonal = a.dim() == 3
    if not diagonal:
        M, D = shard_map(a, b)
    elif local_map is not None:
        M, D = (x.to(b.dtype) for x in local_map(a, b))
    else:
        M, D = torch.prod(a, dim=1), local_scan(a, b, None)[:, -1]
    h_in = incoming_state(M, D, initial_state, group, diagonal=diagonal, algorithm=algorithm)
    return local_scan(a, b, h_in), h_in


class _SPDiagScan(torch.autograd.Function):
    """The diagonal ``sp_scan`` over more than one rank, with one scan of the shard each way.

    Forward: the shard's map ``(M, D)`` from one read (:func:`~pflow_dist.ops.scan.scan_map`, nothing of length T
    written), ``h_in`` from the combine, then one scan from ``h_in``. Backward (the sp_deer adjoint, diagonal): the
    gradient reaching this shard's end state from the later ranks, ``μ``, obeys ``μ_{p-1} = M_p ⊙ μ_p + E_p`` with
    ``E_p = a_1 ⊙ λ⁰_1`` (``λ⁰``: the local adjoint from zero; ``λ⁰_1`` from the adjoint's map, one read of ``a`` and
    ``dh``, nothing of length T written), the *reverse* combine of ``(M_p, E_p)``; then the local
    adjoint with ``∂L/∂h_end += μ`` gives ``da``, ``db`` and the gradient at ``h_in``, which on rank 0 is the whole
    sequence's ``∂L/∂h_0`` (sent to every rank, like :func:`~pflow_dist.dist.combine.incoming_state`'s). The map's own
    gradient needs no pass: ``M`` and ``D`` reach the later ranks only through ``h_end = M ⊙ h_in + D``.
    """

    @staticmethod
    def forward(ctx, a, b, h0, group, backend, algorithm):
        M, D = scan_map(a, b, backend)
        h_in = incoming_state(M, D, h0, group, diagonal=True, algorithm=algorithm)
        h, _ = scan_forward(a, b, h_in, backend)
        ctx.save_for_backward(a, h, h_in, M)
        ctx.args = (group, backend, algorithm)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h_in, M = ctx.saved_tensors
        group, backend, algorithm = ctx.args
        first_gate = a[:, 0].to(M.dtype)
        lam0 = scan_map(a, dh, backend, reverse=True)[1].to(M.dtype)  # λ_1 from zero beyond the shard, one read
        mu = incoming_state(M, first_gate * lam0, None, group, diagonal=True, reverse=True, algorithm=algorithm)
        lam, lam_first, da = scan_adjoint(a, dh, mu, backend, h=h, h0=h_in, want_da=True, out_dtype=h.dtype)
        dh0 = None
        if ctx.needs_input_grad[2]:
            rank = group_rank_size(group)[0]
            dh0 = first_gate * lam_first if rank == 0 else torch.zeros_like(lam_first)
            torch.distributed.all_reduce(dh0, group=group)
            dh0 = dh0.to(h_in.dtype)
        return da, lam, dh0, None, None, None


def sp_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    group: ProcessGroup | None,
    output_final_state: bool = False,
    backend: str = "auto",
    algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence-parallel affine scan ``h_t = A_t h_{t-1} + b_t`` over the ranks of ``group``.

    The local work is the scan op (:func:`pflow_dist.ops.scan.scan`): a diagonal shard is read once for its map and
    scanned once from ``h_in`` (backward: one adjoint pass from zero for the reverse combine, one with da), a dense
    one takes a tree for its flow and one pass (:func:`sp_affine`); one rank runs the scan op alone.

    Args:
        a: this rank's shard of the transitions, ``[B, T_p, N]`` (diagonal) or ``[B, T_p, N, N]`` (dense).
        b: this rank's shard of the inputs ``[B, T_p, N]``.
        initial_state: ``h_0 [B, N]``, identical on every rank.
        group: the sequence-parallel process group.
        output_final_state: also return the state at the end of this rank's shard.
        backend: the local scan's backend (``"auto"``, ``"triton"``, ``"torch"``; see
            :func:`~pflow_dist.ops.scan.scan`).
        algorithm: the cross-rank combine, ``"auto"``, ``"allgather"`` or ``"doubling"`` (see
            :func:`~pflow_dist.dist.combine.incoming_state`).

    Returns:
        ``(h [B, T_p, N], h_end [B, N] or None)`` in ``b``'s dtype (computed in float32, float64 for float64).
    """
    diagonal = check_scan_inputs(a, b, initial_state)
    acc = _acc_dtype(b)
    if diagonal and group_rank_size(group)[1] > 1:
        h0 = None if initial_state is None else initial_state.to(acc)
        be = resolve_backend(backend, b.device, acc, b.shape[-1], True)
        h = _SPDiagScan.apply(a.to(acc), b.to(acc), h0, group, be, resolve_algorithm(algorithm, group))
    else:
        local = lambda a_, b_, h0: scan(a_, b_, h0, backend=backend)[0]  # noqa: E731
        h, _ = sp_affine(a.to(acc), b.to(acc), initial_state, group, local, algorithm)
    return h.to(b.dtype), (h[:, -1].to(b.dtype) if output_final_state else None)
