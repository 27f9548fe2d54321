"""``backend="auto"`` of the bi-level projection: which backend runs for which device, tree and layout
(``resolve_backend``; no GPU needed: the choice depends on the device's type only)."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.kernels.projection.shapes import bilevel_tree, make_tree
from pflow_dist.ops.projection import bilevel_project, resolve_backend, view3

CUDA = [torch.device("cuda"), "cuda", "cuda:1"]


@pytest.mark.parametrize("device", CUDA, ids=["device", "str", "str-index"])
def test_auto_picks_triton_for_bilevel_linf_on_cuda(device):
    for ndim, red in ((2, (0,)), (2, (1,)), (3, (1, 2)), (3, (0, 1)), (1, ()), (2, ())):
        assert resolve_backend("auto", bilevel_tree(ndim, "linf", red), device) == "triton", (ndim, red)


@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu", torch.device("meta")], ids=["cpu", "str", "meta"])
def test_auto_stays_on_torch_off_cuda(device):
    assert resolve_backend("auto", bilevel_tree(2, "linf", (0,)), device) == "torch"


def test_auto_falls_back_to_torch_where_the_fused_path_does_not_apply():
    cuda = torch.device("cuda")
    assert resolve_backend("auto", bilevel_tree(3, "linf", (0, 2)), cuda) == "torch"  # not consecutive
    assert resolve_backend("auto", bilevel_tree(3, "linf", (1,), batch_dims=0), cuda) == "torch"  # batched
    assert resolve_backend("auto", make_tree(3, ("l1", "linf", "linf")), cuda) == "torch"  # three levels
    for inner in ("l1", "l2"):  # not measured on GPU yet
        assert resolve_backend("auto", bilevel_tree(2, inner, (0,)), cuda) == "torch"
    assert resolve_backend("auto", bilevel_tree(2, "linf", (0,)), cuda, viewable=False) == "torch"  # in place


def test_explicit_backends_are_kept_and_unknown_ones_refused():
    tree = bilevel_tree(2, "linf", (0,))
    assert resolve_backend("torch", tree, "cuda") == "torch"
    assert resolve_backend("triton", tree, "cpu") == "triton"  # runs under the interpreter, or raises there
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", tree, "cpu")


def test_viewable_layouts_for_in_place():
    x = torch.zeros(6, 5, 4)
    assert view3(x, (1,)) is not None and view3(x, (0, 1)) is not None
    assert view3(x[:, ::2], ()) is None  # the layout test_projection_fused refuses for triton in place


def test_auto_on_cpu_is_the_torch_path_bitwise():
    x = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for red in ((0,), (1,)):
        assert torch.equal(bilevel_project(x, 3.0, "linf", red, backend="auto"),
                           bilevel_project(x, 3.0, "linf", red, backend="torch"))
