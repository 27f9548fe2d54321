"""Input checks of sliding-window + global-token sparse attention, shared by the reference, the op and the SP op.

Layout (DESIGN.md §2): ``q [B, T, H, D]``, ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]`` with ``H % Hkv == 0``
(grouped-query attention: query head ``h`` reads key/value head ``h // (H // Hkv)``; ``Hkv == H`` is plain
multi-head attention). Global tokens are one set of positions shared by every batch row and head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..common.checks import check_same_device, check_tensor

__all__ = ["INF_WINDOW", "AttnDims", "check_attention_inputs", "check_scale", "check_window", "normalize_global_idx"]

INF_WINDOW = 1 << 30  # "no window" (full causal rows): t − s < 2^30 for every position the int32 kernels address


@dataclass(frozen=True)
class AttnDims:
    """Sizes of one attention problem: ``rep = H // Hkv`` query heads share one key/value head."""

    B: int
    T: int
    H: int
    Hkv: int
    D: int
    Dv: int

    @property
    def rep(self) -> int:
        return self.H // self.Hkv


def check_attention_inputs(q: object, k: object, v: object, *, same_length: bool = True) -> AttnDims:
    """Validate ``q [B, T, H, D]``, ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, Dv]``: one float dtype, one device,
    ``H`` divisible by ``Hkv``. With ``same_length=False`` k/v may have another length than q (key ranges).

    Raises:
        TypeError: not tensors, non-float dtype, or dtypes differ.
        ValueError: wrong rank or sizes, T = 0, devices differ.
    """
    check_tensor("q", q, ndim=4, dims="[B, T, H, D]")
    B, T, H, D = q.shape
    if T == 0:
        raise ValueError("q must have at least one time step (T >= 1), got T=0")
    check_tensor("k", k, ndim=4, dims="[B, T, Hkv, D]")
    Hkv = k.shape[2]
    Tk = T if same_length else None
    check_tensor("k", k, shape=(B, Tk, None, D), dims="[B, T, Hkv, D] (B and D as in q)")
    check_tensor("v", v, shape=(B, k.shape[1], Hkv, None), dims="[B, T, Hkv, Dv] (B, T, Hkv as in k)")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"the number of query heads H={H} must be a multiple of the key/value heads Hkv={Hkv}")
    if D == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be >= 1, got D={D}, Dv={v.shape[-1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    check_same_device(q=q, k=k, v=v)
    return AttnDims(B=B, T=T, H=H, Hkv=Hkv, D=D, Dv=v.shape[-1])


def check_window(window: object) -> int:
    """``window`` is a positive int (query ``t`` sees keys ``t − window + 1 .. t``); any size, also ``> T``."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int >= 1, got {type(window).__name__} {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (query t sees keys t-window+1..t), got window={window}")
    return window


def check_scale(scale: object, D: int) -> float:
    """The softmax scale: ``D ** -0.5`` for ``None``, else a finite number."""
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def normalize_global_idx(
    global_idx: torch.Tensor | Sequence[int] | None,
    n_global: int,
    T: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The global-token positions as a sorted ``int64`` tensor (possibly empty).

    Args:
        global_idx: positions ``0 ≤ j < T`` (1-D integer tensor or sequence of ints, any order, no duplicates), or
            ``None``.
        n_global: shorthand for ``global_idx = range(n_global)`` (the first ``n_global`` positions, "attention
            sinks"); ``0 ≤ n_global ≤ T``; not together with ``global_idx``.
        T: sequence length the positions index.
        device: where the returned tensor lives.

    Raises:
        TypeError: non-integer indices.
        ValueError: both given, out of range, duplicated, not 1-D.
    """
    if isinstance(n_global, bool) or not isinstance(n_global, int):
        raise TypeError(f"n_global must be an int, got {type(n_global).__name__} {n_global!r}")
    if not 0 <= n_global <= T:
        raise ValueError(f"n_global must be in [0, T={T}], got {n_global}")
    if global_idx is not None and n_global:
        raise ValueError(f"pass either global_idx or n_global, not both (got global_idx and n_global={n_global})")
    if global_idx is None:
        return torch.arange(n_global, dtype=torch.int64, device=device)
    if isinstance(global_idx, torch.Tensor):
        idx = global_idx
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"global_idx must hold integers, got dtype {idx.dtype}")
    else:
        items = list(global_idx)
        bad = [x for x in items if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise TypeError(f"global_idx must hold ints, got {bad[0]!r} ({type(bad[0]).__name__})")
        idx = torch.tensor(items, dtype=torch.int64)
    if idx.dim() != 1:
        raise ValueError(f"global_idx must be 1-D (positions shared by every batch row and head), "
                         f"got shape {list(idx.shape)}")
    idx = idx.to(device="cpu", dtype=torch.int64)  # validated on the host: one copy instead of several GPU syncs
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= T:
            raise ValueError(f"global_idx must lie in [0, T={T}), got min={lo}, max={hi}")
    idx, counts = torch.unique(idx, sorted=True, return_counts=True)
    if idx.numel() and int(counts.max()) > 1:
        dup = idx[counts > 1].tolist()
        raise ValueError(f"global_idx must not repeat a position, got duplicates {dup[:8]}")
    return idx.to(device)
