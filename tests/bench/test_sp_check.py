"""pflow-dist sp-check on CPU: real gloo ranks, the sequence-parallel flow against the op on the whole sequence."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from pflow_dist.bench.harness import read_jsonl
from pflow_dist.bench.sp_check import CheckConfig, _rel_rms, check_sequence_parallel
from pflow_dist.cli import app
from pflow_dist.testing import interpreting

pytestmark = pytest.mark.dist


def test_torch_backend_float64_three_ranks_gated():
    cfg = CheckConfig(world=3, tokens=50, batch=2, heads=2, dim=4, dtype="float64", gated=True, chunk_size=8)
    rows = check_sequence_parallel(cfg)
    assert [r.extra["rank"] for r in rows] == [0, 1, 2] and [r.shapes["local"][1] for r in rows] == [17, 17, 16]
    assert set(rows[0].extra["errors"]) == {"o", "dq", "dk", "dv", "dbeta", "dg"}
    assert "final_state" in rows[2].extra["errors"] and "final_state" not in rows[1].extra["errors"]
    assert all(r.extra["ok"] and r.extra["worst"] < 1e-10 for r in rows), [r.extra["errors"] for r in rows]


@pytest.mark.parametrize("op,keys", [("scan", {"o", "da", "db", "dinitial_state"}),
                                     ("deer", {"o", "dx", "dparam0", "dparam1", "dparam2", "dparam3"})])
def test_scan_and_deer_float64_two_ranks(op, keys):
    # scan: the initial state is replicated, its gradient whole on every rank; deer: the GRU's parameter gradients
    # are summed over the ranks before the comparison
    rows = check_sequence_parallel(CheckConfig(op=op, world=2, tokens=37, batch=2, heads=1, dim=3, dtype="float64"))
    assert set(rows[0].extra["errors"]) == keys and set(rows[1].extra["errors"]) == keys | {"final_state"}
    assert rows[0].case.startswith(f"{op}-P2-T37") and [r.shapes["local"][1] for r in rows] == [19, 18]
    assert all(r.extra["ok"] and r.extra["worst"] < 1e-10 for r in rows), [r.extra["errors"] for r in rows]


@pytest.mark.skipif(not interpreting(), reason="the Triton kernels on CPU ranks need the interpreter")
def test_triton_backend_float32(tmp_path):
    res = CliRunner().invoke(app, ["sp-check", "--world", "2", "--tokens", "40", "--heads", "1", "--dim", "16",
                                   "--backend", "triton", "--gated", "--out", str(tmp_path / "c.jsonl")])
    assert res.exit_code == 0, res.output
    assert "rank 0 (20 tokens): o " in res.output and "rank 1 (20 tokens)" in res.output
    rows = read_jsonl(tmp_path / "c.jsonl")
    assert [r["extra"]["ok"] for r in rows] == [True, True] and max(r["extra"]["worst"] for r in rows) < 1e-4


def test_relative_rms_and_bad_input():
    ref = torch.tensor([3.0, 4.0])
    assert _rel_rms(ref, ref) == 0.0 and _rel_rms(ref, torch.tensor([3.0, 3.0])) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="shape mismatch"):
        _rel_rms(ref, torch.zeros(3))
    with pytest.raises(ValueError, match="tokens >= world"):
        CheckConfig(world=4, tokens=3)
    with pytest.raises(ValueError, match="deer: float32 or float64"):
        CheckConfig(op="deer", dtype="bfloat16")
    with pytest.raises(ValueError, match="gated is a flow option"):
        CheckConfig(op="scan", gated=True)
    with pytest.raises(ValueError, match="takes heads=1"):
        CheckConfig(op="deer", heads=2)
    with pytest.raises(ValueError, match="op must be one of"):
        CheckConfig(op="gru")
    with pytest.raises(ValueError, match="need 999 GPUs"):
        CheckConfig(world=999, tokens=4096, device="cuda")
    res = CliRunner().invoke(app, ["sp-check", "--dtype", "int8"])
    assert res.exit_code != 0 and "expected one of" in res.output
