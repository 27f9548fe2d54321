"""``pflow-dist bench scan``: the diagonal affine scan h_t = a_t ⊙ h_{t-1} + b_t, fp32, B·N·T = 2^28 elements.

Implementations, on the same values (the peer gets them in its [B, C, T] layout, transposed outside the timing):
- ``ours``: ``pflow_dist.ops.scan.scan`` (``backend="auto"``: Triton single-pass look-back on CUDA, torch on CPU);
- ``ours-bct``: the same op on the peer's memory: ``[B, C, T]`` tensors passed as their ``transpose(1, 2)`` views
  (channel-major ``[B, T, N]``, run by the kernels without a copy);
- ``ours-3pass``: the same op with the three-pass chunked Triton algorithm;
- ``ours-sp`` / ``ours-sp-bct``: the per-rank work of ``sp_scan`` (``pflow_dist.dist.sp_ops``: the shard's map from one
  read, one scan; backward the adjoint's map from one read, one adjoint with da) on a one-rank process group, in the
  two memory layouts: what each GPU computes under sequence parallelism, without the communication (one GPU
  suffices);
- ``torch``: the chunked log-depth plain-torch scan (``backend="torch"``, the CPU path, run on the same device);
- ``accelerated-scan``: ``accelerated_scan.scalar.scan`` (Triton, one program per sequence), when installed;
- ``accelerated-scan-warp``: ``accelerated_scan.warp.scan`` (its CUDA kernel, compiled on first use by
  ``torch.utils.cpp_extension``: needs nvcc; power-of-two T ≤ 65536 only, an error row beyond).
A memory-bound scan moves at least a, b in and h out (fwd) and a, ḡ, h in, da, db out (bwd): 3 and 8 tensors.
``pflow-dist bench scan`` (and ``python -m pflow_dist.bench.scan``) add to every row (``finalize_rows``) the HBM copy
bandwidth measured in the same run (a 2^28-float device copy, bytes read + written) and the row's effective bandwidth
and fraction of it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util

import torch

from ..kernels.scan.naive import naive_scan
from .harness import BenchRow, measure
from .registry import Bench, Case, Impl, own_process_group

_ELEMENTS = 2**28
_QUICK = [(4, 2**10, 8), (1, 3000, 5)]


def _full() -> list[tuple[int, int, int]]:
    out = []
    for log_t in (10, 12, 14, 16, 18, 20, 22, 24):
        T = 2**log_t
        N = min(256, _ELEMENTS // T)
        out.append((_ELEMENTS // (N * T), T, N))
    return out


def _cases(quick: bool) -> list[Case]:
    return [Case(f"B{b}-T{t}-N{n}", {"B": b, "T": t, "N": n}) for b, t, n in (_QUICK if quick else _full())]


def _inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    B, T, N = case.params["B"], case.params["T"], case.params["N"]
    gen = torch.Generator(device=device).manual_seed(0)
    a = (0.999 + 0.001 * torch.rand(B, T, N, generator=gen, device=device)).to(dtype)  # long memory, as in SSMs
    b = torch.randn(B, T, N, generator=gen, device=device).to(dtype)
    inp = {"a": a, "b": b}
    if device.type == "cuda":  # the peer's layout, also run by ours-bct
        inp["a_bct"] = a.transpose(1, 2).contiguous()
        inp["b_bct"] = b.transpose(1, 2).contiguous()
    return inp


def _ours(inp):
    from ..ops.scan import scan

    return scan(inp["a"], inp["b"])


def _ours_bct(inp):
    from ..ops.scan import scan

    return scan(inp["a_bct"].transpose(1, 2), inp["b_bct"].transpose(1, 2))


def _sp_scan(a, b):
    from ..dist.sp_ops import _SPDiagScan  # the multi-rank path, which sp_scan skips on a group of one rank

    return (_SPDiagScan.apply(a, b, None, None, "triton", "doubling"),)


def _ours_sp(inp):
    return _sp_scan(inp["a"], inp["b"])


def _ours_sp_bct(inp):
    return _sp_scan(inp["a_bct"].transpose(1, 2), inp["b_bct"].transpose(1, 2))


def _ours_3pass(inp):
    from ..ops.scan import _Scan  # the op's autograd function with the three-pass kernels

    return _Scan.apply(inp["a"], inp["b"], None, "triton", {"algorithm": "chunk"})


def _torch(inp):
    from ..ops.scan import scan

    return scan(inp["a"], inp["b"], backend="torch")


def _accel(inp):
    from accelerated_scan.scalar import scan as accel_scan

    return (accel_scan(inp["a_bct"], inp["b_bct"]).transpose(1, 2),)


_WARP_MAX_T = 65536


def _accel_warp(inp):
    T = inp["a"].shape[1]
    if T > _WARP_MAX_T or T & (T - 1):
        raise ValueError(f"accelerated-scan's warp kernel takes power-of-two T <= {_WARP_MAX_T}, got T={T}")
    from accelerated_scan.warp import scan as warp_scan  # JIT-compiles the CUDA extension on first import

    return (warp_scan(inp["a_bct"], inp["b_bct"]).transpose(1, 2),)


def _accel_warp_unavailable(device: torch.device) -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if (why := _accel_unavailable(device)) is not None:
        return why
    return None if CUDA_HOME is not None else "accelerated-scan's warp kernel compiles CUDA C++: no CUDA toolkit here"


def _cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "Triton kernels need a CUDA device (the interpreter is for tests)"


def _kernels_run_here(device: torch.device) -> str | None:
    from ..testing import interpreting

    return None if interpreting() else _cuda_only(device)


def _accel_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("accelerated_scan") is None:
        return "accelerated-scan is not installed"
    return _cuda_only(device)


def _reference(inp) -> torch.Tensor:
    return naive_scan(inp["a"].double(), inp["b"].double())[0]


BENCH = Bench(
    name="scan",
    description=__doc__.splitlines()[0],
    cases=_cases,
    make_inputs=_inputs,
    impls=[Impl("ours", _ours), Impl("ours-bct", _ours_bct, _cuda_only), Impl("ours-3pass", _ours_3pass, _cuda_only),
           Impl("ours-sp", _ours_sp, _kernels_run_here, context=own_process_group),
           Impl("ours-sp-bct", _ours_sp_bct, _cuda_only, context=own_process_group),
           Impl("torch", _torch),
           Impl("accelerated-scan", _accel, _accel_unavailable, package="accelerated-scan"),
           Impl("accelerated-scan-warp", _accel_warp, _accel_warp_unavailable, package="accelerated-scan")],
    grad_inputs=("a", "b", "a_bct", "b_bct"),
    default_dtype=torch.float32,
    reference=_reference,
    check_limit=lambda case: case.params["T"] * case.params["B"] * case.params["N"] <= 2**16,
    shapes=lambda inp: {k: list(v.shape) for k, v in inp.items() if k in ("a", "b")},
)

_TENSORS = {"fwd": 3, "fwd+bwd": 8}  # fewest tensors moved: fwd a, b → h; bwd a, ḡ, h → da, db


def copy_bandwidth(device: torch.device, numel: int = _ELEMENTS) -> float | None:
    """Device copy bandwidth in GB/s (bytes read + written) of a ``numel``-float32 copy; None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=3, rep=20)
    return 2 * numel * 4 / (t.median_ms * 1e-3) / 1e9


