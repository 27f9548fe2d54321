# The two engines behind the one training loop. Both expose the same five calls (forward, backward, micro_step,
# save, load) so the loop never branches on the engine:
#   - DeepSpeedEngine: deepspeed.initialize over the model with the generated ds_config (ZeRO 0–3, bf16 on GPU,
#     gradient clipping, torch AdamW) and the loop's LambdaLR; any world size.
#   - PlainEngine: torch AdamW + LambdaLR + clip_grad_norm_ in one process. It exists because DeepSpeed's start-up
#     (import, process-group set-up, engine construction) costs seconds that a one-minute CPU demo should spend on
#     learning; its update is the same (tests compare the two). On several processes (torchrun, or the tests' gloo
#     workers) it reduces gradients itself: one all-reduce of the flat gradients, divided by the data-parallel degree.
# The schedule (linear warm-up, cosine to min_lr_ratio) is written once, in lr_lambda.
#
# Sequence parallelism (parallel.sp_size > 1, dist/parallel_dims.py): a parameter's gradient must be summed over its
# sequence-parallel group and averaged over its data-parallel group, i.e. summed over all ranks and divided by dp.
# DeepSpeed does exactly that when given a Ulysses-style mpu (an object with `initialize_sequence_parallel`, detected by
# deepspeed/utils/groups.py): it reduces and ZeRO-partitions over the "sequence-data-parallel" group (all dp × sp ranks)
# and divides by its size / sp_size (engine._reduce_non_expert_gradients, stage_1_and_2.py, stage3.py); its batch-size
# check uses world / sp_size (runtime/config.py); its gradient norm counts each partition once. So DeepSpeed's
# averaging group is dp only in effect, while ZeRO shards over all ranks (sp ranks hold identical optimizer states,
# which sharding over them saves). `SequenceParallelMPU` is that interface over our groups. One exception, measured
# here (tests/train/test_train_sp.py) and seen by others (hamishivi/tmax PR #9): ZeRO-3's default reduce-scatter
# (stage3.__avg_scatter_grads → reduce_scatter_coalesced) divides by all dp × sp ranks, without the sp factor, so
# under ZeRO-3 the loss is scaled by sp_size before backward (DeepSpeedEngine.grad_scale).
"""Engines of the training loop: DeepSpeed (``DeepSpeedEngine``) and single-process torch (``PlainEngine``)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..dist.parallel_dims import ParallelDims
from .checkpoint import install_safe_deepspeed_loader, load_plain, save_plain
from .config import RunConfig
from .ds_config import build_ds_config

__all__ = ["DeepSpeedEngine", "PlainEngine", "SequenceParallelMPU", "import_deepspeed", "lr_lambda", "param_groups",
           "reduce_gradients"]


def import_deepspeed():
    """Import DeepSpeed; on its CPU accelerator, switch off the shared-memory all-reduce op.

    DeepSpeed's CPU comm backend JIT-compiles a C++ extension (``deepspeed_shm_comm``) the first time a process
    group is wrapped: minutes of g++ on a 2-core box, once per fresh environment, and a file lock that hangs other
    processes if the build is killed. Gloo does the same collectives, so the op is marked incompatible
    (``deepspeed.ops.__compatible_ops__`` is DeepSpeed's cached probe dict, edits to it persist).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def lr_lambda(cfg: RunConfig):
    """The learning-rate multiplier of optimizer step ``s``: linear warm-up over ``warmup_steps`` to 1, then cosine
    decay to ``min_lr_ratio`` at ``train.steps``."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices (dim ≥ 2, except conv filters) decay; norms, biases, conv filters, gates do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "conv" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def reduce_gradients(params: list[nn.Parameter], dp_size: int) -> None:
    """Sum every gradient over all ranks and divide by ``dp_size`` (= the sp-sum and dp-mean, see the header), in one
    all-reduce of a flat buffer. Missing gradients count as zeros so every rank sends the same sizes."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dp_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).to(g.dtype).clone()
        offset += g.numel()


class PlainEngine:
    """Torch AdamW; bf16 autocast on CUDA when ``precision == "bf16"``. One process, or several (``dims``) with the
    gradients reduced by :func:`reduce_gradients` before clipping."""

    name = "plain"

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device, precision: str,
                 dims: ParallelDims | None = None) -> None:
        o = cfg.optim
        self.dims = dims or ParallelDims(1, 1, 0)
        self.module = model.to(device)
        if self.dims.world_size > 1:  # every rank starts from rank 0's weights (they are seeded alike anyway)
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                dist.broadcast(t.data, src=0)
        self.device = device
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.grad_accum = cfg.train.grad_accum
        self.grad_clip = cfg.optim.grad_clip
        self.bf16 = precision == "bf16"
        self._micro = 0
        self.last_grad_norm: float | None = None

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, input_ids: torch.Tensor, sp_group: Any = None) -> torch.Tensor:
        with self._autocast():
            return self.module(input_ids) if sp_group is None else self.module(input_ids, sp_group=sp_group)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def micro_step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        if self.dims.world_size > 1:
            reduce_gradients(list(self.module.parameters()), self.dims.dp_size)
        if self.grad_clip > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, ckpt_dir: Path, step: int, client_state: dict[str, Any]) -> None:
        if self.dims.world_size > 1:
            dist.barrier()  # every rank's RNG file is on disk before rank 0 names the checkpoint `latest`
        if self.dims.rank == 0:  # the ranks hold identical weights and optimizer states
            save_plain(ckpt_dir, step, self.module, self.optimizer, self.scheduler, client_state)

    def load(self, ckpt_dir: Path) -> dict[str, Any] | None:
        return load_plain(ckpt_dir, self.module, self.optimizer, self.scheduler)

    def close(self) -> None:
        """Nothing to release beyond the references the trainer drops."""


