"""Bi-level / multi-level projections (arXiv 2405.02086, 2407.16293) against the float64 references of
kernels/projection/naive.py, plus the invariants of research/projection.md §6.2 and the edge cases of §5."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from pflow_dist.kernels.projection.naive import (
    naive_bilevel_project,
    naive_exact_l1inf_project,
    naive_l1_threshold,
    naive_mixed_norm,
    naive_multilevel_project,
    naive_project_l1,
)
from pflow_dist.ops.projection import (
    bilevel_project,
    bilevel_project_,
    exact_l1inf_project,
    group_norm,
    l1_threshold,
    mixed_norm,
    multilevel_project,
    multilevel_project_,
    project_l1,
    project_l1_,
)
from pflow_dist.testing import assert_close

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
METHODS = ["sort", "michelot", "pivot"]


def _other(ndim, red):
    return tuple(d for d in range(ndim) if d not in red)


def _bi_norm(x, inner, red):
    return naive_mixed_norm(x, ("l1", inner), (_other(x.dim(), red), red))


def _signed(shape, kind="normal", dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind)).encode()))  # not hash(): str hashes vary
    if kind == "normal":
        x = torch.randn(shape, generator=g, dtype=F64)
    elif kind == "heavy":  # heavy tails: a few huge entries dominate the group norms
        x = torch.randn(shape, generator=g, dtype=F64) * torch.rand(shape, generator=g, dtype=F64).pow(-2)
    elif kind == "ties":  # exact ties inside and across groups
        x = torch.randint(-3, 4, shape, generator=g).to(F64)
    elif kind == "zero_groups":
        x = torch.randn(shape, generator=g, dtype=F64)
        x.view(-1)[: max(1, x.numel() // 3)] = 0
        if x.dim() >= 2:
            x[..., 0] = 0
    else:
        raise ValueError(kind)
    return x.to(dtype=dtype, device=device)


# ---------------------------------------------------------------- ℓ1 ball


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 7, 63, 1000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("frac", [0.0, 1e-3, 0.3, 0.999, 1.0, 5.0], ids=lambda f: f"eta{f}")
def test_l1_threshold_matches_sort_formula(method, n, frac):
    v = torch.rand(3, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    v[1] = v[0].round(decimals=1)  # ties
    v[2, : n // 2] = 0
    for row in range(3):
        eta = frac * v[row].sum().item()
        tau = l1_threshold(v[row], eta, method=method).item()
        ref = naive_l1_threshold(v[row], eta)
        assert tau == pytest.approx(ref, rel=1e-12, abs=1e-14 * max(1.0, v[row].sum().item()))  # cancellation in S − η
        # Σ max(v − τ, 0) = min(η, Σ v)
        assert (v[row] - tau).clamp_min(0).sum().item() == pytest.approx(min(eta, v[row].sum().item()), rel=1e-12,
                                                                        abs=1e-13)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_project_l1_batched_tensor_radius(method, dtype):
    x = torch.randn(5, 33, dtype=F64)
    eta = torch.tensor([0.0, 0.5, 2.0, 10.0, 1e6], dtype=F64)
    out = project_l1(x.to(dtype), eta, dim=1, method=method)
    ref = torch.stack([naive_project_l1(x[i], eta[i].item()) for i in range(5)])
    assert_close("proj_l1", ref, out, 1e-6 if dtype == torch.float32 else 1e-13, atol=1e-6)
    # the same along dim 0 of the transpose
    out_t = project_l1(x.to(dtype).T, eta, dim=0, method=method)
    assert torch.equal(out_t.T, out)
    # whole tensor as one vector, in place on a strided view
    y = x.to(dtype).clone()
    view = y.T
    project_l1_(view, 3.0, method=method)
    assert_close("proj_l1_inplace", naive_project_l1(x, 3.0), y, 1e-6 if dtype == torch.float32 else 1e-13)


def test_l1_inside_is_bitwise_and_errors():
    x = torch.randn(10, dtype=F64)
    assert torch.equal(project_l1(x, x.abs().sum().item() + 1e-9), x)
    assert torch.equal(project_l1(x, 0.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="eta must be >= 0"):
        project_l1(x, -1.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        project_l1(x, float("nan"))
    with pytest.raises(ValueError, match="finite"):
        project_l1(torch.tensor([1.0, float("nan")]), 1.0)
    with pytest.raises(ValueError, match="method"):
        l1_threshold(x.abs(), 1.0, method="bucket")
    with pytest.raises(ValueError, match="broadcast"):
        project_l1(torch.randn(3, 4), torch.ones(5), dim=1)
    assert l1_threshold(torch.zeros(3, 0), 1.0).shape == (3,)


# ---------------------------------------------------------------- bi-level

SHAPES = [((1, 1), (0,)), ((7, 9), (0,)), ((7, 9), (1,)), ((9, 7), ()), ((13,), ()), ((13,), (0,)),
          ((3, 5, 6), (0, 2)), ((3, 5, 6), (1,)), ((2, 3, 4, 5), (1, 3))]
_ID = lambda s: f"{'x'.join(map(str, s[0]))}-red{''.join(map(str, s[1])) or 'none'}"  # noqa: E731


@pytest.mark.parametrize("inner", ["linf", "l1", "l2"])
@pytest.mark.parametrize("shape_red", SHAPES, ids=[_ID(s) for s in SHAPES])
@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "zero_groups"])
def test_bilevel_matches_reference_fp64(inner, shape_red, kind):
    shape, red = shape_red
    x = _signed(shape, kind)
    total = _bi_norm(x, inner, red)
    for frac in (0.0, 0.05, 0.5, 0.97):
        eta = frac * total
        ref = naive_bilevel_project(x, eta, inner, red)
        for method in METHODS:
            out = bilevel_project(x, eta, inner, red, method=method)
            assert_close(f"bilevel {inner} eta={frac}", ref, out, 1e-13, atol=1e-13)
            # invariants: tight norm, |X| <= |Y|, same signs, identity ‖Y−X‖ + ‖X‖ = ‖Y‖ (same mixed norm)
            assert _bi_norm(out, inner, red) == pytest.approx(min(eta, total), rel=1e-12, abs=1e-12)
            assert bool((out.abs() <= x.abs()).all()) and bool((out * x >= 0).all())
            assert _bi_norm(x - out, inner, red) + _bi_norm(out, inner, red) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("inner", ["linf", "l1", "l2"])
@pytest.mark.parametrize("device", DEVICES)
def test_bilevel_low_precision_feasible(dtype, inner, device):
    x64 = _signed((37, 21), "normal") * 10
    x = x64.to(dtype=dtype, device=device)
    xr = x.to(F64).cpu()  # the rounded input is the problem we solve
    total = _bi_norm(xr, inner, (0,))
    eta = 0.3 * total
    out = bilevel_project(x, eta, inner)
    assert out.dtype == dtype and out.device.type == device
    ref = naive_bilevel_project(xr, eta, inner, (0,))
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]  # ~ one ulp of the radii
    assert_close(f"bilevel {inner} {dtype}", ref, out.cpu(), tol, atol=tol)
    got = _bi_norm(out.to(F64).cpu(), inner, (0,))
    if inner == "linf":  # radii are rounded toward zero: never above η
        assert got <= eta * (1 + 1e-12)
    else:
        assert got <= eta * (1 + 8 * torch.finfo(dtype).eps)


def test_bilevel_optimality_certificate():
    """From X alone: all surviving groups share v_j − u_j = τ, dead groups have v_j <= τ, Σ u = η, clip exact."""
    x = _signed((40, 25), "heavy")
    v = x.abs().amax(0)
    eta = 0.2 * v.sum().item()
    out = bilevel_project(x, eta)
    u = out.abs().amax(0)
    alive = u > 0
    gaps = (v - u)[alive]
    tau = gaps[0].item()
    assert torch.allclose(gaps, torch.full_like(gaps, tau), rtol=0, atol=1e-12)
    assert bool((v[~alive] <= tau + 1e-12).all())
    assert u.sum().item() == pytest.approx(eta, rel=1e-13)
    assert torch.equal(out, x.clamp(-u, u))


@pytest.mark.parametrize("inner", ["linf", "l1", "l2"])
@pytest.mark.parametrize("device", DEVICES)
def test_bilevel_edge_cases(inner, device):
    x = _signed((6, 5), "normal", device=device)
    total = float(mixed_norm(x, ("l1", inner), ((1,), (0,))))
    # inside the ball (also exactly on it): bitwise the input, a new tensor
    for eta in (total, total * 1.5, math.inf):
        out = bilevel_project(x, eta, inner)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(bilevel_project(x, 0.0, inner), torch.zeros_like(x))
    z = torch.zeros(4, 3, device=device)
    assert torch.equal(bilevel_project(z, 1.0, inner), z)
    assert torch.equal(bilevel_project(z, 0.0, inner), z)
    assert bilevel_project(torch.zeros(0, 3, device=device), 1.0, inner).shape == (0, 3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 3] = bad
        with pytest.raises(ValueError, match="finite"):
            bilevel_project(y, 1.0, inner)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        bilevel_project(x, -0.1, inner)
    with pytest.raises(TypeError, match="eta must be a real number"):
        bilevel_project(x, "1", inner)
    with pytest.raises(ValueError, match="norm must be one of"):
        bilevel_project(x, 1.0, "l3")
    with pytest.raises(ValueError, match="out of range"):
        bilevel_project(x, 1.0, inner, reduce_dims=(2,))
    with pytest.raises(TypeError, match="dtype"):
        bilevel_project(torch.ones(3, 3, dtype=torch.int64), 1.0, inner)


def test_nan_propagates_through_max_reductions():
    """The NaN check relies on max-reductions propagating NaN into the group norms (research brief §5)."""
    x = torch.randn(5, 4)
    x[3, 1] = float("nan")
    for norm in ("linf", "l1", "l2"):
        v = group_norm(x, norm, 0)
        assert torch.isnan(v[1]) and torch.isfinite(v[[0, 2, 3]]).all()


@pytest.mark.parametrize("inner", ["linf", "l1", "l2"])
def test_bilevel_strided_views_inplace_and_out(inner):
    base = _signed((11, 8), "normal")
    eta = 0.3 * _bi_norm(base.T.contiguous(), inner, (1,))
    ref = naive_bilevel_project(base.T.contiguous(), eta, inner, (1,))
    # a transposed view gives the values of its contiguous copy
    assert_close("transposed", ref, bilevel_project(base.T, eta, inner, (1,)), 1e-13, atol=1e-14)
    # in place into a view writes the original storage
    y = base.clone()
    ret = bilevel_project_(y.T, eta, inner, (1,))
    assert ret.data_ptr() == y.data_ptr()
    assert_close("inplace view", ref.T, y, 1e-13, atol=1e-14)
    # a slice with a step
    big = torch.zeros(22, 8, dtype=F64)
    big[::2] = base
    bilevel_project_(big[::2], eta, inner, (0,))
    assert_close("slice", naive_bilevel_project(base, eta, inner, (0,)), big[::2], 1e-13, atol=1e-14)
    assert bool((big[1::2] == 0).all())
    # out=
    out = torch.empty_like(base)
    ret = bilevel_project(base, eta, inner, (0,), out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert_close("out", naive_bilevel_project(base, eta, inner, (0,)), out, 1e-13, atol=1e-14)
    with pytest.raises(TypeError, match="out must have dtype"):
        bilevel_project(base, eta, inner, out=torch.empty(11, 8))


def test_vector_bilevel_is_l1_projection():
    x = _signed((17,), "normal")
    for eta in (0.5, 3.0):
        assert_close("1-D", naive_project_l1(x, eta), bilevel_project(x, eta), 1e-14, atol=1e-15)


# ---------------------------------------------------------------- multi-level

TREES = [
    (("l1", "linf", "linf"), None),
    (("l1", "l1", "l1"), None),
    (("l1", "l2", "linf"), ((2,), (0,), (1,))),
    (("l1", "linf", "l1"), ((1,), (), (0, 2))),
    (("l1", "l2", "l1"), ((), (0, 1), (2,))),
    (("l1", "linf", "l2"), ((0, 2), (1,), ())),
    (("l1",), ((0, 1, 2),)),
]


@pytest.mark.parametrize("norms_blocks", TREES, ids=lambda t: "-".join(t[0]) + ("" if t[1] is None else
                                                                            "|" + str(t[1]).replace(" ", "")))
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_multilevel_matches_reference(norms_blocks, kind):
    norms, blocks = norms_blocks
    x = _signed((4, 5, 7), kind)
    total = naive_mixed_norm(x, norms, blocks)
    for frac in (0.0, 0.1, 0.6):
        eta = frac * total
        ref = naive_multilevel_project(x, eta, norms, blocks)
        for method in METHODS:
            out = multilevel_project(x, eta, norms, blocks, method=method)
            assert_close(f"{norms} {frac}", ref, out, 1e-13, atol=1e-13)
            assert float(mixed_norm(out, norms, blocks)) == pytest.approx(min(eta, total), rel=1e-12, abs=1e-12)
            assert bool((out.abs() <= x.abs()).all()) and bool((out * x >= 0).all())
    assert torch.equal(multilevel_project(x, total * 1.01, norms, blocks), x)
    y = x.clone()
    multilevel_project_(y, 0.4 * total, norms, blocks)
    assert_close("in place", naive_multilevel_project(x, 0.4 * total, norms, blocks), y, 1e-13, atol=1e-13)


def test_l1infinf_equals_bilevel_on_reshape():
    x = _signed((6, 5, 7), "heavy")
    eta = 0.2 * float(mixed_norm(x, ("l1", "linf", "linf")))
    a = multilevel_project(x, eta, ("l1", "linf", "linf"))
    b = bilevel_project(x.reshape(6, 35), eta, "linf", (1,)).reshape(6, 5, 7)
    assert torch.equal(a, b)


def test_bilevel_is_a_two_level_tree():
    x = _signed((6, 9), "normal")
    for inner in ("linf", "l1", "l2"):
        assert torch.equal(bilevel_project(x, 2.0, inner, (0,)), multilevel_project(x, 2.0, ("l1", inner), (1, 0)))


def test_tree_validation():
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="root norm must be 'l1'"):
        multilevel_project(x, 1.0, ("linf", "l1", "l1"))
    with pytest.raises(ValueError, match="one entry per non-batch dimension"):
        multilevel_project(x, 1.0, ("l1", "linf"))
    with pytest.raises(ValueError, match="partition"):
        multilevel_project(x, 1.0, ("l1", "linf"), ((0,), (1,)))
    with pytest.raises(ValueError, match="repeat"):
        multilevel_project(x, 1.0, ("l1", "linf"), ((0, 0), (1, 2)))


# ---------------------------------------------------------------- exact ℓ1,∞


@pytest.mark.parametrize("shape_red", SHAPES[:8], ids=[_ID(s) for s in SHAPES[:8]])
@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "zero_groups"])
def test_exact_l1inf_matches_bisection_and_beats_bilevel_distance(shape_red, kind):
    shape, red = shape_red
    x = _signed(shape, kind)
    total = _bi_norm(x, "linf", red)
    for frac in (0.0, 0.03, 0.3, 0.9, 1.0):
        eta = frac * total
        ref = naive_exact_l1inf_project(x, eta, red)
        out = exact_l1inf_project(x, eta, red)
        assert_close(f"exact {frac}", ref, out, 1e-10, atol=1e-12)
        assert _bi_norm(out, "linf", red) == pytest.approx(min(eta, total), rel=1e-12, abs=1e-12)
        bi = bilevel_project(x, eta, "linf", red)
        # slack at the scale of x's rounding: at frac = 1 both are x up to an ulp-level decision on "inside"
        assert (out - x).norm() <= (bi - x).norm() * (1 + 1e-12) + 1e-14 * max(1.0, float(x.abs().max()))
        # KKT: every surviving group gives up the same ℓ1 mass θ; dead groups have ‖y_j‖₁ <= θ
        if 0 < frac < 1 and x.dim() >= 2 and red:
            other = _other(x.dim(), red)
            a = x.abs().permute(*other, *red).reshape(math.prod(x.shape[d] for d in other), -1)
            o = out.abs().permute(*other, *red).reshape(a.shape)
            mass = (a - o).sum(1)
            alive = o.amax(1) > 0
            if alive.any():
                theta = mass[alive].max()
                assert torch.allclose(mass[alive], theta.expand(int(alive.sum())), rtol=1e-9, atol=1e-10)
                assert bool((a[~alive].sum(1) <= theta + 1e-9).all())


def test_exact_sparsity_vs_bilevel():
    """The papers' claim: at the same radius the bi-level projection zeroes more groups than the exact one."""
    x = torch.randn(50, 200, dtype=F64, generator=torch.Generator().manual_seed(0))
    eta = 0.05 * _bi_norm(x, "linf", (0,))
    dead_bi = int((bilevel_project(x, eta).abs().amax(0) == 0).sum())
    dead_ex = int((exact_l1inf_project(x, eta).abs().amax(0) == 0).sum())
    assert dead_bi > dead_ex


