# The one training loop (DESIGN.md §9, §11; shaped after torchtitan's Trainer.train: while step < steps:
# train_step(); maybe evaluate; maybe checkpoint). Every launcher ends here: ``python -m pflow_dist.train``,
# ``deepspeed -m pflow_dist.train``, the CPU demo, Ray Train later.
#
# Data parallelism: the batch of optimizer step s is a pure function of (seed, s); every rank draws the same global
# batch and keeps its slice (data-parallel-rank-major, then micro-batch), so N ranks see exactly what one process with
# the same global batch sees, and resume needs no iterator state: the data position is the step counter.
# Sequence parallelism (parallel.sp_size > 1): the sp ranks of one data-parallel slot keep the same sequences and cut
# them along time (contiguous shards, dist/sharding.py); the model runs with their group, the loss is the token mean
# over the group (FlowLM.loss), and the engines sum gradients over sp and average over dp (engine.py header).
"""``Trainer``: build model, data and engine from a :class:`RunConfig`; train, evaluate, checkpoint, resume."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.mqar import IGNORE_INDEX, MQARConfig, MQARData
from ..data.text import TextConfig, TextData
from ..dist.parallel_dims import ParallelDims
from ..dist.sharding import shard_sequence
from ..models.flow_lm import FlowLM
from .checkpoint import get_rng_state, latest_tag, safe_load, set_rng_state, step_tag
from .config import RunConfig
from .ds_config import resolve_precision
from .engine import DeepSpeedEngine, PlainEngine, import_deepspeed
from .metrics import MetricsLog, Progress, peak_memory_mb, peak_tflops

__all__ = ["Trainer", "build_data"]


def build_data(cfg: RunConfig):
    """The data source named by ``cfg.data`` (``batch(step, n, split) -> {"input_ids", "labels"}``)."""
    d = cfg.data
    if d.name == "mqar":
        return MQARData(MQARConfig(vocab_size=cfg.model.vocab_size, num_kv_pairs=d.num_kv_pairs, seq_len=d.seq_len,
                                   power_a=d.power_a, random_non_queries=d.random_non_queries), seed=cfg.train.seed)
    return TextData(TextConfig(seq_len=d.seq_len, max_bytes=d.max_bytes, eval_fraction=d.eval_fraction, root=d.root),
                    seed=cfg.train.seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(engine: str, use_cuda: bool) -> tuple[int, int, int]:
    """(rank, world_size, local_rank). DeepSpeed: join the launcher's group (or a 1-process one); plain: the
    launcher's group when there is one (``torchrun``: WORLD_SIZE > 1), else one process without torch.distributed."""
    if engine == "deepspeed" and not dist.is_initialized():
        deepspeed = import_deepspeed()

        if "RANK" not in os.environ:  # plain `python -m pflow_dist.train`: a one-process group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        deepspeed.init_distributed()
    if engine == "plain" and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")  # env:// from the launcher
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return rank, world, int(os.environ.get("LOCAL_RANK", rank))
    return 0, 1, 0


