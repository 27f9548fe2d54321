"""pflow_dist.ops.scan against the float64 references of kernels/scan/naive.py: outputs, final states and every
gradient (a, b, h_0) with random upstream gradients, for both backends (Triton through the interpreter on CPU), diagonal
and dense, odd sizes (T=63, N not a power of two, T=1, T not a multiple of the tile), long T on the torch path, both
Triton algorithms (look-back and three-pass) with multi-tile sequences, and named errors."""

from __future__ import annotations

import pytest
import torch

from pflow_dist.kernels.scan.diag import to_channel_major
from pflow_dist.kernels.scan.naive import naive_scan
from pflow_dist.ops.scan import scan, scan_adjoint, scan_forward
from pflow_dist.testing import assert_close, kernel_device

F64 = torch.float64
DEV = kernel_device()  # CUDA natively, else CPU through the Triton interpreter
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-12}


def make(B, T, N, diagonal, dtype, seed=0, with_h0=True):
    gen = torch.Generator().manual_seed(seed)
    if diagonal:  # gates in (0.5, 1): long memory, as in SSMs
        a = 0.5 + 0.5 * torch.rand(B, T, N, generator=gen)
    else:  # spectral radius ≈ 0.9
        a = torch.randn(B, T, N, N, generator=gen) * (0.9 / N**0.5)
    b = torch.randn(B, T, N, generator=gen)
    h0 = torch.randn(B, N, generator=gen, dtype=F64 if dtype == F64 else torch.float32) if with_h0 else None
    return a.to(DEV, dtype), b.to(DEV, dtype), h0.to(DEV) if h0 is not None else None


def reference(a, b, h0, gh, gT):
    """float64 outputs and gradients by autograd through the sequential reference."""
    leaves = [x.detach().to(F64).requires_grad_() if x is not None else None for x in (a, b, h0)]
    h, hT = naive_scan(leaves[0], leaves[1], leaves[2], output_final_state=True)
    loss = (h * gh.to(F64)).sum() + (hT * gT.to(F64)).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return h.detach(), hT.detach(), grads


def check_scan(a, b, h0, backend, tol):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (a, b, h0)]
    h, hT = scan(leaves[0], leaves[1], leaves[2], output_final_state=True, backend=backend)
    assert h.dtype == b.dtype and hT.dtype in (torch.float32, F64)
    gh, gT = torch.randn_like(h, dtype=torch.float32), torch.randn_like(hT)
    loss = (h.float() * gh).sum() + (hT * gT).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    rh, rT, rgrads = reference(a, b, h0, gh, gT)
    assert_close("h", rh, h, tol)
    assert_close("h_T", rT, hT, tol)
    for name, r, g in zip(("da", "db", "dh0"), rgrads, grads):
        assert g.dtype == (b.dtype if name != "dh0" else h0.dtype)
        assert_close(name, r, g, tol)


