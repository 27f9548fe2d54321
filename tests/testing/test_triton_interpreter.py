"""Triton kernels run on CPU through the interpreter (natively on CUDA): a masked vector add and a tl.dot tile, checked
against torch. If this fails, every kernel test in the suite is meaningless, so it is tested on its own."""

import pytest
import torch
import triton
import triton.language as tl

from pflow_dist.testing import assert_close, interpreting, kernel_device, triton_available


@triton.jit
def _add_kernel(x_ptr, y_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_x = offs < n
    tl.store(o_ptr + offs, tl.load(x_ptr + offs, mask=m_x) + tl.load(y_ptr + offs, mask=m_x), mask=m_x)


@triton.jit
def _matmul_tile_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    b_a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b_b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(b_a, b_b, input_precision="ieee"))


def test_kernels_can_run_here():
    ok, why = triton_available()
    assert ok, why
    assert interpreting() or torch.cuda.is_available()


@pytest.mark.parametrize("n", [1, 100, 257])
def test_masked_add(n):
    dev = kernel_device()
    x, y = torch.randn(n, device=dev), torch.randn(n, device=dev)
    o = torch.full_like(x, float("nan"))  # poison: every element must be written
    _add_kernel[(triton.cdiv(n, 64),)](x, y, o, n, BLOCK=64)
    assert_close("add", (x + y).double(), o, 1e-7)


def test_dot_tile():
    dev = kernel_device()
    a, b = torch.randn(16, 16, device=dev), torch.randn(16, 16, device=dev)
    c = torch.full_like(a, float("nan"))
    _matmul_tile_kernel[(1,)](a, b, c, N=16)
    assert_close("dot", a.double() @ b.double(), c, 1e-6)
