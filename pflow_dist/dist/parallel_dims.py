# The 2-D layout of training (DESIGN.md §9, §11; torchtitan's ParallelDims, Megatron's context-parallel groups):
# world = dp × sp ranks, rank = dp_rank · sp + sp_rank. Sequence-parallel groups are runs of consecutive ranks because
# they talk in every layer (flow-map all-gathers, halos) while data-parallel groups talk once per step (the gradient
# reduction): consecutive ranks share a node (NVLink) when sp divides the GPUs per node, which is also the layout of
# DeepSpeed-Ulysses (deepspeed/runtime/sequence_parallel/parallel_state_sp.py) and Megatron's context parallelism.
#
# Gradients under this layout: a parameter's gradient is the sum over its sp group (each rank saw a different part of
# every sequence, and the loss on each rank is its share of the global token mean, comm.token_mean) and the mean over
# the dp group (different sequences), i.e. the sum over all ranks divided by dp. Explicit subgroups (dist.new_group)
# rather than a DeviceMesh: the groups are all the training loop needs, DeepSpeed takes them through its mpu interface,
# and gloo CPU tests create them the same way as NCCL runs.
"""``ParallelDims``: the validated data-parallel × sequence-parallel layout and its process groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["ParallelDims"]


@dataclass(frozen=True)
class ParallelDims:
    """The data × sequence layout of ``world_size`` ranks.

    Attributes:
        world_size: all ranks (``dp_size · sp_size``).
        sp_size: sequence-parallel degree (ranks sharing each sequence).
        rank: this process's global rank.
        sp_group: this rank's sequence-parallel group (consecutive ranks); ``None`` when ``sp_size == 1`` (the model
            then runs without sequence parallelism).
        dp_group: this rank's data-parallel group (ranks with the same ``sp_rank``); ``None`` = the default group
            (``sp_size == 1``) or no process group (one process).

    Example::

        >>> dims = ParallelDims.build(sp_size=1)  # one process, no torch.distributed
        >>> dims.dp_size, dims.sp_size, dims.dp_rank, dims.sp_group is None
        (1, 1, 0, True)
    """

    world_size: int
    sp_size: int
    rank: int
    sp_group: ProcessGroup | None = None
    dp_group: ProcessGroup | None = None

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def sp_ranks(self) -> list[int]:
        """Global ranks of this rank's sequence-parallel group, in sequence order."""
        start = self.dp_rank * self.sp_size
        return list(range(start, start + self.sp_size))

    @staticmethod
    def validate(world_size: int, sp_size: int) -> None:
        """Raise ``ValueError`` unless ``sp_size ≥ 1`` divides ``world_size``."""
        if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
            raise ValueError(f"parallel.sp_size must be a positive int, got {sp_size!r}")
        if world_size % sp_size:
            raise ValueError(f"the world size ({world_size} ranks) is not divisible by parallel.sp_size={sp_size}: "
                             f"data-parallel degree = world / sp_size must be a whole number; launch a multiple of "
                             f"{sp_size} ranks or change parallel.sp_size")

    @classmethod
    def build(cls, sp_size: int) -> ParallelDims:
        """Validate the layout for the current process group and create its subgroups (collective: every rank calls
        it, in the same order as its other group creations). Without ``torch.distributed``: one process.

        Raises:
            ValueError: ``sp_size`` does not divide the world size (one process counts as a world of 1).
        """
        initialized = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if initialized else (1, 0)
        cls.validate(world, sp_size)
        if sp_size == 1:
            return cls(world, 1, rank)
        sp_group = dp_group = None
        dp = world // sp_size
        for d in range(dp):  # every rank creates every group (new_group is collective), keeps its own
            g = dist.new_group(list(range(d * sp_size, (d + 1) * sp_size)))
            if rank // sp_size == d:
                sp_group = g
        for s in range(sp_size):
            g = dist.new_group(list(range(s, world, sp_size)))
            if rank % sp_size == s:
                dp_group = g
        return cls(world, sp_size, rank, sp_group, dp_group)
