"""``pflow-dist bench flow``: one flow layer (rank-1 delta rule, gated or not; rank-R), ours vs fla and plain torch.

Implementations, all on the same inputs (L2-normalised keys, β ∈ (0, 1) (β ∈ (0, 1/R) for rank R), log-decay
g = logsigmoid(·) when gated):
- ``ours``: ``pflow_dist.ops.flow.chunk_flow`` (the Triton op; rank-R cases use the product form, DeltaProduct)
  called as the models call it, ``check_finite=False`` (fla has no such check);
- ``ours-checked``: the same with the default ``check_finite=True``, whose NaN/Inf count of beta (and g) is read back
  to the host: one device sync per call, which stalls the launch queue;
- ``ours-sum``: the same op in the rank-R sum form (ParallelFlow), beside the product rows (rank-R cases only; for
  R = 1 the two forms are one op and the row says so);
- ``ours-sp``: the per-rank work of ``sp_flow``'s Triton path (the combine inside the grouped state passes) over a
  one-rank process group: what each GPU computes under sequence parallelism, without the communication (``ours`` /
  ``ours-sp`` bounds the weak-scaling efficiency from above; one GPU suffices to measure it);
- ``fla``: ``fla.ops.delta_rule.chunk_delta_rule`` / ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` /
  ``fla.ops.gated_delta_product.chunk_gated_delta_product`` (non-gated, interleaved [B, T·R, H, ·] layout) when
  fla-core is installed and on CUDA;
- ``torch-chunked``: the chunked WY reference of ``kernels/flow/naive.py`` accumulating in float32 (CPU only: on a
  GPU its Python loop over chunks only wastes device time);
- ``torch-sigdelta``: the same in float32 with ParallelFlow's signature-inspired grid recursion (sigDelta) in place of
  the triangular solve, the paper's second algorithm measured against the first on the same code path (CPU only).
``extra.rel_err`` is each output's relative RMS error against the float64 reference on the same inputs (the product
form for rank-R cases: on ``ours-sum`` rows it measures how far the sum form is from the product form, not an error;
``python -m pflow_dist.bench.flow check`` measures the sum form's error against its own reference).

``python -m pflow_dist.bench.flow longest`` searches the longest T that fits for fwd+bwd at B=1, H=16, D=128 (bf16);
``python -m pflow_dist.bench.flow kernels [--gated]`` lists the device time of every kernel that ours and fla launch at
B4 T8192 H16 D128 (torch profiler), forward and forward+backward.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels.flow.chunk import KERNEL_NAMES
from ..kernels.flow.naive import naive_chunk_flow
from .registry import Bench, Case, Impl, own_process_group

_QUICK = [(1, 64, 2, 16), (2, 100, 2, 32)]
_FULL = [(4, 8192, 16, 128), (1, 65536, 16, 128), (8, 4096, 32, 64),
         (1, 4096, 4, 64)]  # the last: small enough for the CPU-only torch rows (sigDelta vs the triangular solve)
_VARIANTS = [(1, 0), (1, 1), (2, 0), (4, 0)]  # (R, gated)


def _cases(quick: bool) -> list[Case]:
    out = []
    for R, gated in _VARIANTS:
        for b, t, h, d in _QUICK if quick else _FULL:
            name = f"B{b}-T{t}-H{h}-D{d}" + ("-gated" if gated else "") + (f"-R{R}" if R > 1 else "")
            out.append(Case(name, {"B": b, "T": t, "H": h, "D": d, "gated": gated, "R": R}))
    return out


def _inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    p = case.params
    B, T, H, D, R = p["B"], p["T"], p["H"], p["D"], p.get("R", 1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    rk = (R,) if R > 1 else ()
    inp = {
        "q": r(B, T, H, D), "k": F.normalize(r(B, T, H, *rk, D), dim=-1), "v": r(B, T, H, *rk, D),
        "beta": torch.rand(B, T, H, *rk, generator=gen) / R,
    }
    if p["gated"]:
        inp["g"] = F.logsigmoid(r(B, T, H) + 4.0)  # mostly slow decay, as in trained layers
    out = {k: v.to(device=device, dtype=dtype) for k, v in inp.items()}
    if R > 1:  # fla's DeltaProduct layout: rows t·R + j, contiguous (made here, outside the timed region)
        out["k_il"] = out["k"].transpose(2, 3).reshape(B, T * R, H, D).contiguous()
        out["v_il"] = out["v"].transpose(2, 3).reshape(B, T * R, H, D).contiguous()
        out["beta_il"] = out["beta"].transpose(2, 3).reshape(B, T * R, H).contiguous()
    return out


def _rank(inp) -> int:
    return inp["k"].shape[3] if inp["k"].dim() == 5 else 1


def _chunk_flow(inp, rank_form: str = "product", check_finite: bool = False):
    from pflow_dist.ops.flow import chunk_flow  # noqa: PLC0415

    return chunk_flow(inp["q"], inp["k"], inp["v"], inp["beta"], g=inp.get("g"), rank_form=rank_form,
                      check_finite=check_finite)


def _ours(inp):
    return _chunk_flow(inp)


def _ours_checked(inp):
    return _chunk_flow(inp, check_finite=True)


def _ours_sum(inp):
    if _rank(inp) == 1:
        raise ValueError("R=1: the sum form is the same op as 'ours'")
    return _chunk_flow(inp, rank_form="sum")


def _ours_sp(inp):
    from pflow_dist.dist.sp_flow_triton import triton_sp_flow  # noqa: PLC0415

    scale = inp["q"].shape[-1] ** -0.5
    return triton_sp_flow(inp["q"], inp["k"], inp["v"], inp["beta"], inp.get("g"), "product", scale, None, 64, None,
                          "doubling")


def _ours_unavailable(device: torch.device) -> str | None:
    return None if importlib.util.find_spec("pflow_dist.ops.flow") else "pflow_dist.ops.flow is not built yet"


def _fla(inp):
    R = _rank(inp)
    if R > 1:
        from fla.ops.gated_delta_product import chunk_gated_delta_product

        return chunk_gated_delta_product(inp["q"], inp["k_il"], inp["v_il"], inp.get("g"), inp["beta_il"], R)
    if "g" in inp:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return chunk_gated_delta_rule(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"])
    from fla.ops.delta_rule import chunk_delta_rule

    return chunk_delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"])


def _fla_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("fla") is None:
        return "fla-core is not installed"
    return None if device.type == "cuda" else "fla needs a CUDA device"


def _torch_chunked(wy: str):
    def run(inp):
        return naive_chunk_flow(inp["q"], inp["k"], inp["v"], inp["beta"], g=inp.get("g"), rank_form="product",
                                chunk_size=64, acc_dtype=torch.float32, wy=wy)

    return run


def _torch_unavailable(device: torch.device) -> str | None:
    return "skipped on CUDA: a Python loop over chunks (the CPU path)" if device.type == "cuda" else None


def _reference(inp, rank_form: str = "product") -> torch.Tensor:
    """The float64 output, unrounded (the reference returns o in the inputs' dtype)."""
    d = lambda name: None if inp.get(name) is None else inp[name].double()  # noqa: E731
    return naive_chunk_flow(d("q"), d("k"), d("v"), d("beta"), g=d("g"), rank_form=rank_form, chunk_size=64)[0]


BENCH = Bench(
    name="flow",
    description=__doc__.splitlines()[0],
    cases=_cases,
    make_inputs=_inputs,
    impls=[
        Impl("ours", _ours, _ours_unavailable, "pflow-dist"),
        Impl("ours-checked", _ours_checked, _ours_unavailable, "pflow-dist"),
        Impl("ours-sum", _ours_sum, _ours_unavailable, "pflow-dist", lambda inp: _reference(inp, "sum")),
        Impl("ours-sp", _ours_sp, _ours_unavailable, "pflow-dist", context=own_process_group),
        Impl("fla", _fla, _fla_unavailable, "fla-core"),
        Impl("torch-chunked", _torch_chunked("inverse"), _torch_unavailable),
        Impl("torch-sigdelta", _torch_chunked("sigdelta"), _torch_unavailable),
    ],
    grad_inputs=("q", "k", "v", "beta", "g", "k_il", "v_il", "beta_il"),
    default_dtype=torch.bfloat16,
    reference=_reference,
    shapes=lambda inputs: {k: list(v.shape) for k, v in inputs.items() if not k.endswith("_il")},
)


_LONGEST_T = [2**19, 2**20, 5 * 2**18, 3 * 2**19, 2**21, 3 * 2**20, 2**22]


def _fwd_bwd_inputs(B, T, H, D, dtype, R=1, gated=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")
    rk = (R,) if R > 1 else ()
    r = lambda *s: torch.randn(*s, device=dev, generator=gen)  # noqa: E731
    x = {"q": r(B, T, H, D).to(dtype), "k": F.normalize(r(B, T, H, *rk, D), dim=-1).to(dtype),
         "v": r(B, T, H, *rk, D).to(dtype), "beta": (torch.rand(B, T, H, *rk, device=dev, generator=gen) / R).to(dtype)}
    if gated:
        x["g"] = F.logsigmoid(r(B, T, H) + 4.0)
    return x


def longest(H: int = 16, D: int = 128, dtype=torch.bfloat16) -> list[dict]:
    """Grow T at B=1 until fwd+bwd of ``chunk_flow`` runs out of memory; one row per T tried (CUDA)."""
    from pflow_dist.ops.flow import chunk_flow  # noqa: PLC0415

    rows = []
    for T in _LONGEST_T:
        row = {"what": "longest", "T": T, "B": 1, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""),
               "device": torch.cuda.get_device_name()}
        x = None
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            x = {n: t.requires_grad_(True) for n, t in _fwd_bwd_inputs(1, T, H, D, dtype).items()}
            for _ in range(2):  # the second call is timed
                for t in x.values():
                    t.grad = None
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                o, _ = chunk_flow(**x)
                o.backward(torch.ones_like(o))
                torch.cuda.synchronize()
                row["ms"] = (time.perf_counter() - t0) * 1e3
                del o
            row.update(status="ok", peak_gb=torch.cuda.max_memory_allocated() / 1e9)
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="oom", error=str(e).splitlines()[0][:200])
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x
        if row["status"] != "ok":
            break
    return rows


