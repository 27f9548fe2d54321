"""Tolerance helpers: compare a result with a reference and report max abs / max rel / relative-RMS error.

The pass criterion is relative RMS, ``rms(ref − out) / rms(ref)`` (as fla's ``assert_close``): elementwise rtol gives
false failures on long sequences where a few entries are near zero. Max abs and max rel are reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ErrorStats", "assert_close", "error_stats"]


@dataclass(frozen=True)
class ErrorStats:
    """Errors of ``out`` against ``ref`` (computed in float64)."""

    max_abs: float
    max_rel: float
    rms_ratio: float
    ref_rms: float

    def __str__(self) -> str:
        return f"max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e} rms_ratio={self.rms_ratio:.3e}"


def error_stats(ref: torch.Tensor, out: torch.Tensor) -> ErrorStats:
    """Max abs, max rel (``|ref − out| / max(|ref|, tiny)``) and relative-RMS error of ``out`` against ``ref``.

    Raises:
        ValueError: the shapes differ.
    """
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs result {tuple(out.shape)}")
    r = ref.detach().to(torch.float64).cpu()
    o = out.detach().to(torch.float64).cpu()
    if r.numel() == 0:
        return ErrorStats(0.0, 0.0, 0.0, 0.0)
    diff = (r - o).abs()
    ref_rms = r.pow(2).mean().sqrt().item()
    rms = diff.pow(2).mean().sqrt().item()
    tiny = torch.finfo(torch.float64).tiny
    return ErrorStats(
        max_abs=diff.max().item(),
        max_rel=(diff / r.abs().clamp_min(tiny)).max().item(),
        rms_ratio=rms / ref_rms if ref_rms > 0 else (0.0 if rms == 0 else math.inf),
        ref_rms=ref_rms,
    )


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float = 0.0) -> ErrorStats:
    """Assert ``out`` matches ``ref``: no NaN/Inf where ``ref`` is finite, and relative RMS error ``< ratio``
    (or every entry within ``atol``). Returns the stats; the assertion message reports all three errors.

    Args:
        name: what is compared (e.g. ``"dq"``), shown in the message.
        ref: the reference (typically float64).
        out: the result under test.
        ratio: the largest accepted relative RMS error.
        atol: an absolute tolerance that also passes (for tensors that are ~0 everywhere).
    """
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        bad = (~torch.isfinite(out)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite value(s) in the result, none in the reference")
    stats = error_stats(ref, out)
    if not (stats.rms_ratio < ratio or stats.max_abs <= atol):
        raise AssertionError(f"{name}: {stats} exceeds ratio={ratio:g} (atol={atol:g})")
    return stats
