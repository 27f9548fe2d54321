"""The benchmark harness: timing stats, JSONL rows with the required keys, pairing of ours and peers into ratios,
failures of an implementation recorded as rows, and the CLI on a quick CPU run."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from pflow_dist.bench import Bench, Case, Impl, measure, ratios, read_jsonl, run_bench, write_jsonl
from pflow_dist.cli import app

REQUIRED = {"bench", "case", "mode", "impl", "device", "median_ms", "peak_mem_bytes", "versions", "command", "dtype",
            "shapes", "status"}


def _toy_bench(fail_peer: bool = False) -> Bench:
    def inputs(case, dtype, device):
        return {"x": torch.randn(case.params["n"], dtype=dtype, device=device)}

    def slow(inp):
        y = inp["x"]
        for _ in range(50):
            y = torch.sin(y)
        return (y,)

    def peer(inp):
        if fail_peer:
            raise RuntimeError("peer refuses this shape\nsecond line")
        return (inp["x"] * 1.0,)

    return Bench(
        name="toy", description="toy", cases=lambda quick: [Case("n64", {"n": 64}), Case("n128", {"n": 128})],
        make_inputs=inputs, impls=[Impl("ours", lambda inp: (inp["x"] * 1.0,)), Impl("peer", peer),
                                   Impl("absent", peer, unavailable=lambda d: "not installed")],
        grad_inputs=("x",), default_dtype=torch.float32, reference=lambda inp: inp["x"].double(),
    )


def test_measure_reports_ordered_stats():
    t = measure(lambda: torch.randn(1000).sum(), torch.device("cpu"), warmup=1, rep=5)
    assert t.n_rep == 5 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms and t.peak_mem_bytes is None
    with pytest.raises(ValueError, match="rep >= 1"):
        measure(lambda: None, torch.device("cpu"), rep=0)


def test_run_bench_rows_and_ratios(tmp_path):
    rows = run_bench(_toy_bench(), device=torch.device("cpu"), warmup=1, rep=3)
    assert len(rows) == 2 * 3 * 2  # cases × impls × modes
    ok = [r for r in rows if r.status == "ok"]
    assert {r.impl for r in ok} == {"ours", "peer"} and all(r.median_ms > 0 for r in ok)
    assert all(r.extra["rel_err"] == 0.0 for r in ok)
    absent = [r for r in rows if r.impl == "absent"]
    assert all(r.status == "unavailable" and r.error == "not installed" for r in absent)
    path = write_jsonl(rows, tmp_path / "sub" / "toy.jsonl")
    back = read_jsonl(path)
    assert len(back) == len(rows) and all(REQUIRED <= set(r) for r in back)
    pairs = ratios(back)
    assert {(p["case"], p["mode"], p["peer"]) for p in pairs} >= {("n64", "fwd", "peer"), ("n128", "fwd+bwd", "peer")}
    for p in pairs:
        if p["peer"] == "peer":
            assert p["speedup"] == pytest.approx(p["peer_ms"] / p["ours_ms"])
        else:
            assert p["speedup"] is None


def test_impl_with_its_own_reference():
    # an implementation of another function (here 2x) is checked against its own reference, not the bench's
    bench = _toy_bench()
    twice = Impl("twice", lambda inp: (inp["x"] * 2.0,), reference=lambda inp: 2.0 * inp["x"].double())
    bench = dataclasses.replace(bench, impls=[*bench.impls, twice])
    rows = run_bench(bench, device=torch.device("cpu"), warmup=0, rep=1, impl_filter=["ours", "twice"])
    assert {r.impl for r in rows} == {"ours", "twice"} and all(r.extra["rel_err"] == 0.0 for r in rows)
    wrong = dataclasses.replace(twice, reference=lambda inp: inp["x"].double())
    bench = dataclasses.replace(bench, impls=[wrong])
    assert all(r.extra["rel_err"] > 0.5 for r in run_bench(bench, device=torch.device("cpu"), warmup=0, rep=1))


def test_failing_impl_becomes_an_error_row():
    rows = run_bench(_toy_bench(fail_peer=True), device=torch.device("cpu"), warmup=0, rep=1, impl_filter=["peer"])
    assert all(r.status == "error" and r.error == "RuntimeError: peer refuses this shape" for r in rows)


def test_filters_are_validated():
    with pytest.raises(ValueError, match=r"unknown case\(s\) \['n7'\]"):
        run_bench(_toy_bench(), device=torch.device("cpu"), case_filter=["n7"])
    with pytest.raises(ValueError, match="has modes"):
        run_bench(_toy_bench(), device=torch.device("cpu"), modes=["bwd"])
    with pytest.raises(ValueError, match="no implementation left"):
        run_bench(_toy_bench(), device=torch.device("cpu"), impl_filter=["nobody"])


def test_cli_bench_list_and_quick_run(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--list"])
    assert res.exit_code == 0 and "gru" in res.output and "flow" in res.output and "sp " in res.output
    res = runner.invoke(app, ["bench", "sp"])  # multi-process: points to the command that runs it
    assert res.exit_code != 0 and "pflow-dist scale" in res.output
    out = tmp_path / "gru.jsonl"
    res = runner.invoke(app, ["bench", "gru", "--quick", "--case", "B2-nh8-T64", "--warmup", "0", "--rep", "2",
                              "--device", "cpu", "--out", str(out)])  # the 1e-5 bound below is a CPU float32 one
    assert res.exit_code == 0, res.output
    rows = read_jsonl(out)
    assert {r["impl"] for r in rows} == {"ours", "torch.nn.GRU"} and {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["status"] == "ok" and r["extra"]["rel_err"] < 1e-5 for r in rows)
    assert "speedup" in res.output
    res = runner.invoke(app, ["bench", "nope"])
    assert res.exit_code != 0 and "unknown benchmark 'nope'" in res.output


def test_cli_info_json():
    res = CliRunner().invoke(app, ["info", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["packages"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert {"cuda_devices", "triton_backend", "ray_available", "deepspeed_available"} <= set(data)


def test_module_entry_without_typer(tmp_path):
    from pflow_dist.bench.__main__ import main

    out = tmp_path / "g.jsonl"
    assert main(["gru", "--quick", "--case", "B2-nh8-T64", "--mode", "fwd", "--warmup", "0", "--rep", "1",
                 "--out", str(out)]) == 0
    assert {r["impl"] for r in read_jsonl(out)} == {"ours", "torch.nn.GRU"}


def test_scan_bench_warp_peer_refuses_what_it_cannot_run(tmp_path):
    """accelerated-scan's CUDA warp kernel: an 'unavailable' row with the reason where it cannot run (no package,
    no CUDA, no toolkit), and a named error for the lengths it does not take (checked before any import)."""
    from pflow_dist.bench import scan as scan_bench

    rows = run_bench(scan_bench.BENCH, device=torch.device("cpu"), quick=True, case_filter=["B4-T1024-N8"],
                     impl_filter=["ours", "accelerated-scan-warp"], modes=("fwd",), warmup=0, rep=1)
    warp = [r for r in rows if r.impl == "accelerated-scan-warp"]
    assert warp and all(r.status == "unavailable" and r.error for r in warp)
    assert all(r.status == "ok" for r in rows if r.impl == "ours")
    for T in (3000, 2**17):
        with pytest.raises(ValueError, match=f"power-of-two T <= 65536, got T={T}"):
            scan_bench._accel_warp({"a": torch.empty(1, T, 1)})


def test_scan_bench_sp_rows_and_verify(device):
    """ours-sp (sp_scan's multi-rank path on a one-rank group) gives the scan's values and gradients, in rows and in
    --verify with every implementation; no process group is left behind."""
    from pflow_dist.bench import scan as scan_bench

    rows = run_bench(scan_bench.BENCH, device=device, quick=True, case_filter=["B1-T3000-N5"],
                     impl_filter=["ours-sp"], warmup=0, rep=1)
    assert {r.mode for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r.status == "ok" and r.extra["rel_err"] < 1e-5 for r in rows), [r.extra for r in rows]
    scan_bench.verify_rows(rows, device, True, ["B1-T3000-N5"])
    err = rows[0].extra["rel_err_vs_torch"]
    assert set(err) == {"h", "da", "db"} and max(err.values()) < 1e-5, err
    assert not torch.distributed.is_initialized()
