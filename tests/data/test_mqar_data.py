"""MQAR batches: every scored position asks for the value paired with its key earlier in the sequence; batches are
deterministic per (seed, step, split) and differ otherwise."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.data.mqar import IGNORE_INDEX, MQARConfig, MQARData, make_mqar_batch


@pytest.mark.parametrize("vocab,pairs,T,random_fill", [(64, 8, 64, True), (32, 4, 33, False), (128, 16, 255, True)],
                         ids=["v64-n8-T64", "v32-n4-T33-zerofill", "v128-n16-T255"])
def test_labels_are_the_values_of_the_queried_keys(vocab: int, pairs: int, T: int, random_fill: bool) -> None:
    cfg = MQARConfig(vocab_size=vocab, num_kv_pairs=pairs, seq_len=T, random_non_queries=random_fill)
    x, y = make_mqar_batch(16, cfg, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (16, T) and x.dtype == y.dtype == torch.int64
    assert x.min() >= 0 and x.max() < vocab
    half = vocab // 2
    for b in range(16):
        keys, values = x[b, 0 : 2 * pairs : 2], x[b, 1 : 2 * pairs : 2]
        assert len(set(keys.tolist())) == pairs, "keys must be distinct within a sequence"
        assert (keys >= 1).all() and (keys < half).all() and (values >= half).all()
        pos = (y[b] != IGNORE_INDEX).nonzero().flatten()
        assert len(pos) == pairs, "every pair is queried exactly once"
        assert (pos >= 2 * pairs).all()
        table = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for t in pos.tolist():
            assert y[b, t].item() == table[x[b, t].item()], "the label is the value paired with the key just read"
            if t + 1 < T:
                assert x[b, t + 1] == y[b, t], "the answer follows in the input (teacher forcing)"


def test_power_law_prefers_short_gaps() -> None:
    cfg = MQARConfig(vocab_size=64, num_kv_pairs=4, seq_len=256)
    _, y = make_mqar_batch(256, cfg, torch.Generator().manual_seed(0))
    pos = (y != IGNORE_INDEX).nonzero()[:, 1].float()
    assert pos.median() < 2 * 4 + (256 - 8) / 4  # most queries in the first quarter of the query region


def test_batches_are_deterministic_per_seed_step_split() -> None:
    data = MQARData(MQARConfig(vocab_size=32, num_kv_pairs=4, seq_len=32), seed=3)
    a = data.batch(7, 8)
    assert torch.equal(a["input_ids"], data.batch(7, 8)["input_ids"])
    assert torch.equal(a["labels"], MQARData(data.cfg, seed=3).batch(7, 8)["labels"])
    assert not torch.equal(a["input_ids"], data.batch(8, 8)["input_ids"])
    assert not torch.equal(a["input_ids"], data.batch(7, 8, "eval")["input_ids"])
    assert not torch.equal(a["input_ids"], MQARData(data.cfg, seed=4).batch(7, 8)["input_ids"])
    assert MQARConfig(num_kv_pairs=8).chance_accuracy == 1 / 8


def test_invalid_configs_raise() -> None:
    with pytest.raises(ValueError, match="distinct keys"):
        MQARConfig(vocab_size=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match="too short"):
        MQARConfig(vocab_size=64, num_kv_pairs=8, seq_len=20)
    with pytest.raises(ValueError, match="split"):
        MQARData(MQARConfig()).batch(0, 2, "test")
    with pytest.raises(ValueError, match="batch_size"):
        make_mqar_batch(0, MQARConfig(), torch.Generator())
