"""The sampled-pivot ℓ1-ball threshold (method="pivot", Condat's scheme vectorised; ops/projection_l1_pivot.py)
against the sort formula in float64: every code path (short rows, the sampled bracket, a bracket the sample gets
wrong, compaction, the sort fallback), ties, rows already inside, zero rows, η = 0, mixed batches."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.kernels.projection.naive import naive_l1_threshold
from pflow_dist.ops.projection import bilevel_project, l1_threshold, project_l1
from pflow_dist.ops.projection_l1 import _threshold_sort, auto_method
from pflow_dist.ops.projection_l1_pivot import _sample_index, threshold_pivot
from pflow_dist.testing import assert_close

F64 = torch.float64


def _data(kind: str, B: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(B, n, generator=g, dtype=F64)
    if kind == "lognormal":
        return torch.randn(B, n, generator=g, dtype=F64).mul_(2).exp_()
    if kind == "ties":
        return torch.randint(0, 4, (B, n), generator=g).to(F64)
    if kind == "sparse":  # mostly zeros, a few spikes
        return torch.rand(B, n, generator=g, dtype=F64) * (torch.rand(B, n, generator=g) < 0.01)
    raise ValueError(kind)


def _check(tau: torch.Tensor, a: torch.Tensor, eta: torch.Tensor) -> None:
    ref = _threshold_sort(a, eta)
    scale = a.sum(-1).clamp_min(1)
    assert tau.dtype == a.dtype and tau.shape == a.shape[:-1]
    assert bool(((tau - ref).abs() <= 1e-12 * ref.abs() + 1e-14 * scale).all()), (tau - ref).abs().max()
    # the defining identity: Σ max(v − τ, 0) = min(η, Σ v)
    kept = (a - tau.unsqueeze(-1)).clamp_min(0).sum(-1)
    want = torch.minimum(eta.expand(a.shape[:-1]), a.sum(-1))
    assert bool(((kept - want).abs() <= 1e-11 * scale).all())


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "ties", "sparse"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 255), (2, 256), (1, 5000), (40, 1000), (1, 200_000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("frac", [1e-6, 1e-3, 0.1, 0.5, 0.999])
def test_pivot_matches_sort_formula(kind, shape, frac):
    a = _data(kind, *shape, seed=shape[1])
    eta = frac * a.sum(-1)
    _check(threshold_pivot(a, eta), a, eta)


def test_pivot_small_cases_match_the_loop_reference():
    for n, vals in [(1, [2.0]), (2, [1.0, 1.0]), (3, [3.0, 0.0, 1.0]), (5, [0.5] * 5)]:
        v = torch.tensor(vals, dtype=F64)
        for eta in (0.0, 0.1, 1.0, 2.5, 100.0):
            tau = l1_threshold(v, eta, method="pivot").item()
            assert tau == pytest.approx(naive_l1_threshold(v, eta), rel=1e-14, abs=1e-15), (n, eta)


def test_pivot_mixed_batch_inside_zero_rows_and_eta_zero():
    a = _data("uniform", 6, 700, seed=1)
    a[1] = 0  # a zero row: inside every ball
    a[4] = a[0]  # a duplicate row
    eta = torch.tensor([3.0, 3.0, 1e9, 0.0, 3.0, 0.0], dtype=F64)  # row 2 is inside its ball
    tau = threshold_pivot(a, eta)
    assert tau[1] == 0 and tau[2] == 0  # inside: nothing is removed
    assert tau[3] == a[3].max() and tau[5] == a[5].max()  # η = 0: the ball is {0}
    assert tau[4] == tau[0]
    _check(tau, a, eta)


def test_pivot_recovers_from_a_misleading_sample():
    """Spikes placed where the fixed sample never looks: the sampled bracket is wrong, the full-row passes run."""
    n = 1000
    a = torch.ones(3, n, dtype=F64)
    unseen = torch.ones(n, dtype=torch.bool)
    unseen[torch.from_numpy(_sample_index(n, 250))] = False
    spikes = unseen.nonzero().squeeze(1)[:5]
    a[0, spikes] = 1000.0
    a[1, spikes[:2]] = 50.0
    eta = torch.tensor([10.0, 60.0, 0.5], dtype=F64)
    _check(threshold_pivot(a, eta), a, eta)


@pytest.mark.parametrize("shape", [(4, 100), (3, 3000)], ids=["masked-passes", "bracket"])
def test_pivot_sort_fallback_is_exact(shape):
    """With one Michelot pass allowed, the rows left are finished by sorting their candidates (still exact)."""
    a = _data("lognormal", *shape, seed=7)
    eta = 0.3 * a.sum(-1)
    _check(threshold_pivot(a, eta, max_passes=1), a, eta)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_pivot_project_l1_and_bilevel_l11(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 400, generator=g, dtype=F64)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    # one ℓ1 ball over all 120000 entries, and one per row
    for dim, eta in ((None, 50.0), (1, torch.linspace(0, 400, 300, dtype=F64))):
        ref = project_l1(x, eta, dim=dim, method="sort")
        out = project_l1(x.to(dtype), eta, dim=dim, method="pivot")
        assert out.dtype == dtype
        assert_close(f"project_l1 dim={dim}", ref, out, tol, atol=tol)
    # bi-level ℓ1,1: the per-column thresholds are one batched call
    eta = 0.2 * float(x.abs().sum())
    ref = bilevel_project(x, eta, "l1", (0,), method="sort")
    assert_close("bilevel l11", ref, bilevel_project(x.to(dtype), eta, "l1", (0,), method="pivot"), tol, atol=tol)


def test_pivot_is_deterministic_and_validates():
    a = _data("uniform", 5, 4000, seed=11)
    eta = 0.05 * a.sum(-1)
    assert torch.equal(threshold_pivot(a, eta), threshold_pivot(a.clone(), eta))
    with pytest.raises(ValueError, match="finite"):
        l1_threshold(torch.tensor([1.0, float("nan"), 2.0]), 1.0, method="pivot")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        l1_threshold(a, -1.0, method="pivot")


def test_auto_method_choice():
    assert auto_method(torch.empty(4096)) == "sort"  # small: one torch.sort beats the numpy passes' overhead
    assert auto_method(torch.empty(1, 4097)) == "pivot"
    assert auto_method(torch.empty(8000, 100)) == "pivot"
    assert auto_method(torch.empty(0, 10)) == "sort"
