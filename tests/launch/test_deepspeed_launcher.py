"""The DeepSpeed launcher shim: command construction, hostfile validation with line numbers, and the CLI dry run."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pflow_dist.cli import app
from pflow_dist.launch.deepspeed import DeepSpeedLaunch, build_command
from pflow_dist.launch.hostfile import Host, parse_hostfile


@pytest.fixture
def config(tmp_path) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text("train: {steps: 2}\n")
    return p


def test_local_command(config):
    cmd = build_command(DeepSpeedLaunch(config=config, num_gpus=2, master_port=29511, overrides=["train.steps=3"]))
    assert cmd == ["deepspeed", "--num_gpus=2", "--master_port=29511", "--module", "pflow_dist.train", "--config",
                   str(config), "train.steps=3"]


def test_multinode_command(config, tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# two nodes\nnode-0 slots=8\nnode-1 slots=8  # second\n")
    assert parse_hostfile(hf) == [Host("node-0", 8), Host("node-1", 8)]
    cmd = build_command(DeepSpeedLaunch(config=config, num_gpus=8, hostfile=hf, master_addr="node-0", no_ssh=True,
                                        node_rank=1))
    assert f"--hostfile={hf}" in cmd and "--num_nodes=2" in cmd and "--no_ssh" in cmd and "--node_rank=1" in cmd
    assert cmd.index("--no_ssh") < cmd.index("--module")


@pytest.mark.parametrize("text, match", [
    ("node-0 slots=8\nnode-1 8\n", r"hosts:2: expected 'hostname slots=N', got 'node-1 8'"),
    ("node-0 slots=8\nnode-0 slots=8\n", r"hosts:2: host node-0 is listed twice"),
    ("node-0 slots=0\n", r"hosts:1: node-0 has slots=0"),
    ("# nothing\n", r"no host listed"),
])
def test_bad_hostfiles(tmp_path, text, match):
    hf = tmp_path / "hosts"
    hf.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_hostfile(hf)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_gpus=0), ValueError, "num_gpus must be >= 1"),
    (dict(num_nodes=2), ValueError, "needs a hostfile"),
    (dict(no_ssh=True), ValueError, "give --node-rank and --master-addr"),
    (dict(overrides=["steps"]), ValueError, "key=value"),
    (dict(hostfile=Path("/nonexistent/hosts")), FileNotFoundError, "hostfile /nonexistent/hosts does not exist"),
])
def test_bad_launches(config, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_command(DeepSpeedLaunch(config=config, **kwargs))


def test_slots_and_nodes_checked_against_hostfile(config, tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("a slots=4\n")
    with pytest.raises(ValueError, match=r"num_gpus=8 exceeds the slots of \['a'\]"):
        build_command(DeepSpeedLaunch(config=config, num_gpus=8, hostfile=hf))
    with pytest.raises(ValueError, match="num_nodes=2 but the hostfile lists 1 host"):
        build_command(DeepSpeedLaunch(config=config, num_gpus=1, num_nodes=2, hostfile=hf))


def test_cli_dry_run_and_missing_config(config):
    runner = CliRunner()
    res = runner.invoke(app, ["launch", "deepspeed", "--config", str(config), "--num-gpus", "2", "--dry-run",
                              "train.steps=5"])
    assert res.exit_code == 0, res.output
    assert "deepspeed --num_gpus=2 --master_port=29500 --module pflow_dist.train" in res.output
    assert "train.steps=5" in res.output
    res = runner.invoke(app, ["launch", "deepspeed", "--config", "/nonexistent.yaml", "--dry-run"])
    assert res.exit_code != 0 and "does not exist" in res.output


def test_launch_runs_two_processes_on_cpu(tmp_path, monkeypatch):
    """End to end: pflow-dist launch deepspeed starts the real launcher, which runs 2 training ranks (gloo)."""
    import json
    import os
    import sys

    from pflow_dist.launch.deepspeed import free_port

    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "model: {vocab_size: 32, d_model: 24, n_layers: 1, n_heads: 2, chunk_size: 8}\n"
        "data: {seq_len: 24, num_kv_pairs: 4}\n"
        "parallel: {engine: deepspeed, zero_stage: 2}\n"
        f"train: {{steps: 3, eval_every: 0, eval_batches: 1, progress: false, log_every: 1, device: cpu, "
        f"micro_batch_size: 2, out_dir: '{tmp_path / 'run'}', ckpt_dir: '{tmp_path / 'ckpt'}'}}\n"
    )
    res = CliRunner().invoke(app, ["launch", "deepspeed", "--config", str(cfg), "--num-gpus", "2",
                                   "--master-port", str(free_port()), "optim.lr=0.003"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("kind") == "train"] == [1, 2, 3]
    shards = sorted(p.name for p in (tmp_path / "ckpt").rglob("*zero_pp_rank_*optim_states.pt"))
    assert len(shards) == 2, shards  # ZeRO-2 optimizer state sharded over the 2 launched ranks


def test_cli_launch_ray_fails_fast_on_unreachable_address(config):
    import time

    t0 = time.monotonic()
    res = CliRunner().invoke(app, ["launch", "ray", "--config", str(config), "--address", "127.0.0.1:1",
                                   "--connect-timeout", "2"])
    assert res.exit_code != 0 and "127.0.0.1:1" in res.output
    assert time.monotonic() - t0 < 30
