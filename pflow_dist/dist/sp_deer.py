# Sequence-parallel DEER (DESIGN.md §5, §6; Lim et al., ICLR 2024, arXiv 2309.12252; the cross-rank step is the
# prefix combine of dist/combine.py). Rank p holds the contiguous shard t ∈ [s_p, e_p) of x; every rank runs the same
# Newton iterations of ops/deer.py (delta form: δ_t = A_t δ_{t-1} + r_t, δ_{s_0 - 1} = 0, h ← h + δ) on its shard:
#   1. linearise locally (the cell systems of ops/deer_cells.py) at the iterate, with h_{s_p - 1} = b_p, the boundary:
#      h0 on rank 0; on rank p > 0 the previous rank's last state. b_p is not sent: it starts at the global guess (0)
#      and moves by the incoming delta each iteration, b_p ← b_p + δ_in,p (δ_in,p = δ_{s_p - 1} exactly), so the
#      combine delivers it; after an iteration with NaN/Inf (reset to 0, DEER's heuristic) the ranks re-send their
#      last states point-to-point instead;
#   2. the linear recurrence of δ across ranks is dist/sp_ops.sp_affine over the scan op (scan_forward): quasi
#      (diagonal) takes the shard's flow (Π a_t, δ⁰_end) from one read of the shard (ops.scan.scan_map), dense
#      (newton, damped) composes it by a tree; then one scan from δ_in;
#   3. one all-gather of (violation, #non-finite, failed) per iteration: every rank sees the same max violation and
#      the same NaN/Inf verdict, so all ranks iterate, reset and stop together; a rank whose cell raised makes every
#      rank raise (its own exception there, a RuntimeError naming it elsewhere) instead of leaving peers in a
#      collective.
# Backward (the adjoint at the converged trajectory, DESIGN.md §5): λ_t = g_t + J_{t+1}ᵀ λ_{t+1} runs backwards across
# ranks. Rank p's last λ needs μ_p = J_{s_{p+1}}ᵀ λ_{s_{p+1}} from rank p+1 (the gradient at b_{p+1}); μ obeys
# μ_{p-1} = M_pᵀ μ_p + E_p with M_p = J_{e_p - 1} ⋯ J_{s_p} (the shard's Jacobians, J_{s_p} at b_p included) and
# E_p = J_{s_p}ᵀ λ⁰_{s_p} (λ⁰: the local adjoint from zero), so μ is the *reverse* combine of the maps (M_pᵀ, E_p)
# (incoming_state(reverse=True)). Then λ = the local adjoint with g_{e_p - 1} += μ_p, and one batched VJP of f over the
# shard (as deer_rnn) gives dx, the parameters' partial gradient and, on rank 0 only, dh0. b_p (p > 0) is detached in
# that VJP: its gradient is μ_{p-1}, which rank p-1 already got from the combine.
# Parameter gradients are per-rank partial sums (Σ over the shard's steps), like every sequence-parallel layer: sum
# them over the group (DDP over a data × sequence mesh does). h0 is read on rank 0; its gradient arrives there and
# is zero on the other ranks (so a sum over the group is again the total).
"""Sequence-parallel DEER ``sp_deer(cell, x_shard, h0, method, *, group, ...)`` with the sequence-parallel adjoint."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..kernels.deer.naive import GRUWeights
from ..ops.deer import (
    METHODS,
    DEERConvergenceError,
    DEERInfo,
    adjoint_scan,
    build_system,
    check_solver_args,
    convergence_message,
    needs_grad,
    newton_loop,
    pointwise_triton,
    solver_backends,
)
from ..ops.deer_cells import GRUSystem, shift
from ..ops.scan import scan_forward, scan_map, structured_dense
from .combine import ALGORITHMS, incoming_state
from .comm import group_rank_size, send_recv
from .sp_ops import ordered_product, sp_affine

__all__ = ["sp_deer"]

_BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.float64)
# compared across ranks (after the error flag and T_p): must be equal everywhere
_SAME = ("B", "n", "dtype", "method", "h0 given", "requires grad", "max_iter", "damping", "atol", "rtol", "backend",
         "algorithm", "strict")


def _dense(trans: dict) -> torch.Tensor:
    return trans["a"] if "a" in trans else structured_dense(trans["coef"], trans["mats"])


def _setup(cell, x, h0, method, tol, atol, rtol, max_iter, damping, backend, algorithm, strict, group):
    """Validate locally, then one all-gather of the sizes, options and error flags, so a bad input on any rank makes
    every rank raise (instead of leaving the others waiting in a collective)."""
    rank, world = group_rank_size(group)
    meta = torch.full((2 + len(_SAME),), -1.0, dtype=torch.float64)
    error, out = None, None
    try:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        atol, rtol = check_solver_args(x, h0, method, tol, atol, rtol, max_iter, damping)
        system = build_system(cell, x, h0, x.dtype, pointwise_triton(backend, x))
        n = system.n
        if h0 is not None and h0.shape[-1] != n:
            raise ValueError(f"h0 must have shape [B, n={n}], got {list(h0.shape)}")
        be, adj_be = solver_backends(backend, x, n, method, isinstance(system, GRUSystem))
        grad = needs_grad(cell, x, h0)
        meta[1:] = torch.tensor([x.shape[1], x.shape[0], n, _DTYPES.index(x.dtype), METHODS.index(method),
                                 h0 is not None, grad, max_iter, damping, atol, rtol, _BACKENDS.index(backend),
                                 ALGORITHMS.index(algorithm), strict], dtype=torch.float64)
        meta[0] = 0
        out = (system, atol, rtol, be, adj_be, grad)
    except (TypeError, ValueError) as e:
        error = e
    dev = x.device if isinstance(x, torch.Tensor) and dist.get_backend(group) == "nccl" else torch.device("cpu")
    table = [torch.empty_like(meta, device=dev) for _ in range(world)]
    dist.all_gather(table, meta.to(dev), group=group)
    table = torch.stack(table).cpu()
    if error is not None:
        raise error
    bad = (table[:, 0] != 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"sp_deer: invalid inputs on rank(s) {bad} of the group (see their errors)")
    for col, name in enumerate(_SAME, start=2):
        if bool((table[:, col] != table[0, col]).any()):
            hint = (" (every rank must take part in the backward pass: it has collectives)"
                    if name == "requires grad" else "")
            raise ValueError(f"sp_deer: {name} must be the same on every rank, got {table[:, col].tolist()} over "
                             f"ranks 0..{world - 1}{hint}")
    return (*out, int(table[:, 1].sum()), rank, world)


class _Shard:
    """The Newton step of one rank: the boundary state, the linearisation, the cross-rank delta, the agreement."""

    def __init__(self, system, x, h0, method, scale, backend, group, rank, world, algorithm):
        self.system, self.method, self.scale, self.backend = system, method, scale, backend
        self.group, self.rank, self.world, self.algorithm = group, rank, world, algorithm
        B, T, n = x.shape[0], x.shape[1], system.n
        self.shapes, self.device = (B, T, n), x.device
        self.boundary = (None if h0 is None else h0.detach().to(x.dtype)) if rank == 0 else x.new_zeros(B, n)
        system.set_initial_state(self.boundary)
        self.error: BaseException | None = None

    def step(self, h: torch.Tensor) -> torch.Tensor:
        B, T, n = self.shapes
        try:
            res, trans = self.system.linearize(h, self.method, self.scale)
            a = _dense(trans)
            self.error = None
        except Exception as e:  # keep the collectives in step; every rank raises after the agreement
            self.error = e
            res = h.new_full((B, T, n), float("nan"))
            a = h.new_full((B, T, n) if self.method == "quasi" else (B, T, n, n), float("nan"))
        kw = {"precision": "tf32"} if (self.backend == "triton" and a.dim() == 4) else {}
        local = lambda a_, b_, h0_: scan_forward(a_, b_, h0_, self.backend, **kw)[0]  # noqa: E731
        local_map = (lambda a_, b_: scan_map(a_, b_, self.backend)) if a.dim() == 3 else None  # noqa: E731
        with torch.no_grad():
            delta, d_in = sp_affine(a, res, None, self.group, local, self.algorithm, local_map)
        if self.rank > 0:
            self.boundary = self.boundary + d_in  # the previous rank's last state moves by δ_{s_p - 1} = δ_in
            self.system.set_initial_state(self.boundary)
        return delta

    def agree(self, viol: float, bad: int) -> tuple[float, int]:
        mine = torch.tensor([viol, float(bad), float(self.error is not None)], dtype=torch.float64)
        dev = self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        table = [torch.empty(3, dtype=torch.float64, device=dev) for _ in range(self.world)]
        dist.all_gather(table, mine.to(dev), group=self.group)
        table = torch.stack(table).cpu()
        failed = (table[:, 2] != 0).nonzero().flatten().tolist()
        if failed:
            if self.error is not None:
                raise self.error
            raise RuntimeError(f"sp_deer: the cell raised on rank(s) {failed} of the group during the Newton "
                               "iteration (see their errors)")
        return float(table[:, 0].max()), int(table[:, 1].sum())

    def on_reset(self, h: torch.Tensor) -> None:
        """After a NaN/Inf reset the tracked boundary may be stale: take the previous rank's last state."""
        r, P = self.rank, self.world
        buf = h.new_empty(h.shape[0], h.shape[2]) if r > 0 else None
        send_recv([(r + 1, h[:, -1].contiguous())] if r < P - 1 else [], [(r - 1, buf)] if r > 0 else [],
                  self.group)
        if r > 0:
            self.boundary = buf
            self.system.set_initial_state(buf)


