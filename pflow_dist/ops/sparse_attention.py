# Causal sliding-window + global-token sparse attention (DESIGN.md §8): Longformer (Beltagy et al. 2020, arXiv
# 2004.05150) / BigBird (Zaheer et al. 2020, arXiv 2007.14062) pattern, causal; the kernels are FlashAttention-2
# (Dao 2023, arXiv 2307.08691) restricted to the window. Semantics (kernels/attention/naive.py): query t reads key s iff
#     s ≤ t  and  (t − s < W  or  s ∈ G  or  t ∈ G).
#
# The op is built from one block, `window_attention` (queries at given positions over a contiguous key range with a
# window, plus global keys read only outside the window, returning o and the log-sum-exp), called twice:
#   1. every row: window keys + the global keys (pairs with t − j ≥ W), O(T·(W + G));
#   2. the G global rows: full causal rows (queries gathered by position, W = ∞), O(G·T);
# and the global rows of (1) are replaced by (2). On the plain-torch path the two calls are independent differentiable
# functions composed by index_copy (its backward sends a zero gradient to the overwritten rows of (1)). On the Triton
# path one autograd function does the same in place (_TritonSparseAttention: (2) written over (1) in one buffer; in
# the backward the rows of (1) are dropped through their log-sum-exp and the key gradients of both calls and of the
# global keys accumulate into one dK/dV), so no full-size copy or gather gradient is ever allocated. The same block,
# with a key halo and partial global rows merged by log-sum-exp, is the sequence-parallel op
# (pflow_dist/dist/sp_attention.py): lse is a differentiable output for that merge.
"""Public sparse-attention op ``sparse_attention`` and its building block ``window_attention``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels.attention.blocked import blocked_window_attention
from ..kernels.attention.shapes import (
    INF_WINDOW,
    check_attention_inputs,
    check_scale,
    check_window,
    normalize_global_idx,
)
from ..kernels.common.checks import check_tensor

__all__ = ["AUTO_TRITON_MIN_T", "BACKENDS", "INF_WINDOW", "MAX_TRITON_DIM", "auto_backend", "sparse_attention",
           "window_attention"]

BACKENDS = ("auto", "triton", "flex", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_DIM = 256  # head dims of the Triton kernels (a [64, D] fp32 accumulator per program)
# Whole-op calls on CUDA: our Triton kernels from this length on, FlexAttention below. H200, bf16, H16 D128 g4
# (benchmarks/results/attention_h200.jsonl, one autograd function): fwd+bwd 1.16x Flex at T = 131k w = 2048, 1.61x at
# w = 512, 1.19x at T = 1M with 32.2 vs 37.2 GiB peak; 0.63x at T = 8k (likely per-call overhead). T from 8k to 131k
# is not measured, so the switch sits at the shortest measured win.
AUTO_TRITON_MIN_T = 131072


def _interpreting() -> bool:
    from ..testing.triton_mode import interpreting  # noqa: PLC0415

    return interpreting()


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def auto_backend(T: int, on_cuda: bool, triton_ok: bool, flex_ok: bool) -> str:
    """What ``backend="auto"`` runs for a sequence of ``T`` queries: Triton on CUDA from ``AUTO_TRITON_MIN_T`` on
    (or whenever FlexAttention is not an option), FlexAttention on CUDA below it, plain torch off CUDA or for
    dtypes/head dims the kernels do not take."""
    if flex_ok and (T < AUTO_TRITON_MIN_T or not triton_ok):
        return "flex"
    return "triton" if on_cuda and triton_ok else "torch"


def _resolve_backend(backend: object, q: torch.Tensor, v: torch.Tensor, allow_flex: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dims_ok = q.shape[-1] <= MAX_TRITON_DIM and v.shape[-1] <= MAX_TRITON_DIM
    if backend == "auto":
        # the block-level op (window_attention, used by the sequence-parallel path, which needs the log-sum-exp)
        # always takes Triton on CUDA; the whole op takes FlexAttention below AUTO_TRITON_MIN_T
        return auto_backend(q.shape[1], q.is_cuda, q.dtype in _TRITON_DTYPES and dims_ok,
                            allow_flex and q.is_cuda and _flex_available())
    if backend == "triton":
        if not dims_ok:
            raise ValueError(f"backend='triton' supports head dims up to {MAX_TRITON_DIM}, got D={q.shape[-1]}, "
                             f"Dv={v.shape[-1]} (use backend='torch')")
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {q.dtype} "
                            "(use backend='torch' for float64)")
        if not q.is_cuda and not _interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {q.device}")
    if backend == "flex" and not allow_flex:
        raise ValueError("backend='flex' computes the whole op only (sparse_attention); window_attention supports "
                         "'auto', 'triton' and 'torch'")
    return backend


class _TritonWindowAttention(torch.autograd.Function):
    """Triton forward (o, lse) and FlashAttention-2 style backward that also accepts ∂L/∂lse."""

    @staticmethod
    def forward(ctx, q, k, v, kg, vg, q_start, q_pos, k_start, window, g_pos, scale):
        from ..kernels.attention.window import window_attn_fwd  # noqa: PLC0415 - triton import on first use

        kw = dict(q_start=q_start, q_pos=q_pos, k_start=k_start, window=window, kg=kg, vg=vg, g_pos=g_pos,
                  scale=scale)
        o, lse = window_attn_fwd(q, k, v, **kw)
        ctx.kw = kw
        ctx.has_g = kg is not None
        ctx.save_for_backward(q, k, v, kg, vg, o, lse)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        from ..kernels.attention.window import window_attn_bwd  # noqa: PLC0415

        q, k, v, kg, vg, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        kw = dict(ctx.kw, kg=kg, vg=vg)
        dq, dk, dv, dkg, dvg = window_attn_bwd(q, k, v, o, lse, do, dlse, **kw)
        return dq, dk, dv, dkg, dvg, None, None, None, None, None, None


class _TritonSparseAttention(torch.autograd.Function):
    """The whole op on the Triton kernels, written into one output buffer: the window call, then the global rows
    written over it in place; the backward drops those rows from the window call (lse₂ = +∞), adds the global keys'
    and the global rows' key gradients into dK/dV in place, and scatters the global rows' dQ. Peak memory is the
    inputs, O and the three gradients, as for a single attention call (no full-size copies from the gathers)."""

    @staticmethod
    def forward(ctx, q, k, v, g, window, scale):
        from ..kernels.attention.window import window_attn_fwd  # noqa: PLC0415 - triton import on first use

        has_g = g.numel() > 0
        o, lse = window_attn_fwd(q, k, v, window=window, kg=k[:, g] if has_g else None,
                                 vg=v[:, g] if has_g else None, g_pos=g if has_g else None, scale=scale)
        lse_g = None
        if has_g:
            og, lse_g = window_attn_fwd(q[:, g], k, v, q_pos=g, window=INF_WINDOW, scale=scale)
            o.index_copy_(1, g, og)
        ctx.save_for_backward(q, k, v, o, lse, g, lse_g)
        ctx.window, ctx.scale, ctx.has_g = window, scale, has_g
        return o

    @staticmethod
    def backward(ctx, do):
        from ..kernels.attention.window import window_attn_bwd  # noqa: PLC0415

        q, k, v, o, lse, g, lse_g = ctx.saved_tensors
        do = do.contiguous()
        if not ctx.has_g:
            dq, dk, dv, _, _ = window_attn_bwd(q, k, v, o, lse, do, None, window=ctx.window, scale=ctx.scale)
            return dq, dk, dv, None, None, None
        dq, dk, dv, dkg, dvg = window_attn_bwd(q, k, v, o, lse, do, None, window=ctx.window, kg=k[:, g],
                                               vg=v[:, g], g_pos=g, scale=ctx.scale, drop_rows=g)
        dk.index_add_(1, g, dkg)
        dv.index_add_(1, g, dvg)
        dq_g, _, _, _, _ = window_attn_bwd(q[:, g], k, v, o[:, g], lse_g, do[:, g], None, q_pos=g,
                                           window=INF_WINDOW, scale=ctx.scale, dkdv_into=(dk, dv))
        dq.index_copy_(1, g, dq_g)  # the window call left these rows at zero (dropped)
        return dq, dk, dv, None, None, None


def _check_positions(name: str, pos: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    check_tensor(name, pos, shape=(n,), dtypes=(torch.int32, torch.int64), dims=f"[{n}] positions")
    if n > 1 and bool((pos[1:] <= pos[:-1]).any()):
        raise ValueError(f"{name} must be strictly increasing")
    if n and int(pos.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got min {int(pos.min())}")
    return pos.to(device)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    q_start: int = 0,
    q_pos: torch.Tensor | None = None,
    k_start: int = 0,
    kg: torch.Tensor | None = None,
    vg: torch.Tensor | None = None,
    g_pos: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The building block of sparse attention: positioned queries over a key range with a window, plus global keys.

    Query ``i`` sits at position ``t = q_start + i`` (or ``q_pos[i]``), key ``j`` at ``s = k_start + j``; the query
    reads key ``j`` iff ``0 ≤ t − s < window`` and global key ``m`` (position ``g_pos[m]``) iff ``t − g_pos[m] ≥
    window`` (outside the window, so a key in both sets counts once). This is what a rank computes under sequence
    parallelism (keys = halo + shard) and what :func:`sparse_attention` calls twice.

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` (``H % Hkv == 0``).
        window: ``W ≥ 1`` (``INF_WINDOW`` for full causal rows).
        q_start, q_pos: the queries' positions: contiguous from ``q_start``, or a strictly increasing int tensor.
        k_start: position of ``k[:, 0]``.
        kg, vg: global keys ``[B, G, Hkv, D]`` and values ``[B, G, Hkv, Dv]``, or ``None``.
        g_pos: their strictly increasing positions ``[G]``.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16/fp32, else torch), ``"triton"``, ``"torch"``.

    Returns:
        ``(o [B, Tq, H, Dv], lse [B, Tq, H])``: o in q's dtype, lse (natural log) in float32 (float64 for float64
        inputs); both differentiable. A row with no readable key has ``o = 0``, ``lse = −inf``.

    Example::

        >>> q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
        >>> o, lse = window_attention(q, k, v, window=3, q_start=2, k_start=0, backend="torch")
        >>> o.shape, lse.shape
        (torch.Size([1, 4, 2, 8]), torch.Size([1, 4, 2]))
    """
    d = check_attention_inputs(q, k, v, same_length=False)
    window = check_window(window)
    scale = check_scale(scale, d.D)
    for name, x in (("q_start", q_start), ("k_start", k_start)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    if q_pos is not None:
        q_pos = _check_positions("q_pos", q_pos, d.T, q.device)
    if (kg is None) != (vg is None) or (kg is None) != (g_pos is None):
        raise ValueError("kg, vg and g_pos go together: pass all three or none")
    if kg is not None:
        G = kg.shape[1] if kg.dim() == 4 else -1
        check_tensor("kg", kg, shape=(d.B, None, d.Hkv, d.D), dims="[B, G, Hkv, D]")
        check_tensor("vg", vg, shape=(d.B, G, d.Hkv, d.Dv), dims="[B, G, Hkv, Dv]")
        if kg.dtype != q.dtype or vg.dtype != q.dtype:
            raise TypeError(f"kg and vg must have q's dtype {q.dtype}, got {kg.dtype}, {vg.dtype}")
        g_pos = _check_positions("g_pos", g_pos, G, q.device)
    be = _resolve_backend(backend, q, v, allow_flex=False)
    return _window_attention(q, k, v, window, q_start, q_pos, k_start, kg, vg, g_pos, scale, be)


def _window_attention(q, k, v, window, q_start, q_pos, k_start, kg, vg, g_pos, scale, be):
    """:func:`window_attention` on validated arguments (no host syncs: the position checks are the caller's)."""
    window = min(window, INF_WINDOW)
    if be == "triton":
        return _TritonWindowAttention.apply(q, k, v, kg, vg, q_start, q_pos, k_start, window, g_pos, scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    o, lse = blocked_window_attention(q, k, v, q_start=q_start, q_pos=q_pos, k_start=k_start, window=window, kg=kg,
                                      vg=vg, g_pos=g_pos, scale=scale, acc_dtype=acc)
    return o.to(q.dtype), lse


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    global_idx: torch.Tensor | Sequence[int] | None = None,
    *,
    n_global: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal sliding-window + global-token attention, O(T·(W + G)) time and memory, differentiable.

    Query ``t`` reads key ``s`` iff ``s ≤ t`` and (``t − s < window`` or ``s`` is global or ``t`` is global): a global
    token is read by every later query and itself reads its whole causal prefix (Longformer's symmetric global
    attention, made causal: nothing reads the future). ``window > T`` is allowed (full causal attention).

    Args:
        q: queries ``[B, T, H, D]`` (fp16, bf16, fp32; fp64 with the torch backend).
        k: keys ``[B, T, Hkv, D]``, ``H % Hkv == 0`` (grouped-query attention when ``Hkv < H``).
        v: values ``[B, T, Hkv, Dv]``.
        window: ``W ≥ 1``: query t reads keys ``t − W + 1 .. t`` (W = 1: only itself).
        global_idx: positions of the global tokens (1-D ints in ``[0, T)``, any order, no duplicates), or ``None``.
        n_global: the first ``n_global`` positions as global tokens (attention sinks); not with ``global_idx``.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` (on CUDA: Triton from T = ``AUTO_TRITON_MIN_T`` on, where it measured faster and
            leaner than FlexAttention on an H200, FlexAttention below; torch elsewhere: :func:`auto_backend`),
            ``"triton"`` (CUDA, or CPU with
            TRITON_INTERPRET=1),
            ``"flex"`` (torch FlexAttention with the same block mask: compiled on CUDA; no backward on CPU),
            ``"torch"`` (blocked plain torch, fp32 accumulation, any device, autograd).

    Returns:
        ``o [B, T, H, Dv]`` in q's dtype.

    Raises:
        ValueError / TypeError: bad shapes or dtypes, ``window < 1``, global indices out of range or duplicated,
            both ``global_idx`` and ``n_global``, an unknown backend, ``"flex"`` on CPU with gradients.

    Example::

        >>> q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
        >>> sparse_attention(q, k, v, window=3, global_idx=[0, 5], backend="torch").shape
        torch.Size([2, 10, 4, 8])
    """
    d = check_attention_inputs(q, k, v)
    window = check_window(window)
    scale = check_scale(scale, d.D)
    g = normalize_global_idx(global_idx, n_global, d.T, q.device)
    be = _resolve_backend(backend, q, v, allow_flex=True)
    if be == "flex":
        if not q.is_cuda and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise ValueError("backend='flex' has no backward on CPU (torch FlexAttention raises NotImplementedError);"
                             " use backend='torch' or 'triton' to train on CPU")
        from ..kernels.attention.flex import flex_sparse_attention  # noqa: PLC0415

        return flex_sparse_attention(q, k, v, window, g, scale)
    if be == "triton":
        return _TritonSparseAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), g,
                                            min(window, INF_WINDOW), scale)
    has_g = g.numel() > 0
    # g is sorted, unique and in range (normalize_global_idx), the shapes checked: no re-validation (GPU syncs)
    o, _ = _window_attention(q, k, v, window, 0, None, 0, k[:, g] if has_g else None, v[:, g] if has_g else None,
                             g if has_g else None, scale, be)
    if has_g:
        og, _ = _window_attention(q[:, g], k, v, INF_WINDOW, 0, g, 0, None, None, None, scale, be)
        o = o.index_copy(1, g, og)
    return o
