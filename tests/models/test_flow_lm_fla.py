"""FlowLM with ``model.backend="fla"`` (fla's chunk_delta_rule in the flow mixers, the training benchmark's peer):
configs fla cannot run are refused with what it supports, a missing fla-core is a clear error at build time, hybrid
attention layers keep our kernels; on a GPU with fla-core, the fla mixer equals ours (outputs and gradients)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pflow_dist.models.flow_lm import FlowBlock, FlowLM, FlowLMConfig, FlowMixer
from pflow_dist.testing import assert_close
from pflow_dist.train.config import load_config

PRESET_125M = str(Path(__file__).resolve().parents[2] / "configs" / "models" / "flow_lm_125m.yaml")
HAS_FLA = importlib.util.find_spec("fla") is not None
SMALL = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=2, chunk_size=16)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(rank=2), r"got model\.rank=2: the rank-R sum form \(ParallelFlow\) has no fla kernel"),
    (dict(rank=3, rank_form="product"), r"got model\.rank=3"),
    (dict(use_gate=True), r"got model\.use_gate=true: the gated delta rule is a different fla op"),
    (dict(chunk_size=128), r"chunk_size in \(16, 32, 64\).*got model\.chunk_size=128"),
    (dict(head_dim=512), r"K and V <= 256.*got K=512, V=512"),
    (dict(head_dim=16, expand_v=32.0), r"got K=16, V=512"),
], ids=["rank2-sum", "rank3-product", "gated", "chunk128", "K512", "V-too-wide"])
def test_configs_fla_cannot_run_are_refused(kwargs: dict, match: str) -> None:
    cfg = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=r"model\.backend='fla' runs fla's chunk_delta_rule, the rank-1 non-gated"):
        FlowLMConfig(backend="fla", **cfg)
    with pytest.raises(ValueError, match=match):
        FlowLMConfig(backend="fla", **cfg)
    FlowLMConfig(backend="auto", **cfg)  # the same config is fine for our kernels


def test_config_path_refuses_fla_with_the_125m_preset() -> None:
    with pytest.raises(ValueError, match=r"got model\.rank=2"):
        load_config(PRESET_125M, ["model.backend=fla"])
    cfg = load_config(PRESET_125M, ["model.backend=fla", "model.rank=1", "model.use_gate=false"])
    assert (cfg.model.backend, cfg.model.key_dim, cfg.model.value_dim) == ("fla", 128, 128)


def test_rank1_either_form_and_neg_eigval_are_accepted() -> None:
    for form in ("sum", "product"):  # identical ops at rank 1
        FlowLMConfig(backend="fla", rank=1, rank_form=form, allow_neg_eigval=True, **SMALL)


def test_attention_layers_of_a_hybrid_keep_our_kernels() -> None:
    cfg = FlowLMConfig(backend="fla", attn_every=2, **SMALL)
    block = FlowBlock(cfg, layer_idx=1)  # an attention layer: builds without fla
    assert block.mixer.backend == "auto"
    assert FlowLMConfig(backend="torch", attn_every=2, **SMALL).mixer_backend == "torch"


@pytest.mark.skipif(HAS_FLA, reason="fla-core is installed here")
def test_missing_fla_is_a_clear_error_when_the_model_is_built() -> None:
    cfg = FlowLMConfig(backend="fla", **SMALL)  # the config alone does not need fla
    with pytest.raises(ImportError, match=r"model\.backend='fla' needs fla-core \(pip install fla-core==0\.6\.0\)"):
        FlowLM(cfg)
    with pytest.raises(ImportError, match="fla-core"):
        FlowMixer(cfg)


@pytest.mark.skipif(not (HAS_FLA and torch.cuda.is_available()), reason="needs fla-core and a CUDA device")
def test_fla_mixer_equals_ours_on_gpu() -> None:
    torch.manual_seed(0)
    kw = dict(d_model=256, n_heads=2, chunk_size=64)  # K = V = 128, as in the 125M benchmark
    ours = FlowMixer(FlowLMConfig(backend="triton", **kw)).cuda().bfloat16()
    fla = FlowMixer(FlowLMConfig(backend="fla", **kw)).cuda().bfloat16()
    fla.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1000, 256, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(x)
    outs, grads = [], []
    for m in (ours, fla):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        params = [xi, *m.parameters()]
        outs.append(y.float())
        grads.append([g.float() for g in torch.autograd.grad(y, params, do)])
    assert_close("o", outs[0], outs[1], 2e-2)
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for n, g0, g1 in zip(names, grads[0], grads[1], strict=True):
        assert_close(f"d{n}", g0, g1, 3e-2)
    with pytest.raises(TypeError, match="bf16/fp16"):
        FlowMixer(FlowLMConfig(backend="fla", **kw)).cuda()(x.float())