class Trainer:
    """Train a FlowLM as ``cfg`` says; see the module docstring for the data-parallel contract.

    Args:
        cfg: the run config.
        console: a ``rich.console.Console`` for the progress bar and log lines (rank 0).
        on_eval: called on rank 0 with every evaluation row (``{"step", "eval_loss", "eval_acc", ...}``).

    Example::

        >>> from pflow_dist.train.config import load_config
        >>> cfg = load_config(None, ["parallel.engine=plain", "model.d_model=32", "model.n_layers=1",
        ...                          "model.vocab_size=32", "data.num_kv_pairs=2", "data.seq_len=16",
        ...                          "train.steps=2", "train.progress=false", "train.log_every=0"])
        >>> summary = Trainer(cfg).train()
        >>> summary["step"]
        2
    """

    def __init__(self, cfg: RunConfig, console: Any = None, on_eval=None) -> None:
        self.cfg = cfg
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        self.rank, self.world, local_rank = _init_distributed(cfg.parallel.engine, use_cuda)
        self.dims = ParallelDims.build(cfg.parallel.sp_size)
        self.sp_group = self.dims.sp_group
        if use_cuda:
            if not torch.cuda.is_available():
                raise ValueError("train.device='cuda' but no CUDA device is visible")
            self.device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.precision = resolve_precision(cfg, self.device.type)
        torch.manual_seed(t.seed)  # same init on every rank
        self.data = build_data(cfg)
        model = FlowLM(cfg.model)
        if t.compile:
            model.compile_blocks(t.compile_backend)
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.n_params = model.num_params(non_embedding=False)
        if cfg.parallel.engine == "deepspeed":
            self.engine = DeepSpeedEngine(model, cfg, self.device, self.precision, self.dims)
        else:
            self.engine = PlainEngine(model, cfg, self.device, self.precision, self.dims)
        self.is_main = self.rank == 0
        self.log = MetricsLog(t.out_dir, enabled=self.is_main)
        self.console = console
        self.on_eval = on_eval
        self.step = 0
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.resumed_from: str | None = None
        if t.ckpt_dir and t.resume:
            self.load()

    # ---- one step ------------------------------------------------------------------------------------------------

    def _rank_slice(self, batch: dict[str, torch.Tensor], per_rank: int) -> dict[str, torch.Tensor]:
        """This rank's part of a global batch: its data-parallel slot's rows, cut along time to its sequence-parallel
        shard."""
        lo = self.dims.dp_rank * per_rank
        out = {k: v[lo:lo + per_rank] for k, v in batch.items()}
        if self.sp_group is not None:
            out = {k: shard_sequence(v, self.sp_group) for k, v in out.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in out.items()}

    def _all_mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def train_step(self) -> float:
        """One optimizer step over the global batch of ``self.step``; returns the mean loss over all ranks."""
        t = self.cfg.train
        per_rank = t.micro_batch_size * t.grad_accum
        batch = self._rank_slice(self.data.batch(self.step, per_rank * self.dims.dp_size, "train"), per_rank)
        self.engine.train(True)
        total = torch.zeros((), device=self.device)
        for m in range(t.grad_accum):
            sl = slice(m * t.micro_batch_size, (m + 1) * t.micro_batch_size)
            logits = self.engine.forward(batch["input_ids"][sl], self.sp_group)
            loss = FlowLM.loss(logits, batch["labels"][sl], sp_group=self.sp_group)
            self.engine.backward(loss)
            self.engine.micro_step()
            total += loss.detach()
        return float(self._all_mean(total / t.grad_accum))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy (argmax = label) over the scored positions of ``train.eval_batches`` eval batches."""
        t = self.cfg.train
        per_rank = t.eval_batch_size or t.micro_batch_size
        self.engine.train(False)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # Σ loss, correct, n (this rank's tokens)
        for i in range(t.eval_batches):
            b = self._rank_slice(self.data.batch(i, per_rank * self.dims.dp_size, "eval"), per_rank)
            logits = self.engine.forward(b["input_ids"], self.sp_group)
            mask = b["labels"] != IGNORE_INDEX
            sums[0] += F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum").double()
            sums[1] += (logits.argmax(-1)[mask] == b["labels"][mask]).sum()
            sums[2] += mask.sum()
        if self.world > 1:
            dist.all_reduce(sums)
        self.engine.train(True)
        return {"eval_loss": float(sums[0] / sums[2]), "eval_acc": float(sums[1] / sums[2])}

    # ---- the loop ------------------------------------------------------------------------------------------------

    def train(self, until: int | None = None) -> dict[str, Any]:
        """Run to step ``until`` (default and maximum ``train.steps``), evaluating and checkpointing on the way, and
        checkpointing where it stops (so a run cut into pieces resumes exactly: the LR schedule always spans
        ``train.steps``). Returns a summary (last loss, eval metrics, throughput, history)."""
        t = self.cfg.train
        stop = t.steps if until is None else min(int(until), t.steps)
        tokens_per_step = t.micro_batch_size * t.grad_accum * self.dims.dp_size * self.cfg.data.seq_len
        peak = peak_tflops(self.device, self.precision, t.peak_tflops)
        bar = Progress(t.steps, self.step, enabled=self.is_main and t.progress, console=self.console)
        say = bar.print if bar.enabled else (print if self.is_main else (lambda s: None))
        last_eval: dict[str, float] = {}
        tok_s = float("nan")  # stays NaN when there is nothing left to train (resumed at the last step)
        t_window, steps_window = time.perf_counter(), 0
        t_start = time.perf_counter()
        try:
            while self.step < stop:
                loss = self.train_step()
                if not math.isfinite(loss):  # the value is on the host already: the check costs nothing
                    raise FloatingPointError(
                        f"the training loss became {loss} at step {self.step + 1}; stopping instead of training on "
                        f"NaN/Inf. Lower optim.lr or raise optim.warmup_steps, keep optim.grad_clip on, and resume "
                        f"from the last checkpoint" + (f" in {t.ckpt_dir}" if t.ckpt_dir else ""))
                self.step += 1
                steps_window += 1
                if self.device.type == "cuda" and (self.step % max(1, t.log_every or 10) == 0):
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t_window
                tok_s = tokens_per_step * steps_window / elapsed  # over a window of ≥ 1 s (the first: so far)
                if elapsed > 1.0:
                    t_window, steps_window = time.perf_counter(), 0
                mfu = (tok_s * self.flops_per_token / (peak * 1e12 * self.world)) if peak else None
                row = {"step": self.step, "loss": loss, "lr": self.engine.lr(), "tokens_per_s": tok_s,
                       "grad_norm": self.engine.last_grad_norm, "mfu": mfu}
                self.history["train"].append(row)
                info = f"loss {loss:.3f} · {tok_s:,.0f} tok/s"
                if mfu is not None:
                    info += f" · MFU {100 * mfu:.1f}%"
                if last_eval:
                    info += f" · acc {last_eval['eval_acc']:.3f}"
                bar.update(self.step, info)
                if t.log_every and self.step % t.log_every == 0:
                    row["peak_mem_mb"] = peak_memory_mb(self.device)
                    self.log.write({"kind": "train", **row})
                    if not bar.enabled:
                        say(self._format_train(row))
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == stop:
                    last_eval = self._eval_and_report(say)
                if t.ckpt_dir and ((t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == stop):
                    self.save()
        finally:
            bar.close()
        return {
            "step": self.step,
            "loss": self.history["train"][-1]["loss"] if self.history["train"] else None,
            **last_eval,
            "tokens_per_s": tok_s,
            "wall_s": time.perf_counter() - t_start,
            "n_params": self.n_params,
            "flops_per_token": self.flops_per_token,
            "peak_mem_mb": peak_memory_mb(self.device),
            "history": self.history,
            "resumed_from": self.resumed_from,
        }

    def _eval_and_report(self, say) -> dict[str, float]:
        ev = self.evaluate()
        row = {"step": self.step, **ev}
        self.history["eval"].append(row)
        if self.is_main:
            self.log.write({"kind": "eval", **row})
            say(f"step {self.step:>6}  eval loss {ev['eval_loss']:.4f}  eval acc {ev['eval_acc']:.3f}")
            if self.on_eval is not None:
                self.on_eval(row)
        return ev

    @staticmethod
    def _format_train(row: dict[str, Any]) -> str:
        mfu = f"  mfu {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        return (f"step {row['step']:>6}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                f"{row['tokens_per_s']:,.0f} tok/s{mfu}  mem {row['peak_mem_mb']:.0f} MiB")

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint the current step (collective: every rank calls it)."""
        ckpt = Path(self.cfg.train.ckpt_dir)
        tag_dir = ckpt / step_tag(self.step)
        tag_dir.mkdir(parents=True, exist_ok=True)
        # per-rank RNG streams first: `latest` (written last by the engine) then only names complete checkpoints
        torch.save(get_rng_state(), tag_dir / f"rng_rank{self.rank}.pt")
        client = {"step": self.step, "world_size": self.world, "sp_size": self.dims.sp_size, "history": self.history}
        self.engine.save(ckpt, self.step, client)
        if self.world > 1:
            dist.barrier()

    def load(self) -> bool:
        """Resume from ``ckpt_dir/latest`` when it exists; returns whether a checkpoint was loaded."""
        ckpt = Path(self.cfg.train.ckpt_dir)
        tag = latest_tag(ckpt) if ckpt.is_dir() else None
        if tag is None:
            return False
        client = self.engine.load(ckpt)
        if client is None or "step" not in client:
            raise RuntimeError(f"checkpoint {ckpt / tag} has no loop state (step)")
        if client.get("world_size", self.world) != self.world:
            raise ValueError(f"checkpoint {ckpt / tag} was written by {client['world_size']} ranks, this run has "
                             f"{self.world}: the global batch would change")
        if client.get("sp_size", 1) != self.dims.sp_size:
            raise ValueError(f"checkpoint {ckpt / tag} was written with parallel.sp_size={client.get('sp_size', 1)}, "
                             f"this run has {self.dims.sp_size}: the global batch and the ZeRO shards would change")
        self.step = int(client["step"])
        self.history = client.get("history", self.history)
        rng_file = ckpt / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(safe_load(rng_file))
        self.resumed_from = str(ckpt / tag)
        return True

    def close(self) -> None:
        """Release the engine and its memory (the process group is left to whoever created it)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
