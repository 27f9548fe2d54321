"""``python -m pflow_dist.bench.train_lm``: end-to-end training throughput of one FlowLM with our flow kernel and with
fla's, in one process.

Each implementation is the same model (same config, same seed, hence the same initial weights and the same batches)
trained by the project's one training loop (:class:`pflow_dist.train.loop.Trainer`, DeepSpeed ZeRO-2 by default, bf16
on CUDA) on the offline stdlib text; only ``model.backend`` differs: ``ours`` keeps the config's backend (``auto``:
our Triton op on CUDA), ``fla`` sets ``model.backend=fla`` (fla's ``chunk_delta_rule``, which needs a rank-1,
non-gated config: pass ``model.rank=1 model.use_gate=false``). The implementations run one after the other, each
model freed before the next is built.

Measured per implementation: the first ``--warmup-steps`` optimizer steps are not timed (Triton compilation and
autotuning happen there), then ``--steps`` steps are; each step ends on the loop's own host read of the loss plus a
device synchronisation, and the final evaluation is outside the timed window. A row
(:class:`~pflow_dist.bench.harness.BenchRow`, ``bench="train_lm"``, ``mode="train"``) carries the median / 20th / 80th
percentile step time, and in ``extra``: tokens/s over the timed window, the MFU estimate (the loop's FLOPs per token
and the device's dense peak, :func:`~pflow_dist.train.metrics.peak_tflops`), the first, last and last-10-mean training
losses, the final eval loss, the warm-up time and the loss curve. ``peak_mem_bytes`` is
``torch.cuda.max_memory_allocated`` from the model's build to its end (``None`` on CPU, where ``extra.peak_rss_mb`` is
the process's peak resident set). The printed table ends with the throughput ratio ours / peer (> 1: ours faster).

``--profile DIR`` records the last 3 warm-up steps of each implementation with ``torch.profiler`` (after compilation,
before the timed window, so the row is unchanged) and writes the operator tables to ``DIR/<impl>.txt``: where a step's
time goes beyond the mixer kernel.

One plain ``python`` process is enough: the loop starts a one-process DeepSpeed group when no launcher set ``RANK``.

Example (one H200)::

    python -m pflow_dist.bench.train_lm --config configs/models/flow_lm_125m.yaml --impl ours --impl fla \\
        --steps 200 --warmup-steps 20 --seq-len 8192 --micro-batch 2 model.rank=1 model.use_gate=false \\
        --out runs/train_125m.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..train.config import RunConfig, load_config
from ..train.loop import Trainer
from ..train.metrics import peak_tflops
from .harness import OURS, BenchRow, command_line, device_name, versions, write_jsonl

__all__ = ["IMPLS", "build_configs", "main", "run_train_bench"]

IMPLS = ("ours", "fla")
PEER_PACKAGES = ("fla-core", "deepspeed")

# applied after the config file and before the command line's key=value overrides
BENCH_DEFAULTS = ("data.name=text", "parallel.engine=deepspeed", "parallel.zero_stage=2", "train.grad_accum=1",
                  "train.eval_every=0", "train.eval_batches=2", "train.progress=false", "train.log_every=50",
                  "train.out_dir=null")


class _TimedTrainer(Trainer):
    """The training loop, unchanged, with a wall-clock stamp after every optimizer step.

    ``Trainer.train_step`` already ends on a host read of the step's loss (a device sync); the explicit
    ``torch.cuda.synchronize`` makes the stamp independent of that detail.
    """

    def __init__(self, cfg: RunConfig, profiler: torch.profiler.profile | None = None) -> None:
        self.step_end: list[float] = []
        self.profiler = profiler
        super().__init__(cfg)

    def train_step(self) -> float:
        loss = super().train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_end.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.step()
        return loss


PROFILE_STEPS = 3  # steps recorded by --profile, the last ones of the untimed warm-up (after compilation)


def check_profile_warmup(warmup_steps: int) -> None:
    """Raise ValueError unless the warm-up leaves 2 steps (compilation) before the :data:`PROFILE_STEPS` profiled."""
    if warmup_steps < PROFILE_STEPS + 2:
        raise ValueError(f"--profile records the last {PROFILE_STEPS} warm-up steps after at least 2 others: "
                         f"needs --warmup-steps >= {PROFILE_STEPS + 2}, got {warmup_steps}")


def _profiler(warmup_steps: int) -> torch.profiler.profile:
    """A profiler that records the warm-up steps ``warmup_steps − PROFILE_STEPS + 1 .. warmup_steps`` (1-based):
    past compilation and autotuning, and outside the timed window, so profiling does not change the row."""
    check_profile_warmup(warmup_steps)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    sched = torch.profiler.schedule(wait=warmup_steps - PROFILE_STEPS - 1, warmup=1, active=PROFILE_STEPS, repeat=1)
    return torch.profiler.profile(activities=acts, schedule=sched)


def profile_tables(prof: torch.profiler.profile, rows: int = 30) -> str:
    """The recorded steps' operators: by total device time (CUDA) or CPU time, then by self CPU time (host cost)."""
    avg = prof.key_averages()
    first = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return "\n\n".join(avg.table(sort_by=key, row_limit=rows, max_name_column_width=80)
                        for key in (first, "self_cpu_time_total"))


