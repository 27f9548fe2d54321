"""``pflow-dist bench projection``: bi-level ℓ1,∞ projection (ours) vs the exact Euclidean ℓ1,∞ projection (the peer).

Protocol of the authors' timing script (arXiv 2405.02086 / 2407.16293, SAE-Supervised-Autoencoder-Omics
script_test_timer.py): ``torch.rand(1000, m)`` in float64, m in {1000, 2000, 4000, 6000, 8000}, radius 1, groups are
columns here (the paper's convention; reduce over dim 0). ``…-f0.1`` cases use a radius of 10% of ‖Y‖_{1,∞}
(less sparse, harder for the exact solver). On CUDA the cases ``8192x8192`` and ``32768x32768`` are added (run them
with ``--dtype fp32``; the exact solver needs ~76 GiB at the second): 3 passes over 4 GiB, compared with the copy
bandwidth measured in the same process.

Implementations: ``ours`` (:func:`~pflow_dist.ops.projection.bilevel_project`, allocating its result), ``ours-out``
(into a preallocated buffer: on CPU most of the difference is page faults of the fresh allocation), ``triton`` (the
fused kernels, CUDA only), ``exact-l1inf`` (:func:`~pflow_dist.ops.projection.exact_l1inf_project`). The speedup
column of the report is ``exact ms / ours ms``. ``python -m pflow_dist.bench.projection`` also writes
``extra.copy_GBps`` (``dst.copy_(x)``), ``extra.GBps`` (3 bytes per element moved, the bi-level minimum) and
``extra.speedup_vs_exact`` into the rows, and ``--ray`` times the Ray actor tree.

ℓ1-ball threshold methods (``method=`` of :func:`~pflow_dist.ops.projection.l1_threshold`: ``sort``, ``michelot``,
``pivot``) on the same matrices: ``l1-<method>`` projects all n·m entries onto one ℓ1 ball (one vector of up to 8e6),
``l11-<method>`` is the bi-level ℓ1,1 projection (one batched call: the m column groups of n entries each get their
own threshold). Their radius is the case's (``r1``: 1; ``f0.1``: 10% of ‖Y‖₁, resp. ‖Y‖_{1,1});
``extra.speedup_vs_sort`` compares each with the ``-sort`` row of the same family.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from ..kernels.projection.shapes import bilevel_tree
from ..ops.projection import bilevel_project, exact_l1inf_project, mixed_norm, project_l1
from .harness import BenchRow, measure, write_jsonl
from .registry import Bench, Case, Impl, run_bench

_QUICK = [(64, 100, 1.0), (200, 300, 0.1)]
_FULL = [(1000, m, 1.0) for m in (1000, 2000, 4000, 6000, 8000)] + [(1000, 1000, 0.1), (1000, 8000, 0.1)]
_GPU = [(8192, 8192, 0.1), (32768, 32768, 0.1)]  # the exact solver fits the first, not the second


def _case(n: int, m: int, r: float) -> Case:
    # r >= 1: an absolute radius (the authors' radius 1); r < 1: a fraction of ‖Y‖_{1,∞}
    name = f"{n}x{m}" + (f"-r{r:g}" if r >= 1 else f"-f{r:g}")
    return Case(name, {"n": n, "m": m, "r_milli": int(round(r * 1000))})


def _cases(quick: bool) -> list[Case]:
    sizes = _QUICK if quick else _FULL + (_GPU if torch.cuda.is_available() else [])
    return [_case(*s) for s in sizes]


def _inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    n, m, r = case.params["n"], case.params["m"], case.params["r_milli"] / 1000
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(n, m, generator=gen, device=device, dtype=torch.float32 if dtype.itemsize < 4 else dtype)
    x = x.to(dtype)
    eta = r if r >= 1 else r * float(mixed_norm(x, ("l1", "linf"), ((1,), (0,))))
    eta_l1 = r if r >= 1 else r * float(x.abs().sum(dtype=torch.float64))  # ‖Y‖₁ = ‖Y‖_{1,1}
    return {"x": x, "eta": torch.tensor(eta, dtype=torch.float64), "eta_l1": torch.tensor(eta_l1, dtype=torch.float64)}


_OUT: dict[tuple, torch.Tensor] = {}


def _ours(inp):
    return (bilevel_project(inp["x"], float(inp["eta"])),)


def _ours_out(inp):
    x = inp["x"]
    key = (x.data_ptr(), tuple(x.shape), x.dtype, x.device)
    if key not in _OUT:
        _OUT.clear()
        _OUT[key] = torch.empty_like(x)
    return (bilevel_project(x, float(inp["eta"]), out=_OUT[key]),)


def _triton(inp):
    return (bilevel_project(inp["x"], float(inp["eta"]), backend="triton"),)


def _exact(inp):
    return (exact_l1inf_project(inp["x"], float(inp["eta"])),)


def _l1_impls() -> list[Impl]:
    """``l1-<method>`` (one ℓ1 ball over all entries) and ``l11-<method>`` (bi-level ℓ1,1) per threshold method."""
    impls = []
    for method in ("sort", "michelot", "pivot"):
        def ball(inp, method=method):
            return (project_l1(inp["x"], float(inp["eta_l1"]), method=method),)

        def l11(inp, method=method):
            return (bilevel_project(inp["x"], float(inp["eta_l1"]), "l1", (0,), method=method),)

        impls += [Impl(f"l1-{method}", ball), Impl(f"l11-{method}", l11)]
    return impls


def _cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "fused Triton kernels are timed on CUDA only (CPU: interpreter)"


BENCH = Bench(
    name="projection",
    description=__doc__.splitlines()[0],
    cases=_cases,
    make_inputs=_inputs,
    impls=[Impl("ours", _ours), Impl("ours-out", _ours_out), Impl("triton", _triton, _cuda_only),
           Impl("exact-l1inf", _exact), *_l1_impls()],
    grad_inputs=(),
    modes=("fwd",),
    default_dtype=torch.float64,
    shapes=lambda inp: {"x": list(inp["x"].shape)},
)


def annotate(case: Case, inputs: dict[str, torch.Tensor], device: torch.device, rows: list[BenchRow],
             warmup: int = 3, rep: int = 10) -> None:
    """Add to the rows of one case what a table of times alone does not say: the copy bandwidth measured now on
    the same tensor, the bandwidth each implementation reaches at 3 bytes/element (one read for the group maxima,
    one read + one write for the clip), the norm and zeroed groups of the result, and ours' speedup over exact."""
    x = inputs["x"]
    buf = [torch.empty_like(x)]
    t_copy = measure(lambda: buf[0].copy_(x), device, warmup, rep).median_ms
    buf.clear()
    nbytes = x.numel() * x.element_size()
    eta = float(inputs["eta"])
    by_impl = {r.impl: r for r in rows}
    exact = by_impl.get("exact-l1inf")
    for r in rows:
        r.extra["copy_ms"] = t_copy
        r.extra["copy_GBps"] = 2 * nbytes / t_copy / 1e6
        family, _, method = r.impl.partition("-")
        if family in ("l1", "l11"):  # threshold methods: compared with the sort method on the same problem
            r.extra["eta"] = float(inputs["eta_l1"])
            sort = by_impl.get(f"{family}-sort")
            if sort is not None and sort.median_ms and r.median_ms:
                r.extra["speedup_vs_sort"] = sort.median_ms / r.median_ms
            continue
        r.extra["eta"] = eta
        if r.median_ms:
            r.extra["GBps_at_3_bytes_per_elem"] = 3 * nbytes / r.median_ms / 1e6
            r.extra["time_over_1.5_copies"] = r.median_ms / (1.5 * t_copy)
        if exact is not None and exact.median_ms and r.median_ms and r.impl != "exact-l1inf":
            r.extra["speedup_vs_exact"] = exact.median_ms / r.median_ms
    # sparsity of each projection (the papers' "more zero groups at the same radius")
    for impl, fn in (("ours", _ours), ("exact-l1inf", _exact)):
        if impl in by_impl and by_impl[impl].status == "ok":
            with torch.no_grad():
                out = fn(inputs)[0]
            by_impl[impl].extra["groups_zeroed"] = int((out.abs().amax(0) == 0).sum())
            by_impl[impl].extra["norm_after"] = float(mixed_norm(out, ("l1", "linf"), ((1,), (0,))))
            del out


