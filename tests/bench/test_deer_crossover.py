"""``bench deer --crossover``: where DEER overtakes cuDNN (here: the CPU GRU) over a (B, nh, T) grid."""

from __future__ import annotations

import json

import pytest

from pflow_dist.bench import deer as deer_bench
from pflow_dist.bench.harness import BenchRow


def _row(case: str, impl: str, ms: float | None, mode: str = "fwd+bwd") -> BenchRow:
    b, n, t = (int(x.lstrip("Bnh").lstrip("T")) for x in case.split("-"))  # "B16-nh64-T256"
    shapes = {"h0": [b, n], "x": [b, t, 3]}  # what crossover() reads B, nh and T from
    return BenchRow(bench="deer", case=case, mode=mode, impl=impl, device="cpu", dtype="float32", shapes=shapes,
                    median_ms=ms, p20_ms=ms, p80_ms=ms, n_rep=1, peak_mem_bytes=None, versions={}, command="",
                    status="ok" if ms else "error")


def test_crossover_is_the_shortest_length_from_which_ours_stays_faster():
    times = {  # T: (ours ms, cuDNN ms): slower, faster, slower again (a dip), then faster for good
        256: (2.0, 1.0), 1024: (1.0, 2.0), 4096: (4.0, 3.0), 17984: (5.0, 10.0), 65536: (10.0, 40.0)}
    rows = [r for t, (o, c) in times.items()
            for r in (_row(f"B16-nh64-T{t}", "ours", o), _row(f"B16-nh64-T{t}", "torch.nn.GRU", c))]
    rows += [_row("B16-nh32-T256", "ours", 1.0), _row("B16-nh32-T256", "torch.nn.GRU", None)]  # the peer failed
    rows += [_row("B64-nh64-T256", "ours", 3.0), _row("B64-nh64-T256", "torch.nn.GRU", 1.0)]
    summary = deer_bench.crossover(rows)
    assert [(c["B"], c["nh"]) for c in summary] == [(16, 64), (64, 64)]  # no pair of timings: no entry
    assert summary[0]["ours_faster_from_T"] == 17984
    assert summary[0]["speedup_by_T"][1024] == pytest.approx(2.0) and summary[0]["speedup_by_T"][65536] == 4.0
    assert summary[1]["ours_faster_from_T"] is None


def test_crossover_grid_fits_and_cli_writes_the_summary(tmp_path, capsys):
    cases = deer_bench.crossover_cases(quick=False)
    assert all(c.params["B"] * c.params["nh"] * c.params["T"] <= 2**28 for c in cases)
    assert {c.params["T"] for c in cases} == {256, 1024, 4096, 17984, 65536}
    out = tmp_path / "deer.jsonl"
    deer_bench.main(["--crossover", "--quick", "--warmup", "0", "--rep", "1", "--out", str(out)])
    summary = json.loads((tmp_path / "deer.jsonl.crossover.json").read_text())
    assert [(c["B"], c["nh"], c["mode"]) for c in summary] == [(2, 8, "fwd"), (2, 8, "fwd+bwd")]
    assert all(set(c["speedup_by_T"]) == {"16", "48"} and all(s > 0 for s in c["speedup_by_T"].values())
               for c in summary)
    assert "ours from T=" in capsys.readouterr().out
