# The two passes of the multi-level projection (Perez & Barlaud, arXiv 2405.02086, §2), as separate phases so that
# the single-process projection and the Ray actor tree (pflow_dist/ray/projection_tree.py) run the same code:
#
#   upward    A[k-1] = x;  A[i-1] = ‖A[i]‖_{norms[i]} over blocks[i]  (keepdim, so every A broadcasts against x)
#   root      τ = ℓ1 threshold of A[0] (flattened over blocks[0]) at radius η, in float64; R[0] = max(A[0] − τ, 0)
#   downward  R[i] = projection of A[i] onto the norms[i] ball of radius R[i-1] (per parent, broadcast):
#               linf: clip, l2: scale by min(1, r/‖·‖) (‖·‖ is A[i-1], already known), l1: soft-threshold with a
#               per-parent τ (batched sort/Michelot); X = R[k-1].
# Only the root is global; every other step is independent per node, which is the parallelism of the paper.
# Max is exact in any dtype, so ℓ∞ levels are computed in the input dtype; sums (ℓ1, ℓ2) accumulate in float32
# (float64 for float64 input); the root and the radii are float64. Radii are rounded toward zero when cast back to
# the input dtype, so the result never exceeds η through rounding; with τ = 0 (inside the ball) nothing is rounded
# and x comes back bitwise.
"""Phases of the multi-level projection: group norms (upward), the ℓ1 root, the per-level ball projections."""

from __future__ import annotations

import math

import torch

from ..kernels.projection.shapes import ProjectionTree
from .projection_l1 import l1_threshold, threshold_lastdim

__all__ = ["acc_dtype", "group_norm", "level_project", "root_radii", "root_tau", "root_threshold",
           "to_dtype_toward_zero", "to_dtype_up", "upward"]


def acc_dtype(dtype: torch.dtype, norm: str) -> torch.dtype:
    """Dtype of a level's norms: the input dtype for ℓ∞ (max is exact), float32/float64 for sums."""
    if norm == "linf":
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_norm(x: torch.Tensor, norm: str, dims: tuple[int, ...]) -> torch.Tensor:
    """``‖x‖_norm`` over ``dims`` with ``keepdim=True`` (``dims == ()``: ``|x|``, each entry its own group).

    Args:
        x: any float tensor (signed).
        norm: ``"l1"``, ``"l2"`` or ``"linf"``.
        dims: the reduced dims (sorted tuple).

    Returns:
        Nonnegative tensor, ``x``'s shape with ``dims`` set to 1, dtype :func:`acc_dtype`. NaN propagates.
    """
    if not dims:  # torch reductions read dim=() as "all dims"
        return x.abs().to(acc_dtype(x.dtype, norm))
    if norm == "linf":
        if x.device.type == "cpu" and x.dtype not in (torch.float16, torch.bfloat16):
            v = _absmax_cpu_leading(x, dims)
            if v is not None:
                return v
            # two vectorised min/max passes beat vector_norm(ord=inf) by ~2x on CPU and need no |x| temporary
            return torch.maximum(x.amax(dims, keepdim=True), x.amin(dims, keepdim=True).neg_())
        return torch.linalg.vector_norm(x, math.inf, dims, keepdim=True)
    ord_ = 1 if norm == "l1" else 2
    return torch.linalg.vector_norm(x, ord_, dims, keepdim=True, dtype=acc_dtype(x.dtype, norm))


CPU_CHUNK_ELEMS = 1 << 18  # 2 MiB of float64: |x| of a chunk stays in cache between abs and max


