"""Input checks shared by every public function: errors name the expected and the received value."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["FLOAT_DTYPES", "check_same_device", "check_tensor"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
    dims: str | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a tensor with the given rank, shape (``None`` = any size) and dtype.

    Args:
        name: the argument's name, used in the message.
        ndim: the allowed rank(s).
        shape: the expected sizes; ``None`` entries are free.
        dtypes: the allowed dtypes (floating types by default; ``None`` allows any).
        dims: a readable layout such as ``"[B, T, H, K]"`` for the message.

    Raises:
        TypeError: ``x`` is not a tensor or has a dtype outside ``dtypes``.
        ValueError: wrong rank or size.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    layout = f" {dims}" if dims else ""
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions{layout}, got shape {tuple(x.shape)}")
    if shape is not None:
        if x.dim() != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}{layout}, got {list(x.shape)}")
    if dtypes is not None:
        allowed_dtypes = tuple(dtypes)
        if x.dtype not in allowed_dtypes:
            want = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
            raise TypeError(f"{name} must have dtype in ({want}), got {str(x.dtype).replace('torch.', '')}")
    return x


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (``None`` skipped) live on one device; return it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"all inputs must be on one device: {first_name} is on {first}, {k} is on {d}")
    return first
