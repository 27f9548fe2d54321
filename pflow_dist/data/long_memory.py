# A synthetic long-memory classification task for recurrent models (the "copy the early cue" family: Hochreiter &
# Schmidhuber 1997's long-time-lag problems; Arjovsky et al. 2016's copying memory): a class cue appears once, near the
# start of a long noisy sequence, and the label must be read out at the very end, so a model has to carry one
# piece of information across (almost) all T steps. A model without memory scores 1/n_classes; DEER-GRU and the
# sequential GRU must reach the same accuracy on the same weights (tests/models/test_deer_gru.py).
"""Synthetic long-sequence classification: a class cue early in a noisy sequence, the label read at the end."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LongMemoryTask", "make_long_memory"]


@dataclass(frozen=True)
class LongMemoryTask:
    """Sizes of the task.

    Attributes:
        T: sequence length (≥ 16k for GPU runs; tens to hundreds in CPU tests).
        n_classes: number of labels (chance accuracy 1/n_classes).
        in_dim: input features; the first n_classes carry the cue, one more is the cue marker, the rest noise.
        cue_frac: the cue lies in the first ``cue_frac · T`` steps.
        noise: standard deviation of the background noise.
    """

    T: int
    n_classes: int = 4
    in_dim: int = 8
    cue_frac: float = 0.1
    noise: float = 0.5

    def __post_init__(self) -> None:
        if self.T < 2:
            raise ValueError(f"T must be >= 2, got {self.T}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.in_dim < self.n_classes + 1:
            raise ValueError(f"in_dim must be >= n_classes + 1 = {self.n_classes + 1} (cue channels + marker), "
                             f"got {self.in_dim}")
        if not 0.0 < self.cue_frac <= 1.0:
            raise ValueError(f"cue_frac must be in (0, 1], got {self.cue_frac}")


def make_long_memory(
    task: LongMemoryTask,
    batch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a batch of the long-memory task.

    Args:
        task: sizes (:class:`LongMemoryTask`).
        batch: number of sequences B.
        generator: a CPU generator for reproducible batches.
        device, dtype: where and how the inputs are returned.

    Returns:
        ``(x [B, T, in_dim], y [B] int64)``: ``x`` is noise except at one step ``p < cue_frac · T`` where the
        one-hot of ``y`` (scaled to 3) and the marker channel (3) are added.

    Example::

        >>> x, y = make_long_memory(LongMemoryTask(T=100), batch=2, generator=torch.Generator().manual_seed(0))
        >>> x.shape, y.shape
        (torch.Size([2, 100, 8]), torch.Size([2]))
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    T, C = task.T, task.n_classes
    x = torch.randn(batch, T, task.in_dim, generator=generator) * task.noise
    y = torch.randint(0, C, (batch,), generator=generator)
    last = max(1, int(task.cue_frac * T))
    pos = torch.randint(0, last, (batch,), generator=generator)
    rows = torch.arange(batch)
    x[rows, pos, y] += 3.0
    x[rows, pos, C] += 3.0  # marker: "the cue is here"
    return x.to(device=device, dtype=dtype), y.to(device=device)
