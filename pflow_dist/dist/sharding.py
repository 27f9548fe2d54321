"""Sharding a ``[B, T, ...]`` batch along time over a sequence-parallel group, and the inverse gather.

Contiguous shards (what recurrences need: rank p holds tokens ``[start_p, end_p)``) follow ``torch.tensor_split``:
with ``T = q·P + r`` the first ``r`` ranks hold ``q + 1`` tokens, the others ``q``, so any T ≥ P works. Zigzag shards
(for causal attention, where late tokens cost more) cut T into 2P equal pieces and give rank p pieces p and 2P−1−p.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm import group_rank_size

__all__ = ["LAYOUTS", "gather_sequence", "shard_bounds", "shard_sequence", "zigzag_indices"]

LAYOUTS = ("contiguous", "zigzag")


def shard_bounds(T: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the contiguous shard of every rank.

    Raises:
        ValueError: ``T < world_size`` (a rank would hold no token) or non-positive sizes.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if T < world_size:
        raise ValueError(f"cannot shard T={T} tokens over {world_size} ranks: every rank needs at least one token")
    q, r = divmod(T, world_size)
    bounds, start = [], 0
    for p in range(world_size):
        end = start + q + (1 if p < r else 0)
        bounds.append((start, end))
        start = end
    return bounds


def zigzag_indices(T: int, world_size: int, rank: int) -> torch.Tensor:
    """Token indices held by ``rank`` in the zigzag layout (pieces ``rank`` and ``2P−1−rank`` of 2P).

    Raises:
        ValueError: ``T`` is not a multiple of ``2·world_size``.
    """
    if T % (2 * world_size):
        raise ValueError(f"zigzag sharding needs T divisible by 2*world_size={2 * world_size}, got T={T}")
    n = T // (2 * world_size)
    first = torch.arange(rank * n, (rank + 1) * n)
    second = torch.arange((2 * world_size - 1 - rank) * n, (2 * world_size - rank) * n)
    return torch.cat([first, second])


def shard_sequence(x: torch.Tensor, group: ProcessGroup | None = None, dim: int = 1,
                   layout: str = "contiguous") -> torch.Tensor:
    """This rank's shard of a full-length tensor (every rank holds ``x``; nothing is communicated).

    Args:
        x: ``[B, T, ...]`` (time on ``dim``).
        group: the sequence-parallel group.
        layout: ``"contiguous"`` or ``"zigzag"``.

    Returns:
        The local shard, a contiguous copy.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rank, world = group_rank_size(group)
    T = x.shape[dim]
    if layout == "zigzag":
        return x.index_select(dim, zigzag_indices(T, world, rank).to(x.device)).contiguous()
    start, end = shard_bounds(T, world)[rank]
    return x.narrow(dim, start, end - start).contiguous()


def gather_sequence(x_local: torch.Tensor, group: ProcessGroup | None = None, dim: int = 1,
                    layout: str = "contiguous") -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: all ranks get the full-length tensor (not differentiable).

    Shards may have different lengths (contiguous layout with T not divisible by P).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _, world = group_rank_size(group)
    lengths = [torch.zeros(1, dtype=torch.int64, device=x_local.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([x_local.shape[dim]], device=x_local.device), group=group)
    sizes = [int(n.item()) for n in lengths]
    pad_to = max(sizes)
    xt = x_local.movedim(dim, 0).contiguous()
    padded = xt.new_zeros((pad_to, *xt.shape[1:]))
    padded[: xt.shape[0]] = xt
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    full = torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)
    if layout == "zigzag":
        T = full.shape[0]
        order = torch.cat([zigzag_indices(T, world, r) for r in range(world)]).to(full.device)
        out = torch.empty_like(full)
        out[order] = full
        full = out
    return full.movedim(0, dim).contiguous()
