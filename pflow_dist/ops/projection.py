# Multi-level projection with exponential parallel speedup (Perez & Barlaud, arXiv 2405.02086) and the linear-time
# bi-level ℓ1,∞ projection (Barlaud, Perez & Marmorat, arXiv 2407.16293), for torch tensors on CPU and GPU.
#
# Bi-level ℓ1,∞ of Y with groups y_j (DESIGN.md §7):  v_j = max_i |y_ij|;  u = P_{B1(η)}(v);  x_ij = clip(y_ij, ±u_j).
# It is not the Euclidean projection onto the ℓ1,∞ ball (that is exact_l1inf_project, the classical baseline) but it
# has the same norm, min(η, ‖Y‖_{1,∞}), costs O(nm) instead of O(nm log nm) and zeroes more groups. The multi-level
# form applies the same idea recursively over a tree of norms; phases in projection_tree.py, ℓ1 ball in
# projection_l1.py, exact ℓ1,∞ in projection_exact.py. Nothing here is differentiable: projections run on weights
# under no_grad (the projected tensor is not part of the graph).
"""Public projections: bi-level (ℓ1,∞ / ℓ1,1 / ℓ1,2), multi-level over any tree of norms, ℓ1 ball, exact ℓ1,∞."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..kernels.common.checks import check_tensor
from ..kernels.projection.shapes import ProjectionTree, bilevel_tree, check_radius, make_tree, norm_name, normalize_dims
from . import projection_tree as _tree
from .projection_exact import exact_l1inf_project
from .projection_fused import resolve_backend, view3
from .projection_l1 import l1_threshold, project_l1, project_l1_

__all__ = [
    "bilevel_project",
    "bilevel_project_",
    "exact_l1inf_project",
    "group_norm",
    "l1_threshold",
    "mixed_norm",
    "multilevel_project",
    "multilevel_project_",
    "project_l1",
    "project_l1_",
    "project_tree",
    "resolve_backend",
]


def _check_out(x: torch.Tensor, out: torch.Tensor | None) -> None:
    if out is None or out is x:
        return
    check_tensor("out", out, shape=tuple(x.shape), dtypes=(x.dtype,))
    if out.device != x.device:
        raise ValueError(f"out must be on x's device {x.device}, got {out.device}")


def project_tree(
    x: torch.Tensor,
    eta: float,
    tree: ProjectionTree,
    *,
    method: str = "auto",
    check_finite: bool = True,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-level projection of ``x`` for a validated tree (the engine behind the public functions).

    Args:
        x: float tensor (any order, any strides), CPU or CUDA.
        eta: radius >= 0.
        tree: a :class:`~pflow_dist.kernels.projection.shapes.ProjectionTree` for ``x.dim()``.
        method: ℓ1 threshold method (``"auto"``, ``"sort"``, ``"michelot"``, ``"pivot"``; see
            :func:`~pflow_dist.ops.projection_l1.auto_method`).
        check_finite: read the root sum on the host (one sync) to raise on NaN/Inf and to return early (bitwise
            ``x``) when ``x`` is already inside the ball. On CPU this is always done.
        out: write the result here (``x`` itself for in place).
        backend: ``"torch"``, ``"triton"`` (fused kernels, bi-level trees only) or ``"auto"`` (Triton for bi-level
            ℓ1,∞ on CUDA, torch otherwise: :func:`~pflow_dist.ops.projection_fused.resolve_backend`).

    Returns:
        The projection, ``x``'s shape/dtype/device (``out`` when given).

    Raises:
        ValueError: negative/NaN ``eta``, non-finite ``x``, a tree for another order, unknown backend.
    """
    check_tensor("x", x)
    if tree.ndim != x.dim():
        raise ValueError(f"the tree is for {tree.ndim}-dimensional tensors, x has shape {tuple(x.shape)}")
    eta = _batch_radius(eta, [x.shape[d] for d in tree.batch], x.device) if tree.batch else check_radius(eta)
    backend = resolve_backend(backend, tree, x.device,
                              viewable=out is not x or tree.depth != 2 or view3(x, tree.blocks[-1]) is not None)
    _check_out(x, out)
    if x.numel() == 0:
        return x.clone() if out is None else out
    if tree.depth == 1:  # a single ℓ1 level: the plain ℓ1-ball projection of all entries (of each batch index)
        return _single_level(x, eta, tree, method, check_finite, out)
    if backend == "triton":
        if tree.batch:
            raise ValueError("backend='triton' does not take batch_dims; use backend='torch'")
        from .projection_fused import fused_project_tree

        return fused_project_tree(x, eta, tree, method=method, check_finite=check_finite, out=out)
    A = _tree.upward(x, tree)
    if check_finite or x.device.type == "cpu":
        if _inside(A[0], eta, tree):  # inside the ball(s): nothing to do, and nothing rounded
            return x.clone() if out is None else (out if out is x else out.copy_(x))
    tau = _tree.root_tau(A[0], eta, tree, method)
    R = _tree.root_radii(A[0], tau)
    for i in range(1, tree.depth):
        leaf = i == tree.depth - 1
        R = _tree.level_project(A[i], R, A[i - 1], tree.norms[i], tree.blocks[i], leaf=leaf, method=method,
                                out=out if leaf else None)
    return R