def run(device: torch.device, dtype: torch.dtype | None = None, *, quick: bool = False, cases: list[str] = (),
        impls: list[str] = (), warmup: int = 3, rep: int = 10) -> list[BenchRow]:
    """``run_bench`` case by case, then :func:`annotate` on the same inputs (same process)."""
    rows: list[BenchRow] = []
    for case in BENCH.cases(quick):
        if cases and case.name not in cases:
            continue
        case_rows = run_bench(BENCH, device=device, dtype=dtype, quick=quick, case_filter=[case.name],
                              impl_filter=impls, warmup=warmup, rep=rep, check=False)
        inputs = BENCH.make_inputs(case, dtype or BENCH.default_dtype, device)
        annotate(case, inputs, device, case_rows, warmup, rep)
        del inputs
        _OUT.clear()
        rows += case_rows
        for r in case_rows:
            sp, ss = r.extra.get("speedup_vs_exact"), r.extra.get("speedup_vs_sort")
            print(f"{r.case:<16} {r.impl:<12} {r.median_ms or float('nan'):10.3f} ms  "
                  f"copy {r.extra['copy_GBps']:7.2f} GB/s  at3B {r.extra.get('GBps_at_3_bytes_per_elem', 0):7.2f} GB/s"
                  + (f"  vs exact {sp:5.2f}x" if sp else "") + (f"  vs sort {ss:5.2f}x" if ss else "")
                  + (f"  [{r.status}: {r.error}]" if r.status != "ok" else ""), flush=True)
    return rows