def finalize_rows(rows: list[BenchRow], device: torch.device, cases: list[Case] | None = None) -> list[BenchRow]:
    """Add ``copy_GBps`` (measured now), ``effective_GBps`` and ``frac_of_copy`` to every timed row's ``extra``."""
    bw = copy_bandwidth(device)
    for row in rows:
        row.extra["copy_GBps"] = bw
        if row.median_ms and bw:
            numel = 1
            for s in row.shapes["a"]:
                numel *= s
            eff = _TENSORS[row.mode] * numel * 4 / (row.median_ms * 1e-3) / 1e9
            row.extra["effective_GBps"] = eff
            row.extra["frac_of_copy"] = eff / bw
    return rows


BENCH = dataclasses.replace(BENCH, finalize=finalize_rows)


def _verified() -> dict[str, tuple]:
    """The implementations ``--verify`` checks: name -> (``fn(a, b) -> h`` on [B, T, N] views, channel-major memory,
    context)."""
    from ..ops.scan import _Scan

    on = lambda kw: lambda a, b: _Scan.apply(a, b, None, "triton", kw)[0]  # noqa: E731
    sp = lambda a, b: _sp_scan(a, b)[0]  # noqa: E731
    return {"ours": (on(None), False, None), "ours-bct": (on(None), True, None),
            "ours-3pass": (on({"algorithm": "chunk"}), False, None),
            "ours-sp": (sp, False, own_process_group), "ours-sp-bct": (sp, True, own_process_group)}