class _SPAdjoint(torch.autograd.Function):
    """Forward: the converged states (values of ``h_star``). Backward: ``λ`` for ``y = f(h*_{t-1}, x_t)`` from the
    local adjoint with the incoming ``μ`` of the reverse combine (see the header); zeros for ``h0`` (read only
    through ``y`` on rank 0)."""

    @staticmethod
    def forward(ctx, y, h_star, h0, boundary, system, backend, group, algorithm):
        ctx.args = (system, backend, group, algorithm, None if h0 is None else (h0.shape, h0.dtype, h0.device))
        ctx.save_for_backward(h_star, boundary)
        return h_star.clone()

    @staticmethod
    def backward(ctx, g):
        h_star, boundary = ctx.saved_tensors
        system, backend, group, algorithm, h0_meta = ctx.args
        rank, world = group_rank_size(group)
        system.set_initial_state(boundary)
        trans = system.jacobian(shift(h_star, boundary), h_star)
        g = g.to(h_star.dtype).contiguous()
        lam = adjoint_scan(trans, g, backend)  # from zero beyond the shard
        if world > 1:  # (one rank: nothing beyond the shard)
            J = _dense(trans)
            E = (J[:, 0].transpose(-1, -2) @ lam[:, 0].unsqueeze(-1)).squeeze(-1)
            mu = incoming_state(ordered_product(J).transpose(-1, -2).contiguous(), E, None, group, reverse=True,
                                algorithm=algorithm)
            if rank < world - 1:
                g = g.clone()
                g[:, -1] += mu
                lam = adjoint_scan(trans, g, backend)
        dh0 = None if h0_meta is None else torch.zeros(h0_meta[0], dtype=h0_meta[1], device=h0_meta[2])
        return lam, None, dh0, None, None, None, None, None


