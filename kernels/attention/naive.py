# Float64 references of causal sliding-window + global-token sparse attention (DESIGN.md §8), dense masked softmax.
#
# Pattern: Longformer (Beltagy et al. 2020, arXiv 2004.05150) local window + symmetric global attention, BigBird
# (Zaheer et al. 2020, arXiv 2007.14062) ITC form, made causal as in their autoregressive variants and as in
# attention sinks (Xiao et al. 2023, arXiv 2309.17453, the n_global = first-g case). With W the window and G the set
# of global positions, query t may read key s iff
#
#     s ≤ t  and  ( t − s < W  or  s ∈ G  or  t ∈ G ).
#
# Causality always wins: a global key j is read by every query t ≥ j ("attended by everything" that comes after it),
# and a global query t reads every key s ≤ t ("attends to everything" before it, a full causal row). Nothing ever
# reads the future. With G = {0..g−1} the rows of the global tokens are full anyway (they only have g keys), so the
# two Longformer directions reduce to the sink pattern. T < W is allowed: then every row is a full causal row.
#
# The second function is the reference of the building block the fast paths are made of (ops/sparse_attention.py):
# queries at arbitrary positions over a contiguous range of keys with a window, plus separately passed global keys
# that count only where they are outside the window (t − j ≥ W), returning the log-sum-exp too. It is what a rank
# computes under sequence parallelism, where the keys are a halo + the local shard.
"""Float64 references: the sparse-attention mask, the full op, and the positioned window-attention block."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .shapes import check_attention_inputs, check_scale, check_window, normalize_global_idx

__all__ = ["naive_sparse_attention", "naive_window_attention", "sparse_attention_mask"]

_F64 = torch.float64


def sparse_attention_mask(
    T: int,
    window: int,
    global_idx: torch.Tensor | Sequence[int] | None = None,
    *,
    n_global: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The boolean ``[T, T]`` mask ``allowed[t, s]`` of causal sliding-window + global-token attention.

    ``allowed[t, s] = s ≤ t and (t − s < window or s ∈ G or t ∈ G)`` (see the file header for the semantics).

    Example::

        >>> sparse_attention_mask(5, 2, n_global=1).int()
        tensor([[1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 0, 1, 1, 0],
                [1, 0, 0, 1, 1]], dtype=torch.int32)
    """
    window = check_window(window)
    g = normalize_global_idx(global_idx, n_global, T, device)
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(T, device=device)[None, :]
    is_g = torch.zeros(T, dtype=torch.bool, device=device)
    is_g[g] = True
    return (s <= t) & ((t - s < window) | is_g[None, :] | is_g[:, None])


def _attend(q, k, v, allowed, scale, rep):
    """Masked softmax attention in float64: ``q [B,Tq,H,D]``, ``k [B,Tk,Hkv,D]``, ``allowed [Tq, Tk]``.
    Returns ``(o [B,Tq,H,Dv], lse [B,Tq,H])``; rows with no allowed key give ``o = 0``, ``lse = −inf``."""
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.to(_F64), k.to(_F64)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # −inf for empty rows
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    o = torch.einsum("bhts,bshd->bthd", p, v.to(_F64))
    return o, lse.transpose(1, 2)


def naive_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    global_idx: torch.Tensor | Sequence[int] | None = None,
    *,
    n_global: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal sliding-window + global-token attention as one dense masked softmax in float64 (the oracle).

    Args:
        q: queries ``[B, T, H, D]``.
        k: keys ``[B, T, Hkv, D]`` (``H % Hkv == 0``; GQA when ``Hkv < H``).
        v: values ``[B, T, Hkv, Dv]``.
        window: ``W ≥ 1``: query ``t`` reads keys ``t − W + 1 .. t`` (``W > T`` is allowed: full causal).
        global_idx: global-token positions (1-D ints in ``[0, T)``, no duplicates) or ``None``.
        n_global: or the first ``n_global`` positions as global tokens.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``o [B, T, H, Dv]`` in ``q.dtype`` (computed in float64). Differentiable by autograd.

    Example::

        >>> q, k, v = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 1, 4), torch.randn(1, 6, 1, 3)
        >>> naive_sparse_attention(q, k, v, window=2, global_idx=[0, 3]).shape
        torch.Size([1, 6, 2, 3])
    """
    d = check_attention_inputs(q, k, v)
    scale = check_scale(scale, d.D)
    allowed = sparse_attention_mask(d.T, window, global_idx, n_global=n_global, device=q.device)
    o, _ = _attend(q, k, v, allowed, scale, d.rep)
    return o.to(q.dtype)


def naive_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_start: int,
    window: int,
    kg: torch.Tensor | None = None,
    vg: torch.Tensor | None = None,
    g_pos: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the positioned block: queries at ``q_pos`` over keys at ``k_start + j`` and global keys.

    Query at position ``t`` reads key ``j`` of ``k`` (position ``s = k_start + j``) iff ``0 ≤ t − s < window`` and
    global key ``i`` (position ``g_pos[i]``) iff ``0 ≤ t − g_pos[i]`` and ``t − g_pos[i] ≥ window``.

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``.
        q_pos: ``[Tq]`` int positions of the queries.
        k_start: position of ``k[:, 0]``.
        window: ``W ≥ 1``.
        kg, vg: ``[B, G, Hkv, D]``, ``[B, G, Hkv, Dv]`` global keys/values, or ``None``.
        g_pos: ``[G]`` their positions.
        scale: default ``D ** -0.5``.

    Returns:
        ``(o [B, Tq, H, Dv] float64, lse [B, Tq, H] float64)``; a row with no readable key has ``o = 0`` and
        ``lse = −inf``.
    """
    d = check_attention_inputs(q, k, v, same_length=False)
    scale = check_scale(scale, d.D)
    t = q_pos.to(q.device)[:, None]
    s = k_start + torch.arange(k.shape[1], device=q.device)[None, :]
    allowed = (t - s >= 0) & (t - s < window)
    if kg is not None:
        gp = g_pos.to(q.device)[None, :]
        allowed = torch.cat([allowed, (t - gp >= 0) & (t - gp >= window)], dim=1)
        k, v = torch.cat([k, kg], dim=1), torch.cat([v, vg], dim=1)
    return _attend(q, k, v, allowed, scale, d.rep)
