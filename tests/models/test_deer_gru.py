"""The DEER-GRU classifier trains on the long-memory task with the same loss curve as the sequential GRU (same init,
same batches), reaches full accuracy, and the data generator places the cue where it says."""

from __future__ import annotations

import copy

import pytest
import torch

from pflow_dist.data.long_memory import LongMemoryTask, make_long_memory
from pflow_dist.models.deer_gru import DEERGRUClassifier, train_long_memory
from pflow_dist.ops.deer import DEERConvergenceError


def test_deer_gru_trains_like_sequential_gru():
    """80 Adam steps at T=48 (the cue in the first 12 steps, read out at step 48): the DEER model's loss curve equals
    the sequential nn.GRU's step for step, through the plateau and the drop, and both reach full accuracy."""
    task = LongMemoryTask(T=48, n_classes=2, in_dim=4, cue_frac=0.25, noise=0.3)
    torch.manual_seed(0)
    deer = DEERGRUClassifier(4, 16, 2, mode="deer", method="quasi", atol=1e-6, rtol=1e-6)
    seq = copy.deepcopy(deer)
    seq.mode = "sequential"
    r_deer = train_long_memory(deer, task, steps=80, batch=32, lr=2e-2, eval_batch=512)
    r_seq = train_long_memory(seq, task, steps=80, batch=32, lr=2e-2, eval_batch=512)
    diffs = [abs(a - b) for a, b in zip(r_deer.losses, r_seq.losses)]
    assert max(diffs) < 1e-3, f"loss curves differ by up to {max(diffs):.2e}"
    assert r_deer.losses[0] > 0.6 and r_deer.losses[-1] < 0.05  # it learned, from chance level
    assert r_deer.eval_accuracy >= 0.95 and r_seq.eval_accuracy >= 0.95
    assert all(1 <= it[0] <= task.T + 1 for it in r_deer.iterations)
    for p, q in zip(deer.parameters(), seq.parameters()):
        torch.testing.assert_close(p, q, atol=1e-3, rtol=1e-3)


def test_deer_gru_two_layers_newton_matches_sequential_logits():
    torch.manual_seed(1)
    model = DEERGRUClassifier(5, 6, 3, n_layers=2, mode="deer", method="newton", atol=1e-7, rtol=0.0)
    x = torch.randn(3, 40, 5)
    out = model(x)
    model.mode = "sequential"
    ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fallback_runs_unconverged_layers_sequentially():
    """With 2 Newton iterations a 40-step solve cannot converge: without ``fallback`` the classifier raises; with it
    each layer runs as the nn.GRU itself, counted, with the sequential model's logits and gradients."""
    torch.manual_seed(2)
    x = torch.randn(3, 40, 5)
    strict = DEERGRUClassifier(5, 6, 3, n_layers=2, method="quasi", atol=1e-7, rtol=0.0, max_iter=2)
    with pytest.raises(DEERConvergenceError, match="did not converge in 2 iterations"):
        strict(x)
    model = copy.deepcopy(strict)
    model.fallback = True
    out = model(x)
    assert model.last_fallbacks == 2 and model.last_iterations == [2, 2]
    seq = copy.deepcopy(strict)
    seq.mode = "sequential"
    ref = seq(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for p, q in zip(model.parameters(), seq.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6)
    model.deer_kw["max_iter"] = 100  # converged solves do not count
    model(x)
    assert model.last_fallbacks == 0


def test_long_memory_data():
    task = LongMemoryTask(T=200, n_classes=3, in_dim=5, cue_frac=0.1, noise=0.0)
    x, y = make_long_memory(task, 6, torch.Generator().manual_seed(0))
    assert x.shape == (6, 200, 5) and y.shape == (6,) and y.dtype == torch.int64
    marker = x[..., 3]
    pos = marker.argmax(1)
    assert (marker.abs().sum(1) == 3.0).all() and (pos < 20).all()  # one cue, in the first 10%
    assert torch.equal(x[torch.arange(6), pos, :3].argmax(-1), y)
    x2, y2 = make_long_memory(task, 6, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize(
    "kw,match",
    [({"T": 1}, "T must be >= 2"), ({"T": 10, "n_classes": 1}, "n_classes must be >= 2"),
     ({"T": 10, "n_classes": 4, "in_dim": 4}, r"in_dim must be >= n_classes \+ 1 = 5"),
     ({"T": 10, "cue_frac": 0.0}, r"cue_frac must be in \(0, 1\]")],
)
def test_long_memory_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LongMemoryTask(**kw)


def test_classifier_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        DEERGRUClassifier(4, 8, 2, mode="parallel")
    with pytest.raises(ValueError, match=r"x must have 3 dimensions \[B, T, I\]"):
        DEERGRUClassifier(4, 8, 2)(torch.randn(3, 4))


def test_chrono_init_sets_the_update_gate_biases_and_makes_long_memory_learnable():
    """chrono=T: the z-gate bias (split over bias_ih and bias_hh) is log u, u ~ U(1, T-1); the other gates keep
    torch's init. On the long-memory task at T = 128 the GRU then learns (loss ~0 within 150 Adam steps) where the
    default initialisation stays at chance (ln 2)."""
    torch.manual_seed(0)
    m = DEERGRUClassifier(4, 16, 2, chrono=256)
    gru = m.grus[0]
    bz = (gru.bias_ih_l0 + gru.bias_hh_l0).detach()[16:32]
    assert bool((bz >= 0).all()) and bool((bz <= torch.log(torch.tensor(255.0))).all()) and float(bz.std()) > 0.3
    bound = 16 ** -0.5  # torch's U(-1/sqrt(n), 1/sqrt(n)) for the r and n gates
    assert float(gru.bias_ih_l0.detach()[:16].abs().max()) <= bound
    assert float(gru.bias_hh_l0.detach()[32:].abs().max()) <= bound
    with pytest.raises(ValueError, match="chrono must be >= 3"):
        DEERGRUClassifier(4, 16, 2, chrono=2)

    task = LongMemoryTask(T=128, n_classes=2, in_dim=4, cue_frac=0.1, noise=0.3)
    final = {}
    for chrono in (None, 128):
        torch.manual_seed(0)
        model = DEERGRUClassifier(4, 16, 2, mode="sequential", chrono=chrono)
        res = train_long_memory(model, task, steps=150, batch=32, lr=1e-2)
        final[chrono] = sum(res.losses[-20:]) / 20
    assert final[128] < 0.05 and final[None] > 0.6, final
