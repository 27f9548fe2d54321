"""SparseAttentionMixer: against a hand-written float64 forward (projections, RoPE in complex form, the dense reference
attention) for the output and the gradients of x and every parameter, with the torch and the Triton backend; RoPE's
relative-position property; causality; the sequence-parallel forward/backward on 2 gloo ranks; argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pflow_dist.dist import shard_bounds
from pflow_dist.kernels.attention.naive import naive_sparse_attention
from pflow_dist.models.attention_mixer import SparseAttentionMixer, apply_rotary, rotary_tables
from pflow_dist.testing import assert_close, error_stats, run_distributed

F64 = torch.float64


def _rope_complex(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE written independently: pairs (x_i, x_{i+D/2}) as complex numbers times e^{i·pos·θ_i}."""
    B, T, H, D = x.shape
    theta = base ** (-torch.arange(0, D, 2, dtype=F64) / D)
    rot = torch.polar(torch.ones(T, D // 2, dtype=F64), torch.arange(T, dtype=F64)[:, None] * theta[None, :])
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * rot[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def _reference(m: SparseAttentionMixer, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    H, Hkv, hd = m.n_heads, m.n_kv_heads, m.head_dim
    q = (x @ m.q_proj.weight.T).view(B, T, H, hd)
    k = (x @ m.k_proj.weight.T).view(B, T, Hkv, hd)
    v = (x @ m.v_proj.weight.T).view(B, T, Hkv, hd)
    if m.rope:
        q, k = _rope_complex(q, m.rope_base), _rope_complex(k, m.rope_base)
    o = naive_sparse_attention(q, k, v, m.window, n_global=min(m.n_global, T))
    return o.reshape(B, T, H * hd) @ m.o_proj.weight.T


@pytest.mark.parametrize("backend,dtype,ratio", [("torch", F64, 1e-12), ("triton", torch.float32, 1e-5)],
                         ids=["torch-f64", "triton-f32"])
@pytest.mark.parametrize("kw", [dict(n_heads=4, window=5, n_global=2, n_kv_heads=2),
                                dict(n_heads=2, window=30, n_global=0, rope=False)],
                         ids=["gqa-rope-sinks", "mha-norope-W>T"])
def test_mixer_matches_reference(kw, backend, dtype, ratio, device):
    torch.manual_seed(0)
    m = SparseAttentionMixer(24, backend=backend, **kw).to(F64)
    x = torch.randn(2, 19, 24, dtype=F64, requires_grad=True)
    up = torch.randn(2, 19, 24, dtype=F64)
    params = list(m.parameters())
    ref = _reference(m, x)
    ref_grads = torch.autograd.grad(ref, [x, *params], up)
    mt = SparseAttentionMixer(24, backend=backend, **kw).to(device=device, dtype=dtype)
    mt.load_state_dict(m.state_dict())
    xt = x.detach().to(device=device, dtype=dtype).requires_grad_(True)
    out = mt(xt)
    grads = torch.autograd.grad(out, [xt, *mt.parameters()], up.to(device=device, dtype=dtype))
    assert_close("out", ref, out, ratio)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, rg, g in zip(names, ref_grads, grads, strict=True):
        assert_close(f"d{name}", rg, g, ratio)


def test_rope_is_relative():
    """⟨R_p q, R_s k⟩ depends only on p − s (shifting both positions leaves the score unchanged)."""
    q, k = torch.randn(1, 6, 2, 8, dtype=F64), torch.randn(1, 6, 2, 8, dtype=F64)
    cos0, sin0 = rotary_tables(torch.arange(6), 8)
    cos5, sin5 = rotary_tables(torch.arange(6) + 57, 8)
    s0 = torch.einsum("bthd,bshd->bhts", apply_rotary(q, cos0, sin0), apply_rotary(k, cos0, sin0))
    s5 = torch.einsum("bthd,bshd->bhts", apply_rotary(q, cos5, sin5), apply_rotary(k, cos5, sin5))
    assert_close("scores", s0, s5, 1e-5)
    assert not torch.allclose(apply_rotary(q, cos0, sin0), apply_rotary(q, cos5, sin5))


def test_mixer_is_causal():
    m = SparseAttentionMixer(16, 2, window=3, n_global=1, backend="torch").double()
    x = torch.randn(1, 12, 16, dtype=F64)
    x2 = x.clone()
    x2[:, 7] += 1.0
    diff = (m(x2) - m(x)).abs().amax(dim=(0, 2))
    assert (diff[:7] == 0).all() and (diff[7:10] > 0).all()


def _sp_worker(rank, world):
    torch.manual_seed(0)
    m = SparseAttentionMixer(16, 4, window=4, n_global=2, n_kv_heads=2, backend="torch").double()
    x = torch.randn(2, 11, 16, dtype=F64, requires_grad=True)
    up = torch.randn(2, 11, 16, dtype=F64)
    out = m(x)
    ref = torch.autograd.grad(out, [x, *m.parameters()], up)
    s, e = shard_bounds(11, world)[rank]
    xl = x.detach()[:, s:e].clone().requires_grad_(True)
    out_l = m(xl, sp_group=dist.group.WORLD)
    grads = torch.autograd.grad(out_l, [xl, *m.parameters()], up[:, s:e])
    return {"o": error_stats(out[:, s:e], out_l).rms_ratio, "dx": error_stats(ref[0][:, s:e], grads[0]).rms_ratio,
            # numpy, not tensors: tensors cross the result queue as shared memory that dies with the worker
            "param_grads": [g.numpy() for g in grads[1:]], "ref_param_grads": [g.numpy() for g in ref[1:]]}


@pytest.mark.dist
def test_mixer_sequence_parallel():
    """On 2 ranks each shard's output and dx equal the single-process ones; parameter gradients summed over the
    ranks (what data-parallel/sequence-parallel gradient reduction does) equal the single-process gradients."""
    res = run_distributed(_sp_worker, 2)
    for r in res:
        assert r["o"] < 1e-12 and r["dx"] < 1e-12, r
    for i, ref in enumerate(res[0]["ref_param_grads"]):
        summed = torch.from_numpy(res[0]["param_grads"][i] + res[1]["param_grads"][i])
        assert_close(f"param{i}", torch.from_numpy(ref), summed, 1e-12)


@pytest.mark.parametrize("kw,msg", [
    (dict(d_model=10, n_heads=3, window=2), "not divisible by n_heads"),
    (dict(d_model=12, n_heads=4, window=0), "window must be a positive int"),
    (dict(d_model=12, n_heads=4, window=2, n_kv_heads=3), "must divide n_heads"),
    (dict(d_model=12, n_heads=4, window=2, n_global=-1), "n_global must be an int >= 0"),
    (dict(d_model=12, n_heads=4, window=2, head_dim=3), "even head_dim"),
], ids=["d-not-divisible", "window-0", "kv-heads", "n_global-negative", "odd-head-dim-rope"])
def test_mixer_bad_args(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SparseAttentionMixer(**kw)
