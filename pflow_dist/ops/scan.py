# Differentiable affine scans h_t = A_t h_{t-1} + b_t (DESIGN.md §4; Blelloch 1993 for the associative form,
# Martin & Cundy 2018, arXiv 1709.04057, for the adjoint as a reverse scan).
#
# Backends: "triton" (kernels/scan/diag.py single-pass look-back; kernels/scan/dense.py chunked three-pass) and
# "torch" (kernels/scan/chunked.py: the same chunked algorithm in plain torch, log_C(T) levels, the CPU path).
# "auto" picks triton on CUDA (fp16/bf16/fp32, dense n ≤ 64) and torch otherwise (CPU, float64, larger dense n).
# The backward is the adjoint derived in kernels/scan/naive.py: one reverse scan over the shifted transposed gates
# (λ_t = ḡ_t + A_{t+1}ᵀ λ_{t+1}), then db = λ, da_t = λ_t h_{t-1}ᵀ, dh_0 = A_1ᵀ λ_1; `scan_forward` and
# `scan_adjoint` below are that one implementation, also used by the DEER solver (pflow_dist/ops/deer.py).
"""Public affine scan ``scan(a, b, initial_state, output_final_state, backend) -> (h, h_T)`` with autograd."""

from __future__ import annotations

import os

import torch

from ..kernels.common.checks import check_tensor
from ..kernels.scan.chunked import torch_scan, torch_scan_adjoint
from ..kernels.scan.naive import check_scan_inputs

__all__ = ["BACKENDS", "MAX_DENSE_TRITON", "scan", "scan_adjoint", "scan_forward", "scan_map", "structured_dense"]

BACKENDS = ("auto", "triton", "torch")
MAX_DENSE_TRITON = 64
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, n: int, diagonal: bool) -> str:
    """The concrete backend for ``backend`` (``"auto"`` → triton on CUDA when supported, else torch).

    Raises:
        ValueError: unknown backend, or triton asked for where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    triton_ok = dtype in _TRITON_DTYPES and (diagonal or n <= MAX_DENSE_TRITON)
    if backend == "auto":
        return "triton" if (device.type == "cuda" and triton_ok) else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend='triton' on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1 set before "
                         "pflow_dist is imported); use backend='torch' or 'auto'")
    if backend == "triton" and not triton_ok:
        why = (f"dtype {str(dtype).replace('torch.', '')} (needs float16, bfloat16 or float32)"
               if dtype not in _TRITON_DTYPES else f"dense n={n} > {MAX_DENSE_TRITON}")
        raise ValueError(f"backend='triton' cannot run {why}; use backend='torch'")
    return backend


def structured_dense(coef: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Materialise ``A_t = diag(c0_t) + Σ_k diag(c_k,t) M_k`` from ``coef [B, T, K+1, n]`` and ``mats [K, n, n]``."""
    A = torch.diag_embed(coef[:, :, 0])
    for k in range(mats.shape[0]):
        A = A + coef[:, :, k + 1, :, None] * mats[k]
    return A


def _diag_operands(a: torch.Tensor, *xs: torch.Tensor | None) -> tuple:
    """``a`` and ``xs`` (``[B, T, N]`` each) in one memory layout for the diagonal Triton kernels: channel-major
    (``[B, N, T]`` memory) when ``a`` is, contiguous otherwise; tensors already in it are not copied."""
    from ..kernels.scan.diag import is_channel_major, to_channel_major  # noqa: PLC0415

    if is_channel_major(a):
        return (a, *(None if x is None else to_channel_major(x) for x in xs))
    return (a.contiguous(), *(None if x is None else x.contiguous() for x in xs))


