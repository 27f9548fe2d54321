"""``pflow-dist bench gru``: a GRU over long sequences, ours vs ``torch.nn.GRU`` (cuDNN on GPU) on the same weights.

"ours" is the best GRU path pflow_dist has; until the DEER solver lands (issue 11) that is the sequential cell loop,
so this bench is the yardstick DEER must beat. Cases are ``(B, nh, T)`` with input size = hidden size ``nh``.
"""

from __future__ import annotations

import functools

import torch

from ..kernels.deer.naive import GRUWeights, gru_cell, naive_gru, naive_rnn
from .registry import Bench, Case, Impl

_QUICK = [(2, 8, 64), (1, 16, 256)]
_FULL = [(16, 32, 17984), (16, 64, 17984), (16, 256, 17984), (1, 8, 2**20), (16, 32, 2**20)]


def _cases(quick: bool) -> list[Case]:
    return [Case(f"B{b}-nh{n}-T{t}", {"B": b, "nh": n, "T": t}) for b, n, t in (_QUICK if quick else _FULL)]


def _inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    B, N, T = case.params["B"], case.params["nh"], case.params["T"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    bound = N**-0.5  # nn.GRU's init range
    rand = lambda *s: ((torch.rand(*s, generator=gen) * 2 - 1) * bound).to(device=device, dtype=dtype)  # noqa: E731
    return {
        "x": torch.randn(B, T, N, generator=gen).to(device=device, dtype=dtype),
        "h0": torch.zeros(B, N, device=device, dtype=dtype),
        "weight_ih": rand(3 * N, N), "weight_hh": rand(3 * N, N), "bias_ih": rand(3 * N), "bias_hh": rand(3 * N),
    }


def _weights(inp) -> GRUWeights:
    return GRUWeights(inp["weight_ih"], inp["weight_hh"], inp["bias_ih"], inp["bias_hh"])


def _ours(inp):
    w = _weights(inp)
    return naive_rnn(lambda h, x: gru_cell(h, x, w), inp["x"], inp["h0"])


@functools.lru_cache(maxsize=8)
def _gru_module(n: int, device: torch.device, dtype: torch.dtype) -> torch.nn.GRU:
    return torch.nn.GRU(n, n, batch_first=True, device=device, dtype=dtype)


def _cudnn(inp):
    x = inp["x"]
    module = _gru_module(x.shape[-1], x.device, x.dtype)
    params = {f"{k}_l0": inp[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    h, hT = torch.func.functional_call(module, params, (x, inp["h0"].unsqueeze(0)))
    return h, hT[0]


def _reference(inp) -> torch.Tensor:
    return naive_gru(inp["x"].double(), inp["h0"].double(), _weights(inp).to(torch.float64))[0]


BENCH = Bench(
    name="gru",
    description=__doc__.splitlines()[0],
    cases=_cases,
    make_inputs=_inputs,
    impls=[Impl("ours", _ours), Impl("torch.nn.GRU", _cudnn)],
    grad_inputs=("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh"),
    default_dtype=torch.float32,
    reference=_reference,
    check_limit=lambda case: case.params["T"] * case.params["B"] <= 2**19,
)
