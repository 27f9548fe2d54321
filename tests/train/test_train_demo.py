"""The CPU demo really learns: a shortened run of run_demo ends well above chance on MQAR and writes its plot."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pflow_dist.demo import run_demo


def test_short_demo_learns_recall(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    m = run_demo(steps=150, out_dir=tmp_path, progress=True, console=console)
    assert m["steps"] == 150
    assert m["final_loss"] < m["first_loss"] - 1.0, (m["first_loss"], m["final_loss"])
    assert m["eval_acc"] > 2.5 * m["chance_acc"], m["eval_acc"]
    evals = m["history"]["eval"]
    assert [e["step"] for e in evals] == [50, 100, 150]
    assert evals[-1]["eval_acc"] > evals[0]["eval_acc"]
    png = Path(m["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "metrics.jsonl").is_file()
    text = console.export_text()
    assert "eval acc" in text and "chance" in text