def build_configs(config: str | None, impls: list[str], steps: int, warmup_steps: int, seq_len: int | None,
                  micro_batch: int | None, overrides: list[str]) -> dict[str, RunConfig]:
    """One validated :class:`RunConfig` per implementation, all identical except ``model.backend``.

    Args:
        config: YAML run config (``configs/...``) or ``None`` for the defaults.
        impls: names from :data:`IMPLS`.
        steps: timed optimizer steps; the run has ``warmup_steps + steps`` (``train.steps``).
        warmup_steps: untimed steps first.
        seq_len: ``data.seq_len`` (None: the config's).
        micro_batch: ``train.micro_batch_size`` (None: the config's).
        overrides: ``section.key=value`` strings, applied after the bench's defaults and the options above.

    Raises:
        ValueError: an unknown implementation, bad step counts, or a config an implementation cannot run (e.g. fla
            with ``model.rank=2``: the message says what fla supports). Nothing has been trained when this raises.
    """
    bad = [i for i in impls if i not in IMPLS]
    if bad or not impls:
        raise ValueError(f"unknown or no implementation(s) {bad or impls}; known: {list(IMPLS)}")
    if len(set(impls)) != len(impls):
        raise ValueError(f"each implementation once, got {impls}")
    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"need --steps >= 1 and --warmup-steps >= 0, got {steps}, {warmup_steps}")
    opts = [f"train.steps={warmup_steps + steps}"]
    if seq_len is not None:
        opts.append(f"data.seq_len={seq_len}")
    if micro_batch is not None:
        opts.append(f"train.micro_batch_size={micro_batch}")
    base = [*BENCH_DEFAULTS, *opts, *overrides, "train.ckpt_dir=null"]  # a benchmark never resumes or checkpoints
    ours = load_config(config, base)
    if ours.model.backend == "fla":
        raise ValueError("model.backend=fla in the config or overrides: 'ours' is the project's kernel; run fla with "
                         "--impl fla instead")
    out: dict[str, RunConfig] = {}
    for impl in impls:
        out[impl] = ours if impl == OURS else load_config(config, base + ["model.backend=fla"])
    return out