def sp_deer(
    cell: torch.nn.GRU | torch.nn.GRUCell | GRUWeights | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    method: str = "newton",
    *,
    group: ProcessGroup | None,
    tol: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 100,
    damping: float = 0.5,
    backend: str = "auto",
    algorithm: str = "auto",
    strict: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, DEERInfo]:
    """Sequence-parallel DEER: ``h_t = f(h_{t-1}, x_t)`` over a sequence split in contiguous shards over ``group``.

    Every rank of ``group`` calls it with its shard (rank order = time order, any positive lengths, e.g.
    :func:`~pflow_dist.dist.sharding.shard_sequence`); the result on each rank equals the matching slice of
    :func:`pflow_dist.ops.deer.deer_rnn` on the whole sequence, and so does the iteration count. Every rank must
    backpropagate through its output when any does (the backward pass has collectives).

    Args:
        cell: as in :func:`~pflow_dist.ops.deer.deer_rnn` (``nn.GRU`` / ``nn.GRUCell`` / ``GRUWeights``, or a
            row-wise callable ``f(h [..., n], x [..., I])``), the same weights on every rank.
        x: this rank's shard ``[B, T_p, I]``, float32 or float64; ``B``, ``I`` and the dtype equal on every rank.
        h0: the sequence's initial state ``[B, n]``: given on every rank or on none (zeros; a generic cell needs it
            on every rank for ``n``). Only rank 0's value is read.
        method: ``"newton"``, ``"quasi"`` or ``"damped"`` (see ``deer_rnn``).
        group: the sequence-parallel process group (``None``: the default group).
        tol, atol, rtol, max_iter, damping, backend, strict: as in ``deer_rnn`` (the same on every rank; the
            convergence test is over the whole sequence: the max violation over all ranks).
        algorithm: the cross-rank combine, ``"auto"``, ``"allgather"`` or ``"doubling"`` (see
            :func:`~pflow_dist.dist.combine.incoming_state`).

    Returns:
        ``(h [B, T_p, n], h_end [B, n], info)`` in ``x.dtype``: this shard's states, the state at its end (on the
        last rank, the sequence's final state) and a :class:`~pflow_dist.ops.deer.DEERInfo` identical on all ranks.
        Gradients: ``x`` gets its own gradient; the cell's parameters get this rank's *partial* gradient (the sum
        over the group is the total: all-reduce them, as DDP does); ``h0`` gets the total on rank 0 and zeros
        elsewhere.

    Raises:
        TypeError / ValueError: bad inputs on any rank, raised on every rank (``sp_deer: invalid inputs on
            rank(s) [...]`` on the others), or B, n, dtype, method or options that differ across ranks.
        DEERConvergenceError: no convergence within ``max_iter`` (``strict=True``), on every rank.
        RuntimeError: the cell raised on another rank during the iteration (that rank raises its own error).

    Example (on every rank of a 2-process group)::

        >>> torch.manual_seed(0)
        >>> gru = torch.nn.GRU(3, 4, batch_first=True)          # the same weights on every rank
        >>> x_full = torch.randn(2, 1000, 3)                    # the same full sequence (for the check)
        >>> x = shard_sequence(x_full, group=None)              # this rank's [2, T_p, 3]
        >>> h, h_end, info = sp_deer(gru, x, group=None)        # h == gru(x_full)[0][:, s_p:e_p]
    """
    system, atol, rtol, be, adj_be, grad, T, rank, world = _setup(
        cell, x, h0, method, tol, atol, rtol, max_iter, damping, backend, algorithm, strict, group)
    B, T_p, _ = x.shape
    scale = 1.0 - damping if method == "damped" else 1.0
    shard = _Shard(system, x, h0, method, scale, be, group, rank, world, algorithm)
    h = torch.zeros(B, T_p, system.n, device=x.device, dtype=x.dtype)  # DEER's guess, as deer_rnn
    h_star, info = newton_loop(h, shard.step, method, atol, rtol, min(max_iter, T + 1), be == "triton",
                               agree=shard.agree, on_reset=shard.on_reset)
    if not info.converged:
        if strict:
            raise DEERConvergenceError(convergence_message(info, atol, rtol))
        warnings.warn(convergence_message(info, atol, rtol), RuntimeWarning, stacklevel=2)
    if grad:
        boundary = shard.boundary
        first = h0 if rank == 0 else boundary  # rank 0: the live h0 (its gradient); others: detached
        y = system.evaluate(shift(h_star, first))
        h_out = _SPAdjoint.apply(y, h_star, h0, boundary, system, adj_be, group, algorithm)
    else:
        h_out = h_star
    h_out = h_out.to(x.dtype)
    return h_out, h_out[:, -1], info
