"""The training loop under sequence parallelism on real gloo ranks: 2 ranks with parallel.sp_size=2 (plain engine and
DeepSpeed ZeRO-2) and 4 ranks as 2 data-parallel × 2 sequence-parallel (plain, hybrid model) give the loss curve and
eval loss of one process with the same global batch, and a run stopped and resumed from its checkpoint repeats the
uninterrupted run exactly. Layouts that cannot work fail with errors that say why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pflow_dist.dist.parallel_dims import ParallelDims
from pflow_dist.models.flow_lm import FlowLM
from pflow_dist.testing import error_stats, run_distributed
from pflow_dist.train.checkpoint import latest_tag
from pflow_dist.train.config import load_config
from pflow_dist.train.loop import Trainer

pytestmark = pytest.mark.dist

TINY = ["model.vocab_size=32", "model.d_model=24", "model.n_layers=2", "model.n_heads=2", "model.chunk_size=8",
        "model.use_gate=true", "data.seq_len=24", "data.num_kv_pairs=4", "optim.lr=3e-3", "optim.warmup_steps=2",
        "train.steps=4", "train.eval_every=0", "train.eval_batches=1", "train.progress=false", "train.log_every=0",
        "train.device=cpu"]
HYBRID = ["model.n_layers=3", "model.attn_every=2", "model.attn_window=8", "model.attn_n_global=2"]


def _losses(summary: dict) -> list[float]:
    return [r["loss"] for r in summary["history"]["train"]]


def _grad_norms(summary: dict) -> list[float]:
    """Pre-clipping gradient norms: they catch a gradient scaled by a constant (sp_size summed vs averaged), which
    the loss curve alone would not (AdamW's update and norm clipping are invariant to it)."""
    return [r["grad_norm"] for r in summary["history"]["train"]]


def _single_process(extra: list[str]) -> dict:
    return Trainer(load_config(None, TINY + ["parallel.engine=plain", "train.threads=1"] + extra)).train()


def _sp_worker(rank: int, world: int, overrides: list[str], ckpt_dir: str, deepspeed: bool) -> dict:
    if deepspeed:
        os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    straight_trainer = Trainer(load_config(None, overrides))
    dims = straight_trainer.dims
    straight = straight_trainer.train()
    cut = load_config(None, overrides + [f"train.ckpt_dir={ckpt_dir}"])
    Trainer(cut).train(until=2)  # pre-empted after step 2 (checkpoint written by all ranks)
    resumed_trainer = Trainer(cut)
    resumed = resumed_trainer.train()
    params = {k: v.detach().clone() for k, v in resumed_trainer.engine.module.state_dict().items()}
    return {"straight": _losses(straight), "norms": _grad_norms(straight), "resumed": _losses(resumed),
            "eval": (straight["eval_loss"], resumed["eval_loss"]), "resumed_from": resumed_trainer.resumed_from,
            "params": params, "dims": (dims.dp_size, dims.sp_size, dims.dp_rank, dims.sp_rank, dims.sp_ranks)}


def _check(out: list[dict], single: dict, world: int, sp: int, what: str) -> None:
    for rank, r in enumerate(out):
        assert r["dims"] == (world // sp, sp, rank // sp, rank % sp, [rank // sp * sp + i for i in range(sp)])
        assert r["resumed_from"].endswith("step00000002"), r["resumed_from"]
        torch.testing.assert_close(torch.tensor(r["straight"]), torch.tensor(_losses(single)), rtol=1e-5, atol=0,
                                   msg=lambda m, rank=rank: f"rank {rank}, {what} vs one process: {m}")
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(_grad_norms(single)), rtol=1e-5, atol=0,
                                   msg=lambda m, rank=rank: f"rank {rank}, {what} gradient norms: {m}")
        torch.testing.assert_close(r["eval"][0], single["eval_loss"], rtol=1e-5, atol=0)
        assert r["resumed"] == r["straight"], f"rank {rank}: resumed {r['resumed']} vs {r['straight']}"
        assert r["eval"][0] == r["eval"][1]
        for k, v in r["params"].items():  # every rank holds the same weights after the reduced updates
            assert torch.equal(v, out[0]["params"][k]), (rank, k)


def test_plain_two_ranks_sequence_parallel(tmp_path: Path) -> None:
    single = _single_process(["train.micro_batch_size=4"])
    out = run_distributed(_sp_worker, 2, TINY + ["parallel.engine=plain", "parallel.sp_size=2",
                                                 "train.micro_batch_size=4"], str(tmp_path), False, timeout_s=300)
    _check(out, single, 2, 2, "plain sp=2")
    assert latest_tag(tmp_path) == "step00000004"


def test_plain_four_ranks_data_times_sequence_parallel_hybrid(tmp_path: Path) -> None:
    """2 data-parallel slots × 2 sequence shards, attention layers in the model, gradient accumulation."""
    single = _single_process(HYBRID + ["train.micro_batch_size=2", "train.grad_accum=2"])
    out = run_distributed(_sp_worker, 4, TINY + HYBRID + ["parallel.engine=plain", "parallel.sp_size=2",
                                                          "train.micro_batch_size=1", "train.grad_accum=2"],
                          str(tmp_path), False, timeout_s=400)
    _check(out, single, 4, 2, "plain dp=2 x sp=2")


def test_deepspeed_zero2_two_ranks_sequence_parallel(tmp_path: Path) -> None:
    single = _single_process(["train.micro_batch_size=4"])
    out = run_distributed(_sp_worker, 2, TINY + ["parallel.engine=deepspeed", "parallel.zero_stage=2",
                                                 "parallel.sp_size=2", "train.micro_batch_size=4"],
                          str(tmp_path), True, timeout_s=400)
    _check(out, single, 2, 2, "DeepSpeed ZeRO-2 sp=2")


def test_deepspeed_zero3_four_ranks_data_times_sequence_parallel(tmp_path: Path) -> None:
    """ZeRO-3 partitions over all 4 ranks; gradients are summed over sp and averaged over dp=2."""
    single = _single_process(["train.micro_batch_size=4"])
    out = run_distributed(_sp_worker, 4, TINY + ["parallel.engine=deepspeed", "parallel.zero_stage=3",
                                                 "parallel.sp_size=2", "train.micro_batch_size=2"],
                          str(tmp_path), True, timeout_s=500)
    _check(out, single, 4, 2, "DeepSpeed ZeRO-3 dp=2 x sp=2")


def _zero0_grad_worker(rank: int, world: int, overrides: list[str]) -> dict[str, float]:
    """One backward through the DeepSpeed engine; ZeRO-0 leaves the reduced gradients in ``param.grad``."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cfg = load_config(None, overrides)
    tr = Trainer(cfg)
    ref = FlowLM(cfg.model)
    ref.load_state_dict(tr.engine.module.state_dict())
    full = tr.data.batch(0, cfg.train.micro_batch_size * tr.dims.dp_size, "train")
    FlowLM.loss(ref(full["input_ids"]), full["labels"]).backward()
    b = tr._rank_slice(full, cfg.train.micro_batch_size)
    tr.engine.backward(FlowLM.loss(tr.engine.forward(b["input_ids"], tr.sp_group), b["labels"], sp_group=tr.sp_group))
    ref_grads = dict(ref.named_parameters())
    return {n: error_stats(ref_grads[n].grad, p.grad).rms_ratio for n, p in tr.engine.module.named_parameters()}


def test_deepspeed_zero0_gradients_equal_one_process() -> None:
    """The gradients themselves (ZeRO-0, dp=2 × sp=2): the sp sum and the dp mean, not only a loss curve."""
    out = run_distributed(_zero0_grad_worker, 4, TINY + HYBRID + ["parallel.engine=deepspeed", "parallel.zero_stage=0",
                                                                  "parallel.sp_size=2", "train.micro_batch_size=2"],
                          timeout_s=300)
    for rank, errs in enumerate(out):
        assert len(errs) > 20
        bad = {k: v for k, v in errs.items() if not v < 1e-5}
        assert not bad, f"rank {rank}: {bad}"


def _layout_error_worker(rank: int, world: int) -> str:
    try:
        Trainer(load_config(None, TINY + ["parallel.engine=plain", "parallel.sp_size=2", "train.steps=1"]))
    except ValueError as e:
        return str(e)
    return "no error"


def test_world_not_divisible_by_sp_size() -> None:
    for msg in run_distributed(_layout_error_worker, 3):
        assert "world size (3 ranks) is not divisible by parallel.sp_size=2" in msg, msg
    with pytest.raises(ValueError, match=r"world size \(1 ranks\) is not divisible by parallel.sp_size=2"):
        Trainer(load_config(None, TINY + ["parallel.engine=plain", "parallel.sp_size=2"]))  # one process


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"data.seq_len=3 is shorter than parallel.sp_size=4"):
        load_config(None, ["data.seq_len=3", "parallel.sp_size=4"])
    with pytest.raises(ValueError, match="parallel.sp_size must be >= 1"):
        load_config(None, ["parallel.sp_size=0"])
    with pytest.raises(ValueError, match="sp_size must be a positive int"):
        ParallelDims.validate(4, 0)


def _resume_other_sp_worker(rank: int, world: int, ckpt_dir: str) -> str:
    base = TINY + ["parallel.engine=plain", "train.steps=1", f"train.ckpt_dir={ckpt_dir}", "train.micro_batch_size=2"]
    Trainer(load_config(None, base + ["parallel.sp_size=2"])).train()
    try:
        Trainer(load_config(None, base + ["parallel.sp_size=1"]))
    except ValueError as e:
        return str(e)
    return "no error"


def test_resume_refuses_other_sp_size(tmp_path: Path) -> None:
    for msg in run_distributed(_resume_other_sp_worker, 2, str(tmp_path)):
        assert "written with parallel.sp_size=2, this run has 1" in msg, msg


def test_torchrun_plain_sequence_parallel(tmp_path: Path) -> None:
    """The documented command: ``torchrun --nproc-per-node 2 -m pflow_dist.train ... parallel.sp_size=2`` (the plain
    engine joins torchrun's group from the environment) ends at the single process's loss."""
    args = TINY + ["parallel.engine=plain", "parallel.sp_size=2", "train.steps=2", "train.micro_batch_size=4",
                   f"train.out_dir={tmp_path}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "pflow_dist.train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith('{"step"')]
    assert len(summaries) == 1, out[-4000:]  # rank 0 prints the summary
    single = _single_process(["train.steps=2", "train.micro_batch_size=4"])
    torch.testing.assert_close(summaries[0]["loss"], _losses(single)[-1], rtol=1e-5, atol=0)

