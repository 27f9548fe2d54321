# DEER: non-linear recurrences h_t = f(h_{t-1}, x_t) evaluated in parallel over time by Newton's method
# (Lim, Zhu, Selfridge, Kasim, "Parallelizing non-linear sequential models over the sequence length", ICLR 2024,
# arXiv 2309.12252; quasi-DEER and damping: Gonzalez et al., NeurIPS 2024, arXiv 2407.19115). DESIGN.md §5.
#
# Newton step in *delta form*: with the residual r_t = f(h^k_{t-1}, x_t) − h^k_t and A_t ≈ ∂f/∂h at h^k_{t-1},
#     δ_t = A_t δ_{t-1} + r_t,  δ_0 = 0,   h^{k+1} = h^k + δ
# which is DEER's h^{k+1}_t = A_t h^{k+1}_{t-1} + f(h^k_{t-1}) − A_t h^k_{t-1} minus h^k_t. Solving for the
# correction rather than the state means the fixed point (r = 0) is set by the residual alone: any error in A_t or in
# the scan (the quasi diagonal, damping, reduced-precision products) slows convergence but never moves the answer.
# "newton": A_t = J_t (dense); "quasi": diag(J_t); "damped": (1 − damping)·J_t (ELK-style shrinking of the
# linearisation, cf. quasi-slim-ELK). Newton is causal: after k iterations the first k states are exact, so T
# iterations always suffice (the cap) and NaN/Inf, which can only appear past that exact prefix, are reset to 0 and
# the iteration continues (DEER's reset heuristic), counted in DEERInfo.resets.
# Stop when |δ| ≤ atol + rtol·|h^{k+1}| everywhere (fp32 defaults 1e-4 / 1e-3; fp64 1e-8 / 1e-6).
#
# Backward (adjoint, no backprop through the iterations): h* solves h = F(h, θ, x) with F_t = f(h_{t-1}, x_t), so
# dL/dθ = λᵀ ∂F/∂θ with λ = (I − ∂F/∂h)⁻ᵀ g: the reverse scan λ_t = g_t + J_{t+1}ᵀ λ_{t+1} with the exact J at the
# converged trajectory (scan_adjoint, the same one the scan op uses), then ONE batched VJP of f: y = f(h*_{t-1}, x_t)
# is evaluated with autograd (h*_{t-1} detached except h_0), and _Adjoint hands λ to y as its gradient, so autograd
# delivers dθ, dx and dh_0 = J_1ᵀ λ_1. Quasi and damped solves get exact gradients too (dense J in the adjoint).
"""Public DEER solver ``deer_rnn(cell, x, h0, method, ...)`` with the adjoint backward."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.common.checks import check_tensor
from ..kernels.deer.naive import GRUWeights
from ..kernels.deer.update import deer_update
from .deer_cells import FuncSystem, GRUSystem, Transition, shift
from .scan import resolve_backend, scan_adjoint, scan_forward

__all__ = ["DEERConvergenceError", "DEERInfo", "METHODS", "deer_rnn"]
# solver pieces shared with the sequence-parallel solver (pflow_dist/dist/sp_deer.py): adjoint_scan, build_system,
# check_solver_args, convergence_message, needs_grad, newton_loop, pointwise_triton, solver_backends

METHODS = ("newton", "quasi", "damped")
_DEFAULT_TOL = {torch.float32: (1e-4, 1e-3), torch.float64: (1e-8, 1e-6)}


class DEERConvergenceError(RuntimeError):
    """The Newton iteration did not meet its tolerance within ``max_iter`` iterations."""


@dataclass(frozen=True)
class DEERInfo:
    """How the solve went.

    Attributes:
        iterations: Newton iterations run (each one scan).
        converged: whether ``|δ| ≤ atol + rtol|h|`` held at the last iteration.
        max_violation: ``max(|δ| − atol − rtol|h|)`` at the last iteration (≤ 0 when converged; NaN if non-finite).
        resets: iterations whose update held NaN/Inf (reset to 0 and continued).
        method: the method used.
    """

    iterations: int
    converged: bool
    max_violation: float
    resets: int
    method: str


class _Adjoint(torch.autograd.Function):
    """Forward: the converged states (values of ``h_star``). Backward: the gradient reaching ``y = f(h*_{t-1}, x_t)``
    is ``λ`` from the adjoint scan with ``J_tᵀ`` at the converged trajectory."""

    @staticmethod
    def forward(ctx, y, h_star, system, backend):
        ctx.system, ctx.backend = system, backend
        ctx.save_for_backward(h_star)
        return h_star.clone()

    @staticmethod
    def backward(ctx, g):
        (h_star,) = ctx.saved_tensors
        system = ctx.system
        trans = system.jacobian(shift(h_star, system.h0), h_star)
        return adjoint_scan(trans, g.to(h_star.dtype).contiguous(), ctx.backend), None, None, None


def adjoint_scan(trans: Transition, g: torch.Tensor, backend: str) -> torch.Tensor:
    """The adjoint ``λ_t = g_t + J_{t+1}ᵀ λ_{t+1}`` (``λ_T = g_T``) for the Jacobians ``trans`` at the converged
    trajectory (``{"a": [B, T, n, n]}`` or structured ``{"coef", "mats"}``), ``g [B, T, n]``; no autograd.

    ``backend`` is a resolved scan backend or ``"iterative:<backend>"`` (structured J only, see
    :func:`_iterative_adjoint`). A gradient at the last state from beyond the sequence (sequence parallelism) is
    added to ``g[:, -1]`` by the caller.
    """
    if backend.startswith("iterative"):
        return _iterative_adjoint(trans["coef"], trans["mats"], g, backend.split(":")[1])
    lam, _, _ = scan_adjoint(trans.get("a"), g, None, backend, coef=trans.get("coef"), mats=trans.get("mats"))
    return lam


def _iterative_adjoint(coef: torch.Tensor, mats: torch.Tensor, g: torch.Tensor, backend: str, rtol: float = 1e-6,
                       max_iter: int = 500) -> torch.Tensor:
    """The adjoint λ_t = g_t + J_{t+1}ᵀ λ_{t+1} for structured J = diag(c0) + Σ_k diag(c_k) M_k when the dense
    reverse scan is too costly (n > 32 on GPU): split J_{t+1}ᵀ = D_{t+1} + E_{t+1} (D its diagonal) and iterate
    λ^{k+1}_t = g_t + E_{t+1} λ^k_{t+1} + D_{t+1} λ^{k+1}_{t+1}, one diagonal reverse scan per iteration (quasi-Newton
    on the linear adjoint system; causal, so exact after T iterations). E v costs one [B·T, 3n] × [3n, n] GEMM."""
    B, T, n = g.shape
    K = mats.shape[0]
    D = coef[:, :, 0] + (coef[:, :, 1:] * torch.diagonal(mats, dim1=-2, dim2=-1)).sum(2)
    w = mats.reshape(K * n, n)
    lam = torch.zeros_like(g)
    for _ in range(min(max_iter, T + 1)):
        v = lam[:, 1:]
        c = coef[:, 1:]
        off = ((c[:, :, 1:] * v[:, :, None, :]).reshape(B, T - 1, K * n) @ w) + (c[:, :, 0] - D[:, 1:]) * v
        inp = g.clone()
        inp[:, :-1] += off
        new, _, _ = scan_adjoint(D.contiguous(), inp, None, backend)
        done = ((new - lam).abs().amax() <= rtol * new.abs().amax()).item()
        lam = new
        if done:
            break
    return lam


def build_system(cell, x: torch.Tensor, h0: torch.Tensor | None, dtype: torch.dtype, use_triton: bool):
    """The cell system DEER linearises (:class:`GRUSystem` for GRUs, :class:`FuncSystem` for a callable).

    Raises:
        TypeError: ``cell`` is neither a GRU nor callable. ValueError: input size mismatch, or no ``h0`` for a
            generic cell.
    """
    if isinstance(cell, (torch.nn.GRU, torch.nn.GRUCell)):
        cell = GRUWeights.from_module(cell)
    if isinstance(cell, GRUWeights):
        if cell.input_size != x.shape[-1]:
            raise ValueError(f"x must have shape [B, T, I={cell.input_size}] for this GRU, got {list(x.shape)}")
        return GRUSystem(cell, x, h0, dtype, use_triton)
    if not callable(cell):
        raise TypeError(f"cell must be a torch.nn.GRU/GRUCell, GRUWeights or a callable f(h, x), got "
                        f"{type(cell).__name__}")
    if h0 is None:
        raise ValueError("h0 is required for a generic cell (it fixes the state size n)")
    return FuncSystem(cell, x, h0, h0.shape[-1], dtype)


def check_solver_args(x: torch.Tensor, h0: torch.Tensor | None, method: str, tol: float | None, atol: float | None,
                      rtol: float | None, max_iter: int, damping: float) -> tuple[float, float]:
    """Validate the solver's inputs and options (shared by :func:`deer_rnn` and the sequence-parallel solver).

    Returns:
        ``(atol, rtol)`` resolved from ``tol`` and the dtype's defaults.
    """
    check_tensor("x", x, ndim=3, dims="[B, T, I]", dtypes=(torch.float32, torch.float64))
    B, T, _ = x.shape
    if T == 0:
        raise ValueError("x must have at least one time step (T >= 1), got T=0")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"damping must be in [0, 1), got {damping}")
    d_atol, d_rtol = _DEFAULT_TOL[x.dtype]
    atol = (tol if tol is not None else d_atol) if atol is None else atol
    rtol = (0.0 if tol is not None else d_rtol) if rtol is None else rtol
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    if h0 is not None:
        check_tensor("h0", h0, ndim=2, dims="[B, n]")
        if h0.shape[0] != B:
            raise ValueError(f"h0 must have shape [B={B}, n], got {list(h0.shape)}")
        if h0.device != x.device:
            raise ValueError(f"x and h0 must be on one device, got {x.device} and {h0.device}")
    return atol, rtol


def pointwise_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether the Newton terms use the Triton pointwise kernels (``backend`` triton, or auto on CUDA fp32).

    Raises:
        ValueError: an unknown backend.
    """
    if backend not in ("auto", "triton", "torch"):
        resolve_backend(backend, x.device, x.dtype, 1, True)  # raises the named error
    return backend == "triton" or (backend == "auto" and x.is_cuda and x.dtype == torch.float32)


