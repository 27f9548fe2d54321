"""Input validation of every public projection function (ops and the float64 references): NaN or Inf in the
tensor, and a negative or NaN radius, raise a ValueError that says what is wrong (research/projection.md §5).
group_norm is the exception by design: it propagates NaN into the bad group's norm (test_projection.py)."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.kernels.projection import naive as N
from pflow_dist.kernels.projection.shapes import bilevel_tree
from pflow_dist.ops import projection as P

F64 = torch.float64

PROJECTIONS = {
    "bilevel_project": lambda x, e: P.bilevel_project(x, e),
    "bilevel_project-l1": lambda x, e: P.bilevel_project(x, e, "l1"),
    "bilevel_project-l2": lambda x, e: P.bilevel_project(x, e, "l2"),
    "bilevel_project-unchecked": lambda x, e: P.bilevel_project(x, e, check_finite=False),  # CPU checks anyway
    "bilevel_project-batched": lambda x, e: P.bilevel_project(x, e, batch_dims=0),
    "bilevel_project-batched-eta-tensor": lambda x, e: P.bilevel_project(x, torch.full((6,), e, dtype=F64),
                                                                         batch_dims=0),
    "bilevel_project-pivot": lambda x, e: P.bilevel_project(x, e, "l1", method="pivot"),
    "bilevel_project_": lambda x, e: P.bilevel_project_(x.clone(), e),
    "multilevel_project": lambda x, e: P.multilevel_project(x.reshape(2, 3, 5), e),
    "multilevel_project_": lambda x, e: P.multilevel_project_(x.reshape(2, 3, 5).clone(), e),
    "project_tree": lambda x, e: P.project_tree(x, e, bilevel_tree(2, "linf", (0,))),
    "project_l1": lambda x, e: P.project_l1(x, e),
    "project_l1-dim": lambda x, e: P.project_l1(x, e, dim=1),
    "project_l1-eta-tensor": lambda x, e: P.project_l1(x, torch.full((6,), e, dtype=F64), dim=1),
    "project_l1_": lambda x, e: P.project_l1_(x.clone(), e),
    "l1_threshold": lambda x, e: P.l1_threshold(x.abs(), e),
    "l1_threshold-pivot": lambda x, e: P.l1_threshold(x.abs(), e, method="pivot"),
    "l1_threshold-michelot": lambda x, e: P.l1_threshold(x.abs(), e, method="michelot"),
    "exact_l1inf_project": lambda x, e: P.exact_l1inf_project(x, e),
    "naive_bilevel_project": lambda x, e: N.naive_bilevel_project(x, e, "linf", (0,)),
    "naive_multilevel_project": lambda x, e: N.naive_multilevel_project(x.reshape(2, 3, 5), e,
                                                                        ("l1", "linf", "linf")),
    "naive_project_l1": lambda x, e: N.naive_project_l1(x, e),
    "naive_l1_threshold": lambda x, e: N.naive_l1_threshold(x, e),
    "naive_exact_l1inf_project": lambda x, e: N.naive_exact_l1inf_project(x, e, (0,)),
}


def _x(bad: float | None = None) -> torch.Tensor:
    x = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    if bad is not None:
        x[2, 3] = bad
    return x


@pytest.mark.parametrize("name", list(PROJECTIONS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_raises(name, bad):
    with pytest.raises(ValueError, match="finite"):
        PROJECTIONS[name](_x(bad), 1.0)


@pytest.mark.parametrize("name", list(PROJECTIONS))
@pytest.mark.parametrize("eta", [-1.0, -1e-300, float("nan")], ids=["neg", "tiny-neg", "nan"])
def test_bad_radius_raises(name, eta):
    with pytest.raises(ValueError, match="eta must be >= 0"):
        PROJECTIONS[name](_x(), eta)


@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_valid_input_passes(name):
    out = PROJECTIONS[name](_x(), 2.0)
    assert bool(torch.isfinite(torch.as_tensor(out)).all())


@pytest.mark.parametrize("norm", [P.mixed_norm, lambda x: N.naive_mixed_norm(x, ("l1", "linf"), ((1,), (0,)))],
                         ids=["mixed_norm", "naive_mixed_norm"])
def test_mixed_norm_rejects_non_finite(norm):
    assert float(norm(_x())) > 0
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            norm(_x(bad))
