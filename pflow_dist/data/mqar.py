# Multi-query associative recall (MQAR), the synthetic recall benchmark of Zoology (Arora et al. 2023,
# "Zoology: Measuring and Improving Recall in Efficient Language Models", arXiv 2312.04927, §3 and App. D).
#
# A sequence starts with N key-value pairs ``k1 v1 k2 v2 … kN vN`` (keys from the lower half of the vocabulary, values
# from the upper half, keys distinct within a sequence); the rest holds every key once more, in random order, at
# positions drawn with a power law (short gaps are more likely, as in Zoology), each followed by its value. The model
# is scored on predicting the value right after each repeated key: that needs recall of a pair seen earlier, which is
# what linear-recurrent models with a small state find hard and delta-rule models do well.
#
# Batches are a pure function of (seed, step index, split): the training loop's data position is the step counter,
# which makes resume exact without any iterator state, and every data-parallel rank can cut its slice of the same
# global batch (so N ranks see exactly the examples one process would see).
"""Multi-query associative recall (MQAR) batches, generated on the fly, deterministic per (seed, step, split)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["IGNORE_INDEX", "MQARConfig", "MQARData", "make_mqar_batch"]

IGNORE_INDEX = -100  # label of positions that are not scored (torch cross_entropy's default ignore_index)
_SPLIT_SALT = {"train": 0, "eval": 1_000_003}


@dataclass(frozen=True)
class MQARConfig:
    """Sizes of an MQAR task.

    Attributes:
        vocab_size: tokens ``0 … vocab_size-1``; 0 is the filler token, keys come from ``[1, vocab/2)`` and values
            from ``[vocab/2, vocab)``.
        num_kv_pairs: N, the number of pairs written and then queried per sequence.
        seq_len: T, the model's input length (the generated sequence has T + 1 tokens: inputs and shifted labels).
        power_a: exponent of the power law over query positions (Zoology's default 0.01; smaller = more skewed
            towards short gaps).
        random_non_queries: fill the non-query positions with random tokens instead of 0 (Zoology's default).
    """

    vocab_size: int = 64
    num_kv_pairs: int = 8
    seq_len: int = 64
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        if self.num_kv_pairs < 1:
            raise ValueError(f"num_kv_pairs must be >= 1, got {self.num_kv_pairs}")
        half = self.vocab_size // 2
        if half - 1 < self.num_kv_pairs:
            raise ValueError(f"vocab_size={self.vocab_size} gives {half - 1} distinct keys; need >= num_kv_pairs="
                             f"{self.num_kv_pairs} (use vocab_size >= {2 * self.num_kv_pairs + 2})")
        if self.seq_len + 1 < 4 * self.num_kv_pairs:
            raise ValueError(f"seq_len={self.seq_len} is too short for {self.num_kv_pairs} pairs and their queries: "
                             f"need seq_len >= {4 * self.num_kv_pairs - 1}")
        if not self.power_a > 0:
            raise ValueError(f"power_a must be > 0, got {self.power_a}")

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing one of the N values present in the context uniformly: 1/N."""
        return 1.0 / self.num_kv_pairs


def make_mqar_batch(batch_size: int, cfg: MQARConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` MQAR sequences.

    Args:
        batch_size: number of sequences.
        cfg: the task sizes.
        generator: a CPU ``torch.Generator`` (the only source of randomness).

    Returns:
        ``(inputs, labels)``, both ``[batch_size, seq_len]`` int64 on CPU: ``labels[b, t]`` is the value the model must
        predict after reading ``inputs[b, : t + 1]`` at the N query positions, ``IGNORE_INDEX`` elsewhere.

    Example::

        >>> cfg = MQARConfig(vocab_size=32, num_kv_pairs=4, seq_len=32)
        >>> x, y = make_mqar_batch(2, cfg, torch.Generator().manual_seed(0))
        >>> x.shape, int((y != IGNORE_INDEX).sum())
        (torch.Size([2, 32]), 8)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    B, N, L = batch_size, cfg.num_kv_pairs, cfg.seq_len + 1
    half = cfg.vocab_size // 2
    # distinct keys per row: the first N of a random permutation of the key range
    keys = torch.rand(B, half - 1, generator=generator).argsort(dim=-1)[:, :N] + 1
    values = torch.randint(half, cfg.vocab_size, (B, N), generator=generator)
    context = torch.stack([keys, values], dim=-1).reshape(B, 2 * N)

    # query slots: the rest of the sequence is cut into (key, value) slots; pick N distinct slots per row with
    # probability ∝ power law over the gap, as Zoology does
    n_slots = (L - 2 * N) // 2
    gaps = torch.arange(1, n_slots + 1, dtype=torch.float64)
    p = cfg.power_a * gaps ** (cfg.power_a - 1)
    slots = torch.multinomial((p / p.sum()).expand(B, n_slots), N, replacement=False, generator=generator)
    order = torch.rand(B, N, generator=generator).argsort(dim=-1)  # which pair each slot asks for
    q_keys, q_vals = keys.gather(1, order), values.gather(1, order)

    rest_len = L - 2 * N
    if cfg.random_non_queries:
        rest = torch.randint(0, cfg.vocab_size, (B, rest_len), generator=generator)
    else:
        rest = torch.zeros(B, rest_len, dtype=torch.long)
    rest_labels = torch.full((B, rest_len), IGNORE_INDEX, dtype=torch.long)
    pos = 2 * slots
    rest.scatter_(1, pos, q_keys)
    rest.scatter_(1, pos + 1, q_vals)
    rest_labels.scatter_(1, pos + 1, q_vals)
    seq = torch.cat([context, rest], dim=1)
    labels = torch.cat([torch.full((B, 2 * N), IGNORE_INDEX, dtype=torch.long), rest_labels], dim=1)
    return seq[:, :-1].contiguous(), labels[:, 1:].contiguous()


class MQARData:
    """The training loop's view of MQAR: ``batch(step, n, split)`` is deterministic in ``(seed, step, split)``.

    Args:
        cfg: the task sizes.
        seed: base seed of the stream.

    Example::

        >>> data = MQARData(MQARConfig(vocab_size=32, num_kv_pairs=4, seq_len=32), seed=0)
        >>> b = data.batch(step=3, batch_size=4)
        >>> torch.equal(b["input_ids"], data.batch(step=3, batch_size=4)["input_ids"])
        True
    """

    name = "mqar"

    def __init__(self, cfg: MQARConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = int(seed)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    def batch(self, step: int, batch_size: int, split: str = "train") -> dict[str, torch.Tensor]:
        """The global batch of ``step``: ``{"input_ids": [n, T], "labels": [n, T]}`` (int64, CPU)."""
        if split not in _SPLIT_SALT:
            raise ValueError(f"split must be one of {sorted(_SPLIT_SALT)}, got {split!r}")
        gen = torch.Generator().manual_seed(_mix(self.seed, _SPLIT_SALT[split], step))
        x, y = make_mqar_batch(batch_size, self.cfg, gen)
        return {"input_ids": x, "labels": y}


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby steps give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