def _case_name(cfg: RunConfig) -> str:
    m, t = cfg.model, cfg.train
    gate = "-gated" if m.use_gate else ""
    return (f"L{m.n_layers}-D{m.d_model}-H{m.n_heads}-K{m.key_dim}-R{m.rank}{gate}-T{cfg.data.seq_len}-"
            f"mb{t.micro_batch_size}-{cfg.parallel.engine}{cfg.parallel.zero_stage}")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_message(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _train_one(cfg: RunConfig, warmup_steps: int, profile_path: Path | None = None) -> dict[str, Any]:
    """Train ``cfg`` once; the measurements of one row (see the module docstring). With ``profile_path``, the last
    warm-up steps are profiled and the operator tables written there."""
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    mem_before = None
    if use_cuda:
        torch.cuda.synchronize()
        mem_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    prof = _profiler(warmup_steps) if profile_path is not None else None
    trainer = _TimedTrainer(cfg, prof)
    try:
        t_begin = time.perf_counter()
        with prof if prof is not None else contextlib.nullcontext():
            summary = trainer.train()
        if prof is not None:
            profile_path.parent.mkdir(parents=True, exist_ok=True)
            profile_path.write_text(profile_tables(prof) + "\n")
        device, precision, world = trainer.device, trainer.precision, trainer.world
        stamps = [t_begin, *trainer.step_end]  # stamps[i]: end of step i (stamps[0]: the start)
        tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * trainer.dims.dp_size * cfg.data.seq_len
        flops_per_token, n_params = trainer.flops_per_token, trainer.n_params
        peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        trainer.close()  # destroys a DeepSpeed engine: its ZeRO hooks would keep the model alive
        del trainer
    n_steps = len(stamps) - 1
    if n_steps != cfg.train.steps:
        raise RuntimeError(f"the loop ran {n_steps} steps, expected {cfg.train.steps}")
    step_ms = [1e3 * (b - a) for a, b in zip(stamps[warmup_steps:-1], stamps[warmup_steps + 1:])]
    timed_s = stamps[-1] - stamps[warmup_steps]
    tok_s = tokens_per_step * len(step_ms) / timed_s
    peak = peak_tflops(device, precision, cfg.train.peak_tflops)
    mfu = tok_s * flops_per_token / (peak * 1e12 * world) if peak else None
    losses = [r["loss"] for r in summary["history"]["train"]]
    q = statistics.quantiles(step_ms, n=5, method="inclusive") if len(step_ms) > 1 else [step_ms[0]] * 4
    return {
        "device": device, "precision": precision, "median_ms": statistics.median(step_ms), "p20_ms": q[0],
        "p80_ms": q[3], "n_rep": len(step_ms), "peak_mem_bytes": peak_bytes,
        "shapes": {"input_ids": [cfg.train.micro_batch_size, cfg.data.seq_len]},
        "extra": {
            "tokens_per_s": tok_s, "mfu": mfu, "peak_tflops": peak, "flops_per_token": flops_per_token,
            "n_params": n_params, "tokens_per_step": tokens_per_step, "world_size": world,
            "timed_steps": len(step_ms), "warmup_steps": warmup_steps, "timed_s": timed_s,
            "warmup_s": stamps[warmup_steps] - stamps[0], "build_s": t_begin - t_build,
            "first_loss": losses[0], "final_loss": losses[-1],
            "final_loss_mean10": sum(losses[-10:]) / len(losses[-10:]),
            "eval_loss": summary.get("eval_loss"), "eval_acc": summary.get("eval_acc"),
            "peak_rss_mb": summary["peak_mem_mb"] if device.type != "cuda" else None,
            "mem_allocated_before_mb": None if mem_before is None else mem_before / 2**20,
            "losses": [round(x, 5) for x in losses],
        },
    }


def run_train_bench(configs: dict[str, RunConfig], warmup_steps: int, out: str | None = None,
                    on_row=None, profile_dir: str | Path | None = None) -> list[BenchRow]:
    """Train every implementation's config in turn and return one row each (written to ``out`` as it finishes).

    With ``profile_dir``, each implementation's last warm-up steps are profiled into ``<profile_dir>/<impl>.txt``.

    An implementation that raises while training gets a row with ``status="error"`` and the message; the others
    still run. Every model is freed (engine deleted, ``gc``, CUDA cache emptied) before the next one is built.
    """
    vers = versions(*PEER_PACKAGES)
    cmd = command_line()
    rows: list[BenchRow] = []
    for impl, cfg in configs.items():
        fallback_device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
        row = BenchRow(bench="train_lm", case=_case_name(cfg), mode="train", impl=impl,
                       device=device_name(fallback_device), dtype="", shapes={}, median_ms=None, p20_ms=None,
                       p80_ms=None, n_rep=0, peak_mem_bytes=None, versions=vers, command=cmd,
                       extra={"config": cfg.to_dict()})
        try:
            res = _train_one(cfg, warmup_steps, Path(profile_dir) / f"{impl}.txt" if profile_dir else None)
            row.device, row.dtype, row.shapes = device_name(res["device"]), res["precision"], res["shapes"]
            row.median_ms, row.p20_ms, row.p80_ms, row.n_rep = res["median_ms"], res["p20_ms"], res["p80_ms"], \
                res["n_rep"]
            row.peak_mem_bytes = res["peak_mem_bytes"]
            row.extra.update(res["extra"])
        except Exception as e:  # noqa: BLE001 - a peer that fails (OOM, kernel error) is a result; others still run
            row.status, row.error = "error", _error_message(e)
        finally:
            _free(fallback_device)
        rows.append(row)
        if out:
            write_jsonl([row], out)
        if on_row is not None:
            on_row(row)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(rows: list[BenchRow]) -> str:
    """The result table and, when ours and a peer both ran, the throughput ratio ours / peer."""
    head = ["impl", "status", "tok/s", "step ms", "MFU", "peak GiB", "first loss", "final loss (10)", "eval loss",
            "warm-up s"]
    lines = [head]
    for r in rows:
        e = r.extra
        peak = r.peak_mem_bytes / 2**30 if r.peak_mem_bytes is not None else None
        mfu = 100 * e["mfu"] if e.get("mfu") is not None else None
        lines.append([r.impl, r.status, _fmt(e.get("tokens_per_s"), ",.0f"), _fmt(r.median_ms, ".1f"),
                      _fmt(mfu, ".1f") + ("%" if mfu is not None else ""), _fmt(peak, ".2f"),
                      _fmt(e.get("first_loss"), ".4f"), _fmt(e.get("final_loss_mean10"), ".4f"),
                      _fmt(e.get("eval_loss"), ".4f"), _fmt(e.get("warmup_s"), ".1f")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [f"{rows[0].case} on {rows[0].device}" if rows else "no rows"]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    for err in (r for r in rows if r.error):
        text.append(f"{err.impl}: {err.error}")
    ours = next((r for r in rows if r.impl == OURS and r.status == "ok"), None)
    for peer in (r for r in rows if r.impl != OURS and r.status == "ok"):
        if ours is not None:
            ratio = ours.extra["tokens_per_s"] / peer.extra["tokens_per_s"]
            text.append(f"throughput ratio ours/{peer.impl}: {ratio:.3f}x (tokens/s {ours.extra['tokens_per_s']:,.0f}"
                        f" vs {peer.extra['tokens_per_s']:,.0f})")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m pflow_dist.bench.train_lm",
                                description="End-to-end training throughput of one FlowLM, our flow kernel vs fla's, "
                                "in one process (see the module docstring).")
    p.add_argument("--config", help="YAML run config (e.g. configs/models/flow_lm_125m.yaml); defaults when omitted")
    p.add_argument("--impl", action="append", choices=IMPLS, help="ours and/or fla, in run order (default: both)")
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--seq-len", type=int, default=None, help="data.seq_len (default: the config's)")
    p.add_argument("--micro-batch", type=int, default=None, help="train.micro_batch_size (default: the config's)")
    p.add_argument("--out", help="append the rows to this JSONL file")
    p.add_argument("--profile", metavar="DIR", help=f"profile the last {PROFILE_STEPS} warm-up steps of each "
                   "implementation (torch.profiler) and write its operator tables to DIR/<impl>.txt")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.rank=1 model.use_gate=false")
    a = p.parse_intermixed_args(argv)
    impls = a.impl or list(IMPLS)
    if a.profile:
        try:
            check_profile_warmup(a.warmup_steps)
        except ValueError as e:
            p.error(str(e))
    try:
        configs = build_configs(a.config, impls, a.steps, a.warmup_steps, a.seq_len, a.micro_batch, a.overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    if "fla" in configs:
        from ..models.flow_lm import import_fla_delta_rule  # noqa: PLC0415

        try:
            import_fla_delta_rule()  # before training ours for minutes
        except ImportError as e:
            p.error(str(e))
    for impl, cfg in configs.items():
        print(f"{impl}: {_case_name(cfg)}, backend {cfg.model.backend}, {cfg.train.steps} steps "
              f"({a.warmup_steps} untimed)", flush=True)

    def show(row: BenchRow) -> None:
        tok = row.extra.get("tokens_per_s")
        print(f"done {row.impl}: {row.status} " + (f"{tok:,.0f} tok/s" if tok else (row.error or "")), flush=True)

    rows = run_train_bench(configs, a.warmup_steps, a.out, on_row=show, profile_dir=a.profile)
    print(format_table(rows), flush=True)
    if a.out:
        print(f"wrote {len(rows)} rows to {a.out}")
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
