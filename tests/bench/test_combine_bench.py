"""``python -m pflow_dist.bench combine``: one 2-rank gloo run through the module entry writes a row per algorithm and
mode with the measured times, the world size and the traffic; bad world sizes are refused."""

from __future__ import annotations

import pytest

from pflow_dist.bench.__main__ import main
from pflow_dist.bench.combine import run_combine_bench
from pflow_dist.bench.harness import read_jsonl


def test_module_entry_writes_rows(tmp_path):
    out = tmp_path / "combine.jsonl"
    assert main(["combine", "--world", "2", "--shape", "1", "2", "4", "3", "--warmup", "0", "--rep", "2",
                 "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert {(r["impl"], r["mode"]) for r in rows} == {(a, m) for a in ("allgather", "doubling")
                                                      for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["bench"] == "combine" and r["case"] == "P2-B1-H2-K4-V3" and r["status"] == "ok"
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["n_rep"] == 2
        assert r["extra"]["world_size"] == 2 and r["extra"]["bytes_in_per_rank"] == 4 * 2 * 4 * (4 + 3)
        assert isinstance(r["command"], str) and r["command"]  # the running process: pytest or its xdist worker


def test_world_sizes_are_validated():
    with pytest.raises(ValueError, match=r"world sizes must be >= 2, got \[1, 2\]"):
        run_combine_bench([1, 2])
