# Tile I/O of the flow kernels: one int64 scalar base per tile, int32 offsets inside it, sizes as constexprs.
#
# Why: with int64 offsets and run-time strides, a 64×64 tile costs a 64-bit address per element and the compiler can
# neither vectorise nor prove alignment; compiled for sm_90 every kernel sat at 255 registers with kilobytes of spills.
# fla does the same (scalar base pointer advanced once, constexpr H/K/V). Block pointers would also do, but Triton 3.9
# removed them and TMA descriptors need 16-byte-aligned strides (odd head sizes are allowed here).
#
# Rows (t, r) of a [B, T, H, R, D] tensor, token-major: row (t, r) of head h sits at ((b·T + t)·H + h)·R + r; ranks
# r ≥ R, tokens ≥ the limit and columns ≥ D read as zeros and are not written.
"""Loads and stores of chunk tiles: rows (t, r) of the inputs, tiles of contiguous intermediates."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows_addr(x, i_b, i_h, t0, t_lim, T, H: tl.constexpr, R: tl.constexpr, D: tl.constexpr, d0,
               NTOK: tl.constexpr, R_PAD: tl.constexpr, BD: tl.constexpr):
    base = x + ((i_b.to(tl.int64) * T + t0) * H + i_h) * (R * D)
    o = tl.arange(0, NTOK * R_PAD)
    tok = o // R_PAD
    rr = o % R_PAD
    o_d = d0 + tl.arange(0, BD)
    ptr = base + ((tok * (H * R) + rr) * D)[:, None] + o_d[None, :]
    mask = ((t0 + tok < t_lim) & (rr < R))[:, None] & (o_d < D)[None, :]
    return ptr, mask


@triton.jit
def load_rows(x, i_b, i_h, t0, t_lim, T, H: tl.constexpr, R: tl.constexpr, D: tl.constexpr, d0,
              NTOK: tl.constexpr, R_PAD: tl.constexpr, BD: tl.constexpr):
    """Rows of tokens [t0, t0 + NTOK) (zeros at tokens ≥ t_lim, ranks ≥ R, columns ≥ D): ``[NTOK·R_PAD, BD]``."""
    ptr, mask = _rows_addr(x, i_b, i_h, t0, t_lim, T, H, R, D, d0, NTOK, R_PAD, BD)
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def store_rows(x, val, i_b, i_h, t0, t_lim, T, H: tl.constexpr, R: tl.constexpr, D: tl.constexpr, d0,
               NTOK: tl.constexpr, R_PAD: tl.constexpr, BD: tl.constexpr):
    ptr, mask = _rows_addr(x, i_b, i_h, t0, t_lim, T, H, R, D, d0, NTOK, R_PAD, BD)
    tl.store(ptr, val.to(x.dtype.element_ty), mask=mask)


@triton.jit
def _mat_addr(x, base, n_rows, n_cols: tl.constexpr, r0, c0, BR: tl.constexpr, BCOL: tl.constexpr):
    o_r = tl.arange(0, BR)
    o_c = c0 + tl.arange(0, BCOL)
    ptr = x + (base + tl.cast(r0, tl.int64) * n_cols) + (o_r * n_cols)[:, None] + o_c[None, :]
    return ptr, (r0 + o_r < n_rows)[:, None] & (o_c < n_cols)[None, :]


@triton.jit
def load_mat(x, base, n_rows, n_cols: tl.constexpr, r0, c0, BR: tl.constexpr, BCOL: tl.constexpr):
    """Tile ``[BR, BCOL]`` at (r0, c0) of the row-major (n_rows, n_cols) matrix at ``x + base``, zero outside."""
    ptr, mask = _mat_addr(x, base, n_rows, n_cols, r0, c0, BR, BCOL)
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def store_mat(x, val, base, n_rows, n_cols: tl.constexpr, r0, c0, BR: tl.constexpr, BCOL: tl.constexpr):
    ptr, mask = _mat_addr(x, base, n_rows, n_cols, r0, c0, BR, BCOL)
    tl.store(ptr, val.to(x.dtype.element_ty), mask=mask)