def check(B=4, T=8192, H=16, D=128, dtype=torch.bfloat16) -> list[dict]:
    """Relative RMS error of o, the final state and every gradient vs float64, ours (and fla where it runs)."""
    from pflow_dist.ops.flow import chunk_flow  # noqa: PLC0415
    from pflow_dist.testing import error_stats  # noqa: PLC0415

    rows = []
    for R, gated, form in [(1, False, "sum"), (1, True, "sum"), (2, False, "product"), (4, False, "sum")]:
        x = _fwd_bwd_inputs(B, T, H, D, dtype, R, gated, seed=R + 10 * gated)
        x["initial_state"] = torch.randn(B, H, D, D, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(7)
        do = torch.randn(B, T, H, D, device="cuda", generator=gen).to(dtype)
        dS = torch.randn(B, H, D, D, device="cuda", generator=gen)
        ref = {n: t.double().requires_grad_(True) for n, t in x.items()}
        ro, rS = naive_chunk_flow(**ref, rank_form=form, output_final_state=True, chunk_size=64)
        rg = torch.autograd.grad((ro * do.double()).sum() + (rS * dS.double()).sum(), list(ref.values()))
        del ref
        leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
        o, S = chunk_flow(**leaves, rank_form=form, output_final_state=True)
        grads = torch.autograd.grad((o * do).float().sum() + (S * dS).sum(), list(leaves.values()))
        errs = {"o": error_stats(ro, o).rms_ratio, "final_state": error_stats(rS, S).rms_ratio}
        errs.update({f"d{n}": error_stats(a, b).rms_ratio for n, a, b in zip(x, rg, grads, strict=True)})
        row = {"what": "check", "case": f"B{B}-T{T}-H{H}-D{D}" + ("-gated" if gated else "") + f"-R{R}-{form}",
               "impl": "ours", "dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name(),
               "rel_err": errs}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# every kernel gets the same (num_warps, num_stages) in one config; a kernel's time depends only on its own knobs (and
# bvs for the two state passes), so the best value per kernel can be read off the grid independently.
# fuse_dvl=1 folds the dvlocal kernel into the reverse state pass: its time is reported as "...state_bwd+dvlocal".
SWEEP = [f"bk=64,bv=64,bvs={bvs},fuse_dvl={fuse},"
         + ",".join(f"nw_{n}={nw},ns_{n}={ns}" for n in KERNEL_NAMES)
         for fuse, bvs in ((0, 64), (0, 32), (1, 64)) for nw in (2, 4, 8) for ns in (1, 2, 3, 4)]


def warm(cfg: str) -> None:
    """Compile the kernels of one tiling config (FLOW_CFG) on a small input with the sweep's constexprs."""
    import os  # noqa: PLC0415

    from pflow_dist.ops.flow import chunk_flow  # noqa: PLC0415

    os.environ["FLOW_CFG"] = cfg
    for gated in (False, True):
        x = {n: t.requires_grad_(True) for n, t in _fwd_bwd_inputs(1, 256, 16, 128, torch.bfloat16, 1, gated).items()}
        o, _ = chunk_flow(**x)
        o.sum().backward()
    torch.cuda.synchronize()


def _precompile(cfgs: list[str], jobs: int = 12) -> None:
    """Fill Triton's on-disk cache for every config in parallel processes (compiling dominates a sweep's time)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    def one(cfg: str) -> None:
        subprocess.run([sys.executable, "-m", "pflow_dist.bench.flow", "warm", "--cfg", cfg],
                       capture_output=True, check=False, timeout=600)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, cfgs))


def sweep(gated: bool = False) -> list[dict]:
    """Per-kernel CUDA time (torch profiler) of fwd+bwd at B4 T8192 H16 D128 bf16 for every config in SWEEP, then
    the fastest config of each kernel (a row with ``what: "sweep-best"``)."""
    import os  # noqa: PLC0415

    from pflow_dist.ops.flow import chunk_flow  # noqa: PLC0415

    _precompile(SWEEP)
    x = {n: t.requires_grad_(True) for n, t in _fwd_bwd_inputs(4, 8192, 16, 128, torch.bfloat16, 1, gated).items()}
    rows = []
    for cfg in SWEEP:
        os.environ["FLOW_CFG"] = cfg
        row = {"what": "sweep", "cfg": cfg, "gated": gated}
        try:
            us = _kernel_times(lambda: chunk_flow(**x)[0], list(x.values()))
            row["kernels_us"] = {k + ("+dvlocal" if "fuse_dvl=1" in cfg and "state_bwd" in k else ""): t
                                 for k, t in us.items() if "chunk_flow" in k}
        except Exception as e:  # a config that fails to compile or run is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.environ.pop("FLOW_CFG", None)
    best: dict[str, tuple[float, str]] = {}
    for row in rows:
        for kernel, us in row.get("kernels_us", {}).items():
            if kernel not in best or us < best[kernel][0]:
                best[kernel] = (us, row["cfg"])
    summary = {"what": "sweep-best", "gated": gated,
               "best": {k: {"us": us, "cfg": cfg} for k, (us, cfg) in best.items()}}
    print(json.dumps(summary), flush=True)
    return [*rows, summary]


def _kernel_times(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor] | None, rep: int = 3) -> dict[str, float]:
    """Device time per call of every CUDA kernel that ``fn`` (and, when ``leaves`` are given, the gradient of its
    output with respect to them) launches, in µs averaged over ``rep`` profiled calls after two warm-up calls (torch
    profiler). Gradients are returned, not accumulated into ``.grad``: no accumulation kernels in the profile."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    def call() -> None:
        o = fn()
        if leaves is not None:
            torch.autograd.grad(o, leaves, torch.ones_like(o))

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rep):
            call()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / rep for e in prof.key_averages() if e.device_time_total > 0}