def _absmax_cpu_leading(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor | None:
    """max |x| over leading dims (column groups of W[out, in]) in one read of x: |x| of a slab of rows goes into a
    cache-sized buffer and is max-reduced from there (single thread: 2x faster than amax + amin). None when the
    layout does not fit, or with several intra-op threads: each chunk is a few parallel regions, and when another
    process holds a core every region waits for a descheduled thread (measured: 560 ms instead of 10 ms on
    1000x8000 with 2 threads on 2 busy cores); two passes are two regions."""
    k = len(dims)
    if dims != tuple(range(k)) or k == x.dim() or x.numel() < 2 * CPU_CHUNK_ELEMS or not x.is_contiguous():
        return None
    if torch.get_num_threads() > 1:
        return None
    R = math.prod(x.shape[:k])
    x2 = x.view(R, -1)
    rows = max(1, CPU_CHUNK_ELEMS // x2.shape[1])
    buf = torch.empty(min(rows, R), x2.shape[1], dtype=x.dtype)
    v = torch.zeros(x2.shape[1], dtype=x.dtype)
    for i in range(0, R, rows):
        b = buf[: min(rows, R - i)]
        torch.abs(x2[i:i + rows], out=b)
        torch.maximum(v, b.amax(0), out=v)  # amax and maximum propagate NaN
    return v.view([1] * k + list(x.shape[k:]))


def upward(x: torch.Tensor, tree: ProjectionTree, stop: int = 0) -> list[torch.Tensor | None]:
    """The upward pass: ``A[k-1] = x`` and ``A[i-1] = ‖A[i]‖`` over ``blocks[i]``, down to ``A[stop]``.

    Returns:
        The list ``A`` of length ``k`` (entries below ``stop`` are ``None``).
    """
    k = tree.depth
    A: list[torch.Tensor | None] = [None] * k
    A[k - 1] = x
    for i in range(k - 1, stop, -1):
        A[i - 1] = group_norm(A[i], tree.norms[i], tree.blocks[i])
    return A


def root_threshold(a0: torch.Tensor, eta: float, method: str = "auto") -> torch.Tensor:
    """τ of the root: the ℓ1-ball threshold of the flattened root values ``a0`` at radius ``eta``, in float64
    (a 0-d tensor; 0 inside the ball)."""
    return l1_threshold(a0.reshape(-1).to(torch.float64), eta, method=method)


def root_tau(a0: torch.Tensor, eta: float | torch.Tensor, tree: ProjectionTree, method: str = "auto") -> torch.Tensor:
    """τ of every root in float64: a 0-d tensor, or with ``tree.batch`` one τ per batch index, shaped to broadcast
    against ``a0`` (``eta``: a float or a float64 tensor of the batch shape)."""
    if not tree.batch:
        return root_threshold(a0, float(eta), method)
    batch = list(tree.batch)
    rest = [d for d in range(a0.dim()) if d not in tree.batch]
    bshape = [a0.shape[d] for d in batch]
    flat = a0.permute(batch + rest).reshape(*bshape, -1).to(torch.float64)
    eta_t = torch.as_tensor(eta, dtype=torch.float64, device=a0.device)
    tau = threshold_lastdim(flat, eta_t, method)
    return tau.reshape([a0.shape[d] if d in tree.batch else 1 for d in range(a0.dim())])


def root_radii(a0: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``R[0] = max(A[0] − τ, 0)`` in float64."""
    return (a0.to(torch.float64) - tau).clamp_min_(0)


def to_dtype_toward_zero(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast nonnegative float64 ``r`` to ``dtype`` so that the result is never larger than ``r`` (round-to-nearest
    can round up by half an ulp, which could push the projection's norm above η). Exact values stay exact."""
    c = r.to(dtype)
    if dtype == torch.float64:
        return c
    eps = torch.finfo(dtype).eps
    return torch.where(c.to(torch.float64) > r, (r * (1 - eps)).to(dtype), c)


def _soft_threshold_groups(a: torch.Tensor, r: torch.Tensor, dims: tuple[int, ...], method: str) -> torch.Tensor:
    """Per-parent τ (float64, keepdim shape) of the ℓ1 projection of ``|a|`` over ``dims`` at radius ``r``."""
    if not dims:
        return (a.abs().to(torch.float64) - r).clamp_min_(0)  # a one-entry group: τ = max(|a| − r, 0)
    rest = [d for d in range(a.dim()) if d not in dims]
    keep = [1 if d in dims else a.shape[d] for d in range(a.dim())]
    sizes = [a.shape[d] for d in rest]
    flat = a.abs().permute(rest + list(dims)).reshape(*sizes, -1).to(torch.float64)
    radius = r.expand(keep).permute(rest + list(dims)).reshape(sizes)
    if flat.shape[-1] == 0:
        return torch.zeros(keep, dtype=torch.float64, device=a.device)
    return threshold_lastdim(flat, radius, method).reshape(keep)


def to_dtype_up(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast nonnegative float64 ``r`` to ``dtype`` never below ``r`` (a soft threshold rounded down would leave the
    ℓ1 sum above its radius)."""
    c = r.to(dtype)
    if dtype == torch.float64:
        return c
    eps = torch.finfo(dtype).eps
    return torch.where(c.to(torch.float64) < r, (r * (1 + eps)).to(dtype), c)


def level_project(
    a: torch.Tensor,
    r: torch.Tensor,
    n: torch.Tensor,
    norm: str,
    dims: tuple[int, ...],
    *,
    leaf: bool,
    method: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Project every group of ``a`` (over ``dims``) onto its ``norm`` ball of radius ``r``.

    Args:
        a: the level's values: signed ``x`` at the leaves, nonnegative norms above.
        r: float64 radii, keepdim shape (size 1 on ``dims``), broadcastable to ``a``.
        n: the groups' current norms (``A[i-1]`` of the upward pass), same shape as ``r``; used by ℓ2.
        norm: the level's norm.
        leaf: ``a`` is the signed input; radii are cast toward zero to ``a.dtype`` and the result can go to ``out``.
        method: ℓ1 threshold method for ℓ1 levels.
        out: where the leaf result goes (may be ``a`` itself: in place).

    Returns:
        The projected values (``out`` when given). Groups with ``r >= n`` come back unchanged (bitwise).
    """
    dtype = a.dtype if leaf else torch.float64
    if norm == "linf":
        bound = to_dtype_toward_zero(r, dtype)
        if not leaf:
            return torch.minimum(a.to(dtype), bound)
        return torch.clamp(a, -bound, bound, out=out) if out is not None else torch.clamp(a, -bound, bound)
    if norm == "l2":
        n64 = n.to(torch.float64)
        scale = torch.where(n64 > r, r / torch.where(n64 > 0, n64, 1), 1.0)
        s = to_dtype_toward_zero(scale, dtype)
        src = a if leaf else a.to(dtype)
        return torch.mul(src, s, out=out) if out is not None else src * s
    # groups already inside their ball keep τ = 0 exactly (the sort's cumsum may exceed n by an ulp)
    tau = torch.where(r >= n.to(torch.float64), 0.0, _soft_threshold_groups(a, r, dims, method))
    t = to_dtype_up(tau, dtype)
    src = a if leaf else a.to(dtype)
    res = torch.where(t > 0, (src.abs() - t).clamp_min_(0).copysign_(src), src)
    return out.copy_(res) if out is not None else res
