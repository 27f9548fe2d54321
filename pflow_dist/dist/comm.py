"""Differentiable collectives used by the sequence-parallel combine (communication only; the math is elsewhere).

Every helper takes an explicit ``group`` (no global process-group state). Backward rules:
- ``all_gather_stack``: rank r's output is ``stack(x_0, ..., x_{P-1})``; rank j's input ``x_j`` is read by every rank,
  so ``∂L/∂x_j = Σ_r ∂L_r/∂(slot j on rank r)``: all-reduce the stacked gradients and keep slot j. (An all-reduce of
  P small maps instead of a reduce-scatter, because gloo has no reduce-scatter; the maps' size does not grow with T.)
- ``replicated``: identity forward for an input that every rank holds the same copy of (e.g. the initial state); its
  gradient is the sum of the ranks' partial gradients, so every rank receives the full gradient.
- ``token_mean``: a mean over tokens spread across ranks, Σ_r s_r / Σ_r n_r. Its value is the global mean on every rank;
  its gradient is this rank's share ∂(s_r / N)/∂· only (N = Σ_r n_r is a constant count), so summing the parameter
  gradients over the group (what sequence-parallel gradient reduction does) gives the gradient of the global mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["all_gather_stack", "global_rank", "group_rank_size", "replicated", "send_recv", "token_mean"]


def group_rank_size(group: ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process inside ``group`` (the default group when ``None``).

    Raises:
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence parallelism needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group), none is initialised")
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: ProcessGroup | None, r: int) -> int:
    """The global rank of group rank ``r`` (point-to-point ops address global ranks)."""
    return r if group is None else dist.get_global_rank(group, r)


def send_recv(send: list[tuple[int, torch.Tensor]], recv: list[tuple[int, torch.Tensor]],
              group: ProcessGroup | None) -> None:
    """Point-to-point, not differentiable: send each ``(group rank, tensor)`` of ``send`` and fill each buffer of
    ``recv`` from its group rank, as one batch (so pairs of ranks that both send and receive cannot deadlock)."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), global_rank(group, r), group) for r, t in send]
    ops += [dist.P2POp(dist.irecv, t, global_rank(group, r), group) for r, t in recv]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


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


def token_mean(local_sum: torch.Tensor, local_count: torch.Tensor | int,
               group: ProcessGroup | None = None) -> torch.Tensor:
    """``Σ_r local_sum_r / Σ_r local_count_r`` over the ranks of ``group`` (one all-reduce of two numbers).

    Args:
        local_sum: this rank's sum of a per-token quantity (a 0-dim tensor, e.g. the summed token losses).
        local_count: this rank's number of tokens in that sum.
        group: the group the tokens are spread over (the sequence-parallel group).

    Returns:
        A 0-dim tensor whose value is the global mean on every rank and whose gradient is this rank's share
        ``local_sum / N`` (see the module docstring). ``N = 0`` gives NaN, as a mean over no tokens does.
    """
    if local_sum.dim() != 0:
        raise ValueError(f"local_sum must be a 0-dim tensor, got shape {tuple(local_sum.shape)}")
    count = torch.as_tensor(local_count, device=local_sum.device).to(local_sum.dtype)
    stats = torch.stack([local_sum.detach(), count])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    share = local_sum / stats[1]
    return share + (stats[0] / stats[1] - share).detach()
