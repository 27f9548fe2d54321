"""Fused Triton kernels of the bi-level projection (kernels/projection/fused.py), on CPU through the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), against the float64 references."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.kernels.projection.naive import naive_bilevel_project, naive_mixed_norm
from pflow_dist.ops.projection import bilevel_project, bilevel_project_
from pflow_dist.testing import assert_close

pytestmark = pytest.mark.triton
F64 = torch.float64

SHAPES = [((37, 21), (0,)), ((37, 21), (1,)), ((5, 6, 7), (1,)), ((5, 6, 7), (1, 2)), ((4, 3, 5), (0, 1)),
          ((13,), ()), ((9, 4), ()), ((300, 5), (0,)), ((1, 1), (0,))]
TOL = {F64: 1e-13, torch.float32: 5e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}  # fp32: Σ over 300-entry groups


def _id(s):
    return f"{'x'.join(map(str, s[0]))}-red{''.join(map(str, s[1])) or 'none'}"


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("inner", ["linf", "l1", "l2"])
@pytest.mark.parametrize("shape_red", SHAPES, ids=[_id(s) for s in SHAPES])
def test_fused_matches_reference(device, shape_red, inner, dtype):
    shape, red = shape_red
    g = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    x64 = torch.randn(shape, generator=g, dtype=F64) * 3
    x = x64.to(dtype=dtype, device=device)
    xr = x.to(F64).cpu()  # the rounded input is the problem solved
    other = tuple(d for d in range(len(shape)) if d not in red)
    total = naive_mixed_norm(xr, ("l1", inner), (other, red))
    for frac in (0.0, 0.1, 0.7):
        eta = frac * total
        out = bilevel_project(x, eta, inner, red, backend="triton")
        assert out.dtype == dtype and out.shape == x.shape
        assert_close(f"fused {inner} {frac}", naive_bilevel_project(xr, eta, inner, red), out.cpu(), TOL[dtype],
                     atol=TOL[dtype])
        if inner == "linf":  # max is exact and the root sees the same vector: bitwise the torch backend
            assert torch.equal(out, bilevel_project(x, eta, inner, red, backend="torch"))
    assert torch.equal(bilevel_project(x, total * 1.01 + 1, inner, red, backend="triton"), x)


@pytest.mark.parametrize("inner", ["linf", "l2", "l1"])
def test_fused_inplace_strided_and_out(device, inner):
    base = torch.randn(40, 24, dtype=torch.float32, device=device)
    eta = 0.2 * naive_mixed_norm(base.double().cpu(), ("l1", inner), ((1,), (0,)))
    ref = naive_bilevel_project(base.double().cpu(), eta, inner, (0,))
    y = base.clone()
    ret = bilevel_project_(y, eta, inner, (0,), backend="triton")
    assert ret.data_ptr() == y.data_ptr()
    assert_close("in place", ref, y.cpu(), 1e-6)
    # transposed view: [24, 40] with row groups is the same problem; written into the original storage
    z = base.clone()
    bilevel_project_(z.T, eta, inner, (1,), backend="triton")
    assert_close("in place transposed", ref, z.cpu(), 1e-6)
    # out= with a non-viewable layout goes through a temporary
    out = torch.empty(24, 40, dtype=torch.float32, device=device).T
    bilevel_project(base, eta, inner, (0,), out=out, backend="triton")
    assert_close("out strided", ref, out.cpu(), 1e-6)
    # a non-viewable input (a slice with a step) is copied first when not in place
    big = torch.randn(80, 24, dtype=torch.float32, device=device)
    sl = big[::2]
    assert_close("sliced", naive_bilevel_project(sl.double().cpu(), eta, inner, (0,)),
                 bilevel_project(sl, eta, inner, (0,), backend="triton").cpu(), 1e-6)


def test_fused_long_groups_split_the_reduction(device):
    """R much longer than one tile: the r-range is split over programs and the partial norms combined."""
    x = torch.randn(2, 4100, 3, dtype=F64, device=device)
    for inner in ("linf", "l1", "l2"):
        eta = 0.3 * naive_mixed_norm(x.cpu(), ("l1", inner), ((0, 2), (1,)))
        assert_close(inner, naive_bilevel_project(x.cpu(), eta, inner, (1,)),
                     bilevel_project(x, eta, inner, (1,), backend="triton").cpu(), 1e-12)


def test_fused_errors(device):
    x = torch.randn(6, 5, 4, device=device)
    y = x.clone()
    y[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        bilevel_project(y, 1.0, backend="triton")
    with pytest.raises(ValueError, match="consecutive reduce_dims"):
        bilevel_project(x, 1.0, "linf", (0, 2), backend="triton")
    with pytest.raises(ValueError, match="in place needs a layout"):
        bilevel_project_(x[:, ::2], 1.0, "linf", (), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        bilevel_project(x, 1.0, backend="cuda")
    from pflow_dist.kernels.projection.shapes import make_tree
    from pflow_dist.ops.projection import multilevel_project, project_tree

    with pytest.raises(ValueError, match="bi-level trees"):
        project_tree(x, 1.0, make_tree(3, ("l1", "linf", "linf")), backend="triton")
    assert multilevel_project(x, 1.0).shape == x.shape