def ray_scaling(n: int = 4000, m: int = 8000, actors: tuple[int, ...] = (1, 2, 4), rep: int = 10,
                shard_dim: int = 1) -> list[dict[str, Any]]:
    """Time the Ray actor tree (bi-level ℓ1,∞, groups = columns) against the single process on the same tensor.

    Returns one dict per configuration: ``{"config", "actors", "median_ms", "speedup_vs_1thread"}``; in-place
    projections of a fresh copy each time (the copy is not timed for the single process; the actors reload).
    """
    import ray

    from ..ray.projection_tree import ProjectionActorTree, connect

    x = torch.rand(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eta = 0.1 * float(mixed_norm(x, ("l1", "linf"), ((1,), (0,))))
    tree = bilevel_tree(2, "linf", (0,))
    results = []

    def single(threads: int) -> float:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        times = []
        for _ in range(rep + 1):
            y = x.clone()
            t0 = time.perf_counter()
            bilevel_project(y, eta, out=y, method="sort")
            times.append((time.perf_counter() - t0) * 1e3)
        torch.set_num_threads(old)
        return sorted(times[1:])[rep // 2]

    base = single(1)
    results.append({"config": "single process, 1 thread", "actors": 0, "median_ms": base, "speedup_vs_1thread": 1.0})
    t2 = single(2)
    results.append({"config": "single process, 2 threads", "actors": 0, "median_ms": t2,
                    "speedup_vs_1thread": base / t2})
    connect(num_cpus=max(actors) + 1, include_dashboard=False, log_to_driver=False)
    for p in actors:
        pool = ProjectionActorTree(num_actors=p, torch_threads=1)
        times, load_ms = [], []
        for _ in range(rep + 1):
            t0 = time.perf_counter()
            pool.load(x, tree.norms, tree.blocks, shard_dim=shard_dim)
            load_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            pool.project(eta)
            times.append((time.perf_counter() - t0) * 1e3)
        med = sorted(times[1:])[rep // 2]
        results.append({"config": f"Ray, {p} shard actor(s) + root", "actors": p, "median_ms": med,
                        "speedup_vs_1thread": base / med, "scatter_ms": sorted(load_ms[1:])[rep // 2]})
        pool.close()
    # the fixed cost of one projection round trip (upward -> root -> downward) on a tiny tensor
    pool = ProjectionActorTree(num_actors=max(actors), torch_threads=1)
    pool.load(torch.rand(16, 64, dtype=torch.float64), tree.norms, tree.blocks, shard_dim=1)
    lat = []
    for _ in range(rep + 1):
        t0 = time.perf_counter()
        pool.project(1.0)
        lat.append((time.perf_counter() - t0) * 1e3)
    results.append({"config": f"Ray round trip, {max(actors)} actors, 16x64", "actors": max(actors),
                    "median_ms": sorted(lat[1:])[rep // 2], "speedup_vs_1thread": None})
    pool.close()
    ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp64", "fp32", "bf16", "fp16"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--case", action="append", default=[])
    p.add_argument("--impl", action="append", default=[])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--out", default=None, help="append JSONL rows here")
    p.add_argument("--ray", action="store_true", help="time the Ray actor tree instead (CPU)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ray:
        res = ray_scaling(rep=a.rep)
        for r in res:
            print(json.dumps(r))
        if a.out:
            with open(a.out, "a") as f:
                for r in res:
                    f.write(json.dumps({"bench": "projection-ray", **r}) + "\n")
        return
    dtypes = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rows = run(torch.device(a.device), dtypes[a.dtype] if a.dtype else None, quick=a.quick, cases=a.case,
               impls=a.impl, warmup=a.warmup, rep=a.rep)
    if a.out:
        print(f"wrote {len(rows)} rows to {write_jsonl(rows, a.out)}")
    if any(math.isnan(r.median_ms or 0.0) for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
