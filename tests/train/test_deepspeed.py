"""The DeepSpeed path on 2 real gloo ranks (DeepSpeed's CPU accelerator): ZeRO-2 and ZeRO-3 steps give the loss
curve of one plain process with the same global batch, and a run stopped and resumed from its checkpoint repeats the
uninterrupted run exactly (loaded with weights_only=True)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pflow_dist.testing import run_distributed
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
    resumed = resumed_trainer.train()
    files = sorted(p.name for p in (Path(ckpt_dir) / "step00000002").iterdir())
    return {"straight": _losses(straight), "resumed": _losses(resumed), "eval": (straight["eval_loss"],
            resumed["eval_loss"]), "resumed_from": resumed_trainer.resumed_from, "files": files}


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_deepspeed_two_ranks_match_one_process_and_resume_exactly(stage: int, tmp_path: Path) -> None:
    plain = Trainer(load_config(None, TINY + ["parallel.engine=plain", "train.micro_batch_size=4",
                                              "train.threads=1"])).train()
    out = run_distributed(_ds_worker, 2, stage, str(tmp_path), timeout_s=240)
    for rank, r in enumerate(out):
        assert r["resumed_from"].endswith("step00000002"), r["resumed_from"]
        assert any(f.startswith("rng_rank") for f in r["files"]), r["files"]
        # same global batch (2 ranks × 2 = 1 process × 4): the same loss curve up to reduction order
        torch.testing.assert_close(torch.tensor(r["straight"]), torch.tensor(_losses(plain)), rtol=1e-5, atol=0,
                                   msg=lambda m, rank=rank: f"rank {rank}, ZeRO-{stage} vs plain: {m}")
        assert r["resumed"] == r["straight"], f"rank {rank}: resumed {r['resumed']} vs {r['straight']}"
        assert r["eval"][0] == r["eval"][1]
    assert out[0]["straight"] == out[1]["straight"]  # every rank logs the all-reduced loss
