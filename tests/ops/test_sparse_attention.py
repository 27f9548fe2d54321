"""Sparse attention (causal sliding window + global tokens): the mask against its definition written as a loop, the
float64 reference against a per-row softmax, the blocked torch backend and the building block ``window_attention``
against the references (outputs, lse and every gradient with random upstream gradients), FlexAttention's forward,
and the input errors. The Triton kernels: tests/ops/test_sparse_attention_triton.py."""

from __future__ import annotations

import math

import pytest
import torch

from pflow_dist.kernels.attention.naive import naive_sparse_attention, naive_window_attention, sparse_attention_mask
from pflow_dist.ops.sparse_attention import (
    AUTO_TRITON_MIN_T,
    INF_WINDOW,
    auto_backend,
    sparse_attention,
    window_attention,
)
from pflow_dist.testing import assert_close

F64 = torch.float64
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (B, T, H, Hkv, D, Dv, window, globals): globals = list of positions, int = first n, None = none
CASES = {
    "T63-D12-W7-G[0,9,40]": (2, 63, 2, 2, 12, 12, 7, [0, 9, 40]),
    "gqa4:1-T50-W16-first3": (1, 50, 4, 1, 8, 5, 16, 3),
    "gqa2:1-T33-W5-none": (2, 33, 4, 2, 16, 16, 5, None),
    "W1-T20-G[19,4]": (1, 20, 2, 1, 6, 6, 1, [19, 4]),
    "W>T-T12-W40-G[3]": (1, 12, 2, 2, 4, 4, 40, [3]),
    "T1-W3": (1, 1, 1, 1, 4, 3, 3, None),
}


def _globals(spec):
    if isinstance(spec, int):
        return dict(n_global=spec)
    return dict(global_idx=spec)


