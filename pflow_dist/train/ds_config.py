# The DeepSpeed config, generated from the typed run config (DESIGN.md §11: never a hand-kept parallel JSON).
# Keys: DeepSpeed docs/_pages/config-json.md (research/ecosystem.md §2). ``torch_adam: true`` makes DeepSpeed build
# torch.optim.AdamW instead of JIT-compiling its fused CUDA / CPU Adam ops, so the same optimizer runs on the CPU CI
# and on GPUs, and the plain path (torch AdamW) computes the same update.
"""``build_ds_config(cfg, world_size)``: the DeepSpeed JSON dict of a :class:`RunConfig`."""

from __future__ import annotations

from typing import Any

from .config import RunConfig

__all__ = ["build_ds_config", "resolve_precision"]


def resolve_precision(cfg: RunConfig, device_type: str) -> str:
    """``"bf16"`` or ``"fp32"``: ``train.precision`` with ``"auto"`` = bf16 on CUDA, fp32 elsewhere."""
    if cfg.train.precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return cfg.train.precision


def build_ds_config(cfg: RunConfig, world_size: int, device_type: str = "cuda") -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` data-parallel ranks.

    The learning-rate schedule is not in the JSON: the training loop passes its own warm-up + cosine
    ``LambdaLR`` to ``deepspeed.initialize`` so that the DeepSpeed and the plain paths share one schedule function.

    Args:
        cfg: the run config (``train.micro_batch_size``, ``train.grad_accum``, ``optim.*``, ``parallel.zero_stage``,
            ``train.precision``).
        world_size: data-parallel ranks.
        device_type: ``"cuda"`` or ``"cpu"`` (resolves ``precision="auto"``).

    Returns:
        A JSON-serialisable dict for ``deepspeed.initialize(config=...)``.

    Example::

        >>> from pflow_dist.train.config import load_config
        >>> ds = build_ds_config(load_config(None, ["parallel.zero_stage=2"]), world_size=8)
        >>> ds["train_batch_size"], ds["zero_optimization"]["stage"], ds["bf16"]["enabled"]
        (64, 2, True)
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    t, o = cfg.train, cfg.optim
    stage = cfg.parallel.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=device_type == "cuda", contiguous_gradients=True,
                    reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(5e7), stage3_param_persistence_threshold=int(1e5),
                    stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": resolve_precision(cfg, device_type) == "bf16"},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True},
        },
        "steps_per_print": 10**9,  # the loop reports metrics itself
        "wall_clock_breakdown": False,
    }
