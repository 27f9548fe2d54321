"""Differentiable collectives used by the sequence-parallel combine (communication only; the math is elsewhere).

Every helper takes an explicit ``group`` (no global process-group state). Backward rules:
- ``all_gather_stack``: rank r's output is ``stack(x_0, ..., x_{P-1})``; rank j's input ``x_j`` is read by every rank,
  so ``∂L/∂x_j = Σ_r ∂L_r/∂(slot j on rank r)``: all-reduce the stacked gradients and keep slot j. (An all-reduce of
  P small maps instead of a reduce-scatter, because gloo has no reduce-scatter; the maps' size does not grow with T.)
- ``replicated``: identity forward for an input that every rank holds the same copy of (e.g. the initial state); its
  gradient is the sum of the ranks' partial gradients, so every rank receives the full gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["all_gather_stack", "group_rank_size", "replicated"]


def group_rank_size(group: ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process inside ``group`` (the default group when ``None``).

    Raises:
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence parallelism needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group), none is initialised")
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        rank, world = group_rank_size(group)
        ctx.rank = rank
        x = x.contiguous()
        out = x.new_empty((world, *x.shape))
        dist.all_gather(list(out.unbind(0)), x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_gather_stack(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """All-gather ``x`` (same shape on every rank) into ``[P, *x.shape]``, differentiably."""
    return _AllGatherStack.apply(x, group)


def replicated(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Mark a tensor held identically by every rank: identity forward, gradient summed over the group."""
    return _Replicated.apply(x, group)
