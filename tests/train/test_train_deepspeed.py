"""The DeepSpeed path on 2 real gloo ranks (DeepSpeed's CPU accelerator): ZeRO-2 and ZeRO-3 steps give the loss
curve of one plain process with the same global batch, and a run stopped and resumed from its checkpoint repeats the
uninterrupted run exactly (loaded with weights_only=True)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from pflow_dist.testing import run_distributed
from pflow_dist.train.checkpoint import deepspeed_safe_globals, safe_load
from pflow_dist.train.config import load_config
from pflow_dist.train.loop import Trainer

pytestmark = pytest.mark.dist

TINY = ["model.vocab_size=32", "model.d_model=24", "model.n_layers=2", "model.n_heads=2", "model.chunk_size=8",
        "model.use_gate=true", "data.seq_len=24", "data.num_kv_pairs=4", "optim.lr=3e-3", "optim.warmup_steps=2",
        "train.steps=4", "train.eval_every=0", "train.eval_batches=1", "train.progress=false", "train.log_every=0",
        "train.device=cpu"]


def _losses(summary: dict) -> list[float]:
    return [r["loss"] for r in summary["history"]["train"]]


def _ds_worker(rank: int, world_size: int, stage: int, ckpt_dir: str) -> dict:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    base = TINY + ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}", "train.micro_batch_size=2"]
    straight = Trainer(load_config(None, base)).train()
    cut = load_config(None, base + [f"train.ckpt_dir={ckpt_dir}"])
    Trainer(cut).train(until=2)  # pre-empted after step 2 (checkpoint written by all ranks)
    resumed_trainer = Trainer(cut)
    loader = type(resumed_trainer.engine.engine.checkpoint_engine).__name__
    resumed = resumed_trainer.train()
    files = sorted(p.name for p in (Path(ckpt_dir) / "step00000002").iterdir())
    return {"straight": _losses(straight), "resumed": _losses(resumed), "eval": (straight["eval_loss"],
            resumed["eval_loss"]), "resumed_from": resumed_trainer.resumed_from, "files": files,
            "loader": loader}


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_deepspeed_two_ranks_match_one_process_and_resume_exactly(stage: int, tmp_path: Path) -> None:
    plain = Trainer(load_config(None, TINY + ["parallel.engine=plain", "train.micro_batch_size=4",
                                              "train.threads=1"])).train()
    out = run_distributed(_ds_worker, 2, stage, str(tmp_path), timeout_s=240)
    for rank, r in enumerate(out):
        assert r["resumed_from"].endswith("step00000002"), r["resumed_from"]
        assert r["loader"] == "SafeTorchCheckpointEngine"
        assert any(f.startswith("rng_rank") for f in r["files"]), r["files"]
        # same global batch (2 ranks × 2 = 1 process × 4): the same loss curve up to reduction order
        torch.testing.assert_close(torch.tensor(r["straight"]), torch.tensor(_losses(plain)), rtol=1e-5, atol=0,
                                   msg=lambda m, rank=rank: f"rank {rank}, ZeRO-{stage} vs plain: {m}")
        assert r["resumed"] == r["straight"], f"rank {rank}: resumed {r['resumed']} vs {r['straight']}"
        assert r["eval"][0] == r["eval"][1]
    assert out[0]["straight"] == out[1]["straight"]  # every rank logs the all-reduced loss
    _check_weights_only(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def _check_weights_only(ckpt_dir: Path) -> None:
    files = sorted(ckpt_dir.glob("step*/*.pt"))
    assert any("optim_states" in f.name for f in files), files
    for f in files:
        safe_load(f, extra_safe_globals=deepspeed_safe_globals())  # every file DeepSpeed wrote loads weights-only
    victim = next(f for f in files if "optim_states" in f.name)
    state = safe_load(victim, extra_safe_globals=deepspeed_safe_globals())
    state["payload"] = _Evil()
    torch.save(state, victim)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        safe_load(victim, extra_safe_globals=deepspeed_safe_globals())


def test_deepspeed_launcher_two_processes(tmp_path: Path) -> None:
    """The real launcher: ``deepspeed --num_gpus 2 --module pflow_dist.train ...`` (it passes --local_rank=N)."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--module", "pflow_dist.train", *TINY, "train.steps=2", "parallel.engine=deepspeed",
           "parallel.zero_stage=1", "train.micro_batch_size=2", f"train.out_dir={tmp_path}"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    # own process group: on a timeout the launcher's rank processes are killed with it, not left behind
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"deepspeed launcher timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert "--local_rank=1" in out  # the launcher did pass it, and the entry point ignored it
    assert '"step": 2' in out
    assert (tmp_path / "metrics.jsonl").is_file()
