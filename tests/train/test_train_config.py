"""The config tree: YAML with base includes, key=value overrides, errors naming the key, every shipped config loads,
the demo config equals configs/demo_mqar.yaml, the DeepSpeed JSON follows the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from pflow_dist.demo import demo_config
from pflow_dist.train.__main__ import parse_args
from pflow_dist.train.config import load_config
from pflow_dist.train.ds_config import build_ds_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 4
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage


def test_demo_config_equals_the_yaml() -> None:
    assert load_config(CONFIGS / "demo_mqar.yaml").to_dict() == demo_config().to_dict()


def test_base_include_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("model:\n  d_model: 48\n  n_heads: 3\ntrain:\n  steps: 7\n")
    (tmp_path / "run.yaml").write_text("base: m.yaml\ntrain:\n  steps: 9\n  ckpt_dir: null\noptim:\n  lr: 3e-4\n")
    cfg = load_config(tmp_path / "run.yaml", ["model.rank=2", "optim.warmup_steps=0", "train.progress=false",
                                              "data.root=/tmp"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.rank) == (48, 3, 2)
    assert cfg.train.steps == 9 and cfg.optim.lr == 3e-4 and cfg.train.progress is False
    assert cfg.data.root == "/tmp" and cfg.train.ckpt_dir is None


@pytest.mark.parametrize("override,exc,match", [
    ("train.steps=abc", TypeError, r"train\.steps: expected int"),
    ("train.stpes=3", ValueError, r"unknown config key.*stpes"),
    ("trian.steps=3", ValueError, r"unknown config key.*trian"),
    ("steps=3", ValueError, "section.key"),
    ("train.steps", ValueError, "section.key=value"),
    ("parallel.zero_stage=4", ValueError, "zero_stage"),
    ("parallel.sp_size=0", ValueError, "sp_size"),
    ("model.attn_every=-1", ValueError, "attn_every"),
    ("data.name=wiki", ValueError, "data.name"),
    ("train.progress=3", TypeError, r"train\.progress: expected bool"),
], ids=["type", "unknown-key", "unknown-section", "no-section", "no-value", "zero4", "sp", "attn", "dataset", "bool"])
def test_bad_overrides_name_the_key(override: str, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        load_config(None, [override])


def test_text_needs_byte_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 256"):
        load_config(None, ["data.name=text", "model.vocab_size=64"])


def test_ds_config_precision_and_zero() -> None:
    cfg = load_config(None, ["parallel.zero_stage=3", "train.micro_batch_size=2", "train.grad_accum=3",
                             "optim.grad_clip=0.5"])
    gpu, cpu = build_ds_config(cfg, 8, "cuda"), build_ds_config(cfg, 2, "cpu")
    assert gpu["bf16"]["enabled"] and not cpu["bf16"]["enabled"]
    assert gpu["train_batch_size"] == 48 and cpu["train_batch_size"] == 12
    assert gpu["gradient_clipping"] == 0.5 and gpu["optimizer"]["params"]["torch_adam"] is True
    assert "stage3_prefetch_bucket_size" in gpu["zero_optimization"]
    fp32 = load_config(None, ["train.precision=fp32"])
    assert not build_ds_config(fp32, 1, "cuda")["bf16"]["enabled"]


def test_cli_accepts_and_ignores_local_rank() -> None:
    a = parse_args(["--local_rank=3", "--config", "x.yaml", "train.steps=2", "model.rank=2"])
    assert a.config == "x.yaml" and a.overrides == ["train.steps=2", "model.rank=2"]
    b = parse_args(["train.steps=2", "--local-rank", "1"])
    assert b.overrides == ["train.steps=2"] and b.config is None
