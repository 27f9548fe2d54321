"""``pflow-dist bench attention``: causal sliding-window + global-token attention, ours vs FlexAttention and dense SDPA.

Implementations, all on the same inputs (``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]``, window W, the first G tokens
global):
- ``ours``: ``pflow_dist.ops.sparse_attention.sparse_attention`` (``backend="triton"`` on CUDA, blocked torch on CPU);
- ``flex``: the same pattern as a torch FlexAttention block mask (``backend="flex"``: compiled on CUDA; on CPU eager,
  forward only — torch has no FlexAttention backward there, the fwd+bwd row records that error);
- ``sdpa-causal``: dense causal ``scaled_dot_product_attention`` (FlashAttention backend on CUDA), O(T²): the cost
  yardstick that sparse attention must beat. It computes a *denser* pattern, so its ``rel_err`` against the sparse
  reference is large by construction; it is skipped (status ``error``) above ``DENSE_MAX_T`` tokens, where one call
  takes seconds;
- ``torch-blocked``: the plain-torch O(T·W) path (``backend="torch"``), up to ``BLOCKED_MAX_T`` tokens (its scores
  take T·(W + 128)·H floats).
``extra.rel_err`` is each output's relative RMS error against the float64 dense-mask reference (small cases only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.attention.naive import naive_sparse_attention
from ..ops.sparse_attention import sparse_attention
from .registry import Bench, Case, Impl

DENSE_MAX_T = 262_144
BLOCKED_MAX_T = 32_768
REFERENCE_MAX_T = 4_096

# (B, T, H, Hkv, D, W, G)
_QUICK = [(1, 256, 2, 2, 16, 32, 2), (1, 1000, 4, 2, 32, 64, 4)]
_FULL = [(1, t, 16, 16, 128, w, 4) for w in (512, 2048) for t in (8_192, 32_768, 131_072, 524_288, 1_048_576)]
_FULL += [(1, 131_072, 32, 8, 128, 2048, 4)]  # GQA 4:1
_FULL += [(1, REFERENCE_MAX_T, 16, 16, 128, 512, 4)]  # full head size, small enough for the float64 check


def _cases(quick: bool) -> list[Case]:
    out = []
    for b, t, h, hkv, d, w, g in _QUICK if quick else _FULL:
        name = f"B{b}-T{t}-H{h}" + (f"-Hkv{hkv}" if hkv != h else "") + f"-D{d}-W{w}-G{g}"
        out.append(Case(name, {"B": b, "T": t, "H": h, "Hkv": hkv, "D": d, "W": w, "G": g}))
    return out


def _inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    p = case.params
    shape_q = (p["B"], p["T"], p["H"], p["D"])
    shape_kv = (p["B"], p["T"], p["Hkv"], p["D"])
    gen = torch.Generator(device=device).manual_seed(0)  # drawn on the device: 1M-token inputs in milliseconds
    r = lambda s: torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    return {"q": r(shape_q), "k": r(shape_kv), "v": r(shape_kv),
            "window": torch.tensor(p["W"]), "n_global": torch.tensor(p["G"])}


def _ours(inp):
    backend = "triton" if inp["q"].is_cuda else "auto"  # our kernels (auto may choose FlexAttention on CUDA)
    return (sparse_attention(inp["q"], inp["k"], inp["v"], int(inp["window"]), n_global=int(inp["n_global"]),
                             backend=backend),)


def _flex(inp):
    return (sparse_attention(inp["q"], inp["k"], inp["v"], int(inp["window"]), n_global=int(inp["n_global"]),
                             backend="flex"),)


def _blocked(inp):
    T = inp["q"].shape[1]
    if T > BLOCKED_MAX_T:
        raise RuntimeError(f"skipped: torch-blocked runs up to T={BLOCKED_MAX_T} (memory T·(W+128)·H floats)")
    return (sparse_attention(inp["q"], inp["k"], inp["v"], int(inp["window"]), n_global=int(inp["n_global"]),
                             backend="torch"),)


def _sdpa(inp):
    q, k, v = inp["q"], inp["k"], inp["v"]
    T = q.shape[1]
    if T > DENSE_MAX_T:
        raise RuntimeError(f"skipped: dense causal attention is O(T^2); runs up to T={DENSE_MAX_T}")
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    gqa = q.shape[2] != k.shape[2]
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            o = F.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=gqa)
    return (o.transpose(1, 2),)


def _flex_unavailable(device: torch.device) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401, PLC0415
    except ImportError:
        return "torch.nn.attention.flex_attention is not available in this torch"
    return None


def _reference(inp) -> torch.Tensor:
    return naive_sparse_attention(inp["q"].double(), inp["k"].double(), inp["v"].double(), int(inp["window"]),
                                  n_global=int(inp["n_global"]))


BENCH = Bench(
    name="attention",
    description=__doc__.splitlines()[0],
    cases=_cases,
    make_inputs=_inputs,
    impls=[
        Impl("ours", _ours, package="pflow-dist"),
        Impl("flex", _flex, _flex_unavailable, "torch"),
        Impl("sdpa-causal", _sdpa, package="torch"),
        Impl("torch-blocked", _blocked),
    ],
    grad_inputs=("q", "k", "v"),
    default_dtype=torch.bfloat16,
    reference=_reference,
    check_limit=lambda case: case.params["T"] <= REFERENCE_MAX_T,
    shapes=lambda inputs: {k: list(v.shape) for k, v in inputs.items() if v.dim()},
)
