# Plain-torch references for affine scans h_t = A_t h_{t-1} + b_t, computed in float64 (DESIGN.md §4).
#
# Adjoint (reverse) scan, derived once here and used by every backward pass: with upstream gradients ḡ_t = ∂L/∂h_t
# (plus ∂L/∂h_T from the final state), define λ_t = ∂L/∂h_t through all later steps. Since h_{t+1} depends on h_t
# only through A_{t+1} h_t,
#     λ_T = ḡ_T,   λ_t = ḡ_t + A_{t+1}ᵀ λ_{t+1}
# which is the same scan run backwards over the *shifted* transposed gates (accelerated-scan, arXiv 1709.04057 §2.2).
# Then, as h_t = A_t h_{t-1} + b_t:
#     ∂L/∂b_t = λ_t,   ∂L/∂A_t = λ_t h_{t-1}ᵀ (diagonal: λ_t ⊙ h_{t-1}),   ∂L/∂h_0 = A_1ᵀ λ_1.
"""Float64 references of the diagonal and dense affine scans, forward, adjoint and chunked (associative) forms."""

from __future__ import annotations

import torch

from ..common.affine import apply_map, compose, prefix_compose
from ..common.checks import check_same_device, check_tensor

__all__ = ["check_scan_inputs", "naive_chunked_scan", "naive_scan", "naive_scan_adjoint", "naive_scan_backward"]

_F64 = torch.float64


def check_scan_inputs(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None) -> bool:
    """Validate scan inputs; return True for a diagonal scan (``a [B, T, N]``), False for dense (``a [B, T, N, N]``).

    Raises:
        ValueError/TypeError naming the expected and the received shape or dtype.
    """
    check_tensor("b", b, ndim=3, dims="[B, T, N]")
    B, T, N = b.shape
    if T == 0:
        raise ValueError("b must have at least one time step (T >= 1), got T=0")
    check_tensor("a", a, ndim=(3, 4), dims="[B, T, N] (diagonal) or [B, T, N, N] (dense)")
    diagonal = a.dim() == 3
    check_tensor("a", a, shape=(B, T, N) if diagonal else (B, T, N, N), dims="matching b [B, T, N]")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(B, N), dims="[B, N]")
    check_same_device(a=a, b=b, initial_state=initial_state)
    return diagonal


def _state_dtype(b: torch.Tensor) -> torch.dtype:
    return _F64 if b.dtype == _F64 else torch.float32


