"""``pflow-dist deer-train`` on a small CPU run: DEER and the sequential GRU from the same weights, progress, metrics,
plot and a summary; bad options are named."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pflow_dist.cli import app
from pflow_dist.deer_train import run_deer_train


def test_deer_train_small_run_writes_metrics_plot_and_matching_curves(tmp_path):
    res = CliRunner().invoke(app, ["deer-train", "--seq-len", "48", "--steps", "6", "--batch", "8", "--hidden", "8",
                                   "--device", "cpu", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    deer = [r for r in rows if r["mode"] == "deer"]
    seq = [r for r in rows if r["mode"] == "sequential"]
    assert [r["step"] for r in deer] == [r["step"] for r in seq] == list(range(1, 7))
    assert all(1 <= r["iterations"][0] <= 49 for r in deer) and all(r["iterations"] == [] for r in seq)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(deer, seq)) < 1e-4  # same weights, same batches
    assert (tmp_path / "deer_train.png").stat().st_size > 0
    assert "largest step-wise loss gap" in res.output and "held-out accuracy" in res.output


def test_deer_train_counts_sequential_fallbacks(tmp_path):
    """``--max-iter 1``: no solve converges, every DEER step falls back to the sequential GRU (counted in the metrics
    and the summary) and the curve then equals the sequential run's; ``--no-fallback`` stops with the solver's error."""
    args = ["deer-train", "--seq-len", "48", "--steps", "3", "--batch", "8", "--hidden", "8", "--device", "cpu",
            "--max-iter", "1", "--out-dir", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["fallbacks"] for r in rows if r["mode"] == "deer"] == [1, 1, 1]
    assert "3 step(s) fell back to the sequential GRU" in res.output
    res = CliRunner().invoke(app, [*args, "--no-fallback"])
    assert res.exit_code != 0 and "did not converge in 1 iterations" in str(res.exception)


def test_deer_train_rejects_bad_options(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["deer-train", "--method", "adam", "--out-dir", str(tmp_path)])
    assert res.exit_code != 0 and "method must be quasi, newton or damped" in res.output
    res = runner.invoke(app, ["deer-train", "--seq-len", "1", "--out-dir", str(tmp_path)])
    assert res.exit_code != 0 and "seq-len" in res.output
    res = runner.invoke(app, ["deer-train", "--device", "tpu", "--out-dir", str(tmp_path)])
    assert res.exit_code != 0 and "device must be auto, cpu or cuda" in res.output
    with pytest.raises(ValueError, match="method must be quasi, newton or damped, got 'adam'"):
        run_deer_train(seq_len=48, steps=1, method="adam", out_dir=tmp_path)
