# Launchers of the chunked flow kernels (chunk_fwd.py, chunk_bwd.py): tiling choices, intermediate buffers, and the
# two small per-token steps done in torch (the in-chunk cumsum of the log-decay g, and its reverse for dg).
"""Launchers of the chunked flow kernels: ``chunk_flow_fwd`` and ``chunk_flow_bwd`` (no autograd here)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .chunk_bwd import chunk_flow_dvlocal_bwd_kernel, chunk_flow_grads_bwd_kernel
from .chunk_fwd import chunk_flow_output_fwd_kernel
from .chunk_scan import Boundary, num_groups, state_bwd, state_fwd
from .chunk_wy import chunk_flow_wy_fwd_kernel

__all__ = ["ChunkPlan", "chunk_flow_bwd", "chunk_flow_fwd", "keep_intermediates", "plan_chunks", "token_cumsum"]

ROWS_MAX = 64  # rows (t, r) per chunk: the (I + A) solve and the BT×BT tiles live in registers

# Tiling knobs: bk / bv = K / V blocks of the parallel kernels (≤ 64), bvs = V block of the sequential state kernels,
# groups = chunk groups of the state passes (0: auto, chunk_scan.py), fuse_dvl = compute the local dVn (Attᵀ dO) in
# the reverse state passes instead of a kernel of its own (1: auto, see chunk_flow_bwd; 2: always), nw_<kernel> /
# ns_<kernel> = num_warps / num_stages. FLOW_CFG="bk=32,nw_grads=8,..." overrides (tuning runs).
_CFG = {
    "bk": 64, "bv": 64, "bvs": 64, "groups": 0, "save": -1, "fuse_dvl": 1,
    "nw_wy": 2, "nw_state": 4, "nw_out": 4, "nw_dvl": 8, "nw_sbwd": 4, "nw_grads": 8,
    "ns_wy": 3, "ns_state": 3, "ns_out": 3, "ns_dvl": 3, "ns_sbwd": 3, "ns_grads": 3,
}
KERNEL_NAMES = tuple(k[3:] for k in _CFG if k.startswith("nw_"))  # the kernels with their own launch knobs
# Defaults: the best per kernel of a sweep on H200 at B4 T8192 H16 D128 bf16 (python -m pflow_dist.bench.flow sweep,
# benchmarks/results/flow_sweep_h200.jsonl; the earlier H100 sweep is flow_sweep_h100.jsonl): the reverse state pass
# with the local dVn fused took 291 µs on 4 warps against 148 + 509 µs for the two kernels; the WY kernel 389 µs on
# 2 warps against 456 on 4. save: keep W, Ainv, h, Vn from the forward for the backward
# (1), recompute them (0), or auto (-1): keep unless they would take more than a sixth of the device memory.


def _cfg(key: str) -> int:
    env = os.environ.get("FLOW_CFG")
    if env:
        for item in env.split(","):
            k, _, val = item.partition("=")
            if k.strip() == key:
                return int(val)
    return _CFG[key]


def _launch(name: str, x: torch.Tensor) -> dict:
    """Launch options of kernel ``name``: warps, pipelining depth, and PREC, the precision of fp32 dots: "ieee" for
    fp32 inputs (plain tf32 gave ~1e-3 relative error on H100; with tf32x3 the CUDA test run hit an illegal memory
    access, so fp32 takes the exact FMA path: fp32 is the accuracy path, bf16/fp16 the fast one, which ignore PREC)."""
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    return {"num_warps": _cfg(f"nw_{name}"), "num_stages": _cfg(f"ns_{name}"), "PREC": prec}


@dataclass(frozen=True)
class ChunkPlan:
    """Tiling of one call: BC tokens and BT = BC·R_PAD rows per chunk, NT chunks, block sizes."""

    B: int
    T: int
    H: int
    R: int
    K: int
    V: int
    R_PAD: int
    BC: int
    BT: int
    BQ: int
    NT: int
    BK: int
    BV: int
    BKF: int
    BVS: int  # V block of the sequential state kernels (state tile BKF × BVS)
    product: bool


def plan_chunks(B, T, H, R, K, V, chunk_size: int, rank_form: str) -> ChunkPlan:
    """Pick the chunk: ``chunk_size`` tokens rounded down to a power of two, limited so that C·R_PAD ∈ [16, 64]."""
    R_PAD = triton.next_power_of_2(R)
    bc = 1 << (max(1, chunk_size).bit_length() - 1)
    BC = max(max(1, 16 // R_PAD), min(bc, ROWS_MAX // R_PAD))
    BT = BC * R_PAD
    BKF = max(16, triton.next_power_of_2(K))
    BVS = max(16, min(triton.next_power_of_2(V), _cfg("bvs"), 8192 // BKF))
    return ChunkPlan(
        B=B, T=T, H=H, R=R, K=K, V=V, R_PAD=R_PAD, BC=BC, BT=BT, BQ=max(BC, 16), NT=triton.cdiv(T, BC),
        BK=max(16, min(_cfg("bk"), triton.next_power_of_2(K))), BV=max(16, min(_cfg("bv"), triton.next_power_of_2(V))),
        BKF=BKF, BVS=BVS, product=rank_form == "product",
    )


def token_cumsum(g: torch.Tensor | None, p: ChunkPlan) -> torch.Tensor | None:
    """``g [B, T, H]`` -> in-chunk cumulative log-decay ``[B·H, NT·BC]`` in fp32 (slots past T repeat the last G)."""
    if g is None:
        return None
    gt = g.float().permute(0, 2, 1)
    gt = torch.nn.functional.pad(gt, (0, p.NT * p.BC - p.T))
    return gt.reshape(p.B * p.H, p.NT, p.BC).cumsum(-1).reshape(p.B * p.H, p.NT * p.BC).contiguous()


def _token_dg(dG_row: torch.Tensor, dG_q: torch.Tensor, p: ChunkPlan) -> torch.Tensor:
    """dg per token from dG (per row and per query slot) by the reverse in-chunk cumsum: G_t = Σ_{s≤t} g_s."""
    d = dG_row.view(p.B * p.H, p.NT, p.BC, p.R_PAD).sum(-1) + dG_q.view(p.B * p.H, p.NT, p.BC)
    d = d.flip(-1).cumsum(-1).flip(-1)
    return d.reshape(p.B, p.H, p.NT * p.BC)[:, :, : p.T].permute(0, 2, 1)


def _wy_state(k, v, beta, G, h0, p: ChunkPlan, store_ht: bool, inter_dtype, boundary: Boundary | None = None):
    """Run the WY and the sequential state kernels: Ainv, W, U, per-chunk start states h, Vn, and the final state."""
    dev = k.device
    rows = p.B * p.H * p.NT * p.BT
    W = torch.empty(rows, p.K, device=dev, dtype=inter_dtype)
    U = torch.empty(rows, p.V, device=dev, dtype=inter_dtype)
    Ainv = torch.empty(rows, p.BT, device=dev, dtype=inter_dtype)
    gated = G is not None
    Gp = G if gated else W  # a dummy pointer when not gated (never read)
    chunk_flow_wy_fwd_kernel[(p.NT, p.B * p.H)](
        k, v, beta, Gp, W, U, Ainv, p.T, p.NT,
        H=p.H, R=p.R, K=p.K, V=p.V,
        BT=p.BT, BC=p.BC, R_PAD=p.R_PAD, BK=p.BK, BV=p.BV, PRODUCT=p.product, GATED=gated, DT=dot_dtype(k),
        **_launch("wy", k),
    )
    h = torch.empty(p.B * p.H * p.NT, p.K, p.V, device=dev, dtype=inter_dtype)
    Vn = torch.empty(rows, p.V, device=dev, dtype=inter_dtype)
    consts = dict(H=p.H, R=p.R, K=p.K, V=p.V, BT=p.BT, BC=p.BC, R_PAD=p.R_PAD, BKF=p.BKF, BV=p.BVS, GATED=gated,
                  DT=dot_dtype(k))
    P = num_groups(p, dev, _cfg("groups"))
    hT = state_fwd(k, W, U, Gp, h0, h, Vn, p, P, store_ht, _launch("state", k), consts, boundary)
    return W, U, Ainv, h, Vn, hT


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(x: torch.Tensor):
    """Operand dtype of tl.dot: the input dtype (fp32 accumulation), except bf16 under the Triton interpreter, whose
    tl.dot multiplies the raw uint16 bit patterns of bf16 (Triton 3.9): there the operands are upcast to fp32."""
    if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return tl.float32
    return _TL_DTYPES[x.dtype]


def _inter_dtype(x: torch.Tensor) -> torch.dtype:
    """Intermediates (W, U, Ainv, h, Vn) are stored in the input dtype, as fla does; accumulation is fp32."""
    return x.dtype


def keep_intermediates(p: ChunkPlan, x: torch.Tensor) -> bool:
    """Whether the forward keeps W, Ainv, h, Vn for the backward (saves recomputing the WY and state passes)."""
    mode = _cfg("save")
    if mode >= 0:
        return bool(mode)
    if x.device.type != "cuda":
        return True
    rows = p.B * p.H * p.NT * p.BT
    nbytes = (rows * (p.K + p.V + p.BT) + p.B * p.H * p.NT * p.K * p.V) * x.element_size()
    return nbytes * 6 < torch.cuda.get_device_properties(x.device).total_memory


def chunk_flow_fwd(q, k, v, beta, G, scale: float, h0, output_final_state: bool, p: ChunkPlan, keep: bool = False,
                   boundary: Boundary | None = None):
    """Forward: ``o [B, T, H, V]`` (q's dtype), the final state ``[B, H, K, V]`` fp32 (or None), and, when ``keep``,
    the intermediates ``(W, Ainv, h, Vn)`` for :func:`chunk_flow_bwd` (else None; U is not needed there).
    ``boundary`` replaces ``h0`` by the state it returns for the sequence's map (:func:`~.chunk_scan.state_fwd`).

    Inputs are contiguous, rank-R shaped (``k [B, T, H, R, K]``, ``v [B, T, H, R, V]``, ``beta [B, T, H, R]``);
    ``G`` is :func:`token_cumsum` of g (None without gate); ``h0`` fp32 ``[B, H, K, V]`` or None.
    """
    W, U, Ainv, h, Vn, hT = _wy_state(k, v, beta, G, h0, p, output_final_state, _inter_dtype(q), boundary)
    o = torch.empty(p.B, p.T, p.H, p.V, device=q.device, dtype=q.dtype)
    chunk_flow_output_fwd_kernel[(triton.cdiv(p.V, p.BV) * p.NT, p.B * p.H)](
        q, k, Vn, h, G if G is not None else Vn, o, scale, p.T, p.NT,
        H=p.H, R=p.R, K=p.K, V=p.V,
        BT=p.BT, BC=p.BC, BQ=p.BQ, R_PAD=p.R_PAD, BK=p.BK, BV=p.BV, GATED=G is not None, DT=dot_dtype(q),
        **_launch("out", k),
    )
    return o, hT, ((W, Ainv, h, Vn) if keep else None)


def chunk_flow_bwd(q, k, v, beta, G, scale: float, h0, do, dht, p: ChunkPlan, need_dh0: bool, saved=None,
                   boundary: Boundary | None = None):
    """Backward: W, Ainv, h, Vn from ``saved`` (or recomputed from ``h0``), then the reverse state pass and the
    per-chunk gradients. ``boundary`` replaces ``dht`` by the gradient it returns for the reverse pass's map
    (:func:`~.chunk_scan.state_bwd`).

    Returns:
        ``(dq, dk, dv, dbeta, dg, dh0)`` in the shapes of the inputs (dg ``[B, T, H]`` fp32 or None, dh0 fp32 or
        None).
    """
    dev = q.device
    inter = _inter_dtype(q)
    if saved is None:
        W, _, Ainv, h, Vn, _ = _wy_state(k, v, beta, G, h0, p, False, inter)
    else:
        W, Ainv, h, Vn = saved
    gated = G is not None
    Gp = G if gated else W
    rows = p.B * p.H * p.NT * p.BT
    dVn = torch.empty(rows, p.V, device=dev, dtype=inter)  # as fla: its dv2 is stored in the input dtype
    P = num_groups(p, dev, _cfg("groups"))
    # fuse_dvl=1 (auto): fused with one group (its map pass for a sequence-parallel boundary and its true pass both
    # recompute Attᵀ dO, still cheaper than the dvlocal kernel) and, without a gate, with P > 1 groups too (H200, B1
    # T65536 H16 D128 bf16, 9 groups, fwd+bwd: 7.38 -> 6.79 ms; gated 8.50 -> 9.94 ms, the gate's exp in every
    # recomputation); 2: always; 0: never
    mode = _cfg("fuse_dvl")
    fuse_dvl = mode == 2 or (mode == 1 and (P == 1 or not gated))
    if not fuse_dvl:
        chunk_flow_dvlocal_bwd_kernel[(triton.cdiv(p.V, p.BV) * p.NT, p.B * p.H)](
            q, k, do, Gp, dVn, scale, p.T, p.NT,
            H=p.H, R=p.R, K=p.K, V=p.V,
            BT=p.BT, BC=p.BC, BQ=p.BQ, R_PAD=p.R_PAD, BK=p.BK, BV=p.BV, GATED=gated, DT=dot_dtype(q),
            **_launch("dvl", k),
        )
    dh = torch.empty(p.B * p.H * p.NT, p.K, p.V, device=dev, dtype=inter)
    consts = dict(H=p.H, R=p.R, K=p.K, V=p.V, BT=p.BT, BC=p.BC, BQ=p.BQ, R_PAD=p.R_PAD, BKF=p.BKF, BV=p.BVS,
                  GATED=gated, DT=dot_dtype(q))
    dh0 = state_bwd(q, k, W, do, Gp, dht, dh, dVn, scale, p, P, need_dh0, _launch("sbwd", k), consts, fuse_dvl,
                    boundary)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dG_row = torch.empty(p.B * p.H, p.NT * p.BT, device=dev, dtype=torch.float32) if gated else None
    dG_q = torch.empty(p.B * p.H, p.NT * p.BC, device=dev, dtype=torch.float32) if gated else None
    chunk_flow_grads_bwd_kernel[(p.NT, p.B * p.H)](
        q, k, v, beta, Gp, Ainv, h, dh, Vn, dVn, do,
        dq, dk, dv, dbeta, dG_row if gated else W, dG_q if gated else W, scale,
        p.T, p.NT,
        H=p.H, R=p.R, K=p.K, V=p.V,
        BT=p.BT, BC=p.BC, BQ=p.BQ, R_PAD=p.R_PAD, BK=p.BK, BV=p.BV, PRODUCT=p.product, GATED=gated, DT=dot_dtype(q),
        **_launch("grads", k),
    )
    dg = _token_dg(dG_row, dG_q, p) if gated else None
    return dq, dk, dv, dbeta, dg, dh0
