# Linear-time (in practice) exact ℓ1-ball threshold on CPU: the vectorised form of Condat's method ("Fast projection
# onto the simplex and the l1 ball", Math. Prog. 158, 2016) for a batch of vectors, written with numpy passes.
#
# Condat's algorithm is Michelot's variable fixing (τ ← (Σ_{v>τ} v − η)/#{v>τ}, which rises monotonically to the exact
# τ and stops when the active set repeats) started from a lower bound that a cheap first pass finds, so that the
# iterations only see a few candidates. Its first pass is sequential (one update per entry) and cannot be vectorised;
# what makes it work is a fact we use directly:
#   for ANY subset T of the entries, (Σ_T v − η)/|T| <= τ*,
# because Σ_T v <= S_|T| (the sum of the |T| largest) and τ* = max_k (S_k − η)/k (the sort formula). So
#   1. pivot: sort a fixed sample of s = 128 entries per vector, take its threshold at the scaled radius η·s/n, and
#      step a few sample ranks below it (Floyd–Rivest / Kiwiel-style sampled pivot p ≈ τ*, slightly under);
#   2. one pass over the vector gives T = {v > p}: t = max((Σ_T v − η)/|T|, (Σ v − η)/n, 0) is a guaranteed lower bound,
#      whatever p was (if p overshot τ*, t is merely less tight);
#   3. Michelot from t: every entry <= t is inactive for good, so the candidates are compacted once they are few
#      (< 1/4 of the entries) and the remaining passes cost O(#candidates). A good pivot leaves 1–3 passes.
# Cost: one sum pass + one masked pass over all n entries + the passes over the candidates, i.e. O(n) with a small
# constant; after MAX_PASSES passes (never seen on random, tied or heavy-tailed data) the candidates of the rows left
# are sorted (sort formula on a superset of the active set: exact), so the worst case is O(MAX_PASSES·n + n log n).
# The result is exact up to the order of float64 summation (the sort method sums the same entries in another order).
"""Exact ℓ1-ball threshold by sampled pivot + Michelot on compacted candidates (Condat's scheme, vectorised)."""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["MAX_PASSES", "SAMPLE", "threshold_pivot"]

SAMPLE = 128  # sample size of the pivot (per vector); vectors shorter than 2·SAMPLE start from (Σ v − η)/n
MAX_PASSES = 12  # Michelot passes before the rows left are finished by sorting their candidates
_COMPACT_BELOW = 0.25  # compact the candidates once fewer than this fraction of the entries remain


def threshold_pivot(a: torch.Tensor, eta: torch.Tensor, *, max_passes: int = MAX_PASSES) -> torch.Tensor:
    """τ along the last dim of ``a >= 0`` (finite, non-empty last dim); ``eta`` broadcasts to ``a.shape[:-1]``.

    Runs in float64 numpy on the CPU (a CUDA tensor makes a host round trip). Returns τ in ``a``'s dtype and device.
    """
    n = a.shape[-1]
    A = a.detach().to(device="cpu", dtype=torch.float64).reshape(-1, n).contiguous().numpy()
    e = eta.detach().to(device="cpu", dtype=torch.float64).expand(a.shape[:-1]).reshape(-1).numpy()
    tau = _threshold_np(A, np.ascontiguousarray(e), max_passes)
    return torch.from_numpy(tau).reshape(a.shape[:-1]).to(device=a.device, dtype=a.dtype)


def _threshold_np(A: np.ndarray, eta: np.ndarray, max_passes: int) -> np.ndarray:
    B, n = A.shape
    total = A.sum(1)
    tau = np.zeros(B)
    zero = (eta == 0) & (total > 0)  # the ball {0}: τ = max v clips everything
    tau[zero] = A[zero].max(1) if zero.any() else 0
    solve = np.flatnonzero((total > eta) & (eta > 0))
    if solve.size == 0:
        return tau
    if solve.size < B:
        A, eta, total = A[solve], eta[solve], total[solve]
    tau[solve] = _solve(A, eta, total, max_passes)
    return tau


@functools.lru_cache(maxsize=64)
def _sample_index(n: int, s: int) -> np.ndarray:
    """``s`` distinct positions out of ``n``, fixed per ``(n, s)`` (deterministic results), sorted."""
    return np.sort(np.random.default_rng(n).choice(n, s, replace=False))


