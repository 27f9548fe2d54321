# Sequence-parallel causal sliding-window + global-token attention (DESIGN.md §8; semantics in
# kernels/attention/naive.py). Rank p holds the contiguous tokens [a_p, b_p) (shards in rank order; any positive
# lengths, e.g. shard_sequence / shard_bounds). Its queries need three things it does not hold:
#   1. the halo: keys/values [e_p, a_p) with e_p = max(0, a_p − W + 1), owned by the previous rank(s) — several ranks
#      when shards are shorter than W − 1. Point-to-point: every rank sends each later rank the part of its shard in
#      that rank's halo (one batch_isend_irecv; dist/halo.py, shared with the short-conv halo of FlowLM);
#   2. the global tokens' keys/values (read outside the window): G rows, gathered by one all-reduce of a zero buffer
#      that only the owners fill (a broadcast from many owners in one collective, G·Hkv·(D + Dv) values);
#   3. for the global *rows* (a global query reads its whole causal prefix, which spans ranks): the G global queries go
#      out in the same all-reduce, every rank attends them to its own shard (a partial softmax: o_r, lse_r), the
#      partials are all-gathered and merged by log-sum-exp, o = Σ_r exp(lse_r − lse) o_r with lse = logsumexp_r lse_r
#      (Ring-/Flash-decoding style merge; Liu et al. 2023, arXiv 2310.01889), and the owner keeps its rows.
# Per rank: O(T_p·(W + G) + G·T_p) work, O(W + G) extra tokens of memory, 2 messages per neighbour + 2 small
# collectives, independent of the total T.
#
# Backward (the adjoint of each step, so gradients equal the single-process op's): the window/global-key block and the
# partial rows are the differentiable single-device block ops.sparse_attention.window_attention; the merge is torch
# autograd; the all-gather of partials is comm.all_gather_stack (its backward all-reduces); the exchange of (1) and (2)
# is one autograd Function whose backward sends each halo gradient back to the rank that owns those keys (P2P, the
# reverse pattern) and all-reduces the gradients of the gathered global rows back to their owners, in that fixed
# order. Every rank runs exactly the same sequence of collectives in forward and backward (same graph on every rank:
# no rank-dependent branch), which is what keeps gloo/NCCL from deadlocking. Input errors are exchanged in the first
# (metadata) collective, so a bad input on one rank makes every rank raise instead of leaving the others waiting.
"""Differentiable sequence-parallel sparse attention: ``sp_sparse_attention`` (halo exchange + global tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..kernels.attention.shapes import check_attention_inputs, check_scale, check_window, normalize_global_idx
from ..ops.sparse_attention import BACKENDS, INF_WINDOW, window_attention
from .comm import all_gather_stack, group_rank_size
from .halo import HaloPlan, gather_halo, scatter_halo_grad

__all__ = ["sp_sparse_attention"]

_META = 10  # error flag, T_p, window, B, H, Hkv, D, Dv, n_global, global-index checksum


@dataclass(frozen=True)
class _Plan:
    """Who sends which tokens to whom; identical on every rank (built from the all-gathered shard lengths)."""

    group: ProcessGroup | None
    rank: int
    bounds: tuple[tuple[int, int], ...]  # [a_p, b_p) per rank
    window: int
    g: torch.Tensor  # sorted global positions
    dims: tuple[int, int, int, int]  # H, Hkv, D, Dv

    @property
    def halo(self) -> HaloPlan:
        """The halo of the window: the ``window − 1`` keys/values before each shard."""
        return HaloPlan(self.group, self.rank, self.bounds, self.window - 1)

    def owned(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(local row index, slot in g) of the global tokens held by this rank."""
        a, b = self.bounds[self.rank]
        g = self.g.to(device)
        slots = ((g >= a) & (g < b)).nonzero().flatten()
        return g[slots] - a, slots