class SequenceParallelMPU:
    """DeepSpeed's model-parallel unit for data × sequence parallelism, over the groups of a :class:`ParallelDims`.

    The method names are those of ``deepspeed.runtime.sequence_parallel.parallel_state_sp`` (DeepSpeed-Ulysses), the
    interface DeepSpeed recognises by ``initialize_sequence_parallel``: it then reduces gradients and partitions ZeRO
    states over ``get_sequence_data_parallel_group()`` (all ranks) and averages by its size / sp_size (see the file
    header). Like that module, it aliases the model-parallel getters to the sequence-parallel group (DeepSpeed's
    ZeRO-0 gradient norm counts each gradient on sp rank 0 only). It deliberately has no
    ``get_data_parallel_world_size``: DeepSpeed's batch-size check then uses world / sp_size.
    """

    def __init__(self, dims: ParallelDims) -> None:
        if dims.sp_group is None:
            raise ValueError("SequenceParallelMPU needs sp_size > 1")
        self.dims = dims
        self._seq_dp_group = dist.new_group(list(range(dims.world_size)))  # collective: every rank builds it

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        raise RuntimeError("the groups are built by ParallelDims.build; DeepSpeed only reads them")

    def get_sequence_parallel_group(self):
        return self.dims.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.dims.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.dims.sp_rank

    def get_sequence_data_parallel_group(self):
        return self._seq_dp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dims.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dims.rank

    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank


class DeepSpeedEngine:
    """``deepspeed.initialize`` with the generated config; ``torch.distributed`` must already be initialised. With
    ``dims.sp_size > 1`` DeepSpeed gets a :class:`SequenceParallelMPU`."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device, precision: str,
                 dims: ParallelDims) -> None:
        deepspeed = import_deepspeed()
        from deepspeed.utils import groups

        self.ds_config = build_ds_config(cfg, dims.dp_size, device.type)
        if precision != ("bf16" if self.ds_config["bf16"]["enabled"] else "fp32"):
            raise AssertionError(f"precision mismatch: loop {precision}, ds_config {self.ds_config['bf16']}")
        schedule = lr_lambda(cfg)
        mpu = SequenceParallelMPU(dims) if dims.sp_size > 1 else None
        # DeepSpeed keeps the last engine's mpu in a module global and only overwrites it when given a new one: clear
        # it, or an engine without sequence parallelism built after one with it would reuse the stale groups
        groups.mpu = None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(device),
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            mpu=mpu,
        )
        install_safe_deepspeed_loader(self.engine)
        self.grad_scale = 1.0  # multiplies the loss before backward (not the reported loss), see the file header
        if dims.sp_size > 1 and cfg.parallel.zero_stage == 3:
            if getattr(self.engine.optimizer, "reduce_scatter", None) is not True:
                raise RuntimeError("ZeRO-3 with parallel.sp_size > 1 expects DeepSpeed's reduce-scatter gradient path "
                                   "(zero_optimization.reduce_scatter=true, the default), whose averaging this engine "
                                   "compensates")
            self.grad_scale = float(dims.sp_size)
        self.module = self.engine.module
        self.device = device
        self.bf16 = precision == "bf16"

    @property
    def last_grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def forward(self, input_ids: torch.Tensor, sp_group: Any = None) -> torch.Tensor:
        return self.engine(input_ids) if sp_group is None else self.engine(input_ids, sp_group=sp_group)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed scales by 1/gradient_accumulation_steps itself
        self.engine.backward(loss * self.grad_scale if self.grad_scale != 1.0 else loss)

    def micro_step(self) -> None:
        self.engine.step()  # steps the optimizer and the scheduler only at the accumulation boundary

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, ckpt_dir: Path, step: int, client_state: dict[str, Any]) -> None:
        from .checkpoint import step_tag

        self.engine.save_checkpoint(str(ckpt_dir), tag=step_tag(step), client_state=client_state)

    def close(self) -> None:
        """Free the model: ZeRO's gradient hooks sit on autograd nodes that reference the DeepSpeed optimizer from
        C++, out of reach of Python's cycle collector; without ``destroy()`` (which removes them) the model, its
        gradients and the optimizer states stay allocated after the engine is dropped."""
        self.engine.destroy()

    def load(self, ckpt_dir: Path) -> dict[str, Any] | None:
        from .checkpoint import latest_tag

        if latest_tag(ckpt_dir) is None:
            return None
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=None)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint named by {Path(ckpt_dir) / 'latest'}")
        return client_state
