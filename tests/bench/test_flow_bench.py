"""The flow benchmark (pflow_dist.bench.flow) on CPU: rows, errors against the unrounded float64 output."""

from __future__ import annotations

import torch

from pflow_dist.bench import flow as flow_bench
from pflow_dist.bench.registry import run_bench


def test_reference_is_unrounded_float64():
    case = next(c for c in flow_bench.BENCH.cases(True) if c.name == "B1-T64-H2-D16")
    inp = flow_bench.BENCH.make_inputs(case, torch.bfloat16, torch.device("cpu"))
    ref = flow_bench._reference(inp)
    assert ref.dtype == torch.float64
    assert (ref - ref.to(torch.bfloat16).double()).abs().max() > 0  # not rounded to the inputs' bf16


def test_quick_rows_ours_and_sum_form():
    rows = run_bench(flow_bench.BENCH, device=torch.device("cpu"), quick=True, warmup=0, rep=1,
                     case_filter=["B1-T64-H2-D16", "B1-T64-H2-D16-R2"], impl_filter=["ours", "ours-sum", "ours-sp"])
    by = {(r.case, r.impl, r.mode): r for r in rows}
    for key in [("B1-T64-H2-D16", "ours", "fwd"), ("B1-T64-H2-D16-R2", "ours", "fwd+bwd"),
                ("B1-T64-H2-D16-R2", "ours-sum", "fwd"), ("B1-T64-H2-D16", "ours-sp", "fwd+bwd"),
                ("B1-T64-H2-D16-R2", "ours-sp", "fwd")]:
        r = by[key]
        # bf16 outputs against the float64 result: rounding error, never exactly zero, well below 1%
        assert r.status == "ok" and 1e-5 < r.extra["rel_err"] < 1e-2, (key, r.extra)
    r = by[("B1-T64-H2-D16", "ours-sum", "fwd")]
    assert r.status == "error" and "the sum form is the same op" in r.extra["check_error"]
    # ours-sp's one-process group is gone after its cases: later code in this process must not find a default group
    assert not torch.distributed.is_initialized()
