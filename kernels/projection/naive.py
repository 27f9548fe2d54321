# Float64 references of the projections of Perez & Barlaud (arXiv 2405.02086, multi-level) and Barlaud, Perez &
# Marmorat (arXiv 2407.16293, bi-level), and of the exact Euclidean ℓ1,∞ projection they compare against.
#
# Written to be obviously correct, not fast: the tree is walked recursively node by node (Python loops), each node
# projects the vector of its children's norms onto its own ball:
#     ℓ1 ball (radius r):  sign(c) · max(|c| − τ, 0),  τ = max(0, max_k (S_k − r)/k)  (S_k: sum of the k largest |c|)
#     ℓ2 ball:             c · min(1, r/‖c‖₂)
#     ℓ∞ ball:             sign(c) · min(|c|, r)
# The exact ℓ1,∞ projection X* = argmin ‖X − Y‖_F s.t. Σ_j max_i |x_ij| ≤ C has X*_ij = sign(y_ij) min(|y_ij|, μ_j)
# where every surviving group gives up the same ℓ1 mass θ: Σ_i (|y_ij| − μ_j)_+ = θ. For a fixed θ that makes μ_j
# the ℓ1-ball threshold of |y_j| at radius θ (0 when ‖y_j‖₁ ≤ θ), and Σ_j μ_j(θ) decreases in θ, so θ is found by
# bisection. Only tiny shapes: the loops visit every node.
"""Float64 references: ℓ1-ball projection, multi-level / bi-level projections, exact ℓ1,∞ projection, mixed norms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .shapes import ProjectionTree, bilevel_tree, check_radius, make_tree

__all__ = [
    "naive_bilevel_project",
    "naive_exact_l1inf_project",
    "naive_l1_threshold",
    "naive_mixed_norm",
    "naive_multilevel_project",
    "naive_project_l1",
]

_F64 = torch.float64


def _check_finite(x: torch.Tensor, name: str = "x") -> None:
    """``ValueError`` on NaN/Inf: Python's ``max``/``sorted`` would silently skip or misplace a NaN here."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite: NaN or Inf found")


def naive_l1_threshold(v: torch.Tensor, eta: float) -> float:
    """Threshold τ of the ℓ1-ball projection of the vector ``|v|`` at radius ``eta`` (sort formula; 0 inside the ball).

    Args:
        v: any-shape tensor, flattened (its absolute values are used).
        eta: radius >= 0.

    Returns:
        τ as a Python float, so that ``Σ max(|v| − τ, 0) = min(eta, ‖v‖₁)``.

    Example:
        >>> naive_l1_threshold(torch.tensor([3.0, 1.0]), 2.0)
        1.0
    """
    eta = check_radius(eta)
    _check_finite(v, "v")
    a = sorted((abs(float(t)) for t in v.reshape(-1).tolist()), reverse=True)
    best, s = 0.0, 0.0
    for k, ak in enumerate(a, start=1):
        s += ak
        best = max(best, (s - eta) / k)
    return best


def naive_project_l1(x: torch.Tensor, eta: float) -> torch.Tensor:
    """Euclidean projection of ``x`` (all entries as one vector) onto the ℓ1 ball of radius ``eta``, in float64.

    Returns:
        A float64 tensor of ``x``'s shape: ``sign(x) · max(|x| − τ, 0)``.
    """
    x64 = x.detach().to(_F64).cpu()
    tau = naive_l1_threshold(x64, eta)
    return x64.sign() * (x64.abs() - tau).clamp_min(0)


def _ball(c: torch.Tensor, r: float, norm: str) -> torch.Tensor:
    """Project the (signed) vector ``c`` onto the ``norm`` ball of radius ``r``."""
    if norm == "linf":
        return c.sign() * c.abs().clamp(max=r)
    if norm == "l2":
        n = math.sqrt(sum(float(t) ** 2 for t in c.tolist()))
        return c * (r / n) if n > r else c.clone()
    return naive_project_l1(c, r)


def _node_norm(y: torch.Tensor, level: int, norms: Sequence[str]) -> float:
    """Nested norm of the subtree ``y`` whose top is ``level`` (``y`` has one axis per remaining level)."""
    if level == len(norms) - 1:
        children = [abs(float(t)) for t in y.tolist()]
    else:
        children = [_node_norm(y[j], level + 1, norms) for j in range(y.shape[0])]
    q = norms[level]
    if q == "l1":
        return float(sum(children))
    if q == "l2":
        return math.sqrt(sum(c * c for c in children))
    return max(children, default=0.0)


def _project_node(y: torch.Tensor, r: float, level: int, norms: Sequence[str]) -> torch.Tensor:
    """Project the subtree ``y`` so that its nested norm is <= ``r``: its children's norms are projected onto
    the level's ball, then each child is projected with its new radius (leaves: the entries themselves)."""
    if level == len(norms) - 1:
        return _ball(y, r, norms[level])
    c = torch.tensor([_node_norm(y[j], level + 1, norms) for j in range(y.shape[0])], dtype=_F64)
    radii = _ball(c, r, norms[level]).tolist()
    return torch.stack([_project_node(y[j], radii[j], level + 1, norms) for j in range(y.shape[0])])