def verify_rows(rows: list[BenchRow], device: torch.device, quick: bool, case_filter: list[str]) -> None:
    """Relative RMS error of our implementations (h, da, db; see :func:`_verified`) against the torch path on the
    same device and inputs, for every case (the float64 loop is too slow at 2^28 elements), into
    ``extra.rel_err_vs_torch``."""
    from ..kernels.scan.diag import to_channel_major
    from ..ops.scan import scan
    from ..testing import error_stats

    for case in BENCH.cases(quick):
        if case_filter and case.name not in case_filter:
            continue
        inp = _inputs(case, torch.float32, device)
        a, b = (inp["a"].requires_grad_(), inp["b"].requires_grad_())
        g = torch.randn_like(b)
        h_ref = scan(a, b, backend="torch")[0]
        ref = [h_ref.detach(), *torch.autograd.grad(h_ref, (a, b), g)]
        del h_ref
        for impl, (fn, channel_major, context) in _verified().items():
            try:
                # channel-major: the same values stored [B, N, T] (the peer's layout), as leaves of their own
                x = ((a, b) if not channel_major
                     else tuple(to_channel_major(t.detach()).requires_grad_() for t in (a, b)))
                with context() if context is not None else contextlib.nullcontext():
                    h = fn(*x)
                    out = [h.detach(), *torch.autograd.grad(h, x, g)]
                del x, h
                err = {k: error_stats(r, o).rms_ratio for k, r, o in zip(("h", "da", "db"), ref, out)}
            except Exception as e:
                err = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            for row in rows:
                if row.case == case.name and row.impl == impl:
                    row.extra["rel_err_vs_torch"] = err
            print(f"verify {case.name:<22} {impl:<11} {err}", flush=True)
        del inp, a, b, g, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    """``python -m pflow_dist.bench.scan [--quick] [--case ...] [--out FILE]``: run, add bandwidths, write JSONL."""
    from .harness import write_jsonl
    from .registry import run_bench
    from .report import format_row, print_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--case", action="append", default=[])
    p.add_argument("--impl", action="append", default=[])
    p.add_argument("--mode", action="append", default=[])
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--verify", action="store_true",
                   help="ours, ours-bct, ours-3pass, ours-sp and ours-sp-bct vs the torch path, fwd and grads")
    p.add_argument("--verify-case", action="append", default=[], help="verify only these cases")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_bench(BENCH, device=device, quick=args.quick, case_filter=args.case, impl_filter=args.impl,
                     modes=args.mode or None, rep=args.rep, on_row=lambda r: print(format_row(r), flush=True))
    if args.verify:
        verify_rows(rows, device, args.quick, args.verify_case or args.case)
    from rich.console import Console

    print_table(rows, Console())
    for r in rows:
        if "frac_of_copy" in r.extra:
            print(f"{r.case:<22} {r.mode:<8} {r.impl:<17} {r.median_ms:9.3f} ms  {r.extra['effective_GBps']:7.0f} GB/s"
                  f"  {100 * r.extra['frac_of_copy']:5.1f}% of copy ({r.extra['copy_GBps']:.0f} GB/s)")
    if args.out:
        write_jsonl(rows, args.out)


if __name__ == "__main__":
    main()

