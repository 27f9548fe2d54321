"""The JAX peer of ``bench deer`` (the official DEER ``seq1d``): a clear refusal where it cannot run, and where it can
(jax installed, the deer source on PYTHONPATH, e.g. the GPU image with the carried repository), the same GRU layer as
torch.nn.GRU, values and gradients, against the float64 sequential reference."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.bench import deer_jax
from pflow_dist.kernels.deer.naive import GRUWeights, naive_gru

_WHY = deer_jax.unavailable(torch.device("cpu"))


@pytest.mark.skipif(_WHY is None, reason="jax and the deer code are both importable here")
def test_missing_peer_is_refused_with_the_reason():
    assert "jax" in _WHY or "deer" in _WHY
    with pytest.raises(RuntimeError, match="jax is not installed|official DEER code is not importable"):
        deer_jax.load_seq1d()


@pytest.mark.skipif(_WHY is not None, reason=f"JAX DEER peer unavailable: {_WHY}")
def test_official_seq1d_gru_matches_the_sequential_gru():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    B, T, n = 2, 300, 8
    x = torch.randn(B, T, n, generator=gen).to(device).requires_grad_()
    h0 = (0.1 * torch.randn(B, n, generator=gen)).to(device).requires_grad_()
    ws = [((torch.rand(*s, generator=gen) * 2 - 1) * n**-0.5).to(device).requires_grad_()
          for s in ((3 * n, n), (3 * n, n), (3 * n,), (3 * n,))]
    h, hT = deer_jax.jax_deer_gru(x, h0, *ws)
    ref = naive_gru(x.double(), h0.double(), GRUWeights(*[w.double() for w in ws]))[0]
    assert h.shape == (B, T, n) and torch.equal(hT, h[:, -1])
    torch.testing.assert_close(h.double(), ref, rtol=0, atol=1e-5)
    g = torch.randn(B, T, n, generator=gen).to(device)
    got = torch.autograd.grad((h * g).sum(), [x, h0, *ws])
    want = torch.autograd.grad((ref * g.double()).sum(), [x, h0, *ws])
    for name, a, b in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want, strict=True):
        rel = ((a.double() - b).norm() / b.norm()).item()
        assert rel < 1e-4, (name, rel)


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.zeros(2, 5, 4, dtype=torch.float64)), TypeError, "x must have dtype"),
    (dict(h0=torch.zeros(3, 8)), ValueError, r"h0 must have shape \[2, 8\]"),
    (dict(w_ih=torch.zeros(24, 5)), ValueError, r"w_ih must have shape \[24, 4\]"),
    (dict(b_hh=torch.zeros(23)), ValueError, r"b_hh must have shape \[24\]"),
])
def test_bad_inputs_are_refused_before_jax_runs(change, error, match):
    args = dict(x=torch.zeros(2, 5, 4), h0=torch.zeros(2, 8), w_ih=torch.zeros(24, 4), w_hh=torch.zeros(24, 8),
                b_ih=torch.zeros(24), b_hh=torch.zeros(24))
    with pytest.raises(error, match=match):
        deer_jax.jax_deer_gru(**{**args, **change})
