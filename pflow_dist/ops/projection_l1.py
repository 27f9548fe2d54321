# Euclidean projection onto the ℓ1 ball: the building block at the root (and at every ℓ1 node) of the multi-level
# projection (Perez & Barlaud, arXiv 2405.02086).
#
# P(v)_i = sign(v_i) · max(|v_i| − τ, 0), τ = 0 inside the ball, else the root of Σ_i max(|v_i| − τ, 0) = η.
# Three exact methods, all batched over every dim but ``dim``:
#   "sort"     τ = max(0, max_k (S_k − η)/k) with S_k the sum of the k largest |v_i| (Condat 2016, eq. of the sort
#              method; the sequence rises up to the optimal k and falls after it). O(n log n), no host sync: the
#              GPU default.
#   "michelot" variable fixing (Michelot 1986, the method Condat's algorithm accelerates): τ₀ = (Σ v − η)/n and
#              τ ← (Σ_{v>τ} v − η)/#{v>τ}. τ rises monotonically, every step drops at least one entry, and the loop
#              stops when the active set is stable; then τ is exact. O(n) per step, 3–9 steps observed on
#              Gaussian/uniform/log-normal data (research/projection.md §1.1). One host sync per step. Condat's
#              own algorithm is a sequential Gauss-Seidel pass over the entries; its vectorised core is this
#              fixed point.
#   "pivot"    Condat's scheme vectorised (projection_l1_pivot.py): a sampled pivot and one pass give a lower bound
#              of τ close to it, then Michelot runs on the few candidates left. O(n) in practice, numpy on the CPU:
#              the CPU default above 4096 entries (auto_method has the measurements).
"""Batched ℓ1-ball thresholds and projections (sort, Michelot, sampled pivot), CPU and GPU."""

from __future__ import annotations

import torch

from ..kernels.common.checks import check_tensor
from ..kernels.projection.shapes import check_radius
from .projection_l1_pivot import threshold_pivot

__all__ = ["l1_threshold", "project_l1", "project_l1_", "threshold_lastdim"]

_METHODS = ("auto", "sort", "michelot", "pivot")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _radius(eta: float | torch.Tensor, batch_shape: torch.Size, device: torch.device, dtype: torch.dtype
            ) -> torch.Tensor:
    """η as a tensor broadcastable to the batch (the dims of ``v`` without ``dim``)."""
    if isinstance(eta, torch.Tensor) and eta.numel() != 1:
        check_tensor("eta", eta, dtypes=None)
        try:
            torch.broadcast_shapes(eta.shape, batch_shape)
        except RuntimeError as e:
            raise ValueError(f"eta of shape {tuple(eta.shape)} does not broadcast to the batch shape "
                             f"{tuple(batch_shape)}") from e
        if torch.isnan(eta).any() or (eta < 0).any():
            raise ValueError("eta must be >= 0 everywhere (the ball of a negative radius is empty)")
        return eta.to(device=device, dtype=dtype)
    return torch.tensor(check_radius(eta), device=device, dtype=dtype)


