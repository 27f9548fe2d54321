# Sequential references for non-linear RNNs h_t = f(h_{t-1}, x_t), the oracle of the DEER solver (DESIGN.md §5).
#
# GRU with torch.nn.GRU semantics (https://docs.pytorch.org/docs/stable/generated/torch.nn.GRU.html), gate order
# (r, z, n) in the rows of weight_ih_l0 [3N, I] and weight_hh_l0 [3N, N]:
#   r = σ(W_ir x + b_ir + W_hr h + b_hr)
#   z = σ(W_iz x + b_iz + W_hz h + b_hz)
#   n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
#   h' = (1 − z) ⊙ n + z ⊙ h
"""Float64 references: the GRU cell with ``torch.nn.GRU`` semantics and a sequential RNN over T."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..common.checks import check_same_device, check_tensor

__all__ = ["GRUWeights", "gru_cell", "naive_gru", "naive_rnn"]

_F64 = torch.float64

Cell = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GRUWeights:
    """Weights of one GRU layer in ``torch.nn.GRU``'s layout.

    Attributes:
        weight_ih: ``[3N, I]`` rows (r, z, n).
        weight_hh: ``[3N, N]``.
        bias_ih: ``[3N]`` or ``None``.
        bias_hh: ``[3N]`` or ``None``.
    """

    weight_ih: torch.Tensor
    weight_hh: torch.Tensor
    bias_ih: torch.Tensor | None = None
    bias_hh: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("weight_hh", self.weight_hh, ndim=2, dims="[3N, N]")
        N = self.weight_hh.shape[1]
        check_tensor("weight_hh", self.weight_hh, shape=(3 * N, N), dims="[3N, N]")
        check_tensor("weight_ih", self.weight_ih, shape=(3 * N, None), dims="[3N, I]")
        for name in ("bias_ih", "bias_hh"):
            bias = getattr(self, name)
            if bias is not None:
                check_tensor(name, bias, shape=(3 * N,), dims="[3N]")
        check_same_device(weight_ih=self.weight_ih, weight_hh=self.weight_hh, bias_ih=self.bias_ih,
                          bias_hh=self.bias_hh)

    @property
    def hidden_size(self) -> int:
        return self.weight_hh.shape[1]

    @property
    def input_size(self) -> int:
        return self.weight_ih.shape[1]

    @classmethod
    def from_module(cls, module: torch.nn.GRU | torch.nn.GRUCell) -> GRUWeights:
        """Take the (live, differentiable) weights of a one-layer unidirectional ``nn.GRU`` or an ``nn.GRUCell``."""
        if isinstance(module, torch.nn.GRUCell):
            return cls(module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
        if not isinstance(module, torch.nn.GRU):
            raise TypeError(f"expected torch.nn.GRU or torch.nn.GRUCell, got {type(module).__name__}")
        if module.num_layers != 1 or module.bidirectional or module.proj_size:
            raise ValueError(
                "only one-layer, unidirectional GRUs without projection are supported, got "
                f"num_layers={module.num_layers}, bidirectional={module.bidirectional}, proj_size={module.proj_size}"
            )
        return cls(module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0 if module.bias else None,
                   module.bias_hh_l0 if module.bias else None)

    def to(self, dtype: torch.dtype) -> GRUWeights:
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return GRUWeights(cast(self.weight_ih), cast(self.weight_hh), cast(self.bias_ih), cast(self.bias_hh))


def gru_cell(h: torch.Tensor, x: torch.Tensor, w: GRUWeights) -> torch.Tensor:
    """One GRU step with ``torch.nn.GRU`` semantics (computed in the dtype of the inputs).

    Args:
        h: previous hidden state ``[..., N]``.
        x: input ``[..., I]``.
        w: the layer's weights.

    Returns:
        ``h' [..., N]``.
    """
    gi = x @ w.weight_ih.T
    gh = h @ w.weight_hh.T
    if w.bias_ih is not None:
        gi = gi + w.bias_ih
    if w.bias_hh is not None:
        gh = gh + w.bias_hh
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def naive_rnn(cell: Cell, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential RNN ``h_t = cell(h_{t-1}, x_t)`` over ``x [B, T, I]`` from ``h0 [B, N]``.

    Returns:
        ``(h [B, T, N], h_T [B, N])`` in the dtype the cell computes in.
    """
    check_tensor("x", x, ndim=3, dims="[B, T, I]")
    check_tensor("h0", h0, shape=(x.shape[0], None), dims="[B, N]")
    if x.shape[1] == 0:
        raise ValueError("x must have at least one time step (T >= 1), got T=0")
    h, hs = h0, []
    for t in range(x.shape[1]):
        h = cell(h, x[:, t])
        hs.append(h)
    return torch.stack(hs, dim=1), h


def naive_gru(
    x: torch.Tensor, h0: torch.Tensor | None, w: GRUWeights
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential GRU over ``x [B, T, I]`` (``batch_first`` layout) in float64.

    Args:
        x: inputs ``[B, T, I]``.
        h0: initial state ``[B, N]`` or ``None`` (zeros).
        w: weights, e.g. ``GRUWeights.from_module(nn.GRU(I, N, batch_first=True))``.

    Returns:
        ``(h [B, T, N], h_T [B, N])`` in ``x.dtype`` — equal to ``nn.GRU(..., batch_first=True)(x, h0[None])``.
    """
    check_tensor("x", x, shape=(None, None, w.input_size), dims=f"[B, T, I={w.input_size}]")
    if h0 is None:
        h0 = x.new_zeros(x.shape[0], w.hidden_size)
    check_tensor("h0", h0, shape=(x.shape[0], w.hidden_size), dims="[B, N]")
    w64 = w.to(_F64)
    h, hT = naive_rnn(lambda h_, x_: gru_cell(h_, x_, w64), x.to(_F64), h0.to(_F64))
    return h.to(x.dtype), hT.to(x.dtype)
