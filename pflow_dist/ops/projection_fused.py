# The bi-level projection through the fused Triton kernels of kernels/projection/fused.py (arXiv 2407.16293):
# pass 1 (group norms) and pass 2 (clip / scale / soft-threshold) are one kernel each; the root (an ℓ1 threshold over
# the G group norms, G << N) and the per-group thresholds of ℓ1 groups stay in torch. Same conventions, radii rounding
# and edge cases as the torch path (projection_tree.py), so ℓ∞ results are bitwise the same.
"""``backend="triton"`` of the bi-level projection: x viewed as [A, R, C] (groups (a, c), entries over r)."""

from __future__ import annotations

import importlib.util
import math

import torch

from ..kernels.projection.shapes import ProjectionTree
from . import projection_tree as _t
from .projection_l1 import threshold_lastdim

__all__ = ["BACKENDS", "fused_project_tree", "resolve_backend", "view3"]

BACKENDS = ("auto", "torch", "triton")


def view3(x: torch.Tensor, reduce_dims: tuple[int, ...]) -> torch.Tensor | None:
    """``x`` as a 3-D view ``[A, R, C]`` (R = the reduced dims, which must be consecutive), or None when the
    reduced dims are not consecutive or the strides do not allow a view."""
    if reduce_dims:
        lo, hi = reduce_dims[0], reduce_dims[-1]
        if list(reduce_dims) != list(range(lo, hi + 1)):
            return None
        shape = (math.prod(x.shape[:lo]), math.prod(x.shape[lo:hi + 1]), math.prod(x.shape[hi + 1:]))
    else:
        shape = (1, 1, x.numel())
    try:
        return x.view(shape)
    except RuntimeError:
        return None


def resolve_backend(backend: str, tree: ProjectionTree, device: torch.device | str, *, viewable: bool = True) -> str:
    """The backend a projection runs: ``"torch"`` or ``"triton"`` (an explicit choice is returned as is).

    ``"auto"`` picks the fused Triton kernels where they were measured faster and apply: a CUDA device, a bi-level
    ℓ1,∞ tree (two levels, inner ``"linf"``) without batch dims, reduced dims that are consecutive, and (in place)
    a layout that views as ``[A, R, C]`` (``viewable``); torch everywhere else (CPU: the interpreter is slow).
    Measured on H100 (``benchmarks/results/projection_h100.jsonl``, 32768² fp32, radius 0.1‖Y‖_{1,∞}): fused
    5.13 ms vs torch 6.07 ms, with a copy floor of 4.95 ms for the three passes. ℓ1 and ℓ2 inner norms stay on torch
    under ``"auto"`` until measured.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        tree: the validated projection tree.
        device: where ``x`` lives (a ``torch.device`` or a string such as ``"cuda:1"``).
        viewable: False when the call is in place on a layout :func:`view3` cannot view (the fused path refuses it).

    Raises:
        ValueError: unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    red = tree.blocks[-1]
    consecutive = not red or list(red) == list(range(red[0], red[-1] + 1))
    fits = tree.depth == 2 and not tree.batch and tree.norms[1] == "linf" and consecutive and viewable
    if torch.device(device).type == "cuda" and fits and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


def fused_project_tree(x: torch.Tensor, eta: float, tree: ProjectionTree, *, method: str = "auto",
                       check_finite: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bi-level projection with the fused kernels (called by ``project_tree(..., backend="triton")``, which has
    validated the arguments). Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.

    Raises:
        ValueError: a tree deeper than two levels, reduced dims that are not consecutive, or an in-place call on a
            layout that cannot be viewed as ``[A, R, C]``.
    """
    from ..kernels.projection.fused import fused_group_norm, fused_shrink

    if tree.depth != 2:
        raise ValueError(f"backend='triton' runs bi-level trees (2 levels), got {tree.depth} levels; use "
                         "backend='torch'")
    norm, red = tree.norms[1], tree.blocks[1]
    x3 = view3(x, red)
    if x3 is None:
        if red and list(red) != list(range(red[0], red[-1] + 1)):
            raise ValueError(f"backend='triton' needs consecutive reduce_dims, got {red}; use backend='torch'")
        if out is x:
            raise ValueError("backend='triton' in place needs a layout viewable as [A, R, C]; use backend='torch'")
        x3 = view3(x.contiguous(), red)
    v = fused_group_norm(x3, norm)  # [A, C]
    if check_finite or x.device.type == "cpu":
        total = v.sum(dtype=torch.float64).item()
        if not math.isfinite(total):
            raise ValueError("x must be finite: NaN or Inf found (they would poison the threshold and every group)")
        if total <= eta:
            return x.clone() if out is None else (out if out is x else out.copy_(x))
    u = _t.root_radii(v, _t.root_threshold(v, eta, method))
    if norm == "linf":
        bound = _t.to_dtype_toward_zero(u, x.dtype)
    elif norm == "l2":
        v64 = v.to(torch.float64)
        bound = _t.to_dtype_toward_zero(torch.where(v64 > u, u / torch.where(v64 > 0, v64, 1), 1.0), x.dtype)
    else:
        A, R, C = x3.shape
        groups = x3.abs().permute(0, 2, 1).reshape(A * C, R).to(torch.float64)
        tau = threshold_lastdim(groups, u.reshape(-1), method).reshape(A, C)
        tau = torch.where(u >= v.to(torch.float64), 0.0, tau)  # groups inside their ball stay bitwise
        bound = _t.to_dtype_up(tau, torch.float64 if x.dtype == torch.float64 else torch.float32)
    res = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o3 = view3(res, red)
    if o3 is None:  # an `out` whose strides do not view as [A, R, C]: go through a temporary
        tmp = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
        fused_shrink(x3, bound, norm, tmp)
        return res.copy_(tmp.view(x.shape))
    fused_shrink(x3, bound, norm, o3)
    return res
