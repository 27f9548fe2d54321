"""The training loop on the plain (single-process torch) engine: exact resume, gradient accumulation equals a larger
micro-batch, checkpoints refuse arbitrary pickles, the command-line entry point runs."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pflow_dist.train.checkpoint import latest_tag, load_plain
from pflow_dist.train.config import load_config
from pflow_dist.train.loop import Trainer

TINY = ["parallel.engine=plain", "model.vocab_size=32", "model.d_model=24", "model.n_layers=2", "model.n_heads=2",
        "model.chunk_size=8", "model.use_gate=true", "data.seq_len=24", "data.num_kv_pairs=4",
        "optim.lr=3e-3", "optim.warmup_steps=2", "train.micro_batch_size=4", "train.eval_every=3",
        "train.eval_batches=1", "train.progress=false", "train.log_every=0", "train.device=cpu", "train.threads=1"]


def _losses(summary: dict) -> list[float]:
    return [r["loss"] for r in summary["history"]["train"]]


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def test_resume_is_exact(tmp_path: Path) -> None:
    cfg = load_config(None, TINY + ["train.steps=6"])
    straight = Trainer(cfg)
    ref = straight.train()

    cut = load_config(None, TINY + ["train.steps=6", f"train.ckpt_dir={tmp_path}"])
    first = Trainer(cut)
    first.train(until=4)  # stops and checkpoints at step 4 (a pre-empted job)
    assert latest_tag(tmp_path) == "step00000004"
    second = Trainer(cut)  # a fresh process would do the same: resume from `latest`
    assert second.step == 4 and second.resumed_from.endswith("step00000004")
    out = second.train()
    assert _losses(out) == _losses(ref), "loss curve after resume differs from the uninterrupted run"
    assert out["eval_loss"] == ref["eval_loss"]
    for k, v in _params(straight).items():
        assert torch.equal(v, _params(second)[k]), k


def test_grad_accumulation_equals_larger_micro_batch() -> None:
    big = Trainer(load_config(None, TINY + ["train.steps=3", "train.micro_batch_size=8"])).train()
    accum = Trainer(load_config(None, TINY + ["train.steps=3", "train.micro_batch_size=2",
                                              "train.grad_accum=4"])).train()
    torch.testing.assert_close(torch.tensor(_losses(accum)), torch.tensor(_losses(big)), rtol=2e-5, atol=0)


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_checkpoint_load_refuses_arbitrary_pickle(tmp_path: Path) -> None:
    cfg = load_config(None, TINY + ["train.steps=1", f"train.ckpt_dir={tmp_path}"])
    t = Trainer(cfg)
    t.train()
    state_file = tmp_path / latest_tag(tmp_path) / "state.pt"
    state = torch.load(state_file, weights_only=True)  # what we wrote is weights-only loadable
    state["client"]["payload"] = _Evil()
    torch.save(state, state_file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_plain(tmp_path, t.engine.module, t.engine.optimizer, t.engine.scheduler)


def test_resume_refuses_other_world_size(tmp_path: Path) -> None:
    cfg = load_config(None, TINY + ["train.steps=1", f"train.ckpt_dir={tmp_path}"])
    Trainer(cfg).train()
    state_file = tmp_path / latest_tag(tmp_path) / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["client"]["world_size"] = 2
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="written by 2 ranks"):
        Trainer(cfg)


def test_module_entry_point_runs(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "pflow_dist.train", "--config", str(Path(__file__).resolve().parents[2] /
            "configs" / "demo_mqar.yaml"), "--local_rank=0", "train.steps=2", "train.eval_batches=1",
            "train.progress=false", f"train.out_dir={tmp_path}"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"step": 2' in res.stdout
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any('"kind": "eval"' in r for r in rows)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_blocks_follow_the_eager_loss_curve(backend: str) -> None:
    # the model glue compiled (inductor: fused C++ kernels on CPU), the flow op eager: same training within fp32 noise;
    # a hybrid layer (attention mixer) is included so both disabled ops are crossed
    over = TINY + ["train.steps=4", "model.attn_every=2", "model.attn_window=8"]
    eager = Trainer(load_config(None, over)).train()
    trainer = Trainer(load_config(None, over + ["train.compile=true", f"train.compile_backend={backend}"]))
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in trainer.engine.module.blocks)
    compiled = trainer.train()
    torch.testing.assert_close(torch.tensor(_losses(compiled)), torch.tensor(_losses(eager)), rtol=1e-4, atol=0)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-4)


def test_compile_with_zero3_is_refused() -> None:
    with pytest.raises(ValueError, match="zero_stage=3"):
        load_config(None, ["parallel.engine=deepspeed", "parallel.zero_stage=3", "train.compile=true"])


def test_non_finite_loss_stops_the_run_with_a_clear_error() -> None:
    trainer = Trainer(load_config(None, TINY + ["train.steps=3"]))
    with torch.no_grad():
        trainer.engine.module.blocks[0].mlp.down.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan at step 1"):
        trainer.train()
    assert trainer.step == 0
