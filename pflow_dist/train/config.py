# One typed config tree for a training run (DESIGN.md §11, after torchtitan's dataclass tree and nanoGPT's
# GPTConfig): sections model / data / optim / parallel / train, loaded from YAML (with ``base:`` files merged first)
# and ``section.key=value`` overrides from the command line. The DeepSpeed JSON is generated from it
# (``ds_config.py``), never kept beside it by hand.
"""The training config tree: dataclasses, YAML loading with ``base:`` includes, ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..models.flow_lm import FlowLMConfig

__all__ = ["DataConfig", "OptimConfig", "ParallelConfig", "RunConfig", "TrainConfig", "apply_overrides",
           "config_from_dict", "load_config"]

_DATASETS = ("mqar", "text")
_ENGINES = ("deepspeed", "plain")
_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class DataConfig:
    """Attributes:
        name: ``"mqar"`` (associative recall; vocabulary = ``model.vocab_size``) or ``"text"`` (stdlib bytes,
            needs ``model.vocab_size >= 256``).
        seq_len: tokens per example.
        num_kv_pairs, power_a, random_non_queries: MQAR task (see ``pflow_dist.data.mqar.MQARConfig``).
        max_bytes, eval_fraction, root: text corpus (see ``pflow_dist.data.text.TextConfig``).
    """

    name: str = "mqar"
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True
    max_bytes: int = 8_000_000
    eval_fraction: float = 0.05
    root: str | None = None

    def __post_init__(self) -> None:
        if self.name not in _DATASETS:
            raise ValueError(f"data.name must be one of {_DATASETS}, got {self.name!r}")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio · lr`` at the last step.

    Weight decay applies to matrices (linear and embedding weights) only, not to norms, biases, conv filters and
    gate parameters.
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(f"optim.warmup_steps and optim.grad_clip must be >= 0, got {self.warmup_steps}, "
                             f"{self.grad_clip}")


@dataclass
class ParallelConfig:
    """Attributes:
        engine: ``"deepspeed"`` (DeepSpeed engine, any world size, ZeRO) or ``"plain"`` (torch AdamW in one
            process, no DeepSpeed start-up: the CPU demo's path).
        zero_stage: DeepSpeed ZeRO stage 0–3 (1: shard optimizer states, 2: + gradients, 3: + parameters).
        sp_size: sequence-parallel degree: each sequence is cut into ``sp_size`` contiguous shards held by
            consecutive ranks; the data-parallel degree is ``world_size / sp_size`` (must divide). 1 = data parallel
            only. Any engine; ``"plain"`` needs several processes then (e.g. ``torchrun``).
    """

    engine: str = "deepspeed"
    zero_stage: int = 0
    sp_size: int = 1

    def __post_init__(self) -> None:
        if self.engine not in _ENGINES:
            raise ValueError(f"parallel.engine must be one of {_ENGINES}, got {self.engine!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.sp_size < 1:
            raise ValueError(f"parallel.sp_size must be >= 1, got {self.sp_size}")


@dataclass
class TrainConfig:
    """Attributes:
        steps: optimizer steps.
        micro_batch_size: sequences per rank per forward.
        grad_accum: micro-batches per optimizer step (global batch = micro × accum × data-parallel ranks).
        precision: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"``.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        seed: model init and data stream seed.
        eval_every: evaluate every this many steps (0: only at the end).
        eval_batches, eval_batch_size: size of an evaluation (eval_batch_size 0 = micro_batch_size × ranks).
        log_every: print a metrics line every this many steps (0: never; the progress bar still updates).
        ckpt_dir: checkpoint directory (None: no checkpoints).
        ckpt_every: save every this many steps (0: only at the end); the final step is always saved.
        resume: continue from the latest checkpoint in ``ckpt_dir`` when there is one.
        out_dir: write ``metrics.jsonl`` there (rank 0).
        progress: show a progress bar (rank 0 only).
        peak_tflops: accelerator peak for the MFU estimate (None: a table of known GPUs; unknown → no MFU).
        threads: ``torch.set_num_threads`` (0: leave torch's default).
        compile: ``torch.compile`` each block (the flow / attention kernels stay as they are; see
            :meth:`pflow_dist.models.flow_lm.FlowLM.compile_blocks`). Not with ZeRO-3, whose parameter gathering
            hooks the compiler does not trace.
        compile_backend: the ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` compiles fast, fuses nothing).
    """

    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    eval_batch_size: int = 0
    log_every: int = 50
    ckpt_dir: str | None = None
    ckpt_every: int = 0
    resume: bool = True
    out_dir: str | None = None
    progress: bool = True
    peak_tflops: float | None = None
    threads: int = 0
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batch_size", "log_every", "ckpt_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"train.precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class RunConfig:
    """The whole run: ``model`` (FlowLMConfig), ``data``, ``optim``, ``parallel``, ``train``."""

    model: FlowLMConfig = field(default_factory=FlowLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.name == "text" and self.model.vocab_size < 256:
            raise ValueError(f"data.name='text' is byte-level: model.vocab_size must be >= 256, got "
                             f"{self.model.vocab_size}")
        if self.train.compile and self.parallel.engine == "deepspeed" and self.parallel.zero_stage == 3:
            raise ValueError("train.compile=true does not work with parallel.zero_stage=3 (ZeRO-3 gathers parameters "
                             "in module hooks that torch.compile does not trace); use zero_stage <= 2 or compile=false")
        if self.data.seq_len < self.parallel.sp_size:
            raise ValueError(f"data.seq_len={self.data.seq_len} is shorter than parallel.sp_size="
                             f"{self.parallel.sp_size}: every sequence-parallel rank needs at least one token")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- building dataclasses from plain dicts, with type checks that name the offending key ------------------------

def _check_value(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{path}: expected {tp}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: YAML 1.1's float rule
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{path}: unsupported config type {tp}")
    raise TypeError(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def _build(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        where = prefix or "top level"
        raise ValueError(f"unknown config key(s) {unknown} at {where}; valid keys: {names}")
    kwargs = {k: _check_value(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in d.items()}
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested dicts (``{"model": {...}, "train": {...}}``).

    Raises:
        ValueError: an unknown key or an invalid value (the message names the key and the valid choices).
        TypeError: a value of the wrong type (the message names the key, the expected and the received type).
    """
    return _build(RunConfig, d)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config include cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    bases = data.pop("base", None)
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else (bases or []):
        merged = _deep_merge(merged, _read_yaml(path.parent / b, seen + (path,)))
    return _deep_merge(merged, data)


def apply_overrides(d: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML scalars: ``3``, ``1e-3``,
    ``true``, ``null``, ``text``). Returns a new dict; types are checked later by :func:`config_from_dict`."""
    out = _deep_merge({}, d)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"override key {key!r} must be section.key, one of the sections "
                             f"{[f.name for f in dataclasses.fields(RunConfig)]}")
        value = yaml.safe_load(raw) if raw.strip() else ""
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ValueError(f"override {item!r}: {parts[0]!r} is not a section")
        section[parts[1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config: the YAML file (its ``base:`` files merged first, paths relative to it), then overrides.

    Args:
        path: a YAML file with sections ``model``, ``data``, ``optim``, ``parallel``, ``train`` (all optional), or
            ``None`` for the defaults.
        overrides: ``section.key=value`` strings, applied last.

    Returns:
        The validated :class:`RunConfig`.

    Example::

        >>> cfg = load_config(None, ["model.d_model=64", "train.steps=10"])
        >>> cfg.model.d_model, cfg.train.steps
        (64, 10)
    """
    d = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(d, overrides))