def solver_backends(backend: str, x: torch.Tensor, n: int, method: str, structured: bool) -> tuple[str, str]:
    """``(scan backend of the Newton steps, backend of the adjoint)`` for state size ``n``; ``structured``: the cell
    has the GRU's structured Jacobian (enables the iterative adjoint for n > 32 on CUDA).

    Raises:
        ValueError: triton where it cannot run, or a dense method that CUDA cannot run.
    """
    dtype, diagonal = x.dtype, method == "quasi"
    be = resolve_backend(backend, x.device, dtype, n, diagonal)
    if not diagonal and be == "torch" and x.is_cuda and backend == "auto":
        raise ValueError(f"method={method!r} on CUDA needs n <= 64 (the dense Triton scan; the torch path would "
                         f"materialise B·T·n² Jacobians), got n={n}: use method='quasi'")
    # the adjoint scans the dense J_tᵀ (exact gradients for every method): Triton's dense scan takes n ≤ 64
    # n > 32 on GPU: the dense Jᵀ scan's n³ chunk products (1 program per SM at n = 64) cost more than iterating
    # diagonal reverse scans with the off-diagonal part as GEMMs (H100, B16 n64 T17984: the dense adjoint took ~165 ms)
    if n > 32 and x.is_cuda and structured:
        adj_be = "iterative:" + resolve_backend(backend, x.device, dtype, n, True)
    else:
        adj_be = resolve_backend(backend if (backend != "triton" or n <= 64) else "auto", x.device, dtype, n, False)
    return be, adj_be


