"""FlowLM: the mixer against an independent float64 token-loop reference (outputs and every gradient), causality,
gate ranges, presets' sizes, and the errors a user can hit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from pflow_dist.kernels.flow.naive import naive_recurrent_flow
from pflow_dist.models.flow_lm import FlowLM, FlowLMConfig, FlowMixer
from pflow_dist.testing import assert_close

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

MIXERS = {
    "rank1": dict(rank=1),
    "rank1-gated": dict(rank=1, use_gate=True),
    "rank2-sum": dict(rank=2, rank_form="sum"),
    "rank3-product-gated": dict(rank=3, rank_form="product", use_gate=True),
    "rank2-sum-noconv-nogate-negeig": dict(rank=2, use_short_conv=False, use_output_gate=False,
                                           allow_neg_eigval=True),
    "rank1-Knot2-expandv": dict(rank=1, head_dim=6, expand_v=1.5),
}


def _reference_mixer(m: FlowMixer, x: torch.Tensor) -> torch.Tensor:
    """The mixer written from its equations, with the sequential float64 flow loop instead of the chunked op."""
    cfg = m.cfg
    B, T, _ = x.shape
    H, R, K, V = cfg.n_heads, cfg.rank, cfg.key_dim, cfg.value_dim

    def conv(lin, conv_mod):
        y = lin(x)
        if not cfg.use_short_conv:
            return F.silu(y)
        w = conv_mod.weight[:, 0]  # [C, W]; y_t = Σ_j w[:, W-1-j] x_{t-j}
        out = torch.zeros_like(y)
        for j in range(conv_mod.kernel_size):
            out[:, j:] += w[:, -1 - j] * y[:, : T - j]
        return F.silu(out + conv_mod.bias)

    q = conv(m.q_proj, getattr(m, "q_conv", None)).view(B, T, H, K)
    k = conv(m.k_proj, getattr(m, "k_conv", None)).view(B, T, H, R, K)
    v = conv(m.v_proj, getattr(m, "v_conv", None)).view(B, T, H, R, V)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    beta_max = 2.0 if cfg.allow_neg_eigval else 1.0
    beta = torch.sigmoid(m.b_proj(x)).view(B, T, H, R) * (beta_max / R if cfg.rank_form == "sum" else beta_max)
    g = -m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias) if cfg.use_gate else None
    o, _ = naive_recurrent_flow(q, k, v, beta, g, rank_form=cfg.rank_form)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * m.o_norm.weight
    if cfg.use_output_gate:
        o = o * F.silu(m.g_proj(x).view(B, T, H, V))
    return m.o_proj(o.reshape(B, T, H * V))


@pytest.mark.parametrize("T", [1, 37], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("name", list(MIXERS), ids=str)
def test_mixer_matches_float64_token_loop(name: str, T: int) -> None:
    cfg = FlowLMConfig(d_model=12, n_heads=2, chunk_size=16, **MIXERS[name])
    m = FlowMixer(cfg).double()
    with torch.no_grad():  # non-trivial conv biases / norm weights so that every parameter matters
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, T, 12, dtype=torch.float64, requires_grad=True)
    do = torch.randn(2, T, 12, dtype=torch.float64)
    params = [x] + list(m.parameters())
    out = m(x)
    grads = torch.autograd.grad(out, params, do)
    ref = _reference_mixer(m, x)
    ref_grads = torch.autograd.grad(ref, params, do, allow_unused=True)
    assert_close("o", ref, out, 1e-10)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, r, g in zip(names, ref_grads, grads, strict=True):
        assert r is not None, f"reference has no gradient for {n}"
        assert_close(f"d{n}", r, g, 1e-10, atol=1e-13)  # dA_log, ddt_bias are exactly 0 at T=1 (zero state)


@pytest.mark.parametrize("name", ["rank1-gated", "rank2-sum", "rank3-product-gated"], ids=str)
def test_model_is_causal_and_grads_flow(name: str) -> None:
    cfg = FlowLMConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, chunk_size=8, **MIXERS[name])
    model = FlowLM(cfg)
    ids = torch.randint(0, 23, (2, 21))
    logits = model(ids)
    assert logits.shape == (2, 21, 23)
    ids2 = ids.clone()
    ids2[:, 13] = (ids2[:, 13] + 1) % 23
    logits2 = model(ids2)
    torch.testing.assert_close(logits2[:, :13], logits[:, :13], rtol=0, atol=1e-6)
    assert (logits2[:, 13:] - logits[:, 13:]).abs().max() > 1e-4  # the change does reach later positions
    loss = model.loss(logits, ids)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} gets no gradient"


@pytest.mark.parametrize("rank,form,neg", [(1, "sum", False), (4, "sum", True), (3, "product", True)],
                         ids=["r1", "r4-sum-negeig", "r3-product-negeig"])
def test_gate_ranges(rank: int, form: str, neg: bool) -> None:
    cfg = FlowLMConfig(d_model=16, n_heads=2, rank=rank, rank_form=form, use_gate=True, allow_neg_eigval=neg)
    m = FlowMixer(cfg)
    with torch.no_grad():
        m.b_proj.weight.mul_(1e3)  # saturate the sigmoids: β reaches its bound
    beta, g = m.gates(torch.randn(3, 40, 16))
    per_token = beta.sum(-1) if (rank > 1 and form == "sum") else beta
    bound = 2.0 if neg else 1.0
    assert per_token.max() <= bound + 1e-6 and per_token.max() > 0.95 * bound
    assert beta.min() >= 0
    assert g.shape == (3, 40, 2) and (g <= 0).all()


@pytest.mark.parametrize("preset,low,high", [("1m", 0.7e6, 1.3e6), ("10m", 7e6, 13e6), ("125m", 100e6, 150e6),
                                             ("350m", 300e6, 420e6), ("1b", 0.85e9, 1.25e9)], ids=str)
def test_presets_have_their_size(preset: str, low: float, high: float) -> None:
    d = yaml.safe_load((CONFIGS / "models" / f"flow_lm_{preset}.yaml").read_text())["model"]
    with torch.device("meta"):
        model = FlowLM(FlowLMConfig.from_dict(d))
    n = model.num_params(non_embedding=False)
    assert low <= n <= high, f"flow_lm_{preset}: {n / 1e6:.1f}M parameters"
    assert model.flops_per_token(2048) > 6 * model.num_params(non_embedding=True)


def test_tied_embeddings_share_the_weight() -> None:
    model = FlowLM(FlowLMConfig(vocab_size=17, d_model=8, n_layers=1, n_heads=2, tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="attn_window"):
        FlowLMConfig(d_model=8, n_heads=2, attn_every=2, attn_window=0)
    model = FlowLM(FlowLMConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2))
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):  # sp_group without a process group
        model(torch.randint(0, 11, (1, 5)), sp_group=object())
    with pytest.raises(TypeError, match="int64"):
        model(torch.randn(1, 5))
    with pytest.raises(ValueError, match="n_heads"):
        FlowLMConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="rank_form"):
        FlowLMConfig(rank_form="tensor")
    with pytest.raises(ValueError, match="unknown model config keys"):
        FlowLMConfig.from_dict({"d_modle": 3})
