# Launchers of the window-attention Triton kernels (window_fwd.py, window_bwd.py): tensor preparation, block sizes,
# grids. The backward is FlashAttention-2's split (Dao 2023, arXiv 2307.08691): one query-centric pass for dQ and one
# key-centric pass for dK/dV per key set (window keys; global keys), so no pass needs atomics.
"""Python launchers of the positioned window-attention kernels: ``window_attn_fwd`` and ``window_attn_bwd``."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .shapes import INF_WINDOW
from .window_bwd import window_sparse_attn_bwd_delta_kernel, window_sparse_attn_bwd_dkdv_kernel
from .window_fwd import window_sparse_attn_bwd_dq_kernel, window_sparse_attn_fwd_kernel

__all__ = ["INF_WINDOW", "TRITON_DTYPES", "window_attn_bwd", "window_attn_fwd"]

# Gathered rows (the G global rows) read up to T keys each, but there are few of them: one program per (row block,
# head) would walk all T keys alone. Their keys are split into chunks of SPLIT_KEYS handled by parallel programs that
# write partial (o, lse) (FlashDecoding, Dao et al. 2023), merged by log-sum-exp; their dQ partials are summed.
SPLIT_KEYS = 4096
SPLIT_KEYS_INTERPRETER = 16  # tiny test shapes still run (and test) the split + merge path
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_dtype(dtype: torch.dtype):
    """tl.dot operand type: the input dtype, except bf16 under the interpreter, whose tl.dot multiplies the raw bf16
    bit patterns (Triton 3.9, see kernels/flow/chunk.py): there the operands are upcast to fp32."""
    if dtype == torch.bfloat16 and _interpreting():
        return tl.float32
    return _TL[dtype]


# GPU tile candidates (BLOCK_M query rows, BLOCK_N keys, warps, pipeline stages), tried once per (head dims, window,
# variant, dtype) by triton.autotune on the first call. Larger query tiles in the forward/dQ passes and larger key
# tiles in the dK/dV pass cut the re-reads of the band (a tile re-reads W + BLOCK rows of the other side); which size
# wins depends on D and on register pressure, so it is measured, not guessed (benchmarks/results/attention_*.jsonl).
_CANDIDATES = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the default the sm_90 compile test builds
    "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2),
            (64, 32, 4, 2)],
    "dq": [(128, 64, 8, 3), (128, 32, 4, 3), (128, 32, 4, 5), (64, 64, 4, 3), (64, 32, 4, 2)],
    "dkdv": [(64, 128, 8, 3), (32, 128, 4, 3), (32, 128, 4, 5), (64, 64, 4, 3), (64, 128, 8, 2), (64, 32, 4, 2)],
}


def _tuned(kernel, kind: str, key: list[str], restore: list[str] | None = None):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
               for bm, bn, w, st in _CANDIDATES[kind]]
    return triton.autotune(configs=configs, key=key, restore_value=restore)(kernel)


_TUNED = {
    "fwd": _tuned(window_sparse_attn_fwd_kernel, "fwd", ["D", "DV", "GATHERED", "HAS_GLOBAL"]),
    "dq": _tuned(window_sparse_attn_bwd_dq_kernel, "dq", ["D", "DV", "GATHERED", "HAS_GLOBAL"]),
    # ACCUMULATE adds to DK/DV: the tuning runs must each start from the same values
    "dkdv": _tuned(window_sparse_attn_bwd_dkdv_kernel, "dkdv", ["D", "DVD", "GATHERED", "FAR"], ["DK", "DV"]),
}
_RAW = {"fwd": window_sparse_attn_fwd_kernel, "dq": window_sparse_attn_bwd_dq_kernel,
        "dkdv": window_sparse_attn_bwd_dkdv_kernel}


def _launch(kind: str, grid_rows: int, grid_rest: tuple[int, int], *args, **kw) -> None:
    """Launch one kernel over ``cdiv(grid_rows, tile) × grid_rest``: fixed small tiles under the interpreter, the
    autotuned GPU tiles otherwise (the tiled axis is BLOCK_M for fwd/dQ, BLOCK_N for dK/dV)."""
    axis = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    d, dv = kw.pop("D"), kw.pop("DV")
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    kw[("DVD" if kind == "dkdv" else "DV")] = dv
    kw.update(D=d, EVEN=bd == d and bdv == dv)
    if _interpreting():  # the interpreter runs every lane in numpy: the smallest legal tiles are the fastest
        bm, bn, opts = 16, 16, {}
    elif os.environ.get("PFLOW_DIST_AUTOTUNE", "1") == "0":  # the first candidate only (e.g. quick GPU test runs)
        bm, bn, warps, stages = _CANDIDATES[kind][0]
        opts = dict(num_warps=warps, num_stages=stages)
    else:
        _TUNED[kind][lambda meta: (triton.cdiv(grid_rows, meta[axis]), *grid_rest)](*args, **kw, BLOCK_D=bd,
                                                                                   BLOCK_DV=bdv)
        return
    _RAW[kind][(triton.cdiv(grid_rows, bm if axis == "BLOCK_M" else bn), *grid_rest)](
        *args, **kw, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, **opts)


def _row_stats(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
               drop_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(δ, lse₂)`` as head-major [B, H, Tq] float32: ``δ = Σ_d dO ⊙ O − ∂L/∂lse`` and ``lse₂ = lse · log2 e`` (0 where
    lse = −inf), by one fused pass over ``o``, ``do`` [B, Tq, H, Dv] and ``lse`` [B, Tq, H]. Rows in ``drop_rows``
    get lse₂ = +∞: their probabilities recompute as exactly 0, so they send no gradient anywhere."""
    o, do, lse = o.contiguous(), do.contiguous(), lse.contiguous()
    B, Tq, H, dv = o.shape
    n_rows = B * Tq * H
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=o.device)
    lse2 = torch.empty_like(delta)
    if n_rows == 0:
        return delta, lse2
    block_dv = max(16, triton.next_power_of_2(dv))
    block_r = 16 if _interpreting() else max(1, min(128, 8192 // block_dv))
    dl = dlse.contiguous() if dlse is not None else delta
    window_sparse_attn_bwd_delta_kernel[(triton.cdiv(n_rows, block_r),)](
        o, do, lse, dl, delta, lse2, n_rows, Tq, H, dv, HAS_DLSE=dlse is not None, BLOCK_R=block_r,
        BLOCK_DV=block_dv)
    if drop_rows is not None:
        lse2.index_fill_(2, drop_rows, float("inf"))
    return delta, lse2


def _prec(dtype: torch.dtype) -> str | None:
    # fp32 inputs get exact fp32 products (no TF32: the tests compare against float64); half types: Triton's default
    return "ieee" if dtype == torch.float32 else None


@functools.cache
def _no_positions(device: torch.device) -> torch.Tensor:
    """A placeholder position pointer for kernels whose flags never read it (one per device, never written)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _pos(x: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if x is None:
        return _no_positions(device)
    return x.to(device=device, dtype=torch.int32).contiguous()


def _s3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def window_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int = 0,
    q_pos: torch.Tensor | None = None,
    k_start: int = 0,
    window: int,
    kg: torch.Tensor | None = None,
    vg: torch.Tensor | None = None,
    g_pos: torch.Tensor | None = None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the positioned block (semantics: ``naive_window_attention``); inputs already validated.

    Queries sit at ``q_start + i`` (or at the sorted ``q_pos``), keys at ``k_start + j``.

    Returns:
        ``(o [B, Tq, H, Dv] in q.dtype, lse [B, Tq, H] float32)``.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    has_g = kg is not None and kg.shape[1] > 0
    kg_ = kg.contiguous() if has_g else k
    vg_ = vg.contiguous() if has_g else v
    S, split_len = _splits(q_pos, Tk, has_g)
    o = torch.empty(S, B, Tq, H, Dv, dtype=q.dtype if S == 1 else torch.float32, device=q.device)
    lse = torch.empty(S, B, Tq, H, dtype=torch.float32, device=q.device)
    _launch(
        "fwd", Tq, (B * H, S),
        q, k, v, kg_, vg_, _pos(g_pos if has_g else None, q.device), _pos(q_pos, q.device), o, lse,
        *_s3(q), *_s3(k), *_s3(v), *_s3(kg_), *_s3(vg_), *_s3(o[0]), o.stride(0),
        Tq, Tk, kg_.shape[1] if has_g else 0, H, H // Hkv, q_start, k_start, min(window, INF_WINDOW),
        scale * 1.4426950408889634, split_len,
        D=D, DV=Dv, GATHERED=q_pos is not None, HAS_GLOBAL=has_g, PREC=_prec(q.dtype), DT=_dot_dtype(q.dtype),
    )
    if S == 1:
        return o[0], lse[0]
    # merge the key splits: lse = logsumexp_s lse_s, o = Σ_s exp(lse_s − lse) o_s (rows without keys stay 0, −inf)
    lse_all = torch.logsumexp(lse, dim=0)
    w = torch.exp(lse - torch.where(torch.isinf(lse_all), 0.0, lse_all))
    return (w.unsqueeze(-1) * o).sum(0).to(q.dtype), lse_all


def _splits(gathered: torch.Tensor | None, n: int, has_g: bool) -> tuple[int, int]:
    """Number of splits of the ``n`` rows one program would walk, and rows per split: several only when the other
    side is a gathered handful (global rows over all keys; global keys over all queries)."""
    split = SPLIT_KEYS_INTERPRETER if _interpreting() else SPLIT_KEYS
    if gathered is None or has_g or n <= split:
        return 1, max(n, 1)
    return triton.cdiv(n, split), split


def window_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    *,
    q_start: int = 0,
    q_pos: torch.Tensor | None = None,
    k_start: int = 0,
    window: int,
    kg: torch.Tensor | None = None,
    vg: torch.Tensor | None = None,
    g_pos: torch.Tensor | None = None,
    scale: float,
    drop_rows: torch.Tensor | None = None,
    dkdv_into: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`window_attn_fwd` for the upstream gradients ``do`` (of o) and ``dlse`` (of lse, or None).

    ``drop_rows`` (query rows, int64): rows whose output was replaced after the forward; they contribute nothing.
    ``dkdv_into``: contiguous ``(dk, dv)`` of k's and v's shapes to which the window keys' gradients are
    added in place (and returned) instead of new tensors.

    Returns:
        ``(dq, dk, dv, dkg, dvg)`` in the inputs' dtypes (``dkg``/``dvg`` None without global keys).
    """
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    has_g = kg is not None and kg.shape[1] > 0
    kg_ = kg.contiguous() if has_g else k
    vg_ = vg.contiguous() if has_g else v
    delta, lse2 = _row_stats(o, do, lse, dlse, drop_rows)
    window = min(window, INF_WINDOW)
    qk_scale = scale * 1.4426950408889634
    qpos, gpos = _pos(q_pos, q.device), _pos(g_pos if has_g else None, q.device)
    prec = _prec(q.dtype)
    gathered = q_pos is not None

    S, split_len = _splits(q_pos, Tk, has_g)
    dq = torch.empty((S, *q.shape), dtype=q.dtype if S == 1 else torch.float32, device=q.device)
    _launch(
        "dq", Tq, (B * H, S),
        q, k, v, kg_, vg_, gpos, qpos, do, lse2, delta, dq,
        *_s3(q), *_s3(k), *_s3(v), *_s3(kg_), *_s3(vg_), *_s3(do), dq.stride(0),
        Tq, Tk, kg_.shape[1] if has_g else 0, H, H // Hkv, q_start, k_start, window, qk_scale, scale, split_len,
        D=D, DV=Dv, GATHERED=gathered, HAS_GLOBAL=has_g, PREC=prec, DT=_dot_dtype(q.dtype),
    )
    dq = dq[0] if S == 1 else dq.sum(0).to(q.dtype)

    def dkdv(kk, vv, kpos, far, into=None):
        S, split_len = _splits(None if not far else kpos, Tq, False)  # split the O(T) queries of global keys
        dtype = kk.dtype if S == 1 else torch.float32
        if into is not None:  # window keys are never split
            dk, dv = (x.unsqueeze(0) for x in into)
        else:
            dk = torch.empty((S, *kk.shape), dtype=dtype, device=kk.device)
            dv = torch.empty((S, *vv.shape), dtype=dtype, device=kk.device)
        _launch(
            "dkdv", kk.shape[1], (B * Hkv, S),
            q, kk, vv, qpos, kpos, do, lse2, delta, dk, dv,
            *_s3(q), *_s3(kk), *_s3(vv), *_s3(do), dk.stride(0), dv.stride(0),
            Tq, kk.shape[1], H, Hkv, H // Hkv, q_start, k_start, window, qk_scale, scale, split_len,
            D=D, DV=Dv, GATHERED=gathered, FAR=far, PREC=prec, DT=_dot_dtype(q.dtype), ACCUMULATE=into is not None,
        )
        if S == 1:
            return dk[0], dv[0]
        return dk.sum(0).to(kk.dtype), dv.sum(0).to(vv.dtype)

    if dkdv_into is not None and not (dkdv_into[0].shape == k.shape and dkdv_into[1].shape == v.shape
                                      and all(x.is_contiguous() for x in dkdv_into)):
        raise ValueError("dkdv_into must be contiguous tensors of k's and v's shapes")
    dk, dv = dkdv(k, v, gpos, False, dkdv_into)
    dkg = dvg = None
    if has_g:
        dkg, dvg = dkdv(kg_, vg_, gpos, True)
    elif kg is not None:
        dkg, dvg = torch.zeros_like(kg), torch.zeros_like(vg)
    return dq, dk, dv, dkg, dvg
