# The SAE's bi-level ℓ1,∞ projection on a DeepSpeed ZeRO-3 parameter, without gathering it (arXiv 2407.16293;
# research/projection.md §6.3 case B and §6.4).
#
# Under ZeRO-3 every rank holds one flat partition of each parameter: the fp32 master partition in the optimizer
# (safe_get/set_local_fp32_param) and the 16-bit partition the forward all-gathers (param.ds_tensor). Rank r owns the
# flat entries [r·p, (r+1)·p) of the row-major weight (p = partition size; the last one is padded), so a group (a column
# of W [out, in] for feature selection, or a row) is cut across ranks. The bi-level projection only needs, per group,
# the max |w| over the full matrix: each rank scatter-maxes its entries into a [G] vector, one all-reduce(MAX) over the
# parameter's process group makes it global (max is exact, so every rank holds the same vector), every rank computes the
# same threshold from it with the single-process code (projection_tree.root_threshold/root_radii), and clips its own
# entries. The result is bitwise the single-process bilevel_project of the full fp32 master; traffic is G floats, not
# the matrix. The 16-bit partition receives the projected fp32 values cast down, as a full gather-and-copy would (and a
# small parameter that ZeRO-3 keeps resident in full has that copy refreshed by one all-gather).
"""ZeRO-3: bi-level ℓ1,∞ projection and feature masks applied to the local fp32/16-bit partitions of a weight."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.projection_tree import root_radii, root_threshold, to_dtype_toward_zero

__all__ = ["is_zero3", "mask_partitioned_", "project_partitioned_"]


def is_zero3(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by DeepSpeed ZeRO-3."""
    return hasattr(param, "ds_id")


def _local(param: torch.Tensor, reduce_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(fp32 partition, group index of each entry, valid mask, G)`` of this rank's partition of a 2-D ``param``."""
    from deepspeed.utils import safe_get_local_fp32_param

    shape = tuple(param.ds_shape)
    if len(shape) != 2 or reduce_dim not in (0, 1):
        raise ValueError(f"ZeRO-3 projection takes 2-D weights with reduce_dim 0 or 1, got shape {shape} and "
                         f"reduce_dim {reduce_dim}")
    frag = safe_get_local_fp32_param(param)
    p = frag.numel()
    rank = dist.get_rank(group=param.ds_process_group)
    flat = torch.arange(rank * p, (rank + 1) * p, device=frag.device)
    valid = flat < param.ds_numel  # the last partition is padded
    groups = flat % shape[1] if reduce_dim == 0 else (flat // shape[1]).clamp_max_(shape[0] - 1)
    return frag, groups, valid, shape[1 - reduce_dim]


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set this rank's fp32 master partition and its 16-bit partition (what the next forward gathers). A parameter
    whose full 16-bit copy stays resident (ZeRO-3 keeps small ones, below ``stage3_param_persistence_threshold``,
    gathered between steps) gets it refreshed by an all-gather of the new partitions: a collective then."""
    from deepspeed.utils import safe_set_local_fp32_param

    safe_set_local_fp32_param(param, value)
    part = param.ds_tensor.data
    part.copy_(value.to(part.dtype))
    if param.numel() == param.ds_numel:  # resident full copy
        group = param.ds_process_group
        full = torch.empty(dist.get_world_size(group=group) * part.numel(), dtype=part.dtype, device=part.device)
        dist.all_gather_into_tensor(full, part, group=group)
        param.data.copy_(full[: param.ds_numel].view(param.data.shape))


@torch.no_grad()
def project_partitioned_(param: torch.Tensor, eta: float | None = None, *, eta_frac: float | None = None,
                         reduce_dim: int = 0, method: str = "auto") -> tuple[torch.Tensor, float]:
    """Bi-level ℓ1,∞ projection of a ZeRO-3 weight ``[out, in]`` in place, on every rank's partition (collective).

    Args:
        param: a 2-D parameter partitioned by ZeRO-3 (all ranks of its process group must call).
        eta: radius >= 0; or ``eta_frac``: the radius as a fraction of the current ``‖W‖_{1,∞}``.
        reduce_dim: the dim inside a group: 0 groups columns (input features, the SAE), 1 groups rows.
        method: ℓ1 threshold method of the root (as in :func:`~pflow_dist.ops.projection.bilevel_project`).

    Returns:
        ``(kept, eta)``: the bool ``[G]`` mask of groups left nonzero (same on every rank) and the radius used.

    Raises:
        ValueError: not exactly one of ``eta``/``eta_frac``, a negative radius, a weight with NaN/Inf on any rank.
    """
    if (eta is None) == (eta_frac is None):
        raise ValueError("give exactly one of eta and eta_frac")
    frag, groups, valid, G = _local(param, reduce_dim)
    mag = torch.where(valid, frag.abs(), 0)
    # partial group maxima plus a NaN/Inf flag, made global by one all-reduce(MAX)
    v = torch.zeros(G + 1, dtype=frag.dtype, device=frag.device)
    v[:G].scatter_reduce_(0, groups, mag, "amax")
    v[G] = float(not bool(torch.isfinite(mag).all()))
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=param.ds_process_group)
    v, bad = v[:G], bool(v[G])
    if bad:
        raise ValueError("the weight has NaN or Inf entries; not projecting")
    total = float(v.sum(dtype=torch.float64))
    eta = float(eta_frac) * total if eta is None else float(eta)
    if eta < 0 or eta != eta:
        raise ValueError(f"eta must be >= 0 (the ball of a negative radius is empty), got {eta}")
    if total <= eta:  # inside the ball: nothing changes (bitwise)
        return v > 0, eta
    bound = to_dtype_toward_zero(root_radii(v, root_threshold(v, eta, method)), frag.dtype)
    b = bound[groups]
    _write(param, torch.where(valid, torch.clamp(frag, -b, b), frag))
    return bound > 0, eta


@torch.no_grad()
def mask_partitioned_(param: torch.Tensor, kept: torch.Tensor, *, reduce_dim: int = 0) -> None:
    """Zero the groups of a ZeRO-3 weight where ``kept [G]`` is False, in both partitions (local; a collective only
    for a parameter kept resident, see :func:`_write`)."""
    frag, groups, valid, G = _local(param, reduce_dim)
    if kept.shape != (G,):
        raise ValueError(f"kept must have shape ({G},), got {tuple(kept.shape)}")
    keep = kept.to(device=frag.device)[groups] | ~valid
    _write(param, torch.where(keep, frag, 0))