def kernels(B=4, T=8192, H=16, D=128, gated: bool = False, only: list[str] | None = None) -> list[dict]:
    """Per-kernel device time of ours and fla (or the implementations in ``only``) on the same inputs, forward alone
    and forward+backward, bf16: where each implementation spends its time (one row per implementation and pass;
    kernels sorted by time)."""
    x = {n: t.requires_grad_(True) for n, t in _fwd_bwd_inputs(B, T, H, D, torch.bfloat16, 1, gated).items()}
    impls = {"ours": lambda: _ours(x)[0]}
    if _fla_unavailable(torch.device("cuda")) is None:
        impls["fla"] = lambda: _fla(x)[0]
    impls = {name: fn for name, fn in impls.items() if not only or name in only}
    rows = []
    for impl, fn in impls.items():
        for passes in ("fwd", "fwd+bwd"):
            row = {"what": "kernels", "case": f"B{B}-T{T}-H{H}-D{D}" + ("-gated" if gated else ""), "impl": impl,
                   "passes": passes}
            try:
                us = _kernel_times(fn, list(x.values()) if passes == "fwd+bwd" else None)
                row["total_us"] = sum(us.values())
                row["kernels_us"] = dict(sorted(us.items(), key=lambda kv: -kv[1]))
            except Exception as e:  # noqa: BLE001 - fla's gated backward refuses Hopper on Triton 3.6: a result
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def groups_sweep(B=1, T=65536, H=16, D=128) -> list[dict]:
    """fwd and fwd+bwd time of the sequential state passes (groups=1) vs grouped ones (chunk_scan.py)."""
    import os  # noqa: PLC0415

    from pflow_dist.ops.flow import chunk_flow  # noqa: PLC0415

    x = {n: t.requires_grad_(True) for n, t in _fwd_bwd_inputs(B, T, H, D, torch.bfloat16).items()}
    rows = []
    for groups in (1, 0, 4, 8, 16):
        os.environ["FLOW_CFG"] = f"groups={groups}"
        row = {"what": "groups", "case": f"B{B}-T{T}-H{H}-D{D}", "groups": groups}
        for mode in ("fwd", "fwd+bwd"):
            def fn(mode=mode):
                o, _ = chunk_flow(**x)
                if mode == "fwd+bwd":
                    o.backward(torch.ones_like(o))
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            for _ in range(5):
                fn()
            ev[1].record()
            torch.cuda.synchronize()
            row[mode + "_ms"] = ev[0].elapsed_time(ev[1]) / 5
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.environ.pop("FLOW_CFG", None)
    return rows


