"""The Triton sparse-attention kernels (forward, dQ and dK/dV passes; the interpreter on CPU, so tiny shapes) against
the float64 references: the whole op (window + global keys + global rows, MHA and GQA, D not a power of two, W > T,
W = 1) and the positioned block with an upstream gradient on the log-sum-exp (what the sequence-parallel merge uses)."""

from __future__ import annotations

import pytest
import torch
from test_sparse_attention import TOL, check_op_against_reference, check_window_attention_block  # sibling module

from pflow_dist.ops.sparse_attention import INF_WINDOW

pytestmark = pytest.mark.triton

# (B, T, H, Hkv, D, Dv, window, globals)
CASES = {
    "T37-D12-W7-G[0,9,30]": (1, 37, 2, 2, 12, 12, 7, [0, 9, 30]),
    "gqa2:1-T63-W20-G[5,31,62]": (1, 63, 2, 1, 8, 8, 20, [5, 31, 62]),
    "gqa2:1-T40-W16-Dv5-first2": (1, 40, 2, 1, 8, 5, 16, 2),
    "B2-T21-W5-none": (2, 21, 1, 1, 16, 16, 5, None),
    "W1-T18-G[17,4]": (1, 18, 2, 1, 6, 6, 1, [17, 4]),
    "W>T-T12-W40-G[3]": (1, 12, 2, 2, 4, 4, 40, [3]),
    # W ≥ 3 tiles of 16: the tiles that skip the mask (every row reads every key) run between masked edge tiles
    "T90-W50-unmasked-tiles-G[0,70]": (1, 90, 1, 1, 16, 16, 50, [0, 70]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_triton_op(case, dtype, device):
    check_op_against_reference(case, dtype, "triton", TOL[dtype], device=device)


BLOCK_CASES = {
    # (B, Tq, H, Hkv, D, Dv, q_start, Tk, k_start, window, g_pos, gathered)
    "halo-shard-offsets": (1, 19, 2, 1, 6, 5, 30, 27, 22, 9, [0, 3, 25, 40], False),
    "keys-after-some-queries": (1, 10, 2, 2, 4, 4, 3, 10, 8, 4, [1], False),
    "gathered-rows-inf-window": (1, 4, 2, 1, 5, 3, None, 20, 6, INF_WINDOW, [], True),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES.values()), ids=list(BLOCK_CASES))
def test_triton_window_attention_block(case, device):
    check_window_attention_block(case, "triton", torch.float32, 1e-5, device=device)


_COMPILE_FOR_SM90 = r'''
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pflow_dist.kernels.attention import window
from pflow_dist.kernels.attention.window_bwd import window_sparse_attn_bwd_dkdv_kernel as dkdv
from pflow_dist.kernels.attention.window_fwd import window_sparse_attn_bwd_dq_kernel as dq
from pflow_dist.kernels.attention.window_fwd import window_sparse_attn_fwd_kernel as fwd

def build(kern, elem, consts):
    ptrs = {"Q", "K", "V", "KG", "VG", "O", "DO", "DQ", "DK", "GPOS", "QPOS", "KPOS", "LSE", "LSE2", "DELTA"}
    if kern is dkdv:
        ptrs.add("DV")  # the dV pointer; in the forward kernels DV is the value head dim
    sig = {}
    for n in kern.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = "*i32" if n.endswith("POS") else "*fp32" if n in ("LSE", "LSE2", "DELTA") else elem
        else:
            sig[n] = "fp32" if n in ("qk_scale", "scale") else "i32"
    src = ASTSource(fn=kern, signature=sig, constexprs={(kern.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)

opts = {}

def config(kind, cand, d, prec, dt):
    bm, bn, opts["num_warps"], opts["num_stages"] = cand
    bd = max(16, triton.next_power_of_2(d))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bd, EVEN=bd == d, PREC=prec, DT=dt)

# bf16, D = 128 (the largest tiles): every autotuning candidate of the main variants, the first for the others
rows = [dict(GATHERED=False, HAS_GLOBAL=True), dict(GATHERED=True, HAS_GLOBAL=False)]
for kind, kern, variants in (("fwd", fwd, rows), ("dq", dq, rows),
                             ("dkdv", dkdv, [dict(GATHERED=False, FAR=False, ACCUMULATE=False),
                                             dict(GATHERED=False, FAR=True, ACCUMULATE=False),
                                             dict(GATHERED=True, FAR=False, ACCUMULATE=True)])):
    for n, cand in enumerate(window._CANDIDATES[kind]):
        for var in variants if n == 0 else variants[:1]:
            build(kern, "*bf16", dict(config(kind, cand, 128, None, tl.bfloat16), **var))
# fp32 with exact (ieee) products: one variant (its FMA-emulated dots take ~6 s each to compile)
build(fwd, "*fp32", dict(config("fwd", window._CANDIDATES["fwd"][0], 48, "ieee", tl.float32), GATHERED=False,
                         HAS_GLOBAL=True))
from pflow_dist.kernels.attention.window_bwd import window_sparse_attn_bwd_delta_kernel as delta
for has in (False, True):
    opts.update(num_warps=4, num_stages=1)
    src = ASTSource(fn=delta, signature=dict(O="*bf16", DO="*bf16", LSE="*fp32", DLSE="*fp32", DELTA="*fp32",
                                             LSE2="*fp32", n_rows="i32", Tq="i32", H="i32", DVD="i32",
                                             HAS_DLSE="constexpr", BLOCK_R="constexpr", BLOCK_DV="constexpr"),
                    constexprs={(10,): has, (11,): 64, (12,): 128})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
print("compiled")
'''


def test_kernels_compile_for_hopper(tmp_path):
    """The kernels as the launcher configures them on a GPU compile to sm_90 cubins (no GPU needed: Triton's own
    ptxas). The interpreter tests cannot catch what only the compiler rejects (types, layouts, shared memory)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", _COMPILE_FOR_SM90], env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


class _FullSizeAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the tensors of at least ``numel`` elements that ops create (views excluded)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count, self.ops = numel, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func._schema.is_mutable):  # new storage only (not views, not in-place ops)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                    self.count += 1
                    self.ops.append(str(func))
        return out


def test_triton_op_allocates_like_one_attention_call(device):
    # o, dq, dk, dv and nothing else of the inputs' size: the global rows are written in place and their gradients
    # accumulate in place (the composed-autograd version allocated about twice as many: index_copy's output and its
    # gradient, the gathers' full-size gradients, a second dK/dV)
    B, T, H, D, W = 1, 64, 2, 16, 16
    q, k, v = (torch.randn(B, T, H, D, device=device, requires_grad=True) for _ in range(3))
    do = torch.randn(B, T, H, D, device=device)
    from pflow_dist.ops.sparse_attention import sparse_attention

    with _FullSizeAllocations(q.numel()) as mode:
        out = sparse_attention(q, k, v, W, global_idx=[0, 20, 50], backend="triton")
        torch.autograd.grad(out, (q, k, v), do)
    assert mode.count == 4, mode.ops