def _matvec(A: torch.Tensor, x: torch.Tensor, diagonal: bool, transpose: bool = False) -> torch.Tensor:
    if diagonal:
        return A * x
    M = A.transpose(-1, -2) if transpose else A
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def naive_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential affine scan ``h_t = A_t h_{t-1} + b_t`` in float64.

    Args:
        a: transitions, ``[B, T, N]`` (diagonal, ``A_t = diag(a_t)``) or ``[B, T, N, N]`` (dense).
        b: inputs ``[B, T, N]``.
        initial_state: ``h_0 [B, N]`` (zeros when ``None``).
        output_final_state: also return ``h_T``.

    Returns:
        ``(h [B, T, N] in b.dtype, h_T [B, N] or None)``; ``h_T`` is float64 for float64 inputs, else float32.

    Example::

        >>> a, b = torch.full((1, 3, 1), 0.5), torch.ones(1, 3, 1)
        >>> naive_scan(a, b)[0].flatten().tolist()
        [1.0, 1.5, 1.75]
    """
    diagonal = check_scan_inputs(a, b, initial_state)
    a64, b64 = a.to(_F64), b.to(_F64)
    h = b64.new_zeros(b.shape[0], b.shape[2]) if initial_state is None else initial_state.to(_F64)
    hs = []
    for t in range(b.shape[1]):
        h = _matvec(a64[:, t], h, diagonal) + b64[:, t]
        hs.append(h)
    out = torch.stack(hs, dim=1)
    return out.to(b.dtype), (h.to(_state_dtype(b)) if output_final_state else None)


def naive_scan_adjoint(
    a: torch.Tensor, grad_h: torch.Tensor, grad_final: torch.Tensor | None = None
) -> torch.Tensor:
    """Reverse (adjoint) scan ``λ_T = ḡ_T (+ ∂L/∂h_T)``, ``λ_t = ḡ_t + A_{t+1}ᵀ λ_{t+1}`` in float64.

    Args:
        a: transitions ``[B, T, N]`` or ``[B, T, N, N]`` as in :func:`naive_scan`.
        grad_h: ``ḡ = ∂L/∂h`` ``[B, T, N]``.
        grad_final: optional extra gradient on the final state ``[B, N]``.

    Returns:
        ``λ [B, T, N]`` float64: the total gradient reaching each ``h_t``.
    """
    diagonal = check_scan_inputs(a, grad_h, grad_final)
    a64, g64 = a.to(_F64), grad_h.to(_F64)
    T = g64.shape[1]
    lam = g64[:, -1] if grad_final is None else g64[:, -1] + grad_final.to(_F64)
    lams = [lam]
    for t in range(T - 2, -1, -1):
        lam = g64[:, t] + _matvec(a64[:, t + 1], lam, diagonal, transpose=True)
        lams.append(lam)
    return torch.stack(lams[::-1], dim=1)


def naive_scan_backward(
    a: torch.Tensor,
    h: torch.Tensor,
    initial_state: torch.Tensor | None,
    grad_h: torch.Tensor,
    grad_final: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`naive_scan` from the adjoint scan (no autograd), in float64.

    Args:
        a: transitions as in :func:`naive_scan`.
        h: the forward states ``[B, T, N]``.
        initial_state: ``h_0 [B, N]`` or ``None`` (zeros).
        grad_h: ``∂L/∂h [B, T, N]``; grad_final: optional ``∂L/∂h_T [B, N]``.

    Returns:
        ``(da, db, dh0)`` with the shapes of ``a``, ``h`` and ``[B, N]``.
    """
    diagonal = a.dim() == 3
    lam = naive_scan_adjoint(a, grad_h, grad_final)
    h64 = h.to(_F64)
    h0 = h64.new_zeros(h.shape[0], h.shape[2]) if initial_state is None else initial_state.to(_F64)
    h_prev = torch.cat([h0.unsqueeze(1), h64[:, :-1]], dim=1)
    da = lam * h_prev if diagonal else lam.unsqueeze(-1) * h_prev.unsqueeze(-2)
    dh0 = _matvec(a.to(_F64)[:, 0], lam[:, 0], diagonal, transpose=True)
    return da, lam, dh0


def naive_chunked_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked algorithm of the Triton scans, in float64: same signature and result as :func:`naive_scan`.

    Each chunk is scanned from a zero state, which also gives its flow ``(A_chunk, b_chunk)``; the chunk flows are
    composed with :func:`~pflow_dist.kernels.common.affine.prefix_compose` to get every chunk's incoming state, which is
    then pushed through the chunk (``h_t = P_t h_in + h_t^0`` with ``P_t`` the product of the chunk's gates so far).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    diagonal = check_scan_inputs(a, b, initial_state)
    a64, b64 = a.to(_F64), b.to(_F64)
    B, T, N = b.shape
    h0 = b64.new_zeros(B, N) if initial_state is None else initial_state.to(_F64)
    local, props, flows = [], [], []
    for t0 in range(0, T, chunk_size):
        A_acc = torch.ones_like(a64[:, 0]) if diagonal else torch.eye(N, dtype=_F64, device=b.device).expand(B, N, N)
        x = b64.new_zeros(B, N)
        hs, Ps = [], []
        for t in range(t0, min(t0 + chunk_size, T)):  # scan from zero and keep the running gate product
            A_acc, x = compose((A_acc, x), (a64[:, t], b64[:, t]), diagonal)
            hs.append(x)
            Ps.append(A_acc)
        local.append(torch.stack(hs, 1))
        props.append(torch.stack(Ps, 1))
        flows.append((A_acc, x))
    # incoming state of every chunk: exclusive prefix of the chunk flows applied to h0
    incoming = [apply_map(m, h0, diagonal) for m in prefix_compose(flows, diagonal, exclusive=True)]
    out = []
    for h_loc, P, h_in in zip(local, props, incoming):
        h_in = h_in.unsqueeze(1)
        out.append(h_loc + (P * h_in if diagonal else (P @ h_in.unsqueeze(-1)).squeeze(-1)))
    h = torch.cat(out, dim=1)
    return h.to(b.dtype), (h[:, -1].to(_state_dtype(b)) if output_final_state else None)
