"""The sequential GRU reference against torch.nn.GRU in float64 (same weights), gradcheck, and named errors."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.kernels.deer.naive import GRUWeights, gru_cell, naive_gru, naive_rnn
from pflow_dist.testing import assert_close


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize("B, T, I, N", [(2, 17, 3, 5), (1, 1, 4, 4), (3, 40, 7, 2)], ids=lambda v: str(v))
def test_matches_nn_gru_float64(B, T, I, N, bias, with_h0):
    gru = torch.nn.GRU(I, N, batch_first=True, bias=bias, dtype=torch.float64)
    x = torch.randn(B, T, I, dtype=torch.float64)
    h0 = torch.randn(B, N, dtype=torch.float64) if with_h0 else None
    ref, ref_T = gru(x, None if h0 is None else h0[None])
    h, hT = naive_gru(x, h0, GRUWeights.from_module(gru))
    assert_close("h", ref, h, 1e-13)
    assert_close("h_T", ref_T[0], hT, 1e-13)


def test_matches_nn_gru_gradients():
    gru = torch.nn.GRU(3, 4, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 12, 4, dtype=torch.float64)
    ref, _ = gru(x, h0[None])
    ref_grads = torch.autograd.grad(ref, [x, h0, *gru.parameters()], g)
    h, _ = naive_gru(x, h0, GRUWeights.from_module(gru))
    grads = torch.autograd.grad(h, [x, h0, *gru.parameters()], g)
    for name, r, o in zip(["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"], ref_grads, grads):
        assert_close(name, r, o, 1e-12)


def test_gru_cell_matches_nn_grucell_and_gradcheck():
    cell = torch.nn.GRUCell(3, 4, dtype=torch.float64)
    x, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    w = GRUWeights.from_module(cell)
    assert_close("cell", cell(x, h), gru_cell(h, x, w), 1e-14)
    x.requires_grad_(True)
    h.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h_, x_: gru_cell(h_, x_, w), (h, x))


def test_naive_rnn_with_any_cell():
    decay = 0.5
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    h, hT = naive_rnn(lambda h_, x_: decay * h_ + x_, x, torch.zeros(2, 3, dtype=torch.float64))
    expected = torch.stack([sum(decay ** (t - s) * x[:, s] for s in range(t + 1)) for t in range(6)], dim=1)
    assert_close("linear cell", expected, h, 1e-14)
    assert torch.equal(hT, h[:, -1])


def test_errors_are_named():
    with pytest.raises(ValueError, match=r"only one-layer, unidirectional GRUs .* got num_layers=2"):
        GRUWeights.from_module(torch.nn.GRU(3, 4, num_layers=2))
    with pytest.raises(TypeError, match="expected torch.nn.GRU or torch.nn.GRUCell, got LSTM"):
        GRUWeights.from_module(torch.nn.LSTM(3, 4))
    with pytest.raises(ValueError, match=r"weight_ih must have shape \[12, \*\] \[3N, I\], got \[9, 3\]"):
        GRUWeights(torch.zeros(9, 3), torch.zeros(12, 4))
    w = GRUWeights.from_module(torch.nn.GRU(3, 4, batch_first=True))
    with pytest.raises(ValueError, match=r"x must have shape \[\*, \*, 3\] \[B, T, I=3\], got \[2, 5, 4\]"):
        naive_gru(torch.zeros(2, 5, 4), None, w)
    with pytest.raises(ValueError, match=r"h0 must have shape \[2, 4\]"):
        naive_gru(torch.zeros(2, 5, 3), torch.zeros(2, 5), w)
