"""``pflow-dist bench flow``: one flow layer (rank-1 delta rule, gated or not), ours vs fla and a plain-torch form.

Implementations, all on the same inputs (L2-normalised keys, β ∈ (0, 1), log-decay g = logsigmoid(·) when gated):
- ``ours``: ``pflow_dist.ops.flow.chunk_flow`` (the Triton op; unavailable until it lands, issue 4);
- ``fla``: ``fla.ops.delta_rule.chunk_delta_rule`` / ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``
  (fla-core, when installed and on CUDA);
- ``torch-chunked``: the chunked WY reference of ``kernels/flow/naive.py`` accumulating in float32.
``extra.rel_err`` is each output's relative RMS error against the float64 reference on the same inputs.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..kernels.flow.naive import naive_chunk_flow
from .registry import Bench, Case, Impl

_QUICK = [(1, 64, 2, 16), (2, 100, 2, 32)]
_FULL = [(4, 8192, 16, 128), (1, 65536, 16, 128), (8, 4096, 32, 64)]


def _cases(quick: bool) -> list[Case]:
    out = []
    for gated in (0, 1):
        for b, t, h, d in _QUICK if quick else _FULL:
            name = f"B{b}-T{t}-H{h}-D{d}" + ("-gated" if gated else "")
            out.append(Case(name, {"B": b, "T": t, "H": h, "D": d, "gated": gated}))
    return out


def _inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    p = case.params
    B, T, H, D = p["B"], p["T"], p["H"], p["D"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    inp = {
        "q": r(B, T, H, D), "k": F.normalize(r(B, T, H, D), dim=-1), "v": r(B, T, H, D),
        "beta": torch.rand(B, T, H, generator=gen),
    }
    if p["gated"]:
        inp["g"] = F.logsigmoid(r(B, T, H) + 4.0)  # mostly slow decay, as in trained layers
    return {k: v.to(device=device, dtype=dtype) for k, v in inp.items()}


def _ours(inp):
    from pflow_dist.ops.flow import chunk_flow  # noqa: PLC0415 - lands with issue 4

    return chunk_flow(inp["q"], inp["k"], inp["v"], inp["beta"], g=inp.get("g"))


def _ours_unavailable(device: torch.device) -> str | None:
    return None if importlib.util.find_spec("pflow_dist.ops.flow") else "pflow_dist.ops.flow is not built yet"


def _fla(inp):
    if "g" in inp:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"])
    from fla.ops.delta_rule import chunk_delta_rule

    return chunk_delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"])


def _fla_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("fla") is None:
        return "fla-core is not installed"
    return None if device.type == "cuda" else "fla needs a CUDA device"


def _torch_chunked(inp):
    return naive_chunk_flow(inp["q"], inp["k"], inp["v"], inp["beta"], g=inp.get("g"), chunk_size=64,
                            acc_dtype=torch.float32)


def _reference(inp) -> torch.Tensor:
    return naive_chunk_flow(inp["q"], inp["k"], inp["v"], inp["beta"], g=inp.get("g"), chunk_size=64)[0]


BENCH = Bench(
    name="flow",
    description=__doc__.splitlines()[0],
    cases=_cases,
    make_inputs=_inputs,
    impls=[
        Impl("ours", _ours, _ours_unavailable, "pflow-dist"),
        Impl("fla", _fla, _fla_unavailable, "fla-core"),
        Impl("torch-chunked", _torch_chunked),
    ],
    grad_inputs=("q", "k", "v", "beta", "g"),
    default_dtype=torch.bfloat16,
    reference=_reference,
)
