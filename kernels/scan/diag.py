# Triton kernels of the diagonal affine scan h_t = a_t ⊙ h_{t-1} + b_t (DESIGN.md §4), forward and adjoint.
#
# Element (a, b) is the map h ↦ a ⊙ h + b; "first (a1, b1), then (a2, b2)" = (a2 a1, a2 b1 + b2), the combine of
# kernels/common/affine.py (Blelloch 1993) written here as a Triton function because tl.associative_scan needs one.
#
# Layout [B, T, N] with N contiguous: a program owns a tile of BLOCK_T steps × BLOCK_N channels (rows of ≥ 64 bytes
# keep the loads coalesced), scans it from zero with tl.associative_scan and needs the state entering the tile.
# Channel-major memory (a [B, T, N] tensor stored [B, N, T], T contiguous: accelerated-scan's layout) runs through the
# same kernels with the CM constexpr: a tile is then BLOCK_N runs of BLOCK_T consecutive steps (kernels/scan/
# diag_tiles.py holds the tile pieces of both layouts).
# Three ways to get it (chosen by shape, see diag_scan_triton):
# - "loop": one program per (sequence, channel group) walks the sequence tile after tile, carrying the state
#   (accelerated-scan's design): one pass, no communication; needs B · channel groups ≥ LOOP_MIN_SEQS to fill the GPU.
# - "lookback" (one pass over tiles): the single-pass scan with decoupled look-back (Merrill & Garland 2016,
#   "Single-pass Parallel Prefix Scan with Decoupled Look-back"; CUB's DeviceScan). Tiles take their index from an
#   atomic counter (so a tile only ever waits on tiles that already run: no deadlock whatever the block scheduler
#   does), publish their aggregate map, then walk back over the predecessors' published maps WINDOW at a time until
#   one has published its inclusive state, compose, and publish their own inclusive state. Every input is read once
#   and h written once: the minimum traffic, 3 tensors. Measured, it stays latency-bound: 49-67% of the copy
#   bandwidth on H200 with the best tiles (diag_tile_config), against 45-48% for three-pass. A persistent variant
#   (programs claiming tile after tile and loading the next while looking back for the current) was slower on the
#   same sweep (33-52%) and was dropped.
#   The published words carry their own validity (a NaN bit pattern SENTINEL marks "not yet"), so no memory fence
#   between words is needed: a reader only uses words it has seen valid, loaded volatile (from L2, never stale L1).
# - "chunk" (three passes): tile aggregates → a scan over the aggregates (recursively, the same op) → a second pass
#   over the tiles from their carries. 5 tensor passes instead of 3, no inter-program communication.
#
# Adjoint (kernels/scan/naive.py derives it): λ_t = ḡ_t + a_{t+1} ⊙ λ_{t+1}, the same scan run from t = T-1 down with
# the gates shifted by one (a_{T} := 1 and the initial state is ∂L/∂h_T). REVERSE reads the tile in descending time
# with a_{t+1}; the backward kernel also forms da_t = λ_t ⊙ h_{t-1} while λ is in registers (one pass: a, ḡ, h in,
# λ and da out).
"""Diagonal affine scan kernels (single-pass look-back and three-pass chunked), forward and reverse (adjoint)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .diag_tiles import _combine_recent_first, _load_tile, _row, _scan_tile, _scan_tiles, _store_tile

__all__ = ["LOOP_MIN_SEQS", "SENTINEL", "diag_scan_map", "diag_scan_triton", "diag_tile_config",
           "is_channel_major", "to_channel_major"]

# A signalling-NaN bit pattern arithmetic never produces (GPUs return the canonical NaN 0x7FFFFFFF): "not published".
SENTINEL = 0x7FA0DEAD
_SENT = tl.constexpr(SENTINEL)  # jit functions may only read constexpr globals


@triton.jit
def _lookback_diag_scan(
    a_ptr, b_ptr, init_ptr, h_ptr, hT_ptr, state_ptr, counter_ptr, hprev_ptr, h0_ptr, da_ptr,
    T, N, G, n_chunks, n_seq,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, HAS_DA: tl.constexpr,
    HAS_H0_DA: tl.constexpr, PUBLISH_INCLUSIVE: tl.constexpr,
    CM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SEG: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # A program owns SEG consecutive tiles of one sequence ("chunk" below counts these segments; n_chunks of them).
    # SEG = 1: the tile stays in registers from its aggregate to its store. SEG > 1: the aggregate is streamed over
    # the segment's tiles, the look-back runs once, and the tiles are read again, from L2 while the segments in
    # flight fit there, so HBM still sees each input once while the look-back latency is paid once per SEG tiles.
    tile = tl.atomic_add(counter_ptr, 1)  # dynamic tile index: chunk-major, so every sequence advances together
    chunk = tile // n_seq
    seq = tile % n_seq
    bi = seq // G
    offs_n = (seq % G) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    base = bi.to(tl.int64) * T * N
    if SEG == 1:
        a, b, t, m = _load_tile(a_ptr, b_ptr, base, chunk, T, N, offs_n, mask_n, REVERSE, CM, BLOCK_T)
        A_loc, B_loc, agg_a, agg_b = _scan_tile(a, b, REVERSE, CM, BLOCK_T)
    else:
        agg_a = tl.full([BLOCK_N], 1.0, tl.float32)
        agg_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in tl.range(0, SEG, num_stages=NUM_STAGES):
            a, b, _, _ = _load_tile(a_ptr, b_ptr, base, chunk * SEG + i, T, N, offs_n, mask_n, REVERSE, CM, BLOCK_T)
            _, _, tile_a, tile_b = _scan_tile(a, b, REVERSE, CM, BLOCK_T)
            agg_b = tile_a * agg_b + tile_b
            agg_a = tile_a * agg_a

    # state layout: [n_seq * n_chunks, 3, BLOCK_N] int32 words (agg a, agg b, inclusive state)
    slot = (seq.to(tl.int64) * n_chunks + chunk) * 3 * BLOCK_N
    lane = tl.arange(0, BLOCK_N)
    if HAS_INIT:
        carry = tl.load(init_ptr + bi.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    if chunk > 0:
        tl.store(state_ptr + slot + lane, agg_a.to(tl.int32, bitcast=True))
        tl.store(state_ptr + slot + BLOCK_N + lane, agg_b.to(tl.int32, bitcast=True))
        # decoupled look-back: acc = composition of the maps between the found inclusive state and this tile
        acc_a = tl.full([BLOCK_N], 1.0, tl.float32)
        acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        w = tl.arange(0, WINDOW)
        j = chunk - 1
        done = chunk * 0
        while done == 0:
            idx = j - w  # newest first
            in_seq = idx >= 0
            wslot = (seq.to(tl.int64) * n_chunks + idx) * 3 * BLOCK_N
            ptr = state_ptr + wslot[:, None] + lane[None, :]
            wm = in_seq[:, None] & mask_n[None, :]
            wa = tl.load(ptr, mask=wm, other=_SENT, volatile=True)
            wb = tl.load(ptr + BLOCK_N, mask=wm, other=_SENT, volatile=True)
            wi = tl.load(ptr + 2 * BLOCK_N, mask=wm, other=_SENT, volatile=True)
            pad = (~mask_n)[None, :]  # padded channels never count as missing
            has_inc = tl.min(((wi != _SENT) | pad).to(tl.int32), axis=1) > 0
            has_agg = tl.min((((wa != _SENT) & (wb != _SENT)) | pad).to(tl.int32), axis=1) > 0
            has_inc = has_inc & in_seq
            first_inc = tl.min(tl.where(has_inc, w, WINDOW), axis=0)
            first_missing = tl.min(tl.where((has_inc | has_agg) | ~in_seq, WINDOW, w), axis=0)
            n_fold = tl.minimum(first_inc, first_missing)
            fold = (w < n_fold)[:, None]
            # unpublished words are the NaN SENTINEL: swap them for (1, 0) bits before any arithmetic touches them
            fa = tl.where(fold, tl.where(wa == _SENT, 0x3F800000, wa).to(tl.float32, bitcast=True), 1.0)
            fb = tl.where(fold, tl.where(wb == _SENT, 0, wb).to(tl.float32, bitcast=True), 0.0)
            Ma, Mb = tl.associative_scan((fa, fb), 0, _combine_recent_first)
            Ma = _row(Ma, w, WINDOW - 1)
            Mb = _row(Mb, w, WINDOW - 1)
            acc_b = acc_a * Mb + acc_b  # acc ∘ M: the folded (older) maps first, then acc
            acc_a = acc_a * Ma
            found = first_inc < first_missing
            wi = tl.where(wi == _SENT, 0, wi).to(tl.float32, bitcast=True)
            inc = tl.sum(tl.where((w == first_inc)[:, None], wi, 0.0), axis=0)
            carry = tl.where(found, acc_a * inc + acc_b, carry)
            done = found.to(tl.int32)
            j = j - n_fold
    inclusive = agg_a * carry + agg_b
    if PUBLISH_INCLUSIVE or chunk == 0:
        tl.store(state_ptr + slot + 2 * BLOCK_N + lane, inclusive.to(tl.int32, bitcast=True))
    if STORE_FINAL:
        if chunk == n_chunks - 1:
            tl.store(hT_ptr + bi.to(tl.int64) * N + offs_n, inclusive, mask=mask_n)
    if SEG == 1:
        _store_tile(carry, A_loc, B_loc, t, m, h_ptr, base, T, N, offs_n, hprev_ptr, h0_ptr, da_ptr, bi, HAS_H0_DA,
                    HAS_DA, CM)
    else:
        _scan_tiles(carry, chunk * SEG, SEG, a_ptr, b_ptr, h_ptr, hprev_ptr, h0_ptr, da_ptr, base, bi, T, N, offs_n,
                    mask_n, REVERSE, HAS_DA, HAS_H0_DA, CM, BLOCK_T, NUM_STAGES)


@triton.jit
def lookback_diag_scan_fwd_kernel(
    a_ptr, b_ptr, init_ptr, h_ptr, hT_ptr, state_ptr, counter_ptr, T, N, G, n_chunks, n_seq,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, PUBLISH_INCLUSIVE: tl.constexpr,
    CM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SEG: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """h_t = a_t ⊙ h_{t-1} + b_t in one pass (look-back); grid = n_chunks · n_seq segments of SEG tiles."""
    _lookback_diag_scan(a_ptr, b_ptr, init_ptr, h_ptr, hT_ptr, state_ptr, counter_ptr, h_ptr, init_ptr, h_ptr,
                        T, N, G, n_chunks, n_seq, HAS_INIT, STORE_FINAL, False, False, False, PUBLISH_INCLUSIVE,
                        CM, BLOCK_T, BLOCK_N, WINDOW, SEG, NUM_STAGES)


@triton.jit
def lookback_diag_scan_bwd_kernel(
    a_ptr, g_ptr, gT_ptr, lam_ptr, lam0_ptr, state_ptr, counter_ptr, h_ptr, h0_ptr, da_ptr,
    T, N, G, n_chunks, n_seq,
    HAS_GT: tl.constexpr, HAS_DA: tl.constexpr, HAS_H0: tl.constexpr, PUBLISH_INCLUSIVE: tl.constexpr,
    CM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SEG: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """λ_t = ḡ_t + a_{t+1} ⊙ λ_{t+1} (λ_T-1 gets ∂L/∂h_T), da_t = λ_t ⊙ h_{t-1}; λ_0 in fp32 to lam0."""
    _lookback_diag_scan(a_ptr, g_ptr, gT_ptr, lam_ptr, lam0_ptr, state_ptr, counter_ptr, h_ptr, h0_ptr, da_ptr,
                        T, N, G, n_chunks, n_seq, HAS_GT, True, True, HAS_DA, HAS_H0, PUBLISH_INCLUSIVE,
                        CM, BLOCK_T, BLOCK_N, WINDOW, SEG, NUM_STAGES)


@triton.jit
def _loop_diag_scan(a_ptr, b_ptr, init_ptr, h_ptr, hT_ptr, hprev_ptr, h0_ptr, da_ptr, T, N, G, n_chunks,
                    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, HAS_DA: tl.constexpr, HAS_H0_DA: tl.constexpr,
                    CM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    seq = tl.program_id(0)
    bi = seq // G
    offs_n = (seq % G) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    base = bi.to(tl.int64) * T * N
    if HAS_INIT:
        carry = tl.load(init_ptr + bi.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    carry = _scan_tiles(carry, 0, n_chunks, a_ptr, b_ptr, h_ptr, hprev_ptr, h0_ptr, da_ptr, base, bi, T, N, offs_n,
                        mask_n, REVERSE, HAS_DA, HAS_H0_DA, CM, BLOCK_T, NUM_STAGES)
    tl.store(hT_ptr + bi.to(tl.int64) * N + offs_n, carry, mask=mask_n)


@triton.jit
def loop_diag_scan_fwd_kernel(a_ptr, b_ptr, init_ptr, h_ptr, hT_ptr, T, N, G, n_chunks, HAS_INIT: tl.constexpr,
                              CM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """One program per (sequence, channel group) walks its whole sequence, carrying the state (accelerated-scan's
    design): one pass, no communication, for when B · channel groups alone fill the GPU."""
    _loop_diag_scan(a_ptr, b_ptr, init_ptr, h_ptr, hT_ptr, h_ptr, init_ptr, h_ptr, T, N, G, n_chunks, HAS_INIT,
                    False, False, False, CM, BLOCK_T, BLOCK_N, NUM_STAGES)


@triton.jit
def loop_diag_scan_bwd_kernel(a_ptr, g_ptr, gT_ptr, lam_ptr, lam0_ptr, h_ptr, h0_ptr, da_ptr, T, N, G, n_chunks,
                              HAS_GT: tl.constexpr, HAS_DA: tl.constexpr, HAS_H0: tl.constexpr,
                              CM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The adjoint of :func:`loop_diag_scan_fwd_kernel` (reverse time, shifted gates, fused da)."""
    _loop_diag_scan(a_ptr, g_ptr, gT_ptr, lam_ptr, lam0_ptr, h_ptr, h0_ptr, da_ptr, T, N, G, n_chunks, HAS_GT,
                    True, HAS_DA, HAS_H0, CM, BLOCK_T, BLOCK_N, NUM_STAGES)


