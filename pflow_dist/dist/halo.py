# The halo exchange of sequence parallelism (DESIGN.md §6, §8): a rank holding the contiguous tokens [a_p, b_p) of a
# sequence needs the `width` tokens before its shard, [a_p − width, a_p), for any operator with a causal window: the
# short causal convolution in front of q/k/v (window w → width w − 1) and sliding-window attention (window W → width
# W − 1). Those tokens live on the previous rank, or on several previous ranks when shards are shorter than the width
# (T = 5 on 3 ranks with a conv of 4: rank 2 needs tokens 1..3 from ranks 0 and 1). Point-to-point, as the short-conv
# halo of fla's context parallelism: every rank sends each later rank the part of its shard in that rank's halo (one
# batch_isend_irecv). The backward is the reverse pattern: the gradient of every halo piece goes back to the rank that
# owns those tokens and is added to the gradient of its shard (a token read by a later rank's window has two readers).
#
# Communication only: what a window does with its halo (convolve, attend) is the caller's math. `HaloPlan` says who
# sends what to whom (identical on every rank, from the all-gathered shard lengths); `gather_halo` and
# `scatter_halo_grad` are the forward and backward steps (plain functions, so an op that exchanges more than the halo,
# e.g. sp_attention with its global tokens, can run them inside its own autograd Function, in a fixed order);
# `halo_exchange` is the differentiable exchange on its own, padded with zeros before position 0.
"""Differentiable halo exchange along time: each rank receives the ``width`` tokens before its contiguous shard."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm import group_rank_size

__all__ = ["HaloPlan", "gather_halo", "halo_exchange", "scatter_halo_grad", "shard_bounds_of"]


def shard_bounds_of(length: int, group: ProcessGroup | None, device: torch.device | None = None
                    ) -> tuple[tuple[int, int], ...]:
    """``((a_0, b_0), ...)``: every rank's contiguous token range, from one all-gather of the local lengths.

    Args:
        length: this rank's number of tokens (``T_p``).
        group: the sequence-parallel group (ranks in sequence order).
        device: where the tiny collective runs (the tensors' device under NCCL; CPU otherwise).
    """
    _, world = group_rank_size(group)
    dev = device if device is not None and dist.get_backend(group) == "nccl" else torch.device("cpu")
    lengths = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([length], dtype=torch.int64, device=dev), group=group)
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + int(n.item())))
        start += int(n.item())
    return tuple(bounds)


@dataclass(frozen=True)
class HaloPlan:
    """Who sends which tokens to whom; identical on every rank.

    Attributes:
        group: the sequence-parallel group.
        rank: this process's rank in ``group``.
        bounds: ``[a_p, b_p)`` of every rank (contiguous, in rank order).
        width: tokens before each shard that its rank needs (``window − 1``).
    """

    group: ProcessGroup | None
    rank: int
    bounds: tuple[tuple[int, int], ...]
    width: int

    def __post_init__(self) -> None:
        if self.width < 0:
            raise ValueError(f"halo width must be >= 0, got {self.width}")

    def start(self, p: int) -> int:
        """First position of rank ``p``'s halo (the halo is ``[start(p), a_p)``, clipped at the sequence start)."""
        return max(0, self.bounds[p][0] - self.width)

    @property
    def length(self) -> int:
        """Tokens this rank receives: ``min(width, a_p)``."""
        return self.bounds[self.rank][0] - self.start(self.rank)

    def sends(self) -> list[tuple[int, int, int]]:
        """``(dst, start, end)``: the tokens of this shard that rank ``dst`` needs as halo."""
        a, b = self.bounds[self.rank]
        return [(p, max(a, self.start(p)), b) for p in range(self.rank + 1, len(self.bounds))
                if self.start(p) < b and a < b]

    def recvs(self) -> list[tuple[int, int, int]]:
        """``(src, start, end)``: the halo pieces this rank receives, in position order."""
        e = self.start(self.rank)
        return [(j, max(a, e), b) for j, (a, b) in enumerate(self.bounds[: self.rank]) if b > max(a, e)]

    def peer(self, r: int) -> int:
        """The global rank of group rank ``r`` (point-to-point ops address global ranks)."""
        return r if self.group is None else dist.get_global_rank(self.group, r)


def _p2p(plan: HaloPlan, send: list[tuple[int, torch.Tensor]], recv: list[tuple[int, torch.Tensor]]) -> None:
    ops = [dist.P2POp(dist.isend, t.contiguous(), plan.peer(r), plan.group) for r, t in send]
    ops += [dist.P2POp(dist.irecv, t, plan.peer(r), plan.group) for r, t in recv]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def gather_halo(x: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """Forward step: send the pieces of ``x [B, T_p, ...]`` that later ranks need, receive this rank's halo.

    Returns:
        ``[B, plan.length, ...]``: the tokens ``[start(rank), a_rank)`` (empty on rank 0). Not differentiable.
    """
    a = plan.bounds[plan.rank][0]
    B, rest = x.shape[0], x.shape[2:]
    recvs = [(j, x.new_empty(B, e - s, *rest)) for j, s, e in plan.recvs()]
    _p2p(plan, [(p, x[:, s - a:e - a]) for p, s, e in plan.sends()], recvs)
    return torch.cat([t for _, t in recvs] + [x.new_empty(B, 0, *rest)], dim=1)


def scatter_halo_grad(dhalo: torch.Tensor, plan: HaloPlan, dx: torch.Tensor) -> torch.Tensor:
    """Backward step: send the gradient of this rank's halo ``dhalo [B, plan.length, ...]`` back to its owners and
    add the gradients that later ranks return for this shard's tokens into ``dx [B, T_p, ...]`` (in place).

    Returns:
        ``dx``.
    """
    a = plan.bounds[plan.rank][0]
    B, rest = dx.shape[0], dx.shape[2:]
    sends, offset = [], 0
    for j, s, e in plan.recvs():
        sends.append((j, dhalo[:, offset:offset + e - s]))
        offset += e - s
    back = [(p, s, e, dx.new_empty(B, e - s, *rest)) for p, s, e in plan.sends()]
    _p2p(plan, sends, [(p, t) for p, _, _, t in back])
    for _, s, e, t in back:
        dx[:, s - a:e - a] += t
    return dx


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
        ctx.plan = plan
        ctx.set_materialize_grads(True)  # every rank runs the backward exchange, with zeros if it has no gradient
        halo = gather_halo(x, plan)
        pad = plan.width - plan.length  # positions before the sequence start
        if pad:
            halo = torch.cat([halo.new_zeros(halo.shape[0], pad, *halo.shape[2:]), halo], dim=1)
        ctx.x_shape = x.shape
        return halo

    @staticmethod
    def backward(ctx, dhalo: torch.Tensor):
        plan = ctx.plan
        dx = dhalo.new_zeros(ctx.x_shape)
        scatter_halo_grad(dhalo[:, plan.width - plan.length:].contiguous(), plan, dx)
        return dx, None


def halo_exchange(x: torch.Tensor, width: int, group: ProcessGroup | None, *,
                  bounds: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
    """The ``width`` tokens of the whole sequence just before this rank's shard, differentiably.

    Every rank of ``group`` must call it (and backpropagate through it if any rank does); the gradient of a halo token
    is returned to the rank that holds it.

    Args:
        x: this rank's contiguous shard ``[B, T_p, ...]`` (time on dim 1; shards in rank order, any lengths ≥ 1, e.g.
            :func:`~pflow_dist.dist.sharding.shard_sequence`); the other dims must agree across ranks.
        width: ``≥ 0`` tokens (a causal window of ``w`` needs ``w − 1``); may exceed a shard's length (the halo then
            spans several previous ranks).
        group: the sequence-parallel process group (``None`` = the default group).
        bounds: every rank's ``(start, end)`` when already known (skips one all-gather of the shard lengths).

    Returns:
        ``[B, width, ...]``: positions ``a_p − width .. a_p − 1``; positions before the sequence start are zeros (what a
        causal convolution pads with), so rank 0 gets all zeros.

    Example (on each of P ranks, after ``dist.init_process_group``)::

        x_p = shard_sequence(x, group)                       # [B, T_p, D]
        cache = halo_exchange(x_p, conv.kernel_size - 1, group)
        y_p = conv(x_p, cache=cache)                         # = the rows of conv(x) that this rank holds
    """
    if x.dim() < 2:
        raise ValueError(f"x must be [B, T_p, ...], got shape {tuple(x.shape)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be an int >= 0, got {width!r}")
    rank, world = group_rank_size(group)
    if bounds is None:
        bounds = shard_bounds_of(x.shape[1], group, x.device)
    if len(bounds) != world or bounds[rank][1] - bounds[rank][0] != x.shape[1]:
        raise ValueError(f"bounds {bounds} do not match this rank's shard (rank {rank} of {world}, "
                         f"T_p={x.shape[1]})")
    return _HaloExchange.apply(x, HaloPlan(group, rank, tuple(bounds), width))
