"""Test-suite set-up: the Triton interpreter on CPU (set before any kernel module is imported), seeds, dtypes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo)

from pflow_dist.testing import enable_interpreter_if_no_cuda  # noqa: E402

enable_interpreter_if_no_cuda()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(42)


@pytest.fixture
def device() -> torch.device:
    """Where Triton kernels run in this session: CUDA natively, else CPU through the interpreter."""
    from pflow_dist.testing import kernel_device

    return kernel_device()
