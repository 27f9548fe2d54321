# Building blocks shared by the models: RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), the SwiGLU MLP
# (Shazeer 2020, arXiv 2002.05202) and the short causal depthwise convolution that delta-rule layers put in front of
# q/k/v (DeltaNet, Yang et al. 2024, arXiv 2406.06484 §3.3; Mamba's conv1d). Plain torch: these are cheap next to the
# flow op and the matmuls, and torch.compile fuses them on GPU.
"""RMSNorm, SwiGLU MLP and a short causal depthwise convolution, all ``[B, T, D]`` in, ``[B, T, D]`` out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "ShortConv", "SwiGLU", "swiglu_hidden"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dimension, computed in (at least) float32, returned in ``x.dtype``.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square.

    Example::

        >>> RMSNorm(8)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays fp64
        xf = x.to(acc)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(acc)).to(x.dtype)


def swiglu_hidden(d_model: int, mlp_ratio: float, multiple_of: int = 16) -> int:
    """Hidden width of a SwiGLU MLP with the parameter count of a ``mlp_ratio``× GELU MLP (LLaMA's 2/3 rule),
    rounded up to ``multiple_of`` so matmuls stay tensor-core friendly."""
    h = int(2 * mlp_ratio * d_model / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``.

    Args:
        d_model: input and output width.
        hidden: inner width (see :func:`swiglu_hidden`).

    Example::

        >>> SwiGLU(8, 16)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)  # one matmul for both branches
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over time followed by SiLU: ``y_t = silu(Σ_{j<w} W_j ⊙ x_{t-j})``.

    It lets a token's key see the previous few tokens, which is what makes one delta-rule layer able to store
    "key → next token" pairs (the induction / associative-recall circuit) without a second layer.
    Under sequence parallelism a shard needs the previous shard's last ``kernel_size - 1`` inputs (a halo); the
    caller passes them as ``cache`` (``[B, kernel_size - 1, D]``).

    Args:
        dim: channels ``D``.
        kernel_size: window ``w`` (4 in DeltaNet / Mamba).

    Example::

        >>> ShortConv(6, 4)(torch.randn(2, 5, 6)).shape
        torch.Size([2, 5, 6])
    """

    def __init__(self, dim: int, kernel_size: int = 4) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv1d's default

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        pad = self.kernel_size - 1
        if cache is None:
            xp = F.pad(x.transpose(1, 2), (pad, 0))
        else:
            if cache.shape != (x.shape[0], pad, x.shape[2]):
                raise ValueError(f"cache must be [B, kernel_size-1, D] = {(x.shape[0], pad, x.shape[2])}, "
                                 f"got {tuple(cache.shape)}")
            xp = torch.cat([cache, x], dim=1).transpose(1, 2)
        y = F.conv1d(xp, self.weight.to(x.dtype), self.bias.to(x.dtype), groups=x.shape[2])
        return F.silu(y[..., :T].transpose(1, 2))
