# Triton kernels of the bi-level projection (Barlaud, Perez & Marmorat, arXiv 2407.16293; Perez & Barlaud,
# arXiv 2405.02086): the two passes over the tensor, with the O(#groups) root solved in between by torch.
#
# The tensor is viewed as x[A, R, C] (any strides): a group is (a, c) and its entries run over r. This covers every
# bi-level tree whose reduced dims are consecutive: W[out, in] with column groups is [1, out, in] (C contiguous),
# with row groups [out, in, 1] (R contiguous), a conv filter's input channels [out, in, kh·kw] -> reduce (0,) is
# [1, out, in·kh·kw] ... A program owns a BLOCK_R × BLOCK_C tile column of one a and walks its share of r:
#   pass 1 (bilevel_groupnorm_fwd_kernel): per-group max |x| (ℓ∞), Σ|x| (ℓ1) or Σx² (ℓ2) of the r-range
#     [split·rows_per_split, …), one read of x, no |x| temporary; fp32 accumulation (fp64 for fp64). When A·C is too
#     small to fill the GPU the r-range is split and the partial results are combined by torch (max / sum).
#   pass 2 (bilevel_shrink_fwd_kernel): one read and one write: clip to ±b (ℓ∞), scale by b (ℓ2) or
#     soft-threshold by b (ℓ1, b = per-group τ), in place when out is x.
# Offsets are int64 (tensors over 2^31 elements). Max propagates NaN so that the host-side finiteness check of the
# root sum sees it.
"""Fused group reductions and the clip/scale/soft-threshold pass of the bi-level projection (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["NORM_CODES", "SHRINK_CODES", "fused_group_norm", "fused_shrink", "tile_config"]

NORM_CODES = {"linf": 0, "l1": 1, "l2": 2}
SHRINK_CODES = {"linf": 0, "l2": 1, "l1": 2}  # clip, scale, soft-threshold


@triton.jit
def _max_nan(a, b):
    # tl.max drops NaN; a NaN must reach the group norm so that the host check of the root sum catches it
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def bilevel_groupnorm_fwd_kernel(
    x_ptr, part_ptr, A, R, C, rows_per_split, n_cb, n_split,
    stride_a, stride_r, stride_c,
    NORM: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # one flat grid (CUDA caps grid dims 1 and 2 at 65535): program -> (a, column block, r split)
    pid = tl.program_id(0).to(tl.int64)
    pid_s = pid % n_split
    pid_c = (pid // n_split) % n_cb
    pid_a = pid // (n_split * n_cb)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = x_ptr + pid_a * stride_a + offs_c.to(tl.int64)[None, :] * stride_c
    r_start = pid_s * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_dtype)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        m = (offs_r < r_end)[:, None] & mask_c[None, :]
        v = tl.load(base + offs_r[:, None] * stride_r, mask=m, other=0.0).to(acc_dtype)
        if NORM == 0:
            acc = tl.maximum(acc, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
        elif NORM == 1:
            acc += tl.abs(v)
        else:
            acc += v * v
    if NORM == 0:
        res = tl.reduce(acc, 0, _max_nan)
    else:
        res = tl.sum(acc, axis=0)
    out = part_ptr + (pid_s * A + pid_a) * C + offs_c
    tl.store(out, res, mask=mask_c)


@triton.jit
def bilevel_shrink_fwd_kernel(
    x_ptr, out_ptr, b_ptr, R, C, n_cb, n_rb,
    sx_a, sx_r, sx_c, so_a, so_r, so_c,
    MODE: tl.constexpr, F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # computed in fp32 (fp64 for fp64): clip and scale of bf16/fp16 values are exact or correctly rounded there,
    # and the Triton interpreter has no half-precision arithmetic
    cdt = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    pid_r = pid % n_rb
    pid_c = (pid // n_rb) % n_cb
    pid_a = pid // (n_rb * n_cb)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    b = tl.load(b_ptr + pid_a * C + offs_c, mask=mask_c, other=0.0).to(cdt)[None, :]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    m = (offs_r < R)[:, None] & mask_c[None, :]
    c64 = offs_c.to(tl.int64)[None, :]
    x = tl.load(x_ptr + pid_a * sx_a + offs_r[:, None] * sx_r + c64 * sx_c, mask=m, other=0.0).to(cdt)
    if MODE == 0:
        y = tl.minimum(tl.maximum(x, -b), b)
    elif MODE == 1:
        y = x * b
    else:
        mag = tl.maximum(tl.abs(x) - b, 0.0)
        y = tl.where(b > 0, tl.where(x < 0, -mag, mag), x)
    tl.store(out_ptr + pid_a * so_a + offs_r[:, None] * so_r + c64 * so_c, y.to(out_ptr.dtype.element_ty), mask=m)


def tile_config(R: int, C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): up to 128 contiguous columns per row of the tile, 4096 elements per tile."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 128)
    block_r = max(1, min(triton.next_power_of_2(max(R, 1)), 4096 // block_c))
    return block_r, block_c


def _splits(A: int, C: int, R: int, block_r: int, block_c: int, device: torch.device) -> int:
    """Split the r-range when A·⌈C/BLOCK_C⌉ programs cannot fill the device (4 programs per SM)."""
    if device.type != "cuda":
        return 1 if R <= 4 * block_r else 2  # the interpreter: still exercise the split path on small tensors
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    programs = A * triton.cdiv(C, block_c)
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(R, block_r)))


def fused_group_norm(x3: torch.Tensor, norm: str) -> torch.Tensor:
    """Group norms of ``x3 [A, R, C]`` over R: ``[A, C]``, in x's dtype for ℓ∞, float32 (float64) for ℓ1/ℓ2.

    Args:
        x3: a 3-D view (any strides) on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
        norm: ``"linf"``, ``"l1"`` or ``"l2"``.
    """
    A, R, C = x3.shape
    acc64 = x3.dtype == torch.float64
    acc = torch.float64 if acc64 else torch.float32
    block_r, block_c = tile_config(R, C)
    split = _splits(A, C, R, block_r, block_c, x3.device)
    rows_per_split = triton.cdiv(triton.cdiv(R, split), block_r) * block_r
    split = triton.cdiv(R, rows_per_split) if R else 1
    part = torch.empty(split, A, C, device=x3.device, dtype=acc)
    n_cb = triton.cdiv(C, block_c)
    bilevel_groupnorm_fwd_kernel[(A * n_cb * split,)](
        x3, part, A, R, C, rows_per_split, n_cb, split, *x3.stride(), NORM=NORM_CODES[norm], ACC_F64=acc64,
        BLOCK_R=block_r, BLOCK_C=block_c)
    if norm == "linf":
        v = part[0] if split == 1 else part.amax(0)
        return v.to(x3.dtype)
    v = part[0] if split == 1 else part.sum(0)
    return v.sqrt_() if norm == "l2" else v


def fused_shrink(x3: torch.Tensor, bound: torch.Tensor, mode: str, out3: torch.Tensor) -> torch.Tensor:
    """``out3 = clip(x3, ±bound)`` (``"linf"``), ``x3 · bound`` (``"l2"``) or ``soft_threshold(x3, bound)``
    (``"l1"``), with ``bound [A, C]`` per group; ``out3`` may be ``x3`` (in place)."""
    A, R, C = x3.shape
    b = bound.to(x3.dtype if mode != "l1" else torch.float64 if x3.dtype == torch.float64 else torch.float32)
    b = b.contiguous()
    block_r, block_c = tile_config(R, C)
    n_cb, n_rb = triton.cdiv(C, block_c), triton.cdiv(R, block_r)
    bilevel_shrink_fwd_kernel[(A * n_cb * n_rb,)](
        x3, out3, b, R, C, n_cb, n_rb, *x3.stride(), *out3.stride(), MODE=SHRINK_CODES[mode],
        F64=x3.dtype == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c)
    return out3
