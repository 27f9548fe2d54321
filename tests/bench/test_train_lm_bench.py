"""``python -m pflow_dist.bench.train_lm``: a real one-process DeepSpeed ZeRO-2 run (no launcher, CPU accelerator)
through the module entry writes a well-formed row whose loss curve is the plain loop's on the same config; the
configs of ours and fla differ only in the backend; configs fla cannot run, a missing fla, and a checkpoint directory
in the config are handled before anything trains."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pflow_dist.bench.harness import BenchRow, read_jsonl
from pflow_dist.bench.train_lm import build_configs, format_table, main, run_train_bench
from pflow_dist.train.loop import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.chunk_size=16", "model.backend=torch",
        "data.max_bytes=200000", "train.device=cpu", "train.eval_batches=1", "train.log_every=0",
        "optim.warmup_steps=2", "optim.lr=3e-3"]
HAS_FLA = importlib.util.find_spec("fla") is not None


def test_module_entry_trains_with_deepspeed_in_one_plain_process(tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    args = ["--config", str(CONFIGS / "models" / "flow_lm_1m.yaml"), "--impl", "ours", "--steps", "3",
            "--warmup-steps", "2", "--seq-len", "48", "--micro-batch", "2", *TINY]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}  # no launcher
    env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "pflow_dist.bench.train_lm", *args, "train.threads=1",
                           "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = read_jsonl(out)
    e = row["extra"]
    assert (row["bench"], row["mode"], row["impl"], row["status"], row["dtype"]) == \
        ("train_lm", "train", "ours", "ok", "fp32")
    assert row["case"] == "L2-D32-H2-K16-R1-T48-mb2-deepspeed2"
    assert e["config"]["parallel"] == {"engine": "deepspeed", "zero_stage": 2, "sp_size": 1}
    assert e["config"]["model"]["backend"] == "torch" and e["config"]["train"]["ckpt_dir"] is None
    assert row["shapes"] == {"input_ids": [2, 48]} and row["peak_mem_bytes"] is None  # CPU: no CUDA peak
    assert "pflow_dist.bench.train_lm" in row["command"] and "deepspeed" in row["versions"]
    # 5 steps, the last 3 timed
    assert row["n_rep"] == e["timed_steps"] == 3 and e["warmup_steps"] == 2 and len(e["losses"]) == 5
    assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert e["tokens_per_step"] == 2 * 48
    assert math.isclose(e["tokens_per_s"], 3 * 96 / e["timed_s"], rel_tol=1e-9)
    assert 3 * row["p20_ms"] / 1e3 - 1e-6 <= e["timed_s"] <= 3 * row["p80_ms"] / 1e3 + 1e-6  # sum of the 3 steps
    assert e["mfu"] is None and e["peak_rss_mb"] > 0 and math.isfinite(e["eval_loss"])
    assert e["final_loss"] == pytest.approx(e["losses"][-1], abs=1e-5)
    assert e["first_loss"] == pytest.approx(math.log(256), abs=0.1)  # byte text from a small init
    # the bench trains with the one loop: the plain engine on the same config gives the same loss curve
    cfg = build_configs(str(CONFIGS / "models" / "flow_lm_1m.yaml"), ["ours"], 3, 2, 48, 2,
                        TINY + ["parallel.engine=plain"])["ours"]
    plain = [r["loss"] for r in Trainer(cfg).train()["history"]["train"]]
    torch.testing.assert_close(torch.tensor(e["losses"]), torch.tensor(plain), rtol=2e-5, atol=1e-5)
    assert "ours" in proc.stdout and "tok/s" in proc.stdout


_RELEASE_SCRIPT = """
import gc, sys
from pflow_dist.bench.train_lm import build_configs, run_train_bench
from pflow_dist.models.flow_lm import FlowLM
cfgs = build_configs(None, ["ours"], 1, 1, 32, 1, sys.argv[1:])
cfg = cfgs["ours"]
rows = run_train_bench({"ours": cfg, "ours-again": cfg}, 1)
gc.collect()
print("STATUS", [r.status for r in rows], "LIVE", sum(isinstance(o, FlowLM) for o in gc.get_objects()))
"""


def test_each_deepspeed_model_is_freed_after_its_run(tmp_path: Path) -> None:
    # ZeRO-2 hooks keep a DeepSpeed model alive past `del` unless the engine is destroyed (Trainer.close)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", _RELEASE_SCRIPT, *TINY, "model.n_layers=1", "train.threads=1"],
                          env={**env, "DS_ACCELERATOR": "cpu"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "STATUS ['ok', 'ok'] LIVE 0" in proc.stdout, proc.stdout[-2000:]


def test_configs_of_ours_and_fla_differ_only_in_the_backend() -> None:
    # text_125m_zero2.yaml names a checkpoint directory: a benchmark must neither resume from it nor write to it
    cfgs = build_configs(str(CONFIGS / "text_125m_zero2.yaml"), ["ours", "fla"], 200, 20, 8192, 2,
                         ["model.rank=1", "model.use_gate=false"])
    ours, fla = cfgs["ours"].to_dict(), cfgs["fla"].to_dict()
    assert (ours["model"]["backend"], fla["model"]["backend"]) == ("auto", "fla")
    ours["model"].pop("backend"), fla["model"].pop("backend")
    assert ours == fla
    assert ours["train"]["steps"] == 220 and ours["train"]["micro_batch_size"] == 2
    assert ours["train"]["ckpt_dir"] is None and ours["train"]["out_dir"] is None
    assert ours["data"]["seq_len"] == 8192 and ours["data"]["name"] == "text"
    assert ours["parallel"] == {"engine": "deepspeed", "zero_stage": 2, "sp_size": 1}
    assert (ours["model"]["rank"], ours["model"]["use_gate"], ours["model"]["d_model"]) == (1, False, 768)


@pytest.mark.parametrize(("overrides", "match"), [
    ([], r"rank-1 non-gated delta rule .* got model\.rank=2"),  # the 125M preset is rank 2, gated
    (["model.rank=1"], r"got model\.use_gate=true"),
    (["model.rank=1", "model.use_gate=false", "model.chunk_size=128"], r"got model\.chunk_size=128"),
], ids=["rank2", "gated", "chunk128"])
def test_configs_fla_cannot_run_are_refused_before_training(overrides, match, capsys) -> None:
    with pytest.raises(ValueError, match=match):
        build_configs(str(CONFIGS / "models" / "flow_lm_125m.yaml"), ["ours", "fla"], 1, 0, 64, 1, overrides)
    with pytest.raises(SystemExit) as exc:  # the entry: an argparse error, nothing trained
        main(["--config", str(CONFIGS / "models" / "flow_lm_125m.yaml"), "--impl", "ours", "--impl", "fla",
              *overrides])
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert "rank-1 non-gated" in err.err and "done ours" not in err.out


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown or no implementation\(s\) \['flash'\]"):
        build_configs(None, ["ours", "flash"], 1, 0, None, None, [])
    with pytest.raises(ValueError, match="each implementation once"):
        build_configs(None, ["ours", "ours"], 1, 0, None, None, [])
    with pytest.raises(ValueError, match=r"--steps >= 1"):
        build_configs(None, ["ours"], 0, 0, None, None, [])
    with pytest.raises(ValueError, match="run fla with --impl fla"):
        build_configs(None, ["ours"], 1, 0, None, None, ["model.backend=fla"])


@pytest.mark.skipif(HAS_FLA, reason="fla-core is installed here")
def test_missing_fla_is_a_clear_error_before_training(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--impl", "ours", "--impl", "fla", "model.rank=1", "train.device=cpu", *TINY[:4]])
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert "needs fla-core (pip install fla-core==0.6.0)" in err.err and "done ours" not in err.out


def _row(impl: str, tok_s: float | None, status: str = "ok", error: str | None = None) -> BenchRow:
    return BenchRow(bench="train_lm", case="c", mode="train", impl=impl, device="dev", dtype="bf16", shapes={},
                    median_ms=1.0 if tok_s else None, p20_ms=None, p80_ms=None, n_rep=1,
                    peak_mem_bytes=3 * 2**30 if tok_s else None, versions={}, command="", status=status, error=error,
                    extra={"tokens_per_s": tok_s, "mfu": 0.25} if tok_s else {})


def test_table_reports_the_throughput_ratio_and_errors() -> None:
    text = format_table([_row("ours", 300.0), _row("fla", 200.0)])
    assert "throughput ratio ours/fla: 1.500x" in text and "25.0%" in text and "3.00" in text
    text = format_table([_row("ours", 300.0), _row("fla", None, "error", "OutOfMemoryError: CUDA out of memory")])
    assert "ratio" not in text and "fla: OutOfMemoryError: CUDA out of memory" in text


def test_profile_records_the_last_warmup_steps(tmp_path: Path) -> None:
    """--profile writes each implementation's operator tables from 3 post-compilation warm-up steps; the timed steps
    are not profiled (the row is the same kind of row); too few warm-up steps is a usage error."""
    cfg = build_configs(str(CONFIGS / "models" / "flow_lm_1m.yaml"), ["ours"], 2, 5, 32, 1,
                        TINY + ["parallel.engine=plain", "train.threads=1"])
    (row,) = run_train_bench(cfg, 5, profile_dir=tmp_path / "prof")
    assert row.status == "ok" and row.n_rep == 2 and len(row.extra["losses"]) == 7
    text = (tmp_path / "prof" / "ours.txt").read_text()
    assert "aten::mm" in text and "Self CPU time total" in text
    steps = [line.split() for line in text.splitlines() if line.strip().startswith("ProfilerStep*")]
    assert steps and all(cols[-1] == "3" for cols in steps), steps  # 3 recorded steps, in both tables
    with pytest.raises(SystemExit):
        main(["--impl", "ours", "--warmup-steps", "4", "--profile", str(tmp_path / "p2"), *TINY])
