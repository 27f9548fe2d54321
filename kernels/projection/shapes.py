# The tree of norms of a multi-level projection (Perez & Barlaud, arXiv 2405.02086, §2).
#
# A tensor Y of any order is read as a tree: level 0 (the root) is indexed by the dims of blocks[0], level i by
# blocks[0..i], the leaves are the entries of Y. Level i's norm norms[i] is taken over blocks[i] (the children of a
# level-(i-1) node). norms[0] is always "l1": the root is projected onto the ℓ1 ball of radius η.
# Example: bi-level ℓ1,∞ of W[out, in] with column groups (the paper's feature selection) is
#     norms = ("l1", "linf"), blocks = ((1,), (0,)).
"""Validation and normalisation of the tree of norms shared by the references, the fast ops and the Ray tree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["NORM_ORDS", "ProjectionTree", "bilevel_tree", "check_radius", "make_tree", "norm_name", "normalize_dims"]

NORM_ORDS = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
_ALIASES = {"l1": "l1", "1": "l1", "l2": "l2", "2": "l2", "linf": "linf", "inf": "linf", "l_inf": "linf"}


def norm_name(q: object) -> str:
    """The canonical name (``"l1"``, ``"l2"``, ``"linf"``) of a norm given as a name or an order."""
    if isinstance(q, (int, float)) and not isinstance(q, bool):
        key = "inf" if q == math.inf else str(int(q)) if float(q).is_integer() else str(q)
    else:
        key = str(q).lower()
    if key not in _ALIASES:
        raise ValueError(f"norm must be one of 'l1', 'l2', 'linf' (or 1, 2, inf), got {q!r}")
    return _ALIASES[key]


def normalize_dims(dims: int | Sequence[int], ndim: int, name: str = "dims") -> tuple[int, ...]:
    """Turn ``dims`` (an int or a sequence, negative allowed) into a sorted tuple of distinct dims of an
    ``ndim``-dimensional tensor.

    Raises:
        ValueError: a dim out of range or repeated.
    """
    seq = (dims,) if isinstance(dims, int) else tuple(dims)
    out = []
    for d in seq:
        if not isinstance(d, int) or isinstance(d, bool):
            raise TypeError(f"{name} must hold ints, got {d!r}")
        if not -ndim <= d < ndim:
            raise ValueError(f"{name} entry {d} is out of range for a tensor with {ndim} dimension(s)")
        out.append(d % ndim if ndim else d)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat a dimension, got {seq}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class ProjectionTree:
    """A validated tree of norms for a tensor with ``ndim`` dimensions.

    Attributes:
        norms: one of ``"l1" | "l2" | "linf"`` per level, root first; ``norms[0] == "l1"``.
        blocks: the dims of each level, root first; together a partition of ``range(ndim)``. A block may be empty
            (then every node of that level has one child and its norm is ``|.|``).
        ndim: the tensor order.
        batch: dims outside the tree: every index of them is an independent projection with its own ball.
    """

    norms: tuple[str, ...]
    blocks: tuple[tuple[int, ...], ...]
    ndim: int
    batch: tuple[int, ...] = ()

    @property
    def depth(self) -> int:
        """Number of levels (2 for a bi-level projection)."""
        return len(self.norms)

    def level_of_dim(self, dim: int) -> int:
        """The level whose block holds ``dim``."""
        for i, b in enumerate(self.blocks):
            if dim in b:
                return i
        raise ValueError(f"dim {dim} is in no block of {self.blocks}")


def make_tree(
    ndim: int,
    norms: Sequence[object],
    blocks: Sequence[int | Sequence[int]] | None = None,
    batch_dims: int | Sequence[int] = (),
) -> ProjectionTree:
    """Validate a tree of norms.

    Args:
        ndim: the order of the tensor to project.
        norms: the norm of each level, root first (``"l1"``, ``"l2"``, ``"linf"``; ``1``, ``2``, ``math.inf``
            also accepted). The root must be ``"l1"``.
        blocks: the dims of each level, root first (ints or tuples); ``None`` means one dim per level in order
            over the dims outside ``batch_dims`` (then ``len(norms) == ndim - len(batch_dims)``).
        batch_dims: dims whose every index is a separate projection (blocks partition the other dims).

    Returns:
        A :class:`ProjectionTree`.

    Raises:
        ValueError: the root is not ℓ1, fewer than one level, or ``blocks`` is not a partition of the dims.

    Example:
        >>> make_tree(3, ("l1", "linf", "linf")).blocks
        ((0,), (1,), (2,))
    """
    names = tuple(norm_name(q) for q in norms)
    if len(names) < 1:
        raise ValueError("norms must name at least one level (the ℓ1 root)")
    if names[0] != "l1":
        raise ValueError(f"the root norm must be 'l1' (projection onto the ℓ1 ball), got {names[0]!r}")
    batch = normalize_dims(batch_dims, ndim, "batch_dims")
    tree_dims = [d for d in range(ndim) if d not in batch]
    if blocks is None:
        if len(names) != len(tree_dims):
            raise ValueError(f"without blocks, norms needs one entry per non-batch dimension ({len(tree_dims)}), "
                             f"got {len(names)}: pass blocks")
        blks = tuple((d,) for d in tree_dims)
    else:
        if len(blocks) != len(names):
            raise ValueError(f"blocks must have one entry per norm ({len(names)}), got {len(blocks)}")
        blks = tuple(normalize_dims(b, ndim, "blocks") for b in blocks)
        flat = [d for b in blks for d in b]
        if sorted(flat) != tree_dims:
            raise ValueError(f"blocks must partition the dims {tuple(tree_dims)} (each exactly once"
                             f"{', batch dims excluded' if batch else ''}), got {blks}")
    return ProjectionTree(names, blks, ndim, batch)


def bilevel_tree(ndim: int, inner: object = "linf", reduce_dims: int | Sequence[int] | None = None,
                 batch_dims: int | Sequence[int] = ()) -> ProjectionTree:
    """The two-level tree of a bi-level projection: groups are indexed by the dims outside ``reduce_dims``.

    Args:
        ndim: tensor order.
        inner: the norm inside a group (``"linf"``, ``"l1"``, ``"l2"``).
        reduce_dims: the dims inside a group. ``None``: ``(0,)`` for ``ndim >= 2`` (columns of ``W[out, in]``, the
            paper's feature groups) and ``()`` for a vector, where each entry is its own group so that the
            projection is exactly the ℓ1-ball projection. With ``batch_dims`` the same rule applies to the other dims.
        batch_dims: dims whose every index is an independent bi-level projection.
    """
    batch = normalize_dims(batch_dims, ndim, "batch_dims")
    rest = [d for d in range(ndim) if d not in batch]
    if reduce_dims is None:
        reduce_dims = (rest[0],) if len(rest) >= 2 else ()
    red = normalize_dims(reduce_dims, ndim, "reduce_dims")
    if set(red) & set(batch):
        raise ValueError(f"reduce_dims {red} and batch_dims {batch} must not share a dim")
    groups = tuple(d for d in rest if d not in red)
    return make_tree(ndim, ("l1", inner), (groups, red), batch)


def check_radius(eta: object) -> float:
    """The radius η as a float; ``ValueError`` if negative or NaN (the ball would be empty), ``TypeError`` if not a
    number. ``math.inf`` is allowed (nothing to do)."""
    if isinstance(eta, torch.Tensor):
        if eta.numel() != 1:
            raise TypeError(f"eta must be a number or a one-element tensor, got a tensor of shape {tuple(eta.shape)}")
        eta = eta.item()
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a real number, got {type(eta).__name__}")
    eta = float(eta)
    if math.isnan(eta) or eta < 0:
        raise ValueError(f"eta must be >= 0 (the ball of a negative radius is empty), got {eta}")
    return eta