SHAPES = [(2, 63, 5), (1, 1, 3), (3, 17, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-N{}".format(*s))
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scan_fp32(backend, diagonal, shape):
    a, b, h0 = make(*shape, diagonal, torch.float32, with_h0=shape[1] != 17)
    check_scan(a, b, h0, backend, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
def test_scan_half_triton(diagonal, dtype):
    a, b, h0 = make(2, 45, 6, diagonal, dtype)
    check_scan(a, b, h0, "triton", TOL[dtype])


def test_scan_float64_torch_exact():
    a, b, h0 = make(2, 200, 4, True, F64)
    check_scan(a, b, h0, "torch", 1e-12)
    a, b, h0 = make(2, 100, 3, False, F64)
    check_scan(a, b, h0, "torch", 1e-12)


def test_scan_long_T_torch():
    """T = 2^17 + 3: four levels of the chunked torch scan, compared with the sequential float64 loop."""
    a, b, h0 = make(1, 2**17 + 3, 2, True, torch.float32)
    h, hT = scan(a, b, h0, output_final_state=True, backend="torch")
    rh, rT = naive_scan(a.to(F64), b.to(F64), h0.to(F64), output_final_state=True)
    assert_close("h", rh, h, 1e-5)
    assert_close("h_T", rT, hT, 1e-5)


@pytest.mark.parametrize("algorithm,publish,segment", [("lookback", True, 1), ("lookback", False, 1),
                                                       ("lookback", True, 3), ("lookback", False, 2),
                                                       ("chunk", True, 1), ("loop", True, 1)],
                         ids=["lookback", "lookback-deep", "segment3", "segment2-deep", "chunk", "loop"])
@pytest.mark.parametrize("T", [61, 150])
def test_diag_triton_multi_tile(algorithm, publish, segment, T):
    """Many tiles per sequence (8-step tiles, 4-channel groups): the look-back across windows of 4 tiles (with
    ``publish=False`` every tile folds all its predecessors), the three-pass recursion (3 levels at T=150), the fused
    adjoint + da; ``segment`` > 1: each look-back program streams 2-3 tiles (the last segment part past T)."""
    a, b, h0 = make(1, T, 6, True, torch.float32, seed=T)
    kw = dict(algorithm=algorithm, block_t=8, block_n=4, window=4, publish_inclusive=publish, segment=segment)
    if algorithm in ("chunk", "loop"):
        kw.pop("window"), kw.pop("publish_inclusive"), kw.pop("segment")
    h, hT = scan_forward(a, b, h0, "triton", **kw)
    g, gT = torch.randn_like(b), torch.randn_like(h0)
    lam, lam0, da = scan_adjoint(a, g, gT, "triton", h=h, h0=h0, want_da=True, **kw)
    rh, rT, (rda, rdb, _) = reference(a, b, h0, g, gT)
    assert_close("h", rh, h, 2e-5)
    assert_close("h_T", rT, hT, 2e-5)
    assert_close("lambda", rdb, lam, 2e-5)
    assert_close("lambda_0", rdb[:, 0], lam0, 2e-5)
    assert_close("da", rda, da, 2e-5)


@pytest.mark.parametrize("T", [5, 61, 150])
def test_scan_map_is_the_sequence_map(T):
    """``scan_map``: ``h_T = M ⊙ h_0 + D`` for every ``h_0``, from the tile maps (Triton: 8-step tiles, so 1, 8 and 19
    tiles, the last one partial) and on the torch backend, against the float64 scan; the same for the adjoint."""
    from pflow_dist.ops.scan import scan_map

    a, b, h0 = make(2, T, 6, True, torch.float32, seed=T)
    rh, rT, _ = reference(a, b, h0, torch.zeros_like(b), torch.zeros_like(h0))
    from pflow_dist.kernels.scan.diag import diag_scan_map

    for M, D in (diag_scan_map(a, b, block_t=8, block_n=4), scan_map(a, b, "torch"),
                 diag_scan_map(to_channel_major(a), to_channel_major(b), block_t=8, block_n=2)):
        assert M.shape == D.shape == h0.shape and M.dtype == torch.float32
        assert_close("h_T from the map", rT, M * h0 + D, 2e-5)
        assert_close("M", a.double().prod(dim=1), M, 2e-5)
    # reverse: the adjoint's map, λ_1 = M ⊙ ∂L/∂h_T + D with M = Π_{t≥2} a_t, against the float64 adjoint
    g = torch.randn_like(b)
    _, _, (_, lam, _) = reference(a, b, h0, g, h0)
    for M, D in (diag_scan_map(a, g, reverse=True, block_t=8, block_n=4), scan_map(a, g, "torch", reverse=True),
                 diag_scan_map(to_channel_major(a), to_channel_major(g), reverse=True, block_t=8, block_n=2)):
        assert_close("lambda_1 from the map", lam[:, 0], M * h0 + D, 2e-5)
        assert_close("M", a[:, 1:].double().prod(dim=1), M, 2e-5)
    with pytest.raises(ValueError, match="diagonal"):
        scan_map(torch.zeros(1, 3, 2, 2), b[:1, :3, :2], "torch")


@pytest.mark.parametrize("B,N,expect", [(16, 256, dict(algorithm="loop", block_n=16)),
                                         (1, 64, dict(algorithm="lookback", segment=8, block_t=64, num_stages=1)),
                                         (2, 32, dict(algorithm="lookback", segment=8, block_t=64, num_stages=1)),
                                         (1, 256, dict(algorithm="lookback")), (1, 16, dict(algorithm="lookback"))])
def test_diag_auto_algorithm(B, N, expect):
    """``algorithm="auto"``: the loop with ≥ 256 sequences × 16-channel groups, the segmented look-back with one or
    two 32-channel groups (more than 16 channels), else the plain look-back (the H200 sweep's regimes)."""
    from pflow_dist.kernels.scan.diag import auto_algorithm

    assert auto_algorithm(B, N) == expect


def test_diag_auto_algorithm_channel_major():
    """Channel-major memory: the loop from CM_LOOP_MIN_SEQS sequences × channel groups, else the look-back."""
    from pflow_dist.kernels.scan.diag import CM_LOOP_MIN_SEQS, CM_LOOP_TILE, auto_algorithm

    n = CM_LOOP_MIN_SEQS * CM_LOOP_TILE[1]
    assert auto_algorithm(1, n, channel_major=True) == dict(algorithm="loop")
    assert auto_algorithm(1, n - CM_LOOP_TILE[1], channel_major=True) == dict(algorithm="lookback")


@pytest.mark.parametrize("kw", [dict(algorithm="lookback", window=4), dict(algorithm="lookback", window=4,
                                                                            publish_inclusive=False),
                                dict(algorithm="lookback", segment=3), dict(algorithm="loop"),
                                dict(algorithm="chunk"), dict(block_n=None, block_t=None)],
                         ids=["lookback", "lookback-deep", "segment3", "loop", "chunk", "auto"])
def test_diag_triton_channel_major(kw):
    """Channel-major inputs (``[B, N, T]`` memory, accelerated-scan's layout) run without a copy: forward, adjoint
    and da on 8-step tiles of 2 channels (the reverse tiles load ascending time and scan it backwards), T = 61 (the
    last tile partial), the upstream gradient given contiguous (brought to the layout); h, λ and da come back
    channel-major and equal the float64 reference. ``auto``: default channel-major tiles."""
    from pflow_dist.kernels.scan.diag import is_channel_major

    a, b, h0 = make(2, 61, 5, True, torch.float32, seed=5)
    kw = dict(dict(block_t=8, block_n=2), **kw)
    a, b = to_channel_major(a), to_channel_major(b)
    h, hT = scan_forward(a, b, h0, "triton", **kw)
    g, gT = torch.randn(a.shape, device=DEV), torch.randn_like(h0)
    lam, lam0, da = scan_adjoint(a, g, gT, "triton", h=h, h0=h0, want_da=True, **kw)
    assert all(is_channel_major(x) for x in (h, lam, da))
    rh, rT, (rda, rdb, _) = reference(a, b, h0, g, gT)
    for name, want, got in (("h", rh, h), ("h_T", rT, hT), ("lambda", rdb, lam), ("lambda_0", rdb[:, 0], lam0),
                            ("da", rda, da)):
        assert_close(name, want, got, 2e-5)


@pytest.mark.skipif(DEV.type != "cuda", reason="CUDA grid limits (the interpreter has none; 76,800 programs)")
def test_diag_triton_channel_major_many_sequences():
    """Channel-major memory has one sequence per channel: B · N = 76,800 of them here, more than a CUDA grid's second
    axis holds (65,535). The three-pass scan (forward, adjoint with da) and ``scan_map`` launch on one axis."""
    from pflow_dist.kernels.scan.diag import diag_scan_map

    a, b, h0 = make(300, 40, 256, True, torch.float32, seed=7)
    a, b = to_channel_major(a), to_channel_major(b)
    kw = dict(algorithm="chunk", block_t=16, block_n=1)
    h, hT = scan_forward(a, b, h0, "triton", **kw)
    g, gT = torch.randn(a.shape, device=DEV), torch.randn_like(h0)
    lam, _, da = scan_adjoint(a, g, gT, "triton", h=h, h0=h0, want_da=True, **kw)
    M, D = diag_scan_map(a, b, block_t=16, block_n=1)
    rh, rT, (rda, rdb, _) = reference(a, b, h0, g, gT)
    rM = a.double().prod(dim=1)
    for name, want, got in (("h", rh, h), ("h_T", rT, hT), ("lambda", rdb, lam), ("da", rda, da), ("M", rM, M),
                            ("D", rT - rM * h0.double(), D)):
        assert_close(name, want, got, 2e-5)


def test_scan_channel_major_autograd():
    """``scan`` on channel-major leaves (Triton): values and every gradient, the gradients in the leaves' layout."""
    from pflow_dist.kernels.scan.diag import is_channel_major

    a, b, h0 = make(2, 40, 6, True, torch.float32, seed=2)
    check_scan(to_channel_major(a), to_channel_major(b), h0, "triton", TOL[torch.float32])
    a, b = (to_channel_major(x).requires_grad_() for x in (a, b))
    da, db = torch.autograd.grad(scan(a, b, backend="triton")[0].sum(), (a, b))
    assert is_channel_major(da) and is_channel_major(db)


def test_to_channel_major_keeps_values_and_copies_once():
    from pflow_dist.kernels.scan.diag import is_channel_major

    x = torch.randn(2, 7, 3)
    y = to_channel_major(x)
    assert is_channel_major(y) and not is_channel_major(x) and torch.equal(x, y)
    assert to_channel_major(y) is y  # already channel-major: no copy
    assert not is_channel_major(torch.randn(4, 5).t())  # a transposed matrix is not a [B, T, N] layout
    with pytest.raises(ValueError, match=r"\[B, T, N\] tensor, got shape \[4, 5\]"):
        to_channel_major(torch.randn(4, 5))


def test_diag_triton_layout_errors():
    """Tensors of two layouts, or strided in neither, are refused by name instead of scanned wrongly."""
    from pflow_dist.kernels.scan.diag import diag_scan_triton

    a, b, _ = make(1, 12, 4, True, torch.float32)
    with pytest.raises(ValueError, match="one memory layout"):
        diag_scan_triton(to_channel_major(a), b, None)
    with pytest.raises(ValueError, match="transposed contiguous"):
        diag_scan_triton(a[:, ::2], b[:, ::2], None)


def test_diag_triton_auto_segmented():
    """``auto`` on one sequence of 40 channels runs the segmented look-back (8 tiles of 64 steps per program: two
    segments at T = 600, the second one partial), forward and adjoint with da."""
    a, b, h0 = make(1, 600, 40, True, torch.float32, seed=3)
    h, hT = scan_forward(a, b, h0, "triton", algorithm="auto")
    g, gT = torch.randn_like(b), torch.randn_like(h0)
    lam, lam0, da = scan_adjoint(a, g, gT, "triton", h=h, h0=h0, want_da=True, algorithm="auto")
    rh, rT, (rda, rdb, _) = reference(a, b, h0, g, gT)
    for name, want, got in (("h", rh, h), ("h_T", rT, hT), ("lambda", rdb, lam), ("da", rda, da)):
        assert_close(name, want, got, 2e-5)


@pytest.mark.parametrize("n", [5, 20])
def test_dense_triton_multi_chunk_and_structured(n):
    """Dense kernel with 4-step chunks (three recursion levels at T=40) and the structured transition
    A_t = diag(c0) + Σ_k diag(c_k) M_k used by DEER, forward and adjoint."""
    gen = torch.Generator().manual_seed(n)
    B, T, K = 1, 40, 3
    coef = torch.randn(B, T, K + 1, n, generator=gen) * 0.5
    mats = torch.randn(K, n, n, generator=gen) * (0.5 / n**0.5)
    b, h0, g, gT = (torch.randn(B, T, n, generator=gen), torch.randn(B, n, generator=gen),
                    torch.randn(B, T, n, generator=gen), torch.randn(B, n, generator=gen))
    coef, mats, b, h0, g, gT = (x.to(DEV) for x in (coef, mats, b, h0, g, gT))
    A = torch.diag_embed(coef[:, :, 0]) + sum(coef[:, :, k + 1, :, None] * mats[k] for k in range(K))
    for struct in (False, True):
        kw = dict(coef=coef, mats=mats) if struct else {}
        a_in = None if struct else A
        h, hT = scan_forward(a_in, b, h0, "triton", chunk=4, **kw)
        lam, lam0, da = scan_adjoint(a_in, g, gT, "triton", h=h, h0=h0, want_da=not struct, chunk=4, **kw)
        rh, rT, (rda, rdb, _) = reference(A, b, h0, g, gT)
        assert_close("h", rh, h, 2e-5)
        assert_close("h_T", rT, hT, 2e-5)
        assert_close("lambda", rdb, lam, 2e-5)
        assert_close("lambda_0", rdb[:, 0], lam0, 2e-5)
        if not struct:
            assert_close("da", rda, da, 2e-5)


def test_scan_returns_none_without_final_state():
    a, b, _ = make(1, 5, 2, True, torch.float32)
    h, hT = scan(a, b)
    assert hT is None and h.shape == b.shape


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("b_2d", ValueError, r"b must have 3 dimensions \[B, T, N\], got shape \(2, 5\)"),
        ("a_wrong_T", ValueError, r"a must have shape \[2, 5, 3\]"),
        ("dense_wrong", ValueError, r"a must have shape \[2, 5, 3, 3\]"),
        ("T0", ValueError, r"T >= 1"),
        ("h0_shape", ValueError, r"initial_state must have shape \[2, 3\]"),
        ("int_b", TypeError, r"b must have dtype in .* got int64"),
        ("mixed_dtype", TypeError, r"a and b must have the same dtype, got a float64 and b float32"),
        ("backend", ValueError, r"backend must be one of .* got 'cuda'"),
        ("triton_f64", ValueError, r"backend='triton' cannot run dtype float64"),
        ("not_tensor", TypeError, r"a must be a torch.Tensor, got list"),
    ],
)
def test_scan_errors(case, exc, match):
    a, b, h0 = torch.rand(2, 5, 3, device=DEV), torch.randn(2, 5, 3, device=DEV), torch.randn(2, 3, device=DEV)
    kw = {}
    if case == "b_2d":
        b = b[:, :, 0]
    elif case == "a_wrong_T":
        a = a[:, :4]
    elif case == "dense_wrong":
        a = torch.rand(2, 5, 3, 4, device=DEV)
    elif case == "T0":
        a, b = a[:, :0], b[:, :0]
    elif case == "h0_shape":
        h0 = h0[:, :2]
    elif case == "int_b":
        b = b.long()
    elif case == "mixed_dtype":
        a = a.double()
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "triton_f64":
        a, b, kw["backend"] = a.double(), b.double(), "triton"
    elif case == "not_tensor":
        a = a.tolist()
    with pytest.raises(exc, match=match):
        scan(a, b, h0, **kw)
