"""Byte-level stdlib text: windows are contiguous corpus slices, splits come from disjoint files, batches are
deterministic per (seed, step, split)."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.data.text import TextConfig, TextData, stdlib_corpus


@pytest.fixture(scope="module")
def data() -> TextData:
    return TextData(TextConfig(seq_len=31, max_bytes=300_000), seed=0)


def test_corpus_is_python_source(data: TextData) -> None:
    train, ev = data.corpus["train"], data.corpus["eval"]
    assert train.dtype == torch.uint8 and 250_000 < train.numel() + ev.numel() < 400_000
    text = bytes(train[:20000].tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text


def test_windows_are_shifted_slices(data: TextData) -> None:
    b = data.batch(5, 4)
    x, y = b["input_ids"], b["labels"]
    assert x.shape == y.shape == (4, 31) and x.dtype == torch.int64 and x.max() < 256
    assert torch.equal(x[:, 1:], y[:, :-1])
    corpus = bytes(data.corpus["train"].tolist())
    for row in range(4):
        window = bytes(x[row].tolist()) + bytes([y[row, -1].item()])
        assert window in corpus


def test_deterministic_and_split_disjoint(data: TextData) -> None:
    assert torch.equal(data.batch(2, 3)["input_ids"], data.batch(2, 3)["input_ids"])
    assert not torch.equal(data.batch(2, 3)["input_ids"], data.batch(3, 3)["input_ids"])
    ev = data.batch(2, 3, "eval")["input_ids"]
    train_bytes = bytes(data.corpus["train"].tolist())
    assert not all(bytes(r.tolist()) in train_bytes for r in ev)


def test_errors() -> None:
    with pytest.raises(ValueError, match="no .*text found"):
        stdlib_corpus(root="/nonexistent-dir-for-pflow-test")
    with pytest.raises(ValueError, match="eval_fraction"):
        TextConfig(eval_fraction=1.5)
