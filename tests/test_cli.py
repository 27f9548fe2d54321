"""The main CLI entry points run end to end on tiny settings: demo (trains and writes its plot) and train."""

from typer.testing import CliRunner

from pflow_dist.cli import app


def test_demo_trains_and_plots(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--steps", "3", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "recall accuracy" in res.output and (tmp_path / "demo_mqar.png").stat().st_size > 1000


def test_train_print_config_and_bad_override():
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--print-config", "train.steps=7"])
    assert res.exit_code == 0, res.output
    assert '"steps": 7' in res.output
    res = runner.invoke(app, ["train", "--print-config", "train.nonexistent=1"])
    assert res.exit_code != 0
