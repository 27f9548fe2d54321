# Byte-level language modelling on text that ships with every Python install: the ``.py`` sources of the standard
# library (several MB of real, varied text; no download, no tokenizer: vocabulary = 256 byte values).
#
# The corpus is the sorted list of stdlib files, concatenated (files separated by a NUL byte); whole files are
# assigned to train or eval by a stable hash of their relative path, so the two splits never share a file and the
# split does not change when the corpus is cut to ``max_bytes``. Batches are random windows drawn from a generator
# seeded by (seed, step, split): like MQAR, the data position of the training loop is just the step counter.
"""Byte-level text from the Python standard library's own sources, with deterministic random windows."""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .mqar import _mix

__all__ = ["TextConfig", "TextData", "stdlib_corpus"]

_SPLIT_SALT = {"train": 0, "eval": 1_000_003}


@dataclass(frozen=True)
class TextConfig:
    """Attributes:
        seq_len: T, tokens (bytes) per example.
        max_bytes: cap on the corpus size read from disk (train + eval), to bound start-up time and memory.
        eval_fraction: about this fraction of the files (by path hash) goes to the eval split.
        root: directory to read ``*.py`` files from (default: the running interpreter's stdlib).
    """

    seq_len: int = 256
    max_bytes: int = 8_000_000
    eval_fraction: float = 0.05
    root: str | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


def stdlib_corpus(
    max_bytes: int = 8_000_000, eval_fraction: float = 0.05, root: str | None = None
) -> dict[str, torch.Tensor]:
    """Read ``*.py`` files under ``root`` (default: the stdlib, without site-packages) into two byte tensors.

    Args:
        max_bytes: stop reading once this many bytes are collected (files are visited in sorted path order).
        eval_fraction: fraction of files (chosen by a CRC32 of their relative path) put in ``"eval"``.
        root: the directory to scan; default ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        ``{"train": uint8 [N_train], "eval": uint8 [N_eval]}``.

    Raises:
        ValueError: no readable ``.py`` file, or a split ends up empty.

    Example::

        >>> c = stdlib_corpus(max_bytes=200_000)
        >>> c["train"].dtype, c["train"].numel() > c["eval"].numel() > 0
        (torch.uint8, True)
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"train": [], "eval": []}
    total = 0
    cut = int(eval_fraction * 2**32)
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        split = "eval" if zlib.crc32(rel.encode()) < cut else "train"
        parts[split].append(data + b"\0")
        total += len(data) + 1
        if total >= max_bytes:
            break
    out = {}
    for split, chunks in parts.items():
        if not chunks:
            raise ValueError(f"no {split} text found under {base} "
                             f"(max_bytes={max_bytes}, eval_fraction={eval_fraction})")
        out[split] = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return out


class TextData:
    """Random byte windows of the stdlib corpus: ``batch(step, n, split)`` is deterministic in ``(seed, step, split)``.

    Args:
        cfg: window length and corpus size.
        seed: base seed of the stream.

    Example::

        >>> data = TextData(TextConfig(seq_len=16, max_bytes=100_000), seed=0)
        >>> b = data.batch(step=0, batch_size=2)
        >>> b["input_ids"].shape, bool((b["input_ids"][:, 1:] == b["labels"][:, :-1]).all())
        (torch.Size([2, 16]), True)
    """

    name = "text"
    vocab_size = 256

    def __init__(self, cfg: TextConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.corpus = stdlib_corpus(cfg.max_bytes, cfg.eval_fraction, cfg.root)
        for split, data in self.corpus.items():
            if data.numel() < cfg.seq_len + 1:
                raise ValueError(f"the {split} corpus has {data.numel()} bytes, fewer than seq_len + 1 = "
                                 f"{cfg.seq_len + 1}: raise max_bytes or lower seq_len")

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    def batch(self, step: int, batch_size: int, split: str = "train") -> dict[str, torch.Tensor]:
        """The global batch of ``step``: ``{"input_ids": [n, T], "labels": [n, T]}`` (int64, CPU)."""
        if split not in _SPLIT_SALT:
            raise ValueError(f"split must be one of {sorted(_SPLIT_SALT)}, got {split!r}")
        data = self.corpus[split]
        T = self.cfg.seq_len
        gen = torch.Generator().manual_seed(_mix(self.seed, _SPLIT_SALT[split], step))
        starts = torch.randint(0, data.numel() - T, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(T + 1)
        window = data[idx].long()
        return {"input_ids": window[:, :-1].contiguous(), "labels": window[:, 1:].contiguous()}
