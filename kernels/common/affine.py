# The associative combine of affine maps, written once.
#
# Every recurrence in pflow_dist is a chain of affine maps x ↦ A x + b: the flow of a delta-rule chunk
# (S_end = M S_start + D, A = M is K×K and b = D is K×V), a dense linear scan (A n×n, b n) and a diagonal scan
# (A a vector acting elementwise). Chunking, the Triton scans and the cross-device combine all compose such maps
# with the same operator:
#
#     "first (A1, b1), then (A2, b2)"  =  (A2 A1,  A2 b1 + b2)
#
# which is associative (Blelloch 1993, §1.4), so prefixes can be taken sequentially or by a tree.
"""Composition of affine maps ``x ↦ A x + b`` (dense or diagonal), the associative operator of every scan."""

from __future__ import annotations

import torch

__all__ = ["AffineMap", "apply_map", "compose", "identity_map", "prefix_compose"]

AffineMap = tuple[torch.Tensor, torch.Tensor]


def _mul(A: torch.Tensor, x: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """``A x`` for a matrix ``A [..., n, n]`` or a diagonal ``A [..., n]``; ``x`` is ``[..., n]`` or ``[..., n, m]``."""
    if not diagonal:
        return (A @ x.unsqueeze(-1)).squeeze(-1) if x.dim() == A.dim() - 1 else A @ x
    return A * x if A.dim() == x.dim() else A.unsqueeze(-1) * x


def compose(first: AffineMap, second: AffineMap, diagonal: bool = False) -> AffineMap:
    """The map "apply ``first``, then ``second``": ``(A2 A1, A2 b1 + b2)``.

    Args:
        first: ``(A1, b1)``. Dense: ``A1 [..., n, n]``, ``b1 [..., n]`` or ``[..., n, m]``. Diagonal: ``A1 [..., n]``,
            ``b1 [..., n]`` or ``[..., n, m]``.
        second: ``(A2, b2)`` of the same kind and broadcastable shapes.
        diagonal: whether ``A`` is stored as its diagonal.

    Returns:
        ``(A, b)`` with ``A = A2 A1`` and ``b = A2 b1 + b2``.
    """
    A1, b1 = first
    A2, b2 = second
    return _mul(A2, A1, diagonal), _mul(A2, b1, diagonal) + b2


def apply_map(m: AffineMap, x: torch.Tensor, diagonal: bool = False) -> torch.Tensor:
    """``A x + b`` for ``m = (A, b)``."""
    A, b = m
    return _mul(A, x, diagonal) + b


def identity_map(like: AffineMap, diagonal: bool = False) -> AffineMap:
    """The neutral element ``(I, 0)`` with the shapes, dtype and device of ``like``."""
    A, b = like
    if diagonal:
        return torch.ones_like(A), torch.zeros_like(b)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A).clone()
    return eye, torch.zeros_like(b)


def prefix_compose(maps: list[AffineMap], diagonal: bool = False, exclusive: bool = True) -> list[AffineMap]:
    """Prefix compositions of a list of maps, in order (a sequential scan; len(maps) is small, e.g. chunks or ranks).

    Args:
        maps: ``[m_0, m_1, ..., m_{P-1}]``.
        exclusive: if True, entry p is ``m_{p-1} ∘ ... ∘ m_0`` (entry 0 is the identity); otherwise it
            includes ``m_p``.

    Returns:
        A list of ``len(maps)`` maps.
    """
    if not maps:
        raise ValueError("prefix_compose needs at least one map, got an empty list")
    out: list[AffineMap] = []
    acc = identity_map(maps[0], diagonal)
    for m in maps:
        if exclusive:
            out.append(acc)
        acc = compose(acc, m, diagonal)
        if not exclusive:
            out.append(acc)
    return out
