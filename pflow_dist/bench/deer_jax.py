"""The DEER method's own code as a peer of ``bench deer``: ``seq1d`` of machine-discovery/deer (JAX; Lim et al. 2024,
"Parallelizing non-linear sequential models over the sequence length", arXiv 2309.12252), run on the same inputs.

The GRU step is torch.nn.GRU's (same weights, gate order r, z, n, and ``n = tanh(W_in x + b_in + r ⊙ (W_hn h +
b_hn))``), written in ``jax.numpy`` with full-fp32 matmuls (``precision="highest"``, as our kernels and the cuDNN
reference compute), and solved by the official ``seq1d`` with its default DEER method (Newton with the full n×n
Jacobians, ``jax.lax.associative_scan`` over T, its default tolerances), vmapped over the batch as in the repository's
own speed benchmark (``experiments/01_speed_benchmark/seq1d.py``). Inputs and outputs cross between torch and JAX by
DLPack (no copies on the GPU); the backward is ``jax.vjp`` of the same jitted function, wrapped in a
``torch.autograd.Function`` so that the harness's fwd+bwd mode times it like every other implementation.

Where the code comes from: the ``deer`` package installed, or its source folder on ``PYTHONPATH`` (the GPU image has
JAX but not the package: carry the repository's ``deer/`` folder). ``deer/__init__.py`` also imports the ODE solvers,
which need ``optimistix``; ``seq1d`` does not, so the package's modules are loaded without running that file.
JAX's memory is its own (``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set before JAX starts so that torch and JAX share
the GPU): ``torch.cuda.max_memory_allocated`` does not see it, so these rows record JAX's own peak in
``extra.jax_peak_bytes_process`` (its high-water mark over the whole process) instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..kernels.common.checks import check_same_device, check_tensor

__all__ = ["jax_deer_gru", "jax_peak_bytes", "load_seq1d", "unavailable"]

# before JAX starts (it reads this once): allocate on demand, so that torch and JAX share the GPU
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def unavailable(device: torch.device) -> str | None:
    """Why the JAX peer cannot run here (``None`` when it can)."""
    if importlib.util.find_spec("jax") is None:
        return "jax is not installed (pip install jax; the GPU image has it)"
    if importlib.util.find_spec("deer") is None:
        return ("the official DEER code is not importable: install github.com/machine-discovery/deer or put its "
                "source folder (the one holding deer/) on PYTHONPATH")
    return None


def load_seq1d() -> Callable:
    """``deer.fseq1d.seq1d`` from the installed package or source folder, without ``deer/__init__.py``.

    Raises:
        RuntimeError: jax or the deer code is missing.
    """
    why = unavailable(torch.device("cpu"))
    if why:
        raise RuntimeError(why)
    if "deer" not in sys.modules:  # the package object with its path and spec, its __init__ not executed
        sys.modules["deer"] = importlib.util.module_from_spec(importlib.util.find_spec("deer"))
    from deer.fseq1d import seq1d  # noqa: PLC0415

    return seq1d


def _gru_step(h, x, params):
    """torch.nn.GRU's step for one sequence: ``h [n]``, ``x [n_in]``; params ``(W_ih, W_hh, b_ih, b_hh)``."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    w_ih, w_hh, b_ih, b_hh = params
    n = h.shape[-1]
    gi = jnp.dot(w_ih, x, precision="highest") + b_ih
    gh = jnp.dot(w_hh, h, precision="highest") + b_hh
    r = jax.nn.sigmoid(gi[:n] + gh[:n])
    z = jax.nn.sigmoid(gi[n:2 * n] + gh[n:2 * n])
    c = jnp.tanh(gi[2 * n:] + r * gh[2 * n:])
    return (1 - z) * c + z * h


@functools.lru_cache(maxsize=1)
def _solver() -> Callable:
    """``(x [B, T, n], h0 [B, n], W_ih, W_hh, b_ih, b_hh) -> h [B, T, n]``, jitted, batch by vmap."""
    import jax  # noqa: PLC0415

    seq1d = load_seq1d()

    def one(h0, x, params):
        return seq1d(_gru_step, h0, x, params).value

    @jax.jit
    def solve(x, h0, w_ih, w_hh, b_ih, b_hh):
        return jax.vmap(one, in_axes=(0, 0, None))(h0, x, (w_ih, w_hh, b_ih, b_hh))

    return solve


def _to_jax(t: torch.Tensor) -> Any:
    import jax.dlpack  # noqa: PLC0415

    return jax.dlpack.from_dlpack(t.detach().contiguous())


def _to_torch(a: Any) -> torch.Tensor:
    return torch.from_dlpack(a)


class _JaxDeerGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh):
        solve = _solver()  # loads the deer code (and JAX) first
        import jax  # noqa: PLC0415

        args = [_to_jax(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        if any(ctx.needs_input_grad):
            h, ctx.vjp = jax.vjp(solve, *args)
        else:
            h = solve(*args)
        return _to_torch(h)

    @staticmethod
    def backward(ctx, dh):
        grads = ctx.vjp(_to_jax(dh))
        del ctx.vjp
        return tuple(_to_torch(g) for g in grads)


def jax_deer_gru(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                 b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A torch.nn.GRU layer over ``x [B, T, n_in]`` from ``h0 [B, n]`` by the official DEER ``seq1d`` (JAX).

    Args:
        x, h0: inputs and initial state (float32, same device; CUDA or CPU, JAX must see the same device kind).
        w_ih, w_hh, b_ih, b_hh: ``torch.nn.GRU``'s ``weight_ih_l0 [3n, n_in]``, ``weight_hh_l0 [3n, n]``,
            ``bias_ih_l0 [3n]``, ``bias_hh_l0 [3n]``.

    Returns:
        ``(h [B, T, n], h_T [B, n])``, differentiable (``jax.vjp``) in every input.

    Raises:
        TypeError / ValueError: inputs that are not float32 tensors of these shapes on one device (checked before JAX
            is touched).
    """
    f32 = (torch.float32,)
    check_tensor("x", x, ndim=3, dims="[B, T, n_in]", dtypes=f32)
    B, _, n_in = x.shape
    n = w_hh.shape[-1] if w_hh.dim() == 2 else -1
    check_tensor("h0", h0, shape=(B, n), dims="[B, n]", dtypes=f32)
    check_tensor("w_ih", w_ih, shape=(3 * n, n_in), dims="[3n, n_in]", dtypes=f32)
    check_tensor("w_hh", w_hh, shape=(3 * n, n), dims="[3n, n]", dtypes=f32)
    check_tensor("b_ih", b_ih, shape=(3 * n,), dims="[3n]", dtypes=f32)
    check_tensor("b_hh", b_hh, shape=(3 * n,), dims="[3n]", dtypes=f32)
    check_same_device(x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    h = _JaxDeerGRU.apply(x, h0, w_ih, w_hh, b_ih, b_hh)
    return h, h[:, -1]


def jax_peak_bytes() -> int | None:
    """JAX's peak device memory in this process so far (``None`` where the backend does not report it)."""
    if "jax" not in sys.modules:
        return None
    import jax  # noqa: PLC0415

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")