def scan_forward(
    a: torch.Tensor | None,
    b: torch.Tensor,
    h0: torch.Tensor | None,
    backend: str,
    *,
    coef: torch.Tensor | None = None,
    mats: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    **kernel_kw,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward scan on a resolved backend, no autograd: ``(h [B, T, N] in out_dtype or b.dtype, h_T fp32/fp64)``.

    ``a`` is ``[B, T, N]`` (diagonal) or ``[B, T, N, N]``, or ``None`` with a structured transition (``coef``,
    ``mats``, see :func:`structured_dense`). ``kernel_kw`` goes to the Triton launcher (tile sizes, algorithm).
    """
    out_dtype = out_dtype or b.dtype
    if backend == "triton":
        if a is not None and a.dim() == 3:
            from ..kernels.scan.diag import diag_scan_triton

            h, hT, _ = diag_scan_triton(*_diag_operands(a, b), h0, out_dtype=out_dtype, **kernel_kw)
        else:
            from ..kernels.scan.dense import dense_scan_triton

            h, hT, _ = dense_scan_triton(None if a is None else a.contiguous(), b.contiguous(), h0, coef=coef,
                                         mats=mats, out_dtype=out_dtype, **kernel_kw)
        return h, hT
    acc = _acc_dtype(b.dtype)
    A = structured_dense(coef, mats) if a is None else a
    h, hT = torch_scan(A.to(acc), b.to(acc), None if h0 is None else h0.to(acc))
    return h.to(out_dtype), hT


def scan_map(a: torch.Tensor, b: torch.Tensor, backend: str,
             reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence's map of a diagonal scan on a resolved backend, no autograd: ``h_T = M ⊙ h_0 + D`` with
    ``(M [B, N], D [B, N])`` in float32 (float64 for float64 ``b``); with ``reverse``, that of the adjoint scan
    ``λ_t = b_t + a_{t+1} ⊙ λ_{t+1}`` (``D``: its first value from zero; ``M = Π_{t≥2} a_t``). Triton: one read of
    ``a`` and ``b``, nothing of length T written (:func:`~pflow_dist.kernels.scan.diag.diag_scan_map`); torch: a
    product and a scan from zero.
    """
    if a.dim() != 3:
        raise ValueError(f"scan_map takes a diagonal scan (a [B, T, N]), got a of shape {list(a.shape)}")
    if backend == "triton":
        from ..kernels.scan.diag import diag_scan_map  # noqa: PLC0415

        return diag_scan_map(*_diag_operands(a, b), reverse=reverse)
    acc = _acc_dtype(b.dtype)
    if reverse:
        return torch.prod(a[:, 1:].to(acc), dim=1), torch_scan_adjoint(a.to(acc), b.to(acc), None)[1]
    return torch.prod(a.to(acc), dim=1), torch_scan(a.to(acc), b.to(acc), None)[1]


def scan_adjoint(
    a: torch.Tensor | None,
    grad_h: torch.Tensor,
    grad_final: torch.Tensor | None,
    backend: str,
    *,
    h: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    want_da: bool = False,
    coef: torch.Tensor | None = None,
    mats: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    **kernel_kw,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The adjoint scan ``λ_t = ḡ_t + A_{t+1}ᵀ λ_{t+1}`` (``λ_{T} += ∂L/∂h_T``), no autograd.

    Returns:
        ``(λ [B, T, N] in out_dtype or grad_h.dtype, λ_0 [B, N] fp32/fp64, da or None)`` where ``da_t = λ_t h_{t-1}ᵀ``
        (diagonal: ``λ_t ⊙ h_{t-1}``) needs ``h`` (and ``h0``, zeros when ``None``).
    """
    out_dtype = out_dtype or grad_h.dtype
    if backend == "triton":
        kw = dict(reverse=True, h0=h0, want_da=want_da, out_dtype=out_dtype, **kernel_kw)
        if a is not None and a.dim() == 3:
            from ..kernels.scan.diag import diag_scan_triton

            a, grad_h, h = _diag_operands(a, grad_h, h if want_da else None)
            return diag_scan_triton(a, grad_h, grad_final, h=h, **kw)
        from ..kernels.scan.dense import dense_scan_triton

        return dense_scan_triton(None if a is None else a.contiguous(), grad_h.contiguous(), grad_final, coef=coef,
                                 mats=mats, h=h.contiguous() if want_da else None, **kw)
    acc = _acc_dtype(grad_h.dtype)
    A = structured_dense(coef, mats) if a is None else a
    lam, lam0 = torch_scan_adjoint(A.to(acc), grad_h.to(acc), None if grad_final is None else grad_final.to(acc))
    da = None
    if want_da:
        first = h.new_zeros(h.shape[0], 1, h.shape[2]) if h0 is None else h0.to(h.dtype).unsqueeze(1)
        h_prev = torch.cat([first, h[:, :-1]], dim=1).to(acc)
        da = lam * h_prev if A.dim() == 3 else lam.unsqueeze(-1) * h_prev.unsqueeze(-2)
        da = da.to(A.dtype)
    return lam.to(out_dtype), lam0, da


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, backend, kernel_kw=None):
        kernel_kw = kernel_kw or {}
        h, hT = scan_forward(a, b, h0, backend, **kernel_kw)
        ctx.save_for_backward(a, h, h0)
        ctx.backend, ctx.kernel_kw = backend, kernel_kw
        return h, hT

    @staticmethod
    def backward(ctx, dh, dhT):
        a, h, h0 = ctx.saved_tensors
        if dh is None:
            dh = torch.zeros_like(h)
        lam, lam0, da = scan_adjoint(a, dh, dhT, ctx.backend, h=h, h0=h0, want_da=ctx.needs_input_grad[0],
                                     out_dtype=h.dtype, **ctx.kernel_kw)
        dh0 = None
        if h0 is not None and ctx.needs_input_grad[2]:
            a1 = a[:, 0].to(lam0.dtype)
            dh0 = (a1 * lam0 if a.dim() == 3 else (a1.transpose(-1, -2) @ lam0.unsqueeze(-1)).squeeze(-1))
            dh0 = dh0.to(h0.dtype)
        return da, lam, dh0, None, None


def scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Affine scan ``h_t = A_t h_{t-1} + b_t`` over ``t = 1..T``, differentiable in ``a``, ``b`` and ``initial_state``.

    Args:
        a: transitions ``[B, T, N]`` (diagonal, ``A_t = diag(a_t)``) or ``[B, T, N, N]`` (dense); float16, bfloat16,
            float32 or float64, same dtype as ``b``.
        b: inputs ``[B, T, N]``. A diagonal ``a`` may be stored channel-major (``[B, N, T]`` memory, T contiguous:
            ``x.transpose(1, 2)`` of a contiguous ``[B, N, T]`` tensor, accelerated-scan's layout); the Triton kernels
            then read it without a copy (``b`` is brought to the same layout) and ``h`` comes back in it.
        initial_state: ``h_0 [B, N]`` (any float dtype) or ``None`` (zeros).
        output_final_state: also return ``h_T``.
        backend: ``"auto"`` (Triton on CUDA, the chunked torch scan on CPU or for float64 / dense N > 64),
            ``"triton"`` or ``"torch"``. States accumulate in float32 (float64 for float64 inputs).

    Returns:
        ``(h [B, T, N] in b.dtype, h_T [B, N] in float32 (float64 for float64 inputs) or None)``.

    Raises:
        TypeError: non-tensor or non-float inputs, or ``a`` and ``b`` of different dtypes.
        ValueError: shapes that do not match ``[B, T, N]`` / ``[B, T, N(, N)]`` / ``[B, N]``, T = 0, mixed devices,
            an unknown backend, or triton where it cannot run.

    Example::

        >>> a, b = torch.full((1, 3, 1), 0.5), torch.ones(1, 3, 1)
        >>> h, h_T = scan(a, b, output_final_state=True)
        >>> h.flatten().tolist(), h_T.tolist()
        ([1.0, 1.5, 1.75], [[1.75]])
    """
    diagonal = check_scan_inputs(a, b, initial_state)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got a {str(a.dtype).replace('torch.', '')} and b "
                        f"{str(b.dtype).replace('torch.', '')}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=2, dims="[B, N]")
    be = resolve_backend(backend, b.device, b.dtype, b.shape[-1], diagonal)
    h, hT = _Scan.apply(a, b, initial_state, be)
    return h, (hT if output_final_state else None)
