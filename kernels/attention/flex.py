# The same sparse pattern as a FlexAttention block mask (Dong et al. 2024, "Flex Attention: A Programming Model for
# Generating Optimized Attention Kernels", arXiv 2412.05496; torch.nn.attention.flex_attention). The mask_mod is the
# definition in naive.py: s ≤ t and (t − s < W or s ∈ G or t ∈ G); create_block_mask then skips every 128×128 tile
# that holds no allowed pair, so the work is O(T·(W + G)) tiles plus the G full rows, like ours. Used as the GPU
# peer in the benchmark and as backend="flex" (no backward on CPU: torch raises NotImplementedError there).
"""FlexAttention form of causal sliding-window + global-token attention (block mask cached per pattern)."""

from __future__ import annotations

import functools

import torch

__all__ = ["flex_block_mask", "flex_sparse_attention"]


@functools.lru_cache(maxsize=16)
def _block_mask(T: int, window: int, g: tuple[int, ...], device: str, block: int):
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415 - optional, heavy import

    is_g = torch.zeros(T, dtype=torch.bool, device=device)
    if g:
        is_g[list(g)] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | is_g[kv_idx] | is_g[q_idx])

    return create_block_mask(mask_mod, None, None, T, T, device=device, BLOCK_SIZE=block,
                             _compile=device.startswith("cuda"))


def flex_block_mask(T: int, window: int, global_idx: torch.Tensor, device: torch.device | str):
    """The (cached) FlexAttention ``BlockMask`` for length ``T``, window ``W`` and sorted global positions."""
    dev = str(torch.device(device))
    block = 128 if dev.startswith("cuda") else 16
    return _block_mask(T, window, tuple(int(x) for x in global_idx.tolist()), dev, block)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, global_idx: torch.Tensor, scale: float
) -> torch.Tensor:
    """``o [B, T, H, Dv]`` by FlexAttention (compiled on CUDA, eager elsewhere); inputs already validated."""
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    bm = flex_block_mask(q.shape[1], window, global_idx, q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=scale,
           enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)