def _batch_radius(eta: float | torch.Tensor, bshape: list[int], device: torch.device) -> torch.Tensor:
    """η of a batched projection: a number or a tensor broadcastable to the batch shape; float64 on ``device``."""
    if isinstance(eta, torch.Tensor) and eta.numel() != 1:
        try:
            e = torch.broadcast_to(eta.detach().to(device=device, dtype=torch.float64), bshape)
        except RuntimeError as err:
            raise ValueError(f"eta of shape {tuple(eta.shape)} does not broadcast to the batch shape {bshape}") from err
        if bool(torch.isnan(e).any()) or bool((e < 0).any()):
            raise ValueError("eta must be >= 0 everywhere (the ball of a negative radius is empty)")
        return e
    return torch.full(bshape, check_radius(eta), dtype=torch.float64, device=device)


def _inside(a0: torch.Tensor, eta: float | torch.Tensor, tree: ProjectionTree) -> bool:
    """Whether every root is inside its ball (one host sync); ``ValueError`` on NaN/Inf."""
    if not tree.batch:
        return _finite_total(a0) <= eta
    totals = a0.sum([d for d in range(a0.dim()) if d not in tree.batch], dtype=torch.float64)
    total, inside = torch.stack([totals.sum(), (totals <= eta).all().to(torch.float64)]).tolist()
    _finite_total(torch.tensor(total))
    return bool(inside)


def _single_level(x, eta, tree: ProjectionTree, method: str, check_finite: bool, out) -> torch.Tensor:
    if check_finite or x.device.type == "cpu":
        _finite_total(x.abs())
    if not tree.batch:
        res = project_l1(x, eta, method=method)
    else:  # batch dims first, the rest flattened: one ℓ1 ball per batch index
        batch = list(tree.batch)
        perm = batch + [d for d in range(x.dim()) if d not in tree.batch]
        flat = x.permute(perm).reshape(*[x.shape[d] for d in batch], -1)
        res = project_l1(flat, eta, dim=-1, method=method).reshape([x.shape[d] for d in perm])
        res = res.permute(torch.argsort(torch.tensor(perm)).tolist())
    return res.contiguous() if out is None else out.copy_(res)


def _finite_total(a0: torch.Tensor) -> float:
    """Σ of the (nonnegative) root values in float64 on the host; ``ValueError`` on NaN/Inf."""
    total = a0.sum(dtype=torch.float64).item()
    if not math.isfinite(total):
        raise ValueError("x must be finite: NaN or Inf found (they would poison the threshold and every group); "
                         "check the weights before projecting")
    return total