def newton_loop(
    h: torch.Tensor,
    step: Callable[[torch.Tensor], torch.Tensor],
    method: str,
    atol: float,
    rtol: float,
    max_iter: int,
    use_triton: bool,
    agree: Callable[[float, int], tuple[float, int]] | None = None,
    on_reset: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, DEERInfo]:
    """DEER's outer loop: ``δ = step(h)`` (one linearised solve), ``h += δ``, stop when ``|δ| ≤ atol + rtol|h|``.

    Args:
        h: the initial guess ``[B, T, n]``, updated in place (a new tensor after a NaN/Inf reset).
        step: returns the Newton correction ``δ`` at the iterate ``h``.
        agree: maps this process's ``(violation, #non-finite)`` to the values every process uses (sequence
            parallelism: a max over ranks, so all ranks iterate and reset together); identity when ``None``.
        on_reset: called with the reset iterate after an iteration whose update held NaN/Inf.

    Returns:
        ``(h, info)``: the last iterate and a :class:`DEERInfo`.
    """
    resets, viol = 0, float("nan")
    for it in range(1, max_iter + 1):
        delta = step(h)
        viol, bad = deer_update(h, delta, atol, rtol, use_triton=use_triton)
        if agree is not None:
            viol, bad = agree(viol, bad)
        if bad:  # NaN/Inf past the exact prefix: reset them to 0 and keep iterating (DEER's heuristic)
            resets += 1
            viol = float("nan")
            h = torch.where(torch.isfinite(h), h, torch.zeros((), device=h.device, dtype=h.dtype))
            if on_reset is not None:
                on_reset(h)
            continue
        if viol <= 0:
            return h, DEERInfo(it, True, viol, resets, method)
    return h, DEERInfo(max_iter, False, viol, resets, method)


