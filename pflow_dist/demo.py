# The one-minute CPU demo: a tiny FlowLM (one flow-mixer block, DeltaNet-style rank-1 delta rule with a short conv)
# learns multi-query associative recall (MQAR; Zoology, Arora et al. 2023, arXiv 2312.04927) from scratch on two CPU
# cores. Recall is the task that separates delta-rule models from plain linear attention: the state must store N
# key→value pairs and return the right value when a key comes back. Chance is 1/N (guessing among the N values in
# the context); the demo ends far above it.
#
# It runs the same Trainer as every launcher, on the plain engine (torch AdamW in one process): DeepSpeed's start-up
# would spend seconds of the minute without changing the update (tests/train compare the two engines).
"""``run_demo()``: train a tiny FlowLM on MQAR on CPU for about a minute, print evaluations, save a plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .plotting import save_figure

__all__ = ["demo_config", "run_demo"]


def demo_config(steps: int = 400, seed: int = 0, threads: int = 1):
    """The demo's run config (kept equal to ``configs/demo_mqar.yaml``; a test checks it).

    One block, d_model 128, 2 heads of K = V = 64, vocabulary 64, 8 key-value pairs in 64 tokens, batch 32,
    AdamW lr 3e-3 with 20 warm-up steps and cosine decay; one CPU thread (see :func:`run_demo`).
    """
    from .train.config import load_config

    return load_config(None, [
        "model.vocab_size=64", "model.d_model=128", "model.n_layers=1", "model.n_heads=2", "model.mlp_ratio=2",
        "model.chunk_size=32",
        "data.name=mqar", "data.seq_len=64", "data.num_kv_pairs=8",
        "optim.lr=3e-3", "optim.warmup_steps=20", "optim.weight_decay=0.1", "optim.beta2=0.98",
        "optim.min_lr_ratio=0.1", "optim.grad_clip=1.0",
        "parallel.engine=plain",
        f"train.steps={steps}", "train.micro_batch_size=32", "train.eval_every=50", "train.eval_batches=4",
        "train.eval_batch_size=64", "train.log_every=0", f"train.seed={seed}", f"train.threads={threads}",
        "train.device=cpu", "train.precision=fp32",
    ])


def _plot(history: dict[str, list], chance: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = history["train"], history["eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train loss")
    ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (query positions)")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot([r["step"] for r in evals], [r["eval_acc"] for r in evals], "o-", color="C2", label="FlowLM")
    ax2.axhline(chance, ls="--", color="gray", label=f"chance (1/N = {chance:.3f})")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("step")
    ax2.set_ylabel("recall accuracy")
    ax2.legend(loc="lower right")
    fig.suptitle("pflow_dist demo: FlowLM learns multi-query associative recall on CPU")
    return save_figure(fig, path)


def run_demo(
    steps: int = 400,
    out_dir: str | Path = "pflow_demo",
    seed: int = 0,
    threads: int = 1,
    plot: bool = True,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Train a tiny FlowLM on MQAR on CPU, print evaluation lines, save a plot; about a minute on 2 cores.

    Args:
        steps: optimizer steps (400: about 30–60 s on a 2-core CPU, depending on what else runs).
        out_dir: where ``demo_mqar.png`` and ``metrics.jsonl`` go.
        seed: model init and data seed.
        threads: torch CPU threads. One by default: the matmuls of this model are too small to gain much from a
            second thread, and OpenMP threads spin-wait badly when another process holds a core (measured on a
            busy 2-core box: 75–130 ms per step with 1 thread, 300–900 ms with 2).
        plot: write the PNG.
        progress: show the progress bar.
        console: a ``rich.console.Console`` (default: stdout).

    Returns:
        ``{"first_loss", "final_loss", "eval_loss", "eval_acc", "chance_acc", "steps", "wall_s",
        "tokens_per_s", "n_params", "plot", "history"}``.

    Example::

        >>> m = run_demo(steps=5, plot=False, progress=False)  # doctest: +SKIP
        >>> 0.0 <= m["eval_acc"] <= 1.0  # doctest: +SKIP
        True
    """
    from rich.console import Console

    from .train.loop import Trainer

    console = console or Console()
    cfg = demo_config(steps=steps, seed=seed, threads=threads)
    cfg.train.out_dir = str(out_dir)
    cfg.train.progress = progress
    chance = 1.0 / cfg.data.num_kv_pairs
    m = cfg.model
    console.print(f"[bold]pflow_dist demo[/bold]: FlowLM ({m.n_layers} block, d_model {m.d_model}, {m.n_heads} heads, "
                  f"rank-{m.rank} delta rule + short conv) on MQAR: {cfg.data.num_kv_pairs} key-value pairs in "
                  f"{cfg.data.seq_len} tokens, vocabulary {m.vocab_size}; chance accuracy {chance:.3f}")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, console=console)
    console.print(f"{trainer.n_params:,} parameters, {steps} steps of {cfg.train.micro_batch_size} sequences, "
                  f"{threads} CPU thread{'s' if threads != 1 else ''}")
    summary = trainer.train()
    wall = time.perf_counter() - t0
    hist = summary["history"]
    out = {
        "first_loss": hist["train"][0]["loss"],
        "final_loss": summary["loss"],
        "eval_loss": summary["eval_loss"],
        "eval_acc": summary["eval_acc"],
        "chance_acc": chance,
        "steps": summary["step"],
        "wall_s": wall,
        "tokens_per_s": summary["tokens_per_s"],
        "n_params": summary["n_params"],
        "plot": None,
        "history": hist,
    }
    if plot:
        out["plot"] = str(_plot(hist, chance, Path(out_dir) / "demo_mqar.png"))
    console.print(f"train loss {out['first_loss']:.3f} → {out['final_loss']:.3f}; recall accuracy "
                  f"{out['eval_acc']:.3f} (chance {chance:.3f}) after {out['steps']} steps in {wall:.0f} s"
                  + (f"; plot: {out['plot']}" if out["plot"] else ""))
    return out