def _sample_bracket(A: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values a little under and a little over the estimated τ of each row (not bounds: a pass verifies them)."""
    B, n = A.shape
    s = min(SAMPLE, n // 4)
    Z = -np.sort(-A[:, _sample_index(n, s)], axis=1)
    cs = np.cumsum(Z, axis=1)
    est = ((cs - (eta * (s / n))[:, None]) / np.arange(1, s + 1)).max(1)
    k_hat = np.count_nonzero(Z > est[:, None], axis=1)  # sample entries above the estimated threshold
    step = np.ceil(1.5 * np.sqrt(k_hat + 1)).astype(np.int64) + 2  # ~1.5 s.d. of the count either side
    rows = np.arange(B)
    hi = np.where(k_hat - step >= 0, Z[rows, np.maximum(k_hat - step, 0)], np.inf)
    return Z[rows, np.minimum(k_hat + step, s - 1)], hi


def _solve(A: np.ndarray, eta: np.ndarray, total: np.ndarray, max_passes: int) -> np.ndarray:
    """τ of rows that are outside their ball with η > 0."""
    B, n = A.shape
    t = np.maximum((total - eta) / n, 0.0)  # T = all entries
    if n >= 8 * 32:
        lo, hi = _sample_bracket(A, eta)
        lo = np.maximum(lo, t)
        m_hi = A > hi[:, None]
        c_hi = np.count_nonzero(m_hi, axis=1)
        s_hi = np.einsum("ij,ij->i", A, m_hi)
        band = A > lo[:, None]
        band &= ~m_hi
        c_band = np.count_nonzero(band, axis=1)
        vals = A[band]
        s_band = _segment_sum(vals, c_band)
        c_lo, s_lo = c_hi + c_band, s_hi + s_band
        # T = {v > lo} gives a bound whatever lo was; lo <= τ* <= hi when f(lo) >= 0 >= f(hi)
        t = np.maximum(np.where(c_lo > 0, (s_lo - eta) / np.maximum(c_lo, 1), 0.0), t)
        ok = (s_lo - c_lo * lo >= eta) & (s_hi - c_hi * np.where(c_hi > 0, hi, 0) <= eta)
        if ok.all():  # every active entry is above hi (known) or in the band: Michelot on the band only
            return _solve_compact(vals, c_band, t, eta, max_passes, s_hi, c_hi)
    # Michelot on the full rows while most entries are candidates (masked passes, no copies)
    cnt = np.full(B, n + 1)
    for _ in range(max_passes):
        m = A > t[:, None]
        new_cnt = np.count_nonzero(m, axis=1)
        if (new_cnt == cnt).all():
            return t
        cnt = new_cnt
        if cnt.sum() < _COMPACT_BELOW * A.size:
            return _solve_compact(A[m], cnt, t, eta, max_passes)
        t = np.where(cnt > 0, (np.einsum("ij,ij->i", A, m) - eta) / np.maximum(cnt, 1), t)
    m = A > t[:, None]
    return _finish_by_sort(A[m], np.count_nonzero(m, axis=1), t, eta)


def _segment_sum(x: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """Σ of each row's run in ``x`` (rows stored one after the other, ``cnt`` entries each; empty runs give 0)."""
    starts = np.concatenate(([0], np.cumsum(cnt)[:-1]))
    sums = np.add.reduceat(np.append(x, x.dtype.type(0)), starts)  # the appended 0 keeps an empty last run in range
    return np.where(cnt > 0, sums, 0)  # reduceat returns x[start] for an empty run


def _solve_compact(vals: np.ndarray, cnt: np.ndarray, t: np.ndarray, eta: np.ndarray, max_passes: int,
                   s_known: np.ndarray | float = 0.0, c_known: np.ndarray | int = 0) -> np.ndarray:
    """Michelot on the compacted candidates ``vals`` (row-major runs of ``cnt``) from the lower bounds ``t``;
    ``s_known``/``c_known``: sum and count per row of entries known to be active (not in ``vals``)."""
    for _ in range(max_passes):
        c = cnt + c_known
        t_new = np.where(c > 0, (_segment_sum(vals, cnt) + s_known - eta) / np.maximum(c, 1), t)
        keep = vals > np.repeat(t_new, cnt)
        if keep.all():
            return t_new
        t = t_new
        cnt = _segment_sum(keep.astype(np.int64), cnt)
        vals = vals[keep]
    return _finish_by_sort(vals, cnt, t, eta, s_known, c_known)


def _finish_by_sort(vals: np.ndarray, cnt: np.ndarray, t: np.ndarray, eta: np.ndarray,
                    s_known: np.ndarray | float = 0.0, c_known: np.ndarray | int = 0) -> np.ndarray:
    """The sort formula on each row's candidates plus its known-active entries (a superset of the active set, so
    the result is exact): τ = max_k (S_k − η)/k over k >= #known."""
    out = t.copy()
    ends = np.cumsum(cnt)
    s_known = np.broadcast_to(s_known, cnt.shape)
    c_known = np.broadcast_to(c_known, cnt.shape)
    for r in range(cnt.size):
        z = -np.sort(-vals[ends[r] - cnt[r]:ends[r]])
        S = np.concatenate(([s_known[r]], s_known[r] + np.cumsum(z)))
        k = c_known[r] + np.arange(z.size + 1)
        valid = k > 0
        if valid.any():
            out[r] = max(t[r], ((S[valid] - eta[r]) / k[valid]).max())
    return out
