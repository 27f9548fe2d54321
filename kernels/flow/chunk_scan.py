# The inter-chunk state recurrence, sequential or by groups of chunks (the flow view, DESIGN.md §3 "Second algorithm";
# ParallelFlow, Cirone & Salvi 2025, arXiv 2504.00492: chunking = computing flows, combining chunks = composing them).
#
# Sequential (P = 1): one program per (V block, head) walks all NT chunks: depth NT, B·H·V/BV programs. When that is
# fewer programs than the GPU has SMs (long single sequences), the chunks are split into P groups of L:
#   1. every group's affine map (M_g, D_g), S_end = M_g S_start + D_g, in parallel (the state kernel in MAP mode:
#      a [K, K + V] tile from [I | 0]; depth L, P times more programs);
#   2. the group-start states by composing the maps in order (kernels/common/affine.py, P small);
#   3. the state kernel again, every group from its true start state, storing the chunk states and Vn.
# Depth 2L + P instead of NT, for (K + V)/V more flops in step 1. The backward does the same with the transposed maps
# dS_start = Φ_g dS_end + E_g, in reverse order. With L = 1, step 1 is "every chunk's flow in parallel" and step 2 a
# scan over chunks; the grouped form keeps step 2 short. Sequence parallelism adds one level to this tree: with a
# `boundary` hook, step 2 first composes all group maps into the shard's map and asks the hook (the cross-rank combine,
# pflow_dist/dist/sp_flow_triton.py) for the shard's true start state (in the backward: its true dS_end).
"""Inter-chunk state passes of the chunked flow (forward and backward), sequential or grouped by chunk flows."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from ..common.affine import apply_map, compose
from .chunk_bwd import chunk_flow_state_bwd_kernel
from .chunk_fwd import chunk_flow_state_fwd_kernel

__all__ = ["Boundary", "num_groups", "state_bwd", "state_fwd"]


def num_groups(p, device: torch.device, forced: int) -> int:
    """Groups P: ``forced`` when > 0; else 1 unless the sequential pass leaves most SMs idle and T is long."""
    if forced > 0:
        return max(1, min(forced, p.NT))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = p.B * p.H * triton.cdiv(p.V, p.BVS)
    if programs * 2 > sms or p.NT < 32:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), p.NT // 16))


Boundary = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _call_boundary(boundary: Boundary, maps: torch.Tensor, order, p) -> torch.Tensor:
    """The group maps ``maps [B·H, P, K, K + V]`` composed in ``order`` (the whole pass's map), handed to
    ``boundary``; its answer (the pass's true start state, ``[B, H, K, V]``) as ``[B·H, K, V]`` fp32."""
    K = p.K
    total = None
    for g in order:
        m = (maps[:, g, :, :K], maps[:, g, :, K:])
        total = m if total is None else compose(total, m)
    S = boundary(total[0].view(p.B, p.H, K, K), total[1].view(p.B, p.H, K, p.V))
    return S.reshape(p.B * p.H, K, p.V).float()


def _groups(p, P: int) -> tuple[int, int]:
    L = triton.cdiv(p.NT, P)
    return triton.cdiv(p.NT, L), L


def state_fwd(k, W, U, Gp, h0, h, Vn, p, P: int, store_ht: bool, launch: dict, consts: dict,
              boundary: Boundary | None = None):
    """Fill ``h`` (chunk-start states) and ``Vn``; return the final state (fp32) when ``store_ht``.

    ``boundary`` (sequence parallelism): called with the whole pass's map ``(M [B, H, K, K], D [B, H, K, V])``, the
    composition of the group maps, it returns the true start state, which replaces ``h0``; the pass then runs as
    grouped (one group at least), so the map costs nothing beyond the grouped pass."""
    BH, K, V = p.B * p.H, p.K, p.V
    P, L = _groups(p, P)
    if P == 1 and boundary is None:
        hT = torch.empty(BH, K, V, device=k.device, dtype=torch.float32) if store_ht else None
        chunk_flow_state_fwd_kernel[(triton.cdiv(V, p.BVS), BH, 1)](
            k, W, U, Gp, h0 if h0 is not None else W, h, Vn, hT if store_ht else W, p.T, p.NT, p.NT,
            USE_H0=h0 is not None, STORE_HT=store_ht, MAP=False, **consts, **launch,
        )
        return None if hT is None else hT.view(p.B, p.H, K, V)
    maps = torch.empty(BH * P, K, K + V, device=k.device, dtype=torch.float32)
    chunk_flow_state_fwd_kernel[(triton.cdiv(K + V, p.BVS), BH, P)](
        k, W, U, Gp, W, h, Vn, maps, p.T, p.NT, L, USE_H0=False, STORE_HT=True, MAP=True, **consts, **launch,
    )
    maps = maps.view(BH, P, K, K + V)
    S = h0.view(BH, K, V) if h0 is not None else torch.zeros(BH, K, V, device=k.device, dtype=torch.float32)
    if boundary is not None:
        S = _call_boundary(boundary, maps, range(P), p)
    starts = []
    for g in range(P):
        starts.append(S)
        S = apply_map((maps[:, g, :, :K], maps[:, g, :, K:]), S)
    h0g = torch.stack(starts, dim=1).contiguous()
    chunk_flow_state_fwd_kernel[(triton.cdiv(V, p.BVS), BH, P)](
        k, W, U, Gp, h0g, h, Vn, W, p.T, p.NT, L, USE_H0=True, STORE_HT=False, MAP=False, **consts, **launch,
    )
    return S.view(p.B, p.H, K, V) if store_ht else None


def state_bwd(q, k, W, do, Gp, dht, dh, dVn, scale, p, P: int, need_dh0: bool, launch: dict, consts: dict,
              fuse_dvl: bool = False, boundary: Boundary | None = None):
    """Fill ``dh`` (gradients of the chunk-end states) and complete ``dVn`` (holding Attᵀ dO on entry, or, with
    ``fuse_dvl``, nothing: the passes compute that term themselves); return dS_0 (fp32) when asked.

    ``boundary``: as in :func:`state_fwd` for the reverse pass: called with its map ``(Φ, E)``, dS_start = Φ dS_end
    + E over the whole pass, it returns the true dS_end, which replaces ``dht``."""
    BH, K, V = p.B * p.H, p.K, p.V
    P, L = _groups(p, P)
    if P == 1 and boundary is None:
        dh0 = torch.empty(BH, K, V, device=k.device, dtype=torch.float32) if need_dh0 else None
        chunk_flow_state_bwd_kernel[(triton.cdiv(V, p.BVS), BH, 1)](
            q, k, W, do, Gp, dht if dht is not None else W, dh, dVn, dh0 if need_dh0 else W, scale, p.T, p.NT, p.NT,
            USE_DHT=dht is not None, STORE_DH0=need_dh0, MAP=False, FUSE_DVL=fuse_dvl, **consts, **launch,
        )
        return None if dh0 is None else dh0.view(p.B, p.H, K, V)
    maps = torch.empty(BH * P, K, K + V, device=k.device, dtype=torch.float32)
    chunk_flow_state_bwd_kernel[(triton.cdiv(K + V, p.BVS), BH, P)](
        q, k, W, do, Gp, W, dh, dVn, maps, scale, p.T, p.NT, L,
        USE_DHT=False, STORE_DH0=True, MAP=True, FUSE_DVL=fuse_dvl, **consts, **launch,
    )
    maps = maps.view(BH, P, K, K + V)
    S = dht.view(BH, K, V) if dht is not None else torch.zeros(BH, K, V, device=k.device, dtype=torch.float32)
    if boundary is not None:
        S = _call_boundary(boundary, maps, reversed(range(P)), p)
    ends = [None] * P
    for g in reversed(range(P)):
        ends[g] = S
        S = apply_map((maps[:, g, :, :K], maps[:, g, :, K:]), S)
    dhtg = torch.stack(ends, dim=1).contiguous()
    chunk_flow_state_bwd_kernel[(triton.cdiv(V, p.BVS), BH, P)](
        q, k, W, do, Gp, dhtg, dh, dVn, W, scale, p.T, p.NT, L,
        USE_DHT=True, STORE_DH0=False, MAP=False, FUSE_DVL=fuse_dvl, **consts, **launch,
    )
    return S.view(p.B, p.H, K, V) if need_dh0 else None