class _Exchange(torch.autograd.Function):
    """Forward: halo keys/values from the previous ranks and the global rows of q, k, v from their owners.
    Backward: halo gradients back to their owners (P2P), then the global rows' gradients (all-reduce)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        B, Tp = q.shape[:2]
        H, Hkv, D, Dv = plan.dims
        kv = torch.cat([k, v], dim=-1)
        halo = gather_halo(kv, plan.halo)
        k_ext = torch.cat([halo[..., :D], k], dim=1)
        v_ext = torch.cat([halo[..., D:], v], dim=1)
        G = plan.g.numel()
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        rows, slots = plan.owned(q.device)
        buf = q.new_zeros(B, G, H * D + Hkv * (D + Dv), dtype=acc)
        if G:
            local = torch.cat([q.flatten(2), kv.flatten(2)], dim=-1)
            buf[:, slots] = local[:, rows].to(acc)
            dist.all_reduce(buf, group=plan.group)
        qg = buf[..., : H * D].reshape(B, G, H, D).to(q.dtype)
        kvg = buf[..., H * D:].reshape(B, G, Hkv, D + Dv).to(q.dtype)
        ctx.shapes = (B, Tp, halo.shape[1], q.dtype, acc, q.device)
        return k_ext, v_ext, qg, kvg[..., :D].contiguous(), kvg[..., D:].contiguous()

    @staticmethod
    def backward(ctx, dk_ext, dv_ext, dqg, dkg, dvg):
        plan = ctx.plan
        B, Tp, h, dtype, acc, dev = ctx.shapes
        H, Hkv, D, Dv = plan.dims
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=dev)  # noqa: E731
        dk_ext = z(B, h + Tp, Hkv, D) if dk_ext is None else dk_ext
        dv_ext = z(B, h + Tp, Hkv, Dv) if dv_ext is None else dv_ext
        dkv = torch.cat([dk_ext, dv_ext], dim=-1)
        # (1) halo gradients go back to the ranks that own those keys; ours come back from the ranks we fed
        dkv_local = scatter_halo_grad(dkv[:, :h], plan.halo, dkv[:, h:].clone())
        # (2) the global rows: every rank's gradient of the gathered rows, summed, belongs to the owner
        G = plan.g.numel()
        dq = z(B, Tp, H, D)
        if G:
            parts = [x if x is not None else z(*shape)
                     for x, shape in ((dqg, (B, G, H, D)), (dkg, (B, G, Hkv, D)), (dvg, (B, G, Hkv, Dv)))]
            buf = torch.cat([parts[0].flatten(2), torch.cat(parts[1:], dim=-1).flatten(2)], dim=-1).to(acc)
            dist.all_reduce(buf, group=plan.group)
            rows, slots = plan.owned(dev)
            mine = buf[:, slots]
            dq[:, rows] = mine[..., : H * D].reshape(B, -1, H, D).to(dtype)
            dkv_local[:, rows] += mine[..., H * D:].reshape(B, -1, Hkv, D + Dv).to(dtype)
        return dq, dkv_local[..., :D], dkv_local[..., D:], None


def _checksum(global_idx, n_global: int) -> int:
    if global_idx is None:
        return -1
    idx = global_idx.tolist() if isinstance(global_idx, torch.Tensor) else list(global_idx)
    return sum((int(x) + 1) * (i + 7) for i, x in enumerate(sorted(idx))) % (2**61 - 1) if idx else 0


def _plan(q, k, v, window, global_idx, n_global, scale, backend, group) -> tuple[_Plan, float]:
    """Validate locally, all-gather shard lengths, sizes and errors (so every rank raises together), build the plan."""
    rank, world = group_rank_size(group)
    meta = torch.full((_META,), -1, dtype=torch.int64)
    error = None
    try:
        d = check_attention_inputs(q, k, v)
        check_window(window)
        scale = check_scale(scale, d.D)
        if backend not in BACKENDS or backend == "flex":
            raise ValueError(f"backend must be one of {tuple(b for b in BACKENDS if b != 'flex')} under sequence "
                             f"parallelism, got {backend!r}")
        meta[1:] = torch.tensor([d.T, window, d.B, d.H, d.Hkv, d.D, d.Dv, n_global, _checksum(global_idx, n_global)])
        meta[0] = 0
    except (TypeError, ValueError) as e:
        error = e
    dev = q.device if isinstance(q, torch.Tensor) and dist.get_backend(group) == "nccl" else torch.device("cpu")
    table = [torch.empty(_META, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(table, meta.to(dev), group=group)
    table = torch.stack(table).cpu()
    if error is not None:
        raise error
    bad = (table[:, 0] != 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"sp_sparse_attention: invalid inputs on rank(s) {bad} of the group (see their errors)")
    names = ("window", "B", "H", "Hkv", "D", "Dv", "n_global", "global_idx")
    for col, name in enumerate(names, start=2):
        if bool((table[:, col] != table[0, col]).any()):
            raise ValueError(f"sp_sparse_attention: {name} must be the same on every rank, got "
                             f"{table[:, col].tolist()} over ranks 0..{world - 1}")
    lengths = table[:, 1].tolist()
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    g = normalize_global_idx(global_idx, n_global, start, q.device)  # same T everywhere: same error on every rank
    plan = _Plan(group, rank, tuple(bounds), window, g, (d.H, d.Hkv, d.D, d.Dv))
    return plan, scale


def sp_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    global_idx: torch.Tensor | Sequence[int] | None = None,
    n_global: int = 0,
    group: ProcessGroup | None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sequence-parallel causal sliding-window + global-token attention over the ranks of ``group``.

    Equals the matching rows of :func:`pflow_dist.ops.sparse_attention.sparse_attention` on the whole sequence, and
    so do the gradients of ``q``, ``k``, ``v`` (a halo key's gradient is returned to the rank that holds it). Every
    rank of the group must call it with its shard, and must backpropagate through it if any rank does.

    Args:
        q: this rank's queries ``[B, T_p, H, D]``; shards are contiguous, in rank order, ``T_p ≥ 1`` (any lengths,
            e.g. :func:`~pflow_dist.dist.sharding.shard_sequence`).
        k: keys ``[B, T_p, Hkv, D]``; v: values ``[B, T_p, Hkv, Dv]``.
        window: ``W ≥ 1``, the same on every rank. The window may reach over several previous ranks (shards shorter
            than ``W − 1``); the halo is ``min(W − 1, a_p)`` tokens.
        global_idx: global positions in the *whole* sequence (or ``n_global``: the first ``n_global``), the same on
            every rank.
        group: the sequence-parallel process group (``None`` = the default group).
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the local work (see ``sparse_attention``).

    Returns:
        ``o [B, T_p, H, Dv]`` for this rank's queries.

    Raises:
        ValueError / TypeError: bad inputs on any rank (raised on every rank), or window / sizes / global tokens that
            differ between ranks.

    Example (on each of P ranks, after ``dist.init_process_group``)::

        q_p, k_p, v_p = (shard_sequence(x, group) for x in (q, k, v))
        o_p = sp_sparse_attention(q_p, k_p, v_p, window=512, n_global=4, group=group)
    """
    plan, scale = _plan(q, k, v, window, global_idx, n_global, scale, backend, group)
    a, b = plan.bounds[plan.rank]
    k_ext, v_ext, qg, kg, vg = _Exchange.apply(q, k, v, plan)
    G = plan.g.numel()
    g_kw = dict(kg=kg, vg=vg, g_pos=plan.g) if G else {}
    o, _ = window_attention(q, k_ext, v_ext, window=window, q_start=a, k_start=plan.halo.start(plan.rank),
                            scale=scale, backend=backend, **g_kw)
    if G:
        og, lse = window_attention(qg, k, v, window=INF_WINDOW, q_pos=plan.g, k_start=a, scale=scale,
                                   backend=backend)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        parts = all_gather_stack(torch.cat([og.to(acc), lse.to(acc).unsqueeze(-1)], dim=-1), plan.group)
        lse_all = parts[..., -1]
        w = torch.exp(lse_all - torch.logsumexp(lse_all, dim=0))
        og = (w.unsqueeze(-1) * parts[..., :-1]).sum(0)
        rows, slots = plan.owned(q.device)
        o = o.index_copy(1, rows, og[:, slots].to(o.dtype))
    return o