def test_exact_fp32_and_inplace():
    x = _signed((19, 12), "normal", dtype=torch.float32)
    eta = 0.25 * _bi_norm(x.double(), "linf", (0,))
    ref = naive_exact_l1inf_project(x.double(), eta)
    assert_close("exact fp32", ref, exact_l1inf_project(x, eta), 1e-6)
    y = x.clone()
    exact_l1inf_project(y.T, eta, (1,), out=y.T)
    assert_close("exact in place", ref, y, 1e-6)
    assert torch.equal(exact_l1inf_project(x, 1e9), x)


@pytest.mark.parametrize("inner", ["linf", "l2", "l1"])
def test_random_shapes_property(inner):
    """Random orders, sizes (odd, 1) and axes: the fast op equals the reference."""
    g = torch.Generator().manual_seed(7)
    for _ in range(12):
        ndim = int(torch.randint(1, 4, (1,), generator=g))
        shape = tuple(int(s) for s in torch.randint(1, 6, (ndim,), generator=g))
        red = tuple(d for d in range(ndim) if torch.rand(1, generator=g).item() < 0.5)
        x = torch.randn(shape, generator=g, dtype=F64)
        eta = float(torch.rand(1, generator=g)) * _bi_norm(x, inner, red)
        assert_close(f"{shape} {red}", naive_bilevel_project(x, eta, inner, red),
                     bilevel_project(x, eta, inner, red), 1e-13, atol=1e-14)