def _bench(cases: list[str], impls: list[str], out: str | None) -> None:
    """``pflow-dist bench flow`` without the CLI's dependencies (for bare GPU images)."""
    from rich.console import Console  # noqa: PLC0415

    from .harness import write_jsonl  # noqa: PLC0415
    from .registry import run_bench  # noqa: PLC0415
    from .report import format_row, print_table  # noqa: PLC0415

    console = Console()

    def on_row(r) -> None:  # rows land in the file as they come: a run cut short keeps what it measured
        console.print(format_row(r), highlight=False)
        if out:
            write_jsonl([r], out)

    rows = run_bench(BENCH, device=torch.device("cuda"), case_filter=cases, impl_filter=impls, on_row=on_row)
    print_table(rows, console)


def _main() -> None:
    ap = argparse.ArgumentParser(description="Extra flow measurements on CUDA: full-size check, longest T, bench.")
    ap.add_argument("what", choices=["longest", "check", "bench", "warm", "sweep", "groups", "kernels"])
    ap.add_argument("--cfg", default="")
    ap.add_argument("--gated", action="store_true")
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--impl", action="append", default=[])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.what == "bench":
        _bench(a.case, a.impl, a.out)
        return
    if a.what == "warm":
        warm(a.cfg)
        return
    rows = {"longest": longest, "check": check, "sweep": lambda: sweep(a.gated), "groups": groups_sweep,
            "kernels": lambda: kernels(gated=a.gated, only=a.impl)}[a.what]()
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    _main()
