"""Run Triton kernels on CPU through the interpreter (``TRITON_INTERPRET=1``) and natively on CUDA.

Triton decides at decoration time whether ``@triton.jit`` builds a compiled or an interpreted function, so the
interpreter must be switched on *before* any kernel module is imported: call :func:`enable_interpreter_if_no_cuda`
first thing (the test suite's ``conftest.py`` does).
"""

from __future__ import annotations

import os

import torch

__all__ = ["enable_interpreter_if_no_cuda", "interpreting", "kernel_device", "triton_available"]


def enable_interpreter_if_no_cuda() -> bool:
    """Set ``TRITON_INTERPRET=1`` when no CUDA device is present (unless the variable is already set).

    Returns:
        Whether the interpreter is active afterwards.
    """
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return interpreting()


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_device() -> torch.device:
    """The device Triton kernels run on here: CUDA when present and not interpreting, else CPU."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    return torch.device("cpu")


def triton_available() -> tuple[bool, str]:
    """Whether Triton kernels can run here, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a hard dependency
        return False, f"triton is not importable: {e}"
    if interpreting() or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device and TRITON_INTERPRET is not 1"