def test_all_combinations_small_tree():
    x = _signed((3, 4, 5), "normal")
    for n1, n2 in itertools.product(("l1", "l2", "linf"), repeat=2):
        norms = ("l1", n1, n2)
        eta = 0.3 * naive_mixed_norm(x, norms)
        assert_close(str(norms), naive_multilevel_project(x, eta, norms), multilevel_project(x, eta, norms), 1e-13,
                     atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_cpu_chunked_absmax_large_column_groups(dtype):
    """Column groups of a tensor above the chunking threshold take the one-read CPU path: same values, NaN kept."""
    from pflow_dist.ops.projection_tree import CPU_CHUNK_ELEMS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the one-read path is single-thread only
    try:
        _chunked_absmax_checks(CPU_CHUNK_ELEMS, dtype)
    finally:
        torch.set_num_threads(threads)


def _chunked_absmax_checks(chunk, dtype):
    x = torch.randn(4 * chunk // 1000 + 3, 1000, dtype=dtype)
    assert torch.equal(group_norm(x, "linf", 0), x.abs().amax(0))
    x3 = x.view(-1, 10, 100)
    assert torch.equal(group_norm(x3, "linf", (0, 1)), x3.abs().amax((0, 1)))
    eta = 0.05 * float(x.abs().amax(0).double().sum())
    out = bilevel_project(x, eta)
    assert torch.equal(out, x.clamp(-out.abs().amax(0), out.abs().amax(0)))
    assert float(mixed_norm(out, ("l1", "linf"), ((1,), (0,)))) == pytest.approx(eta, rel=1e-6)
    x[7, 3] = float("nan")
    assert torch.isnan(group_norm(x, "linf", 0)[3])
    with pytest.raises(ValueError, match="finite"):
        bilevel_project(x, eta)


def test_exact_l1inf_ties_fuzz():
    """Integer data put θ on kinks of g(θ) (ties, groups whose ℓ1 mass equals θ): Newton must still settle."""
    g = torch.Generator().manual_seed(11)
    for _ in range(40):
        shape = (int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g)))
        x = torch.randint(-3, 4, shape, generator=g).to(F64)
        total = _bi_norm(x, "linf", (0,))
        for eta in {0.0, 1.0, 2.0, 3.0, total / 2, float(int(total) - 1)}:
            if eta < 0:
                continue
            assert_close(f"ties {shape} {eta}", naive_exact_l1inf_project(x, eta), exact_l1inf_project(x, eta),
                         1e-9, atol=1e-9)