def _as_tree_tensor(x: torch.Tensor, tree: ProjectionTree) -> tuple[torch.Tensor, list[int]]:
    """Permute ``x`` to block order and reshape to one axis per level (empty blocks give a size-1 axis)."""
    perm = [d for b in tree.blocks for d in b]
    sizes = [math.prod(x.shape[d] for d in b) for b in tree.blocks]
    return x.detach().to(_F64).cpu().permute(perm).reshape(sizes), perm


def naive_multilevel_project(
    x: torch.Tensor, eta: float, norms: Sequence[object] = ("l1", "linf"), blocks: Sequence[object] | None = None
) -> torch.Tensor:
    """Multi-level projection (float64, recursive): the root's children norms go onto the ℓ1 ball of radius
    ``eta``, every lower node's children onto its own ``norms[level]`` ball of the radius it received.

    Args:
        x: tensor of any order (any float dtype; computed in float64 on CPU).
        eta: radius >= 0.
        norms, blocks: the tree, root first (see :func:`~pflow_dist.kernels.projection.shapes.make_tree`).

    Returns:
        float64 tensor of ``x``'s shape.

    Example:
        >>> naive_multilevel_project(torch.ones(2, 3), 1.0, ("l1", "linf")).sum().item()
        3.0
    """
    eta = check_radius(eta)
    _check_finite(x)
    tree = make_tree(x.dim(), norms, blocks)
    y, perm = _as_tree_tensor(x, tree)
    out = _project_node(y, eta, 0, tree.norms)
    shape_perm = [x.shape[d] for d in perm]
    return out.reshape(shape_perm).permute(torch.argsort(torch.tensor(perm)).tolist()).contiguous()


def naive_bilevel_project(
    x: torch.Tensor, eta: float, inner: str = "linf", reduce_dims: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Bi-level ℓ1,``inner`` projection (float64): group norms ``v`` over ``reduce_dims``, ``u`` = ℓ1 projection of
    ``v`` at radius ``eta``, then each group projected onto its ``inner`` ball of radius ``u_j``.

    Args:
        x: tensor of any order.
        eta: radius >= 0.
        inner: ``"linf"`` (clip), ``"l1"`` (soft-threshold) or ``"l2"`` (scale).
        reduce_dims: dims inside a group (default ``(0,)``; ``()`` for a vector).

    Returns:
        float64 tensor of ``x``'s shape.
    """
    tree = bilevel_tree(x.dim(), inner, reduce_dims)
    return naive_multilevel_project(x, eta, tree.norms, tree.blocks)


def naive_mixed_norm(x: torch.Tensor, norms: Sequence[object] = ("l1", "linf"), blocks: Sequence[object] | None = None
                     ) -> float:
    """The nested norm of ``x`` for a tree of norms (e.g. ``‖X‖_{1,∞} = Σ_j max_i |x_ij|`` for
    ``("l1", "linf"), ((1,), (0,))``), in float64. ``ValueError`` on NaN/Inf."""
    _check_finite(x)
    tree = make_tree(x.dim(), norms, blocks)
    y, _ = _as_tree_tensor(x, tree)
    return _node_norm(y, 0, tree.norms)


def naive_exact_l1inf_project(
    x: torch.Tensor, eta: float, reduce_dims: int | Sequence[int] | None = None, iters: int = 200
) -> torch.Tensor:
    """Exact Euclidean projection onto the ℓ1,∞ ball ``{Σ_groups max |x| <= eta}`` by bisection on the common
    ℓ1 mass θ every surviving group gives up (float64; see the file header).

    Args:
        x: tensor of any order; groups are indexed by the dims outside ``reduce_dims`` (default ``(0,)``).
        eta: radius >= 0.
        iters: bisection steps (200 reach the float64 resolution of θ).

    Returns:
        float64 tensor of ``x``'s shape.
    """
    eta = check_radius(eta)
    _check_finite(x)
    tree = bilevel_tree(x.dim(), "linf", reduce_dims)
    y, perm = _as_tree_tensor(x, tree)  # [G, n]
    groups = [y[j].abs() for j in range(y.shape[0])]
    total = sum(float(g.max()) if g.numel() else 0.0 for g in groups)
    if total <= eta:
        mu = [float(g.max()) if g.numel() else 0.0 for g in groups]
    elif eta == 0:
        mu = [0.0] * len(groups)
    else:
        def mu_of(theta: float) -> list[float]:
            return [naive_l1_threshold(g, theta) for g in groups]

        lo, hi = 0.0, max(float(g.sum()) for g in groups)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if sum(mu_of(mid)) > eta:
                lo = mid
            else:
                hi = mid
        mu = mu_of(hi)
    m = torch.tensor(mu, dtype=_F64).reshape(-1, 1)
    out = y.sign() * torch.minimum(y.abs(), m)
    shape_perm = [x.shape[d] for d in perm]
    return out.reshape(shape_perm).permute(torch.argsort(torch.tensor(perm)).tolist()).contiguous()