@triton.jit
def chunk_diag_scan_fwd_kernel(
    a_ptr, b_ptr, agg_a_ptr, agg_b_ptr, carry_ptr, h_ptr, hprev_ptr, h0_ptr, da_ptr,
    T, N, G, n_chunks,
    PHASE: tl.constexpr, REVERSE: tl.constexpr, HAS_DA: tl.constexpr, HAS_H0_DA: tl.constexpr, CM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Three-pass scan. PHASE 0: store each tile's aggregate map to agg [B, n_chunks, N];
    PHASE 1: rescan each tile from its carry-in [B, n_chunks, N] and store h (and da in the adjoint).
    One grid axis of n_chunks · n_seq programs, tiles of a sequence adjacent (a second axis holds at most 65535:
    channel-major memory has one sequence per channel, B · N of them)."""
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    seq = pid // n_chunks
    bi = seq // G
    offs_n = (seq % G) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    base = bi.to(tl.int64) * T * N
    a, b, t, m = _load_tile(a_ptr, b_ptr, base, chunk, T, N, offs_n, mask_n, REVERSE, CM, BLOCK_T)
    A_loc, B_loc, agg_a, agg_b = _scan_tile(a, b, REVERSE, CM, BLOCK_T)
    agg_off = (bi.to(tl.int64) * n_chunks + chunk) * N + offs_n
    if PHASE == 0:
        tl.store(agg_a_ptr + agg_off, agg_a, mask=mask_n)
        tl.store(agg_b_ptr + agg_off, agg_b, mask=mask_n)
    else:
        carry = tl.load(carry_ptr + agg_off, mask=mask_n, other=0.0)
        _store_tile(carry, A_loc, B_loc, t, m, h_ptr, base, T, N, offs_n, hprev_ptr, h0_ptr, da_ptr, bi, HAS_H0_DA,
                    HAS_DA, CM)


def diag_tile_config(N: int, block_t: int | None = None, block_n: int | None = None,
                     loop: bool = False, channel_major: bool = False, T: int | None = None,
                     reverse: bool = False) -> tuple[int, int, int]:
    """Tile sizes ``(BLOCK_T, BLOCK_N, num_warps)``: rows of up to 32 channels (128-byte fp32 rows) and 64 values per
    thread and tensor. Swept on H200 (fp32, 2^28 elements, 2k-8k-element tiles × 2/4/8 warps: ``python -m
    pflow_dist.bench.scan_sweep``, rows in benchmarks/results/scan_sweep_h200.jsonl): look-back is fastest with
    4096-element tiles on 2 warps for 32-channel rows and 8192 on 4 warps for 16-channel rows (57-67% of copy at
    N = 256 against 38-49% for the former 2048 × 4); the loop kernel (``loop``) with 16-channel rows, 2048 elements
    on 2 warps. Channel-major memory (``channel_major``: T contiguous) takes CM_TILE / CM_LOOP_TILE (CM_ADJOINT_TILE
    for the look-back adjoint, ``reverse``): a program's tile is then BLOCK_N runs of BLOCK_T consecutive steps,
    BLOCK_T at most ``T`` rounded up to a power of two."""
    if channel_major:
        bt, bn, warps = CM_LOOP_TILE if loop else CM_ADJOINT_TILE if reverse else CM_TILE
        return block_t or min(bt, max(16, triton.next_power_of_2(T or bt))), block_n or bn, warps
    bn = block_n or min(32, triton.next_power_of_2(N))
    if loop:
        return block_t or max(16, 2048 // bn), bn, 2
    if bn == 16:
        return block_t or 512, bn, 4
    return block_t or max(16, 4096 // bn), bn, 2


# With ≥ LOOP_MIN_SEQS sequences × 16-channel groups, each program simply walks its own sequence with prefetched
# tiles: one pass, no look-back latency (the short-T regime). H200: 68.5% of copy at B16 T2^16 N256 (256 programs)
# against 66.8% for look-back, but 19% at 64 programs (B4 T2^18), where look-back reaches 64.8%. Everything else
# takes the look-back, which on H200 also beats the three-pass form with a single sequence (49.0% against 47.9% at
# B1 T2^24 N16; 57.7% against 45.2% at B1 T2^20 N256).
LOOP_MIN_SEQS = 256
LOOP_BLOCK_N = 16
# With at most SEGMENT_MAX_SEQS sequences × 32-channel groups and more than 16 channels, the look-back latency is
# paid by few, long rows of tiles: segments of SEGMENT_TILES 2048-element tiles (1 pipeline stage) win. H200 sweep
# (scan_sweep_h200.jsonl, run "sweep-3-segmented"): 56.1% of copy at B1 T2^22 N64 (2 groups) against 45.7% for
# plain look-back; even (56.8% against 57.4%) at B1 T2^20 N256 (8 groups); slower at N16 (35% against 49%).
SEGMENT_MAX_SEQS = 2
SEGMENT_TILES = 8
# Channel-major memory ([B, N, T] stored, T contiguous; accelerated-scan's layout): (BLOCK_T, BLOCK_N, warps) of the
# look-back and loop kernels, and the loop from CM_LOOP_MIN_SEQS sequences × channel groups. H200 sweep (fp32, 2^28
# elements; `python -m pflow_dist.bench.scan_sweep --grid cm`, run "sweep-5-cm" in scan_sweep_h200.jsonl), % of copy:
# the loop over single-channel 4096-step tiles on 4 warps streams at 96.4 / 92.5 / 91.1% at B16 T2^16 / B4 T2^18 /
# B1 T2^20 (N = 256), the best config or within 4 points of it, and falls to 49.8% with 64 sequences (B1 T2^22 N64),
# where the look-back over 4096-step tiles on 2 warps reaches 82.5% (73.1% at B1 T2^24 N16).
CM_TILE = (4096, 1, 2)
# The look-back adjoint (5 tensors: a, ḡ, h in, λ, da out) prefers 2048-step tiles on 4 warps: 78.7 / 77.5 / 78.4% of
# copy at B256 T2^12 / B16 T2^16 / B1 T2^20 against 74.3 / 64.8 / 64.8% for CM_TILE (`--grid cm --adjoint`, run
# "sweep-7-cm-adjoint"); the loop adjoint keeps CM_LOOP_TILE (70-86%, no better tile in run "sweep-8-cm-adjoint-loop").
CM_ADJOINT_TILE = (2048, 1, 4)
CM_LOOP_TILE = (4096, 1, 4)
CM_LOOP_MIN_SEQS = 256


def auto_algorithm(B: int, N: int, channel_major: bool = False) -> dict:
    """The ``diag_scan_triton`` keywords ``algorithm="auto"`` resolves to for ``[B, *, N]`` (tile sizes, warps and
    stages not listed here come from :func:`diag_tile_config` and the defaults)."""
    if channel_major:
        return dict(algorithm="loop" if B * triton.cdiv(N, CM_LOOP_TILE[1]) >= CM_LOOP_MIN_SEQS else "lookback")
    if B * triton.cdiv(N, LOOP_BLOCK_N) >= LOOP_MIN_SEQS:
        return dict(algorithm="loop", block_n=LOOP_BLOCK_N)
    if N > 16 and B * triton.cdiv(N, 32) <= SEGMENT_MAX_SEQS:
        return dict(algorithm="lookback", segment=SEGMENT_TILES, block_t=2048 // 32, num_stages=1)
    return dict(algorithm="lookback")


def is_channel_major(x: torch.Tensor) -> bool:
    """Whether a ``[B, T, N]`` tensor is stored channel-major (``[B, N, T]`` memory, T contiguous, e.g. the
    ``transpose(1, 2)`` view of a contiguous ``[B, N, T]`` tensor) and not also plain contiguous (N = 1 or T = 1 are
    both: those run time-major)."""
    return x.dim() == 3 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def to_channel_major(x: torch.Tensor) -> torch.Tensor:
    """The values of a ``[B, T, N]`` tensor stored channel-major (``[B, N, T]`` memory), copied only if needed.

    Raises:
        ValueError: ``x`` is not 3-D.
    """
    if x.dim() != 3:
        raise ValueError(f"to_channel_major takes a [B, T, N] tensor, got shape {list(x.shape)}")
    return x if is_channel_major(x) else x.transpose(1, 2).contiguous().transpose(1, 2)


def _layout(*xs: torch.Tensor | None) -> bool:
    """The shared memory layout of the ``[B, T, N]`` tensors ``xs`` (True: channel-major); a mix is an error."""
    cms = set()
    for x in xs:
        if x is None:
            continue
        if not (x.is_contiguous() or x.transpose(1, 2).is_contiguous()):
            raise ValueError(f"the diagonal scan kernels take [B, T, N] tensors stored [B, T, N] or [B, N, T] "
                             f"(contiguous, or a transposed contiguous [B, N, T]), got strides {x.stride()}")
        cms.add(is_channel_major(x))
    if len(cms) > 1:
        raise ValueError("a, b (and h) must share one memory layout: all [B, T, N]-contiguous or all channel-major")
    return cms.pop() if cms else False


def _grid_dims(B: int, T: int, N: int, bt: int, bn: int) -> tuple[int, int, int]:
    G = triton.cdiv(N, bn)
    return G, triton.cdiv(T, bt), B * G


def diag_scan_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    init: torch.Tensor | None,
    *,
    reverse: bool = False,
    out_dtype: torch.dtype | None = None,
    h: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    want_da: bool = False,
    algorithm: str = "auto",
    block_t: int | None = None,
    block_n: int | None = None,
    window: int = 16,
    publish_inclusive: bool = True,
    num_warps: int | None = None,
    num_stages: int = 3,
    segment: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the diagonal scan (no autograd, no validation: :mod:`pflow_dist.ops.scan` does both).

    Args:
        a, b: ``[B, T, N]`` (fp16/bf16/fp32), same dtype and memory layout: contiguous, or channel-major (stored
            ``[B, N, T]``: :func:`is_channel_major`), which the output and ``da`` then share.
        init: ``[B, N]`` initial state (forward ``h_0``; reverse ``∂L/∂h_T``) or ``None`` (zeros).
        reverse: the adjoint scan ``λ_t = b_t + a_{t+1} λ_{t+1}`` (``b`` is then ``∂L/∂h``).
        out_dtype: dtype of the per-step output (``b.dtype`` when ``None``).
        h, h0: forward states ``[B, T, N]`` and initial state for ``da = λ ⊙ h_{t-1}`` (reverse with want_da).
        algorithm: ``"loop"`` (a program walks each sequence), ``"lookback"`` (single pass over tiles), ``"chunk"``
            (three passes) or ``"auto"`` (:func:`auto_algorithm`: the loop with many sequences × channel groups, the
            segmented look-back with one or two, else the look-back; given tile sizes or segment are kept).
        block_t, block_n, window: tile sizes (defaults from :func:`diag_tile_config`), look-back window.
        num_warps, num_stages: warps per program (default from :func:`diag_tile_config`) and the prefetch depth of
            the loops over tiles (loop kernel, segmented look-back): tuning knobs for ``pflow_dist.bench.scan_sweep``.
        segment: tiles per look-back program: 1 keeps the tile in registers; more streams the segment's aggregate,
            looks back once, then re-reads the tiles (from L2 while the segments in flight fit there).
        publish_inclusive: testing knob: when False only the first tile publishes its inclusive state, so every
            tile looks back to the start (exercises the multi-window path the interpreter never reaches otherwise).

    Returns:
        ``(out [B, T, N] in out_dtype, last [B, N] fp32 — h_T forward, λ_0 reverse, da or None)``.
    """
    B, T, N = b.shape
    if segment < 1:
        raise ValueError(f"segment must be >= 1 tile, got {segment}")
    cm = _layout(a, b, h if want_da else None)
    if algorithm == "auto":
        explicit = block_t is not None or block_n is not None or segment != 1  # then only the algorithm is chosen
        chosen = auto_algorithm(B, N, cm)
        algorithm, block_n = chosen["algorithm"], block_n or chosen.get("block_n")
        if not explicit:
            block_t, segment = chosen.get("block_t"), chosen.get("segment", 1)
            num_stages = chosen.get("num_stages", num_stages)
    bt, bn, warps = diag_tile_config(N, block_t, block_n, loop=algorithm == "loop", channel_major=cm, T=T,
                                     reverse=reverse)
    warps = num_warps or warps
    G, n_chunks, n_seq = _grid_dims(B, T, N, bt, bn)
    out = torch.empty_like(b, dtype=out_dtype or b.dtype)  # keeps b's layout
    last = torch.empty(B, N, device=b.device, dtype=torch.float32)
    da = torch.empty_like(a) if want_da else None
    dummy = out
    hp, h0p, dap = (h if want_da else dummy), (h0 if h0 is not None else dummy), (da if want_da else dummy)
    if algorithm == "loop":
        if reverse:
            loop_diag_scan_bwd_kernel[(n_seq,)](a, b, init if init is not None else dummy, out, last, hp, h0p, dap,
                                                T, N, G, n_chunks, HAS_GT=init is not None, HAS_DA=want_da,
                                                HAS_H0=h0 is not None, CM=cm, BLOCK_T=bt, BLOCK_N=bn,
                                                NUM_STAGES=num_stages, num_warps=warps)
        else:
            loop_diag_scan_fwd_kernel[(n_seq,)](a, b, init if init is not None else dummy, out, last, T, N, G,
                                                n_chunks, HAS_INIT=init is not None, CM=cm, BLOCK_T=bt, BLOCK_N=bn,
                                                NUM_STAGES=num_stages, num_warps=warps)
        return out, last, da
    if algorithm == "lookback":
        n_segs = triton.cdiv(n_chunks, segment)  # look-back units of `segment` tiles
        state = torch.full((n_seq * n_segs * 3 * bn,), SENTINEL, dtype=torch.int32, device=b.device)
        counter = torch.zeros(1, dtype=torch.int32, device=b.device)
        # every thread must own distinct elements of the [WINDOW, BLOCK_N] look-back tile: replicas of one word load
        # it separately (volatile) and can disagree on "published yet", folding a map one replica counts as missing
        window = max(window, triton.cdiv(32 * warps, bn))
        common = dict(PUBLISH_INCLUSIVE=publish_inclusive, CM=cm, BLOCK_T=bt, BLOCK_N=bn, WINDOW=window, SEG=segment,
                      NUM_STAGES=num_stages, num_warps=warps)
        grid = (n_segs * n_seq,)
        if reverse:
            lookback_diag_scan_bwd_kernel[grid](
                a, b, init if init is not None else dummy, out, last, state, counter, hp, h0p, dap,
                T, N, G, n_segs, n_seq, HAS_GT=init is not None, HAS_DA=want_da, HAS_H0=h0 is not None, **common,
            )
        else:
            lookback_diag_scan_fwd_kernel[grid](
                a, b, init if init is not None else dummy, out, last, state, counter, T, N, G, n_segs, n_seq,
                HAS_INIT=init is not None, STORE_FINAL=True, **common,
            )
        return out, last, da
    if algorithm != "chunk":
        raise ValueError(f"algorithm must be 'auto', 'loop', 'lookback' or 'chunk', got {algorithm!r}")
    agg_a = torch.empty(B, n_chunks, N, device=b.device, dtype=torch.float32)
    agg_b = torch.empty_like(agg_a)
    common = dict(REVERSE=reverse, HAS_DA=want_da, HAS_H0_DA=h0 is not None, CM=cm, BLOCK_T=bt, BLOCK_N=bn,
                  num_warps=warps)
    chunk_diag_scan_fwd_kernel[(n_chunks * n_seq,)](a, b, agg_a, agg_b, agg_a, out, hp, h0p, dap, T, N, G, n_chunks,
                                                  PHASE=0, **common)
    # states at the end of every tile: the same scan over the tile maps (already in scan order), from init
    if n_chunks > 1:
        ends, last_, _ = diag_scan_triton(agg_a, agg_b, init, out_dtype=torch.float32, algorithm="auto",
                                          block_t=block_t, block_n=block_n, window=window)
        first = init.float().unsqueeze(1) if init is not None else agg_b.new_zeros(B, 1, N)
        carry = torch.cat([first, ends[:, :-1]], dim=1).contiguous()
    else:
        carry = init.float().unsqueeze(1).contiguous() if init is not None else agg_b.new_zeros(B, 1, N)
        last_ = agg_a[:, 0] * carry[:, 0] + agg_b[:, 0]
    chunk_diag_scan_fwd_kernel[(n_chunks * n_seq,)](a, b, agg_a, agg_b, carry, out, hp, h0p, dap, T, N, G, n_chunks,
                                                  PHASE=1, **common)
    last.copy_(last_)
    return out, last, da


def diag_scan_map(a: torch.Tensor, b: torch.Tensor, *, reverse: bool = False, block_t: int | None = None,
                  block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence's map of ``h_t = a_t ⊙ h_{t-1} + b_t``: ``h_T = M ⊙ h_0 + D`` (no autograd); with
    ``reverse``, that of the adjoint ``λ_t = b_t + a_{t+1} ⊙ λ_{t+1}`` (``a_T := 1``): ``λ_1 = M ⊙ λ_{T+1} + D``, so
    ``D`` is the adjoint's first value from zero and ``M = Π_{t≥2} a_t``.

    One read of ``a`` and ``b`` (the three-pass scan's first pass: every tile's map), then the tile maps folded: ``M``
    by a product over tiles, ``D`` by a scan over them. Nothing of length T is written, where a scan from zero for
    ``D`` writes all of h (the sequence-parallel DEER step needs only the shard's map before its real scan).

    Args:
        a, b: ``[B, T, N]`` (fp16/bf16/fp32), same dtype and layout (contiguous or channel-major).

    Returns:
        ``(M [B, N], D [B, N])`` in float32.
    """
    B, T, N = b.shape
    cm = _layout(a, b)
    bt, bn, warps = diag_tile_config(N, block_t, block_n, channel_major=cm, T=T, reverse=reverse)
    G, n_chunks, n_seq = _grid_dims(B, T, N, bt, bn)
    agg_a = torch.empty(B, n_chunks, N, device=b.device, dtype=torch.float32)
    agg_b = torch.empty_like(agg_a)
    chunk_diag_scan_fwd_kernel[(n_chunks * n_seq,)](a, b, agg_a, agg_b, agg_a, agg_a, agg_a, agg_a, agg_a, T, N, G,
                                                  n_chunks, PHASE=0, REVERSE=reverse, HAS_DA=False, HAS_H0_DA=False,
                                                  CM=cm, BLOCK_T=bt, BLOCK_N=bn, num_warps=warps)
    if n_chunks == 1:
        return agg_a[:, 0], agg_b[:, 0]
    return agg_a.prod(dim=1), diag_scan_triton(agg_a, agg_b, None, out_dtype=torch.float32)[1]