@pytest.mark.parametrize("inner", ["linf", "l1", "l2"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_bilevel_is_independent_per_index(inner, method):
    x = _signed((4, 9, 7), "heavy")
    eta = torch.tensor([0.0, 1.0, 30.0, 1e9])
    out = bilevel_project(x, eta, inner, (1,), batch_dims=0, method=method)
    for b in range(4):
        assert_close(f"batch {b}", naive_bilevel_project(x[b], float(eta[b]), inner, (0,)), out[b], 1e-13,
                     atol=1e-13)
    assert torch.equal(out[3], x[3])
    # the default reduce dim is the first non-batch dim; a scalar radius serves every index; batch dim last
    xt = x.permute(1, 2, 0)
    out_t = bilevel_project(xt, 5.0, inner, batch_dims=2, method=method)
    for b in range(4):
        assert_close(f"batch last {b}", naive_bilevel_project(x[b], 5.0, inner, (0,)), out_t[..., b], 1e-13,
                     atol=1e-13)
    assert torch.equal(bilevel_project(x, 1e12, inner, (1,), batch_dims=0), x)
    with pytest.raises(ValueError, match="broadcast"):
        bilevel_project(x, torch.ones(3), inner, (1,), batch_dims=0)
    with pytest.raises(ValueError, match="must not share"):
        bilevel_project(x, 1.0, inner, (0,), batch_dims=0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        bilevel_project(x, torch.tensor([1.0, -1.0, 1.0, 1.0]), inner, (1,), batch_dims=0)


def test_batched_multilevel_and_single_level():
    x = _signed((5, 3, 4, 6), "normal")
    norms, blocks = ("l1", "linf", "l2"), ((0,), (2,), (3,))
    eta = torch.tensor([0.5, 2.0, 8.0])
    out = multilevel_project(x, eta, norms, blocks, batch_dims=1)
    for b in range(3):
        sub = x[:, b]
        ref = naive_multilevel_project(sub, float(eta[b]), norms, ((0,), (1,), (2,)))
        assert_close(f"multi batch {b}", ref, out[:, b], 1e-13, atol=1e-13)
    one = multilevel_project(x, eta, ("l1",), ((0, 2, 3),), batch_dims=1)
    for b in range(3):
        assert_close(f"l1 batch {b}", naive_project_l1(x[:, b], float(eta[b])), one[:, b], 1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="batch dims excluded"):
        multilevel_project(x, 1.0, norms, ((0, 1), (2,), (3,)), batch_dims=1)