def _threshold_sort(a: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """τ along the last dim of ``a >= 0`` (sort formula); ``eta`` broadcasts to ``a.shape[:-1]``."""
    n = a.shape[-1]
    s = torch.sort(a, dim=-1, descending=True).values.cumsum_(-1)
    k = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    return ((s - eta.unsqueeze(-1)) / k).amax(-1).clamp_min_(0)


def _threshold_michelot(a: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """τ along the last dim of ``a >= 0`` by variable fixing; exact once the active sets stop changing."""
    n = a.shape[-1]
    eta = eta.expand(a.shape[:-1])
    total = a.sum(-1)
    # rows inside their ball, and η = 0 rows (answered by max v below; iterating would crawl to it one entry at a
    # time, thousands of passes for the dead groups of a bi-level ℓ1,1 projection), keep τ = 0 in the loop
    inside = (total <= eta) | (eta == 0)
    tau = torch.where(inside, 0, (total - eta) / n).clamp_min(0)
    active = a > tau.unsqueeze(-1)
    for _ in range(n + 1):  # each step removes >= 1 entry from some active set, so this bound is never reached
        cnt = active.sum(-1)
        s = torch.where(active, a, 0).sum(-1)
        tau = torch.where(inside, 0, (s - eta) / cnt.clamp_min(1))
        new_active = a > tau.unsqueeze(-1)
        if torch.equal(new_active, active):
            break
        active = new_active
    # η = 0: the fixed point is τ = max v, where the active set becomes empty; the ball is {0}
    return torch.where(eta == 0, a.amax(-1), tau).clamp_min(0)


def l1_threshold(v: torch.Tensor, eta: float | torch.Tensor, *, dim: int = -1, method: str = "auto") -> torch.Tensor:
    """The threshold τ of the Euclidean projection of ``v >= 0`` onto the ℓ1 ball of radius ``eta``, batched.

    Args:
        v: nonnegative magnitudes (e.g. group norms), any shape, float dtype; the ball is taken along ``dim``.
            Negative entries are not checked (a full pass): pass ``v.abs()`` for signed data.
        eta: radius >= 0: a number or a tensor broadcastable to ``v`` without ``dim`` (one radius per row).
        dim: the dim holding each vector.
        method: ``"sort"``, ``"michelot"``, ``"pivot"`` (linear time in practice, numpy on the CPU: a CUDA tensor
            makes a host round trip) or ``"auto"`` (see :func:`auto_method`: sort on CUDA and for at most 4096
            entries, pivot above).

    Returns:
        τ of shape ``v.shape`` without ``dim``, in float32 (float64 for float64 input), >= 0; exactly 0 when
        ``Σ v <= eta``. ``Σ max(v − τ, 0) = min(eta, Σ v)``.

    Raises:
        ValueError: negative/NaN eta, unknown method, non-finite ``v`` (a NaN would poison τ).

    Example:
        >>> l1_threshold(torch.tensor([[3.0, 1.0], [0.5, 0.25]]), 2.0)
        tensor([1., 0.])
    """
    check_tensor("v", v)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    dim = dim % max(v.dim(), 1)
    a = (v.unsqueeze(0) if v.dim() == 0 else v).movedim(dim, -1).to(_acc_dtype(v.dtype))
    eta_t = _radius(eta, a.shape[:-1], a.device, a.dtype)
    if a.shape[-1] == 0:
        return torch.zeros(a.shape[:-1], device=a.device, dtype=a.dtype)
    if not torch.isfinite(a.sum()):
        raise ValueError("v must be finite: a NaN or Inf entry makes the threshold undefined")
    tau = threshold_lastdim(a, eta_t, method)
    return tau.squeeze(0) if v.dim() == 0 else tau


def threshold_lastdim(a: torch.Tensor, eta: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Unchecked core of :func:`l1_threshold`: τ along the last dim of ``a >= 0`` (finite, non-empty last dim);
    ``eta``: a tensor broadcastable to ``a.shape[:-1]``, >= 0, on ``a``'s device and dtype."""
    if method == "auto":
        method = auto_method(a)
    if method == "pivot":
        return threshold_pivot(a, eta)
    return _threshold_sort(a, eta) if method == "sort" else _threshold_michelot(a, eta)


def _project_l1(x: torch.Tensor, eta, dim, method, out: torch.Tensor | None) -> torch.Tensor:
    check_tensor("x", x)
    if dim is None:
        tau = l1_threshold(x.reshape(-1).abs(), eta, method=method)
        t = tau.to(x.dtype)
    else:
        dim = dim % max(x.dim(), 1)
        tau = l1_threshold(x.abs(), eta, dim=dim, method=method)
        t = tau.to(x.dtype).unsqueeze(dim) if x.dim() else tau.to(x.dtype)
    # sign(x)·max(|x| − τ, 0) written so that τ = 0 returns x bitwise
    shrunk = (x.abs() - t).clamp_min_(0).copysign_(x)
    res = torch.where(t > 0, shrunk, x)
    if out is None:
        return res
    return out.copy_(res)


def project_l1(x: torch.Tensor, eta: float | torch.Tensor, *, dim: int | None = None, method: str = "auto"
               ) -> torch.Tensor:
    """Euclidean projection of ``x`` onto the ℓ1 ball of radius ``eta``; batched along ``dim``.

    Args:
        x: signed tensor, any shape, float dtype, CPU or CUDA.
        eta: radius >= 0 (a number; with ``dim``, also a tensor broadcastable to ``x`` without ``dim``).
        dim: ``None`` projects the whole tensor as one vector; an int projects every slice along ``dim``.
        method: see :func:`l1_threshold`.

    Returns:
        ``sign(x) · max(|x| − τ, 0)``, same shape/dtype/device; ``x``'s values unchanged (bitwise) inside the ball.

    Example:
        >>> project_l1(torch.tensor([3.0, -1.0]), 2.0)
        tensor([2., -0.])
    """
    return _project_l1(x, eta, dim, method, None)


def project_l1_(x: torch.Tensor, eta: float | torch.Tensor, *, dim: int | None = None, method: str = "auto"
                ) -> torch.Tensor:
    """In-place :func:`project_l1`: writes into ``x`` (also a strided view) and returns it."""
    return _project_l1(x, eta, dim, method, x)



AUTO_SORT_MAX = 4096  # CPU: up to this many entries in all, sort; above, pivot (measurements in auto_method)


def auto_method(a: torch.Tensor) -> str:
    """The method ``"auto"`` runs for ``a [..., n]``: ``"sort"`` on CUDA (no host sync), on CPU ``"sort"`` up to
    :data:`AUTO_SORT_MAX` entries in all and ``"pivot"`` above.

    Measured here (2 shared cores, 1 intra-op thread, fp64 uniform data, η from 1e-4 to 0.5 of the ℓ1 norm, ms):
    a vector of 1000: sort 0.03, Michelot 0.07–0.17, pivot 0.18–0.24 (numpy call overhead); of 8000: sort 0.45,
    Michelot 0.14–0.33, pivot 0.25; of 100000: sort 9.5, Michelot 1.3–2.7, pivot 0.6–0.9; 1000 vectors of 1000:
    sort 52–55, Michelot 27–42, pivot 7–15; 100 of 8000: sort 50–53, Michelot 19–35, pivot 3.6–8.1. The projection
    benchmark's rows at 1000×{1000…8000} are in ``benchmarks/results/projection_cpu.jsonl`` (README).
    """
    if a.is_cuda or a.numel() <= AUTO_SORT_MAX:
        return "sort"
    return "pivot"
