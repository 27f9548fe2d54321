# Tile-level pieces of the diagonal scan kernels of kernels/scan/diag.py (which explains the algorithms): load a tile
# of [BLOCK_T steps, BLOCK_N channels] in scan order, scan it from zero, store h (and da in the adjoint), walk a row
# of tiles. Two memory layouts of a logical [B, T, N] tensor (the CM constexpr): N contiguous ([B, T, N] memory, rows
# of channels) or T contiguous (channel-major, [B, N, T] memory: the tile is BLOCK_N runs of consecutive steps, and
# the reverse scan loads its tiles in ascending time and scans them with reverse=True, keeping loads contiguous).
"""Triton tile helpers of the diagonal affine scan: load, scan, store, walk, in either memory layout."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    # "first (a1, b1), then (a2, b2)": kernels/common/affine.py compose, diagonal case.
    return a2 * a1, a2 * b1 + b2


@triton.jit
def _combine_recent_first(a1, b1, a2, b2):
    # the same composition for maps listed newest first (look-back windows): "first (a2, b2), then (a1, b1)".
    return a1 * a2, a1 * b2 + b1


@triton.jit
def _row(x, rows, i):
    """Row ``i`` of a 2-D tile (``rows`` its row indices) as a vector."""
    return tl.sum(tl.where(rows[:, None] == i, x, 0.0), axis=0)


@triton.jit
def _offsets(base, t, offs_n, T, N, CM: tl.constexpr):
    """Element offsets of a [times, channels] tile: ``[B, T, N]`` memory (N contiguous) or, with CM (channel-major),
    ``[B, N, T]`` memory (T contiguous: the tile is BLOCK_N runs of consecutive steps)."""
    if CM:
        return base + offs_n.to(tl.int64)[None, :] * T + t.to(tl.int64)[:, None]
    return base + t.to(tl.int64)[:, None] * N + offs_n[None, :]


@triton.jit
def _load_tile(a_ptr, b_ptr, base, chunk, T, N, offs_n, mask_n, REVERSE: tl.constexpr, CM: tl.constexpr,
               BLOCK_T: tl.constexpr):
    """Load tile ``chunk`` (counted in scan order) as fp32 (a, b), with the identity (1, 0) past the ends; also return
    its times and mask. Rows are in scan order, except channel-major reverse tiles, which keep ascending time (loads
    along contiguous memory) and are scanned backwards by :func:`_scan_tile`."""
    s = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    if REVERSE:
        if CM:
            t = T - (chunk + 1) * BLOCK_T + tl.arange(0, BLOCK_T)
            valid = t >= 0
        else:
            t = T - 1 - s
            valid = s < T
        ta = t + 1  # the adjoint uses the next step's gate; a_T := 1
    else:
        t = s
        valid = s < T
        ta = s
    m = valid[:, None] & mask_n[None, :]
    b = tl.load(b_ptr + _offsets(base, t, offs_n, T, N, CM), mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + _offsets(base, ta, offs_n, T, N, CM), mask=m & (ta < T)[:, None], other=1.0).to(tl.float32)
    return a, b, t, m


@triton.jit
def _scan_tile(a, b, REVERSE: tl.constexpr, CM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Scan a tile from zero in scan order: ``(A_loc, B_loc, aggregate a, aggregate b)`` (the map of the whole tile).
    Channel-major reverse tiles hold ascending time: scanned with ``reverse=True``, their aggregate is row 0."""
    rows = tl.arange(0, BLOCK_T)
    if REVERSE and CM:
        A_loc, B_loc = tl.associative_scan((a, b), 0, _combine, reverse=True)
        end = 0
    else:
        A_loc, B_loc = tl.associative_scan((a, b), 0, _combine)
        end = BLOCK_T - 1
    return A_loc, B_loc, _row(A_loc, rows, end), _row(B_loc, rows, end)


@triton.jit
def _store_tile(carry, A_loc, B_loc, t, m, h_ptr, base, T, N, offs_n, hprev_ptr, h0_ptr, da_ptr, bi, HAS_H0_DA,
                HAS_DA: tl.constexpr, CM: tl.constexpr):
    """h = A_loc ⊙ carry + B_loc at its times; in the adjoint also da_t = λ_t ⊙ h_{t-1} (h_0 = initial state)."""
    out = A_loc * carry[None, :] + B_loc
    tl.store(h_ptr + _offsets(base, t, offs_n, T, N, CM), out.to(h_ptr.dtype.element_ty), mask=m)
    if HAS_DA:
        hp = tl.load(hprev_ptr + _offsets(base, t - 1, offs_n, T, N, CM), mask=m & (t >= 1)[:, None], other=0.0)
        hp = hp.to(tl.float32)
        if HAS_H0_DA:
            h0 = tl.load(h0_ptr + bi.to(tl.int64) * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            hp = tl.where((t == 0)[:, None], h0[None, :], hp)
        tl.store(da_ptr + _offsets(base, t, offs_n, T, N, CM), (out * hp).to(da_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scan_tiles(carry, first, n_tiles, a_ptr, b_ptr, h_ptr, hprev_ptr, h0_ptr, da_ptr, base, bi, T, N, offs_n, mask_n,
                REVERSE: tl.constexpr, HAS_DA: tl.constexpr, HAS_H0_DA: tl.constexpr, CM: tl.constexpr,
                BLOCK_T: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Scan tiles ``first .. first + n_tiles - 1`` of one sequence in order from the state ``carry`` entering the
    first, storing h (and da); returns the state leaving the last. Tile addresses do not depend on the carry, so the
    compiler prefetches NUM_STAGES tiles ahead."""
    for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
        a, b, t, m = _load_tile(a_ptr, b_ptr, base, first + i, T, N, offs_n, mask_n, REVERSE, CM, BLOCK_T)
        A_loc, B_loc, agg_a, agg_b = _scan_tile(a, b, REVERSE, CM, BLOCK_T)
        _store_tile(carry, A_loc, B_loc, t, m, h_ptr, base, T, N, offs_n, hprev_ptr, h0_ptr, da_ptr, bi, HAS_H0_DA,
                    HAS_DA, CM)
        carry = agg_a * carry + agg_b
    return carry
