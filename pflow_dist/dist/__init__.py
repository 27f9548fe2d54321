"""Sequence parallelism: sharding along time, the cross-device prefix combine (fwd + bwd), sequence-parallel ops."""

from .combine import incoming_state
from .comm import all_gather_stack, group_rank_size, replicated
from .halo import halo_exchange
from .sharding import gather_sequence, shard_bounds, shard_sequence, zigzag_indices
from .sp_attention import sp_sparse_attention
from .sp_deer import sp_deer
from .sp_ops import sp_flow, sp_scan

__all__ = [
    "all_gather_stack", "gather_sequence", "group_rank_size", "halo_exchange", "incoming_state", "replicated",
    "shard_bounds", "shard_sequence", "sp_deer", "sp_flow", "sp_scan", "sp_sparse_attention", "zigzag_indices",
]
