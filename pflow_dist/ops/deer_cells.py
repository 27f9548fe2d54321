# The cells DEER linearises (DESIGN.md §5; Lim et al., ICLR 2024, arXiv 2309.12252). A cell system knows, for the
# iterate h (and h_{t-1} = h shifted, h_0 first), the Newton residual f(h_{t-1}, x_t) − h_t and the transition of the
# linear recurrence the Newton step solves: dense J_t = ∂f/∂h, its diagonal (quasi-DEER), or a damped J. It also
# evaluates f over all positions at once with autograd (the one batched VJP of the adjoint backward) and gives J_t at
# the converged trajectory for the reverse scan.
#   - GRUSystem: torch.nn.GRU semantics with the analytic Jacobian of kernels/deer/gru.py (no autodiff per step);
#     J_t is passed to the scans in its structured form (coef [B, T, 4, n] + W_hh), never as B·T·n² floats on the
#     Triton path.
#   - FuncSystem: any cell f(h, x) acting row-wise on leading dims; J_t by torch.func (vmap of jacrev), materialised.
"""Cell systems for the DEER solver: the GRU with its analytic Jacobian, and any cell through torch.func."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.deer.gru import gru_linearize_torch, gru_linearize_triton
from ..kernels.deer.naive import GRUWeights

__all__ = ["FuncSystem", "GRUSystem", "Transition"]

# transition of one Newton step: {"a": diag [B,T,n] or dense [B,T,n,n]} or {"coef": [B,T,K+1,n], "mats": [K,n,n]}
Transition = dict


def shift(h: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """``h_{t-1}`` for every t: ``[h0, h_1, ..., h_{T-1}]`` (zeros for ``h0=None``)."""
    first = h.new_zeros(h.shape[0], 1, h.shape[2]) if h0 is None else h0.to(h.dtype).unsqueeze(1)
    return torch.cat([first, h[:, :-1]], dim=1)


class GRUSystem:
    """A one-layer GRU (``torch.nn.GRU`` semantics) over ``x [B, T, I]``.

    Args:
        w: the weights (live parameters keep their autograd connection through :meth:`evaluate`).
        x: inputs ``[B, T, I]``; h0: ``[B, n]`` or ``None``.
        dtype: the solver's compute dtype (float32 or float64).
        use_triton: compute the Newton terms with the Triton pointwise kernel.
    """

    def __init__(self, w: GRUWeights, x: torch.Tensor, h0: torch.Tensor | None, dtype: torch.dtype,
                 use_triton: bool) -> None:
        self.w = w
        self.x = x
        self.n = w.hidden_size
        self.dtype = dtype
        self.use_triton = use_triton
        with torch.no_grad():
            wd = w.to(dtype)
            B, T, _ = x.shape
            gi = x.to(dtype).reshape(B * T, -1) @ wd.weight_ih.T
            if wd.bias_ih is not None:
                gi += wd.bias_ih
            self.gi = gi.reshape(B, T, 3 * self.n)
            self.w_hh = wd.weight_hh.detach().contiguous()
            self.b_hh = None if wd.bias_hh is None else wd.bias_hh.detach()
            self.mats = self.w_hh.view(3, self.n, self.n)
            self.wdiag = torch.diagonal(self.mats, dim1=-2, dim2=-1).contiguous()
        self.set_initial_state(h0)

    def set_initial_state(self, h0: torch.Tensor | None) -> None:
        """Set the state before the first step (under sequence parallelism: the previous shard's last state)."""
        self.h0 = None if h0 is None else h0.detach().to(self.dtype).contiguous()

    def _gh(self, h_prev: torch.Tensor) -> torch.Tensor:
        B, T, n = h_prev.shape
        gh = h_prev.reshape(B * T, n) @ self.w_hh.T
        if self.b_hh is not None:
            gh += self.b_hh
        return gh.reshape(B, T, 3 * n)

    def _terms(self, h: torch.Tensor, structured: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_triton:
            return gru_linearize_torch(self.gi, self._gh(shift(h, self.h0)), h, self.h0, self.wdiag, structured,
                                       scale)
        B, T, n = h.shape
        h = h.contiguous()
        G = (h.reshape(B * T, n) @ self.w_hh.T).reshape(B, T, 3 * n)  # unshifted: the kernel reads row t-1
        bias = self.b_hh if self.b_hh is not None else h.new_zeros(3 * n)
        gh0 = bias.expand(B, 3 * n) if self.h0 is None else self.h0 @ self.w_hh.T + bias
        return gru_linearize_triton(self.gi, G, gh0.contiguous(), bias.contiguous(), h, self.h0, self.wdiag,
                                    structured, scale)

    def linearize(self, h: torch.Tensor, method: str, scale: float) -> tuple[torch.Tensor, Transition]:
        """Residual ``f(h_{t-1}, x_t) − h_t`` and the Newton transition at the iterate ``h``."""
        if method == "quasi":
            res, d = self._terms(h, False, scale)
            return res, {"a": d}
        res, coef = self._terms(h, True, scale)
        return res, {"coef": coef, "mats": self.mats}

    def jacobian(self, h_prev_star: torch.Tensor, h_star: torch.Tensor) -> Transition:
        """``J_t`` at the converged trajectory (structured), for the adjoint scan."""
        _, coef = self._terms(h_star, True, 1.0)
        return {"coef": coef, "mats": self.mats}

    def evaluate(self, h_prev: torch.Tensor) -> torch.Tensor:
        """``f(h_{t-1}, x_t)`` for all t with autograd to x, h_0 and the weights (fused GRU cell on CUDA)."""
        B, T, n = h_prev.shape
        w = self.w
        x = self.x.reshape(B * T, -1)
        y = torch.gru_cell(x.to(self.dtype), h_prev.reshape(B * T, n), w.weight_ih.to(self.dtype),
                           w.weight_hh.to(self.dtype), None if w.bias_ih is None else w.bias_ih.to(self.dtype),
                           None if w.bias_hh is None else w.bias_hh.to(self.dtype))
        return y.reshape(B, T, n)


class FuncSystem:
    """Any cell ``f(h, x) -> h'`` that acts row-wise on leading dims (``h [..., n]``, ``x [..., I]``), e.g. an
    ``nn.Module``; Jacobians by ``torch.func.vmap(torch.func.jacrev(f))``, materialised ``[B, T, n, n]``.

    Args:
        cell: the callable; its parameters (captured tensors, module parameters) receive gradients through
            :meth:`evaluate`.
        x: ``[B, T, I]``; h0: ``[B, n]`` or ``None``; n: state size; dtype: compute dtype.
    """

    def __init__(self, cell: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 h0: torch.Tensor | None, n: int, dtype: torch.dtype) -> None:
        self.cell = cell
        self.x = x
        self.n = n
        self.dtype = dtype
        self.xd = x.detach().to(dtype)
        self.set_initial_state(h0)

    def set_initial_state(self, h0: torch.Tensor | None) -> None:
        """Set the state before the first step (under sequence parallelism: the previous shard's last state)."""
        self.h0 = None if h0 is None else h0.detach().to(self.dtype)

    def _f(self, h_prev: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.cell(h_prev, self.xd).to(self.dtype)

    def _jac(self, h_prev: torch.Tensor) -> torch.Tensor:
        B, T, n = h_prev.shape
        jac = torch.func.vmap(torch.func.jacrev(lambda h, x: self.cell(h, x), argnums=0))
        with torch.no_grad():
            J = jac(h_prev.reshape(B * T, n), self.xd.reshape(B * T, -1))
        return J.reshape(B, T, n, n).to(self.dtype)

    def linearize(self, h: torch.Tensor, method: str, scale: float) -> tuple[torch.Tensor, Transition]:
        hp = shift(h, self.h0)
        res = self._f(hp) - h
        J = self._jac(hp)
        if method == "quasi":
            return res, {"a": scale * torch.diagonal(J, dim1=-2, dim2=-1).contiguous()}
        return res, {"a": scale * J}

    def jacobian(self, h_prev_star: torch.Tensor, h_star: torch.Tensor) -> Transition:
        return {"a": self._jac(h_prev_star)}

    def evaluate(self, h_prev: torch.Tensor) -> torch.Tensor:
        return self.cell(h_prev, self.x.to(self.dtype)).to(self.dtype)