def _inputs(B, T, H, Hkv, D, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    q, k, v, do = r(B, T, H, D), r(B, T, Hkv, D), r(B, T, Hkv, Dv), r(B, T, H, Dv)
    return [x.to(dtype) for x in (q, k, v)], do


def check_op_against_reference(case, dtype, backend, ratio, device="cpu"):
    """Output and dq, dk, dv of ``sparse_attention(backend=...)`` against the float64 reference."""
    B, T, H, Hkv, D, Dv, W, gl = case
    (q, k, v), do = _inputs(B, T, H, Hkv, D, Dv, dtype)
    q, k, v, do = (x.to(device) for x in (q, k, v, do))
    ref_in = [x.detach().to(F64).requires_grad_(True) for x in (q, k, v)]
    ref = naive_sparse_attention(*ref_in, W, **_globals(gl))
    ref_grads = torch.autograd.grad(ref, ref_in, do)
    ins = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = sparse_attention(*ins, W, **_globals(gl), backend=backend)
    assert out.dtype == dtype and out.shape == (B, T, H, Dv)
    grads = torch.autograd.grad(out, ins, do.to(dtype))
    assert_close("o", ref, out, ratio)
    for name, rg, g in zip(("dq", "dk", "dv"), ref_grads, grads, strict=True):
        assert g.dtype == dtype
        assert_close(name, rg, g, ratio)


def _loop_mask(T, W, G):
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for s in range(t + 1):
            allowed[t, s] = (t - s < W) or (s in G) or (t in G)
    return allowed


@pytest.mark.parametrize("T,W,G", [(9, 3, [0]), (12, 1, [2, 7]), (7, 10, []), (16, 4, [15, 0, 8])],
                         ids=["T9-W3-sink", "T12-W1-G2", "W>T", "T16-W4-G3"])
def test_mask_matches_definition(T, W, G):
    assert torch.equal(sparse_attention_mask(T, W, G), _loop_mask(T, W, set(G)))
    if G == [0]:
        assert torch.equal(sparse_attention_mask(T, W, n_global=1), _loop_mask(T, W, {0}))


def test_reference_matches_per_row_softmax():
    """The dense masked reference equals softmax over each row's allowed keys, written row by row (GQA included)."""
    (q, k, v), _ = _inputs(1, 14, 4, 2, 5, 3, F64, seed=3)
    W, G = 3, [2, 9]
    o = naive_sparse_attention(q, k, v, W, G, scale=0.7)
    allowed = _loop_mask(14, W, set(G))
    for t in range(14):
        keys = allowed[t].nonzero().flatten()
        for h in range(4):
            s = (k[0, keys, h // 2] @ q[0, t, h]) * 0.7
            ref = torch.softmax(s, 0) @ v[0, keys, h // 2]
            assert_close(f"o[{t},{h}]", ref, o[0, t, h], 1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_torch_backend(case, dtype):
    check_op_against_reference(case, dtype, "torch", TOL[dtype])


BLOCK_CASES = {
    # (B, Tq, H, Hkv, D, Dv, q_start, Tk, k_start, window, g_pos, gathered)
    "halo-shard-offsets": (2, 19, 2, 1, 6, 5, 30, 27, 22, 9, [0, 3, 25, 40], False),
    "keys-after-some-queries": (1, 10, 2, 2, 4, 4, 3, 10, 8, 4, [1], False),
    "gathered-rows-inf-window": (1, 4, 2, 1, 5, 3, None, 20, 6, INF_WINDOW, [], True),
}


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("case", list(BLOCK_CASES.values()), ids=list(BLOCK_CASES))
def test_window_attention_block(case, backend):
    check_window_attention_block(case, backend, torch.float32, 1e-5)


def check_window_attention_block(case, backend, dtype, ratio, device="cpu"):
    """o, lse and all gradients of the positioned block (with an upstream gradient on lse too) vs the reference;
    rows without any key (lse = −inf) must give o = 0."""
    B, Tq, H, Hkv, D, Dv, q_start, Tk, k_start, W, gpos, gathered = case
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    G = len(gpos)
    t = [x.to(device=device, dtype=dtype)
         for x in (r(B, Tq, H, D), r(B, Tk, Hkv, D), r(B, Tk, Hkv, Dv), r(B, G, Hkv, D), r(B, G, Hkv, Dv))]
    if gathered:
        q_pos = torch.tensor([2, 6, 15, 40], device=device)
        pos_kw = dict(q_pos=q_pos)
        ref_pos = q_pos
    else:
        pos_kw = dict(q_start=q_start)
        ref_pos = q_start + torch.arange(Tq, device=device)
    g_kw = lambda x: dict(kg=x[3], vg=x[4], g_pos=torch.tensor(gpos, device=device)) if G else {}  # noqa: E731
    n_in = 5 if G else 3
    ref_in = [x.detach().to(F64).requires_grad_(True) for x in t[:n_in]]
    ref_o, ref_lse = naive_window_attention(*ref_in[:3], q_pos=ref_pos, k_start=k_start, window=W, **g_kw(ref_in),
                                            scale=0.5)
    do, dlse = r(B, Tq, H, Dv).to(device), r(B, Tq, H).to(device)
    empty = torch.isinf(ref_lse)
    dlse = dlse.masked_fill(empty, 0.0)
    loss_ref = (ref_o * do).sum() + (ref_lse.masked_fill(empty, 0.0) * dlse).sum()
    ref_grads = torch.autograd.grad(loss_ref, ref_in)
    ins = [x.detach().clone().requires_grad_(True) for x in t[:n_in]]
    o, lse = window_attention(*ins[:3], window=W, k_start=k_start, **pos_kw, **g_kw(ins), scale=0.5, backend=backend)
    assert torch.equal(torch.isinf(lse), empty)
    assert (o[empty.unsqueeze(-1).expand_as(o)] == 0).all()
    loss = (o.to(F64) * do).sum() + (lse.masked_fill(empty, 0.0).to(F64) * dlse).sum()
    grads = torch.autograd.grad(loss, ins)
    assert_close("o", ref_o, o, ratio)
    assert_close("lse", ref_lse.masked_fill(empty, 0.0), lse.masked_fill(empty, 0.0), ratio)
    for name, rg, g in zip(("dq", "dk", "dv", "dkg", "dvg"), ref_grads, grads, strict=False):
        assert_close(name, rg, g, ratio, atol=1e-12)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_cpu():
    """FlexAttention with the same block mask (forward only: torch has no FlexAttention backward on CPU)."""
    (q, k, v), _ = _inputs(1, 40, 2, 1, 16, 16, torch.float32, seed=5)
    ref = naive_sparse_attention(q.double(), k.double(), v.double(), 6, [0, 17])
    with torch.no_grad():
        out = sparse_attention(q, k, v, 6, [0, 17], backend="flex")
    assert_close("o", ref, out, 1e-5)


def test_torch_backend_is_local():
    """Perturbing a key outside every query's readable set changes nothing; inside the window it does."""
    (q, k, v), _ = _inputs(1, 30, 2, 2, 4, 4, F64, seed=9)
    o = sparse_attention(q, k, v, 4, [0], backend="torch")
    k2 = k.clone()
    k2[:, 10] += 5.0  # read only by queries 10..13 (and not by the global row 0)
    o2 = sparse_attention(q, k2, v, 4, [0], backend="torch")
    changed = (o2 - o).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.nonzero().flatten().tolist() == [10, 11, 12, 13]


BAD = {
    "window-0": (dict(window=0), ValueError, "window must be >= 1"),
    "window-negative": (dict(window=-3), ValueError, "window must be >= 1"),
    "window-float": (dict(window=2.0), TypeError, "window must be an int"),
    "window-bool": (dict(window=True), TypeError, "window must be an int"),
    "global-out-of-range": (dict(global_idx=[0, 8]), ValueError, r"global_idx must lie in \[0, T=8\)"),
    "global-negative": (dict(global_idx=[-1]), ValueError, "must lie in"),
    "global-duplicate": (dict(global_idx=[2, 5, 2]), ValueError, r"duplicates \[2\]"),
    "global-float": (dict(global_idx=torch.tensor([1.0])), TypeError, "must hold integers"),
    "global-2d": (dict(global_idx=torch.tensor([[1]])), ValueError, "must be 1-D"),
    "global-and-n_global": (dict(global_idx=[1], n_global=2), ValueError, "either global_idx or n_global"),
    "n_global>T": (dict(n_global=9), ValueError, r"n_global must be in \[0, T=8\]"),
    "scale-nan": (dict(scale=math.nan), ValueError, "scale must be a finite number"),
    "backend": (dict(backend="cuda"), ValueError, "backend must be one of"),
    "triton-f64": (dict(backend="triton", dtype=F64), TypeError, "supports float16, bfloat16 and float32"),
    "triton-D>256": (dict(backend="triton", q_shape=(1, 8, 2, 260), k_shape=(1, 8, 2, 260)), ValueError,
                     "head dims up to 256"),
    "k-length": (dict(k_shape=(1, 7, 2, 4)), ValueError, "k must have shape"),
    "v-heads": (dict(v_shape=(1, 8, 1, 4)), ValueError, "v must have shape"),
    "heads-not-multiple": (dict(k_shape=(1, 8, 3, 4), v_shape=(1, 8, 3, 4)), ValueError, "multiple of the key/value"),
    "q-3d": (dict(q_shape=(1, 8, 4)), ValueError, "q must have 4 dimensions"),
    "dtype-mismatch": (dict(k_dtype=torch.float16), TypeError, "share one dtype"),
    "int-tensor": (dict(q_dtype=torch.int64), TypeError, "q must have dtype"),
    "T0": (dict(q_shape=(1, 0, 2, 4), k_shape=(1, 0, 2, 4), v_shape=(1, 0, 2, 4)), ValueError, "T >= 1"),
}


@pytest.mark.parametrize("kw,exc,msg", list(BAD.values()), ids=list(BAD))
def test_bad_inputs(kw, exc, msg):
    kw = dict(kw)
    dtype = kw.pop("dtype", torch.float32)
    shapes = {n: kw.pop(f"{n}_shape", (1, 8, 2, 4)) for n in "qkv"}
    dtypes = {n: kw.pop(f"{n}_dtype", dtype) for n in "qkv"}
    t = {n: torch.zeros(shapes[n], dtype=dtypes[n]) for n in "qkv"}
    kw.setdefault("window", 3)
    with pytest.raises(exc, match=msg):
        sparse_attention(t["q"], t["k"], t["v"], **kw)


def test_flex_on_cpu_with_grad_is_rejected():
    q = torch.randn(1, 8, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        sparse_attention(q, q, q, 3, backend="flex")


def test_window_attention_bad_positions():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        window_attention(q, q, q, window=2, q_pos=torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="kg, vg and g_pos go together"):
        window_attention(q, q, q, window=2, kg=q[:, :1])
    with pytest.raises(ValueError, match="q_start must be an int >= 0"):
        window_attention(q, q, q, window=2, q_start=-1)


def test_bench_quick_case_runs():
    """The benchmark declaration runs on CPU: ours and the blocked path match the reference, the dense peer runs."""
    from pflow_dist.bench.attention import BENCH
    from pflow_dist.bench.registry import run_bench

    rows = run_bench(BENCH, device=torch.device("cpu"), dtype=torch.float32, quick=True,
                     case_filter=["B1-T256-H2-D16-W32-G2"], impl_filter=["ours", "torch-blocked", "sdpa-causal"],
                     warmup=0, rep=1)
    assert {(r.impl, r.mode) for r in rows} == {(i, m) for i in ("ours", "torch-blocked", "sdpa-causal")
                                                 for m in ("fwd", "fwd+bwd")}
    assert all(r.status == "ok" and r.median_ms > 0 for r in rows), [(r.impl, r.error) for r in rows]
    for r in rows:
        if r.impl != "sdpa-causal":
            assert r.extra["rel_err"] < 1e-5, r


@pytest.mark.parametrize(
    "T,on_cuda,triton_ok,flex_ok,expected",
    [
        (8192, True, True, True, "flex"),  # short: FlexAttention (ours 0.63x there on H200)
        (131072, True, True, True, "triton"),  # long: ours (1.16x, less memory)
        (131072, True, False, True, "flex"),  # a dtype / head dim the kernels do not take
        (8192, True, True, False, "triton"),  # window_attention (no whole-op Flex) or no Flex in this torch
        (131072, False, True, False, "torch"),  # CPU
    ],
)
def test_auto_backend(T, on_cuda, triton_ok, flex_ok, expected):
    assert auto_backend(T, on_cuda, triton_ok, flex_ok) == expected
    assert auto_backend(AUTO_TRITON_MIN_T - 1, True, True, True) == "flex"
    assert auto_backend(AUTO_TRITON_MIN_T, True, True, True) == "triton"