def bilevel_project(
    x: torch.Tensor,
    eta: float,
    inner: str = "linf",
    reduce_dims: int | Sequence[int] | None = None,
    *,
    batch_dims: int | Sequence[int] = (),
    method: str = "auto",
    check_finite: bool = True,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bi-level projection BP^{1,inner}_η: group norms, ℓ1 projection of the norms, then each group onto its own
    ``inner`` ball (clip for ℓ∞, soft-threshold for ℓ1, scale for ℓ2).

    Args:
        x: float tensor, any order and strides, CPU or CUDA.
        eta: radius >= 0 of the ℓ1 ball of group norms (``math.inf``: no-op); with ``batch_dims`` also a tensor
            broadcastable to the batch shape (one radius per batch index).
        inner: ``"linf"`` (default, the paper's BP^{1,∞}), ``"l1"`` or ``"l2"``.
        reduce_dims: the dims inside a group. Default ``(0,)`` (for ``W[out, in]`` of ``nn.Linear``: a group is a
            column = an input feature, the paper's feature selection); ``(1,)`` groups rows (neurons); ``()`` (the
            default for a vector) makes every entry a group, i.e. the plain ℓ1-ball projection.
        batch_dims: dims whose every index is an independent projection (e.g. ``0`` for a stack of matrices
            ``[B, out, in]``); the default ``reduce_dims`` is then the first non-batch dim.
        method: ℓ1 threshold method for the root and ℓ1 groups: ``"sort"``, ``"michelot"``, ``"pivot"`` (linear
            time on CPU) or ``"auto"`` (sort on CUDA and for small inputs, pivot above 4096 entries on CPU).
        check_finite: raise on NaN/Inf and return early when inside the ball (one host sync; always on CPU).
        out: preallocated result (saves the allocation; ``x`` itself is the in-place variant).
        backend: ``"torch"``, ``"triton"`` (fused Triton kernels) or ``"auto"``: Triton on CUDA for ℓ∞ inner groups
            over consecutive dims without batch dims (measured faster on H100), torch otherwise.

    Returns:
        ``X`` with ``‖X‖_{1,inner} = min(eta, ‖x‖_{1,inner})``, ``|X| <= |x|`` with the same signs; ``x`` unchanged
        (bitwise) when already inside the ball; zeros for ``eta = 0``.

    Example:
        >>> W = torch.tensor([[3.0, -1.0], [1.0, 0.5]])
        >>> bilevel_project(W, 2.0)  # column maxima (3, 1) -> (2, 0)
        tensor([[ 2., -0.],
                [ 1.,  0.]])
    """
    return project_tree(x, eta, bilevel_tree(x.dim(), inner, reduce_dims, batch_dims), method=method,
                        check_finite=check_finite, out=out, backend=backend)


def bilevel_project_(x: torch.Tensor, eta: float, inner: str = "linf",
                     reduce_dims: int | Sequence[int] | None = None, **kwargs) -> torch.Tensor:
    """In-place :func:`bilevel_project` (``x`` may be a strided view: the original storage is written)."""
    return bilevel_project(x, eta, inner, reduce_dims, out=x, **kwargs)


def multilevel_project(
    x: torch.Tensor,
    eta: float,
    norms: Sequence[object] = ("l1", "linf", "linf"),
    blocks: Sequence[int | Sequence[int]] | None = None,
    *,
    batch_dims: int | Sequence[int] = (),
    method: str = "auto",
    check_finite: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-level projection over a tree of norms: the upward pass takes ``norms[i]`` over ``blocks[i]`` from the
    leaves to the root, the root goes onto the ℓ1 ball of radius ``eta``, the downward pass projects every node's
    children onto its own ball.

    Args:
        x: float tensor of order ``d``, CPU or CUDA.
        eta: radius >= 0.
        norms: per level, root first; ``norms[0]`` must be ``"l1"``; others ``"l1"``, ``"l2"``, ``"linf"``.
        blocks: the dims of each level, root first, a partition of ``range(d)`` (ints or tuples). ``None``: one dim per
            level (``len(norms) == d``). ``bilevel_project(x, eta, inner, reduce_dims)`` is
            ``multilevel_project(x, eta, ("l1", inner), (other dims, reduce_dims))``.
        batch_dims, method, check_finite, out: as in :func:`bilevel_project` (``blocks`` then partition the
            non-batch dims).

    Returns:
        ``X`` with nested norm ``min(eta, nested norm of x)``, ``|X| <= |x|``, same signs.

    Example:
        >>> Y = torch.rand(10, 20, 30)
        >>> X = multilevel_project(Y, 1.0, ("l1", "linf", "linf"))  # == bi-level on Y.reshape(10, 600)
        >>> round(float(mixed_norm(X, ("l1", "linf", "linf"))), 6)
        1.0
    """
    return project_tree(x, eta, make_tree(x.dim(), norms, blocks, batch_dims), method=method,
                        check_finite=check_finite, out=out)


def multilevel_project_(x: torch.Tensor, eta: float, norms: Sequence[object] = ("l1", "linf", "linf"),
                        blocks: Sequence[int | Sequence[int]] | None = None, **kwargs) -> torch.Tensor:
    """In-place :func:`multilevel_project`."""
    return multilevel_project(x, eta, norms, blocks, out=x, **kwargs)


def mixed_norm(x: torch.Tensor, norms: Sequence[object] = ("l1", "linf"),
               blocks: Sequence[int | Sequence[int]] | None = None) -> torch.Tensor:
    """The nested norm of ``x`` for a tree of norms, as a float64 0-d tensor (e.g. ``‖W‖_{1,∞} = Σ_j max_i |w_ij|``
    is ``mixed_norm(W, ("l1", "linf"), ((1,), (0,)))``). ``ValueError`` on NaN/Inf (one host sync).

    Example:
        >>> float(mixed_norm(torch.tensor([[3.0, -1.0], [1.0, 0.5]]), ("l1", "linf"), ((1,), (0,))))
        4.0
    """
    check_tensor("x", x)
    tree = make_tree(x.dim(), norms, blocks)
    A = _tree.upward(x.to(torch.float64), tree)
    a0 = A[0] if tree.depth > 1 else x.to(torch.float64)
    total = a0.abs().sum()
    _finite_total(total)  # a NaN/Inf anywhere reaches the total (max and sum propagate it)
    return total


def group_norm(x: torch.Tensor, norm: str = "linf", reduce_dims: int | Sequence[int] = (0,), *,
               keepdim: bool = False) -> torch.Tensor:
    """Norm of every group (the dims outside ``reduce_dims`` index the groups).

    Args:
        x: float tensor.
        norm: ``"linf"`` (max |x|, exact in any dtype), ``"l1"`` or ``"l2"`` (accumulated in float32, float64 for
            float64 input).
        reduce_dims: dims inside a group.
        keepdim: keep the reduced dims with size 1.

    Returns:
        The group norms. Example: ``group_norm(W, "linf", 0)`` gives each column's max |w|.
    """
    check_tensor("x", x)
    dims = normalize_dims(reduce_dims, x.dim(), "reduce_dims")
    v = _tree.group_norm(x, norm_name(norm), dims)
    return v if keepdim or not dims else v.squeeze(dims)
