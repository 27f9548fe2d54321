# The sparse-attention token mixer of hybrid models (DESIGN.md §8-9): softmax attention over a causal sliding window
# plus a few global tokens (Longformer, Beltagy et al. 2020, arXiv 2004.05150; attention sinks, Xiao et al. 2023,
# arXiv 2309.17453), interleaved with flow mixers every k-th layer. Hybrids of linear-recurrent and local-attention
# layers (Griffin, De et al. 2024, arXiv 2402.19427; Samba, Ren et al. 2024, arXiv 2406.07522) use exactly this:
# the recurrence carries the long range, the window gives exact recall of recent tokens. Rotary position embedding
# (RoFormer, Su et al. 2021, arXiv 2104.09864; GPT-NeoX half-split layout) on q and k, at the tokens' positions in the
# whole sequence, so a sequence-parallel shard rotates by its global offset.
"""``SparseAttentionMixer``: q/k/v/o projections, optional RoPE and QK-norm, the sparse attention op;
``[B, T, d_model] -> [B, T, d_model]`` like every token mixer."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..ops.sparse_attention import sparse_attention
from .layers import RMSNorm

__all__ = ["SparseAttentionMixer", "apply_rotary", "rotary_tables"]


def rotary_tables(positions: torch.Tensor, dim: int, base: float = 10000.0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, dim // 2]`` of RoPE at integer ``positions [T]``: angle ``pos · base^(−2i/dim)``, computed in
    ``dtype`` (float32; float64 for float64 models). Positions up to 2^24 are exact in float32."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim)
    ang = positions.to(dtype)[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` pairwise, (x_i, x_{i+D/2}) by the angle of frequency i (half-split layout);
    computed in the tables' dtype, returned in ``x.dtype``."""
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


@torch.compiler.disable  # reads lengths back to the host
def _shard_offset(T_local: int, group: Any, device: torch.device) -> int:
    """Position of this shard's first token: the sum of the lengths of the ranks before it (one tiny all-gather)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    lengths = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([T_local], dtype=torch.int64, device=dev), group=group)
    return int(sum(int(n.item()) for n in lengths[:rank]))


class SparseAttentionMixer(nn.Module):
    """Causal sliding-window + global-token softmax attention as a token mixer.

    Args:
        d_model: input and output width.
        n_heads: query heads H.
        window: attention window W (query t reads keys t − W + 1 .. t).
        n_global: the first ``n_global`` positions of the (whole) sequence are global tokens (read by every later
            token, and reading their whole prefix); 0 for a pure sliding window.
        n_kv_heads: key/value heads (GQA), default ``n_heads``; must divide ``n_heads``.
        head_dim: per-head width, default ``d_model // n_heads``.
        rope: apply rotary position embedding to q and k (needs an even ``head_dim``).
        rope_base: RoPE base frequency.
        qk_norm: RMS-normalise q and k per head before RoPE (stabilises attention logits in hybrids).
        backend: the op's backend (``"auto"``: Triton on CUDA, blocked torch on CPU; ``"triton"``, ``"flex"``,
            ``"torch"``).

    Example::

        >>> m = SparseAttentionMixer(32, n_heads=4, window=8, n_global=2, n_kv_heads=2)
        >>> m(torch.randn(2, 20, 32)).shape
        torch.Size([2, 20, 32])
    """

    def __init__(self, d_model: int, n_heads: int, window: int, n_global: int = 0, *, n_kv_heads: int | None = None,
                 head_dim: int | None = None, rope: bool = True, rope_base: float = 10000.0, qk_norm: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        for name, val in (("d_model", d_model), ("n_heads", n_heads), ("window", window)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if isinstance(n_global, bool) or not isinstance(n_global, int) or n_global < 0:
            raise ValueError(f"n_global must be an int >= 0, got {n_global!r}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass head_dim")
            head_dim = d_model // n_heads
        if rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.n_global, self.rope, self.rope_base, self.backend = window, n_global, rope, rope_base, backend
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None

    def forward(self, x: torch.Tensor, sp_group: Any = None) -> torch.Tensor:
        """``x [B, T, d_model] -> [B, T, d_model]``. With ``sp_group`` (a process group), ``x`` is this rank's
        contiguous shard of the sequence and the attention runs sequence-parallel (halo + global tokens)."""
        if x.dim() != 3:
            raise ValueError(f"x must be [B, T, d_model], got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd)
        k = self.k_proj(x).view(B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, Hkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            start = 0 if sp_group is None else _shard_offset(T, sp_group, x.device)
            cos, sin = rotary_tables(torch.arange(start, start + T, device=x.device), hd, self.rope_base,
                                     torch.promote_types(x.dtype, torch.float32))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self._attend(q, k, v, sp_group).reshape(B, T, H * hd))

    @torch.compiler.disable  # the attention kernels (and the SP exchanges) stay eager inside a compiled block
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp_group: Any) -> torch.Tensor:
        if sp_group is None:
            return sparse_attention(q, k, v, self.window, n_global=min(self.n_global, q.shape[1]),
                                    backend=self.backend)
        from ..dist.sp_attention import sp_sparse_attention  # noqa: PLC0415 - models may use dist; lazily

        return sp_sparse_attention(q, k, v, window=self.window, n_global=self.n_global, group=sp_group,
                                   backend=self.backend)
