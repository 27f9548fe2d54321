"""Smoke test of ``pflow_dist.bench.projection`` on CPU (tiny cases): rows, annotations, the Ray timing helper's
single-process part is covered by the Ray tests."""

from __future__ import annotations

import torch

from pflow_dist.bench.projection import BENCH, run


def test_projection_bench_quick_cpu():
    rows = run(torch.device("cpu"), quick=True, warmup=0, rep=2)
    cases = {c.name for c in BENCH.cases(True)}
    assert {r.case for r in rows} == cases
    by = {(r.case, r.impl): r for r in rows}
    for case in cases:
        ours, exact = by[(case, "ours")], by[(case, "exact-l1inf")]
        assert ours.status == "ok" and exact.status == "ok" and ours.dtype == "float64"
        assert ours.extra["copy_GBps"] > 0 and ours.extra["speedup_vs_exact"] > 0
        # same radius, same norm (which groups die differs: see extra["groups_zeroed"])
        assert abs(ours.extra["norm_after"] - exact.extra["norm_after"]) <= 1e-9 * max(1.0, ours.extra["eta"])
        assert 0 <= ours.extra["groups_zeroed"] <= ours.shapes["x"][1]
        assert by[(case, "triton")].status == "unavailable"


def test_projection_bench_threshold_method_rows():
    rows = run(torch.device("cpu"), quick=True, warmup=0, rep=2, impls=[f"{f}-{m}" for f in ("l1", "l11")
                                                                         for m in ("sort", "michelot", "pivot")])
    by = {(r.case, r.impl): r for r in rows}
    for case in {c.name for c in BENCH.cases(True)}:
        for fam in ("l1", "l11"):
            assert by[(case, f"{fam}-sort")].extra["speedup_vs_sort"] == 1.0
            for m in ("michelot", "pivot"):
                r = by[(case, f"{fam}-{m}")]
                assert r.status == "ok" and r.extra["speedup_vs_sort"] > 0 and "speedup_vs_exact" not in r.extra