def convergence_message(info: DEERInfo, atol: float, rtol: float) -> str:
    """The report of a solve that did not converge (raised or warned)."""
    return (f"DEER ({info.method}) did not converge in {info.iterations} iterations: max(|Δh| − atol − rtol·|h|) = "
            f"{info.max_violation:.3e} (atol={atol:g}, rtol={rtol:g}); {info.resets} iteration(s) produced NaN/Inf "
            "and were reset to 0. The recurrence may be unstable or chaotic (parallel Newton converges slowly "
            "when the Lyapunov exponent is positive): try method='damped', a larger max_iter, or the sequential "
            "loop.")


def needs_grad(cell, x: torch.Tensor, h0: torch.Tensor | None) -> bool:
    """Whether the solve must build the adjoint graph (grad mode on and some input or parameter requires grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or (h0 is not None and h0.requires_grad) or any(p.requires_grad for p in _parameters(cell))
    )


def _local_step(system, method: str, scale: float, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """One Newton correction on one device: linearise at ``h`` and scan ``δ_t = A_t δ_{t-1} + r_t`` from zero."""
    def step(h: torch.Tensor) -> torch.Tensor:
        res, trans = system.linearize(h, method, scale)
        # tf32 chunk products on the Triton dense path: in delta form an inexact A only slows convergence
        kw = {"precision": "tf32"} if (backend == "triton" and "a" not in trans) else {}
        delta, _ = scan_forward(trans.get("a"), res, None, backend, coef=trans.get("coef"), mats=trans.get("mats"),
                                **kw)
        return delta

    return step


def deer_rnn(
    cell: torch.nn.GRU | torch.nn.GRUCell | GRUWeights | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    method: str = "newton",
    *,
    tol: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 100,
    damping: float = 0.5,
    backend: str = "auto",
    strict: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, DEERInfo]:
    """Evaluate ``h_t = f(h_{t-1}, x_t)`` for ``t = 1..T`` by parallel Newton iterations (DEER), differentiable.

    Args:
        cell: a one-layer ``torch.nn.GRU`` (``batch_first`` layout of ``x``) or ``nn.GRUCell`` or their
            :class:`~pflow_dist.kernels.deer.naive.GRUWeights` (analytic Jacobian, the fast path), or any callable
            ``f(h [..., n], x [..., I]) -> [..., n]`` acting row-wise (an ``nn.Module`` or a function; Jacobians by
            ``torch.func``).
        x: inputs ``[B, T, I]``, float32 or float64 (the compute dtype).
        h0: initial state ``[B, n]`` (zeros when ``None``; required for a generic cell).
        method: ``"newton"`` (dense Jacobian, quadratic convergence), ``"quasi"`` (its diagonal: O(n) scan, more
            iterations) or ``"damped"`` (``(1 − damping)·J``: slower but robust when J has eigenvalues ≫ 1).
        tol: max-abs tolerance (DEER's original test); sets ``atol = tol`` and ``rtol = 0`` unless given.
        atol, rtol: stop when ``|h^{k+1} − h^k| ≤ atol + rtol·|h^{k+1}|`` elementwise (float32 defaults 1e-4 /
            1e-3, float64 1e-8 / 1e-6).
        max_iter: iteration cap (further capped at T + 1: Newton is exact after T iterations).
        damping: the shrink factor of ``method="damped"``, in ``[0, 1)``.
        backend: scan backend, ``"auto"`` / ``"triton"`` / ``"torch"`` (see :func:`pflow_dist.ops.scan.scan`).
        strict: raise :class:`DEERConvergenceError` when not converged (else warn and return the last iterate).

    Returns:
        ``(h [B, T, n], h_T [B, n], info)`` in ``x.dtype``; ``info`` is a :class:`DEERInfo` (iterations, ...).
        Gradients (to x, h0 and the cell's parameters) come from the adjoint at the converged trajectory.

    Raises:
        TypeError/ValueError: bad cell, shapes, dtypes, method or tolerances.
        DEERConvergenceError: no convergence within ``max_iter`` (``strict=True``); the message reports the
            iterations, the remaining violation and the NaN/Inf resets.

    Example::

        >>> gru = torch.nn.GRU(3, 4, batch_first=True)
        >>> x = torch.randn(2, 50, 3)
        >>> h, h_T, info = deer_rnn(gru, x)
        >>> torch.allclose(h, gru(x)[0], atol=1e-4), info.converged
        (True, True)
    """
    atol, rtol = check_solver_args(x, h0, method, tol, atol, rtol, max_iter, damping)
    B, T, _ = x.shape
    system = build_system(cell, x, h0, x.dtype, pointwise_triton(backend, x))
    n = system.n
    if h0 is not None and h0.shape[-1] != n:
        raise ValueError(f"h0 must have shape [B, n={n}], got {list(h0.shape)}")
    be, adj_be = solver_backends(backend, x, n, method, isinstance(system, GRUSystem))
    scale = 1.0 - damping if method == "damped" else 1.0
    h = torch.zeros(B, T, n, device=x.device, dtype=x.dtype)  # DEER's guess; Newton is exact after T iterations
    h_star, info = newton_loop(h, _local_step(system, method, scale, be), method, atol, rtol, min(max_iter, T + 1),
                               be == "triton")
    if not info.converged:
        if strict:
            raise DEERConvergenceError(convergence_message(info, atol, rtol))
        warnings.warn(convergence_message(info, atol, rtol), RuntimeWarning, stacklevel=2)
    if needs_grad(cell, x, h0):
        y = system.evaluate(shift(h_star, h0))  # one batched f with autograd: the VJP of the adjoint
        h_out = _Adjoint.apply(y, h_star, system, adj_be)
    else:
        h_out = h_star
    h_out = h_out.to(x.dtype)
    return h_out, h_out[:, -1], info


def _parameters(cell) -> list[torch.Tensor]:
    if isinstance(cell, torch.nn.Module):
        return list(cell.parameters())
    if isinstance(cell, GRUWeights):
        return [t for t in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh) if t is not None]
    return [torch.ones(1, requires_grad=True)]  # a plain callable may capture tensors that need gradients
