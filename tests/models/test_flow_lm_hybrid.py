"""The hybrid FlowLM: every k-th mixer is sliding-window + global-token sparse attention. Layer placement, causality
of the whole model, gradients reaching every parameter, the FLOP count, and a few steps of the one training loop."""

import torch

from pflow_dist.models.attention_mixer import SparseAttentionMixer
from pflow_dist.models.flow_lm import FlowLM, FlowLMConfig, FlowMixer

CFG = dict(vocab_size=23, d_model=16, n_layers=4, n_heads=2, attn_every=2, attn_window=4, attn_n_global=1,
           chunk_size=8)


def test_every_kth_layer_is_attention():
    model = FlowLM(FlowLMConfig(**CFG))
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds == [FlowMixer, SparseAttentionMixer, FlowMixer, SparseAttentionMixer]
    assert model.blocks[1].mixer.window == 4


def test_hybrid_is_causal_and_trains_every_parameter():
    torch.manual_seed(0)
    model = FlowLM(FlowLMConfig(**CFG)).double()
    ids = torch.randint(0, 23, (2, 19))
    logits = model(ids)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 23
    assert torch.allclose(model(changed)[:, :12], logits[:, :12], atol=1e-12)
    assert not torch.allclose(model(changed)[:, 12:], logits[:, 12:])
    model.loss(logits[:, :-1], ids[:, 1:]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_flops_count_attention_layers_differently():
    flow_only = FlowLM(FlowLMConfig(**{**CFG, "attn_every": 0}))
    hybrid = FlowLM(FlowLMConfig(**CFG))
    assert hybrid.flops_per_token(64) != flow_only.flops_per_token(64)
    assert hybrid.flops_per_token(64) > 0


def test_training_loop_runs_the_hybrid(tmp_path):
    from pflow_dist.train.config import load_config
    from pflow_dist.train.loop import Trainer

    cfg = load_config(None, ["parallel.engine=plain", "model.vocab_size=32", "model.d_model=16", "model.n_layers=2",
                             "model.n_heads=2", "model.attn_every=2", "model.attn_window=8", "model.chunk_size=8",
                             "data.num_kv_pairs=2", "data.seq_len=16", "train.steps=3", "train.progress=false",
                             "train.log_every=0", "train.eval_every=0", f"train.out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    attn = trainer.engine.module.blocks[1].mixer
    assert isinstance(attn, SparseAttentionMixer)
    before = attn.q_proj.weight.detach().clone()
    summary = trainer.train()
    trainer.close()
    assert summary["step"] == 3 and torch.isfinite(torch.tensor(summary["loss"]))
    assert not torch.equal(before, attn.q_proj.weight)  # the optimizer updated the attention layer
