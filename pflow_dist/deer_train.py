# `pflow-dist deer-train`: the DEER-GRU classifier (pflow_dist/models/deer_gru.py) on the long-memory task
# (pflow_dist/data/long_memory.py), by default at T = 16,384 steps: the label is a cue placed in the first 10% of the
# sequence and read out at the end. The same initial weights are trained a second time with the GRU run sequentially
# (the nn.GRU module itself: cuDNN on a GPU), on the same batches, so the two loss curves can be compared step by step
# (they agree to ~1e-6 on small runs, tests/models/test_deer_gru.py) and the time per step set side by side.
"""``run_deer_train()``: train the DEER-GRU classifier on the long-memory task, optionally beside the sequential GRU."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from .data.long_memory import LongMemoryTask
from .models.deer_gru import MODES, DEERGRUClassifier, TrainResult, train_long_memory
from .ops.deer import METHODS
from .plotting import save_figure

__all__ = ["check_deer_train_args", "run_deer_train"]


def check_deer_train_args(method: str, device: str) -> str:
    """Reject a Newton variant or device ``run_deer_train`` cannot use (ValueError); return the device resolved
    (``"auto"`` → ``"cuda"`` when a CUDA device is visible, else ``"cpu"``)."""
    if method not in METHODS:
        raise ValueError(f"method must be quasi, newton or damped, got {method!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _plot(results: dict[str, TrainResult], path: Path, T: int, chance: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, res in results.items():
        steps = range(1, len(res.losses) + 1)
        style = dict(ls="-" if mode == "deer" else "--", label=f"{mode} GRU")  # dashed: visible where they overlap
        ax1.plot(steps, res.losses, lw=1.2, **style)
        ax2.plot(steps, res.accuracies, lw=0.8, alpha=0.8, **style)
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.axhline(chance, ls="--", color="gray", label=f"chance ({chance:.2f})")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("step")
    ax2.set_ylabel("batch accuracy")
    ax2.legend(loc="lower right")
    fig.suptitle(f"DEER-GRU vs sequential GRU on the long-memory task, T = {T:,}")
    return save_figure(fig, path)


def run_deer_train(
    seq_len: int = 16384,
    steps: int = 400,
    batch: int = 32,
    hidden: int = 16,
    layers: int = 1,
    classes: int = 2,
    lr: float = 1e-2,
    method: str = "quasi",
    max_iter: int = 100,
    fallback: bool = True,
    chrono: bool = True,
    noise: float | None = None,
    compare: bool = True,
    device: str = "auto",
    seed: int = 0,
    eval_batch: int = 256,
    out_dir: str | Path = "deer_train",
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Train the DEER-GRU classifier with Adam on the long-memory task and, with ``compare``, the same initial model
    run sequentially on the same batches; write ``metrics.jsonl`` and ``deer_train.png`` to ``out_dir``.

    Args:
        seq_len: sequence length T (the cue lies in its first 10%).
        steps, batch, lr: Adam steps, sequences per batch, learning rate (the default 400 steps: at T = 16,384 on an
            H200 the loss sat at chance for 220 steps, then fell to 0.001 by step 400).
        hidden, layers, classes: GRU width n, stacked layers, number of labels (chance = 1 / classes).
        method: DEER's Newton variant (``"quasi"``, ``"newton"``, ``"damped"``).
        max_iter: Newton iterations per solve before DEER gives up.
        fallback: a layer whose solve does not converge runs sequentially for that step (exact; counted in the
            metrics as ``fallbacks`` and in the summary) instead of stopping the run with
            :class:`~pflow_dist.ops.deer.DEERConvergenceError`. On H200 at T = 16,384 (quasi) the iterations climbed
            from 8 to 79 once the task was learnt (loss 0.02 at step 228), then a solve missed 100.
        noise: standard deviation of the background noise; ``None``: ``min(0.3, 0.1·sqrt(4096 / T))``, so the noise
            a memory integrates over the sequence stays the same as T grows (CPU: with 0.3 the GRU stays at chance at
            T = 2048 for 300 steps; with 0.1 it learns T = 4096 in ~200 steps).
        chrono: initialise the update gates for memories up to T steps (``DEERGRUClassifier(chrono=T)``). With the
            default initialisation the GRU stays at chance already at T = 256 (300 steps, CPU); with it, T = 256
            and T = 1024 reach zero loss within 150 steps.
        compare: also train the sequential GRU from the same weights.
        device: ``"auto"`` (CUDA when visible), ``"cpu"`` or ``"cuda"``.
        seed: weights and data seed.
        eval_batch: held-out sequences scored at the end (0: none).
        out_dir: where the metrics and the plot go.
        progress, console: progress bar and ``rich`` console.

    Returns:
        ``{mode: {"first_loss", "final_loss" (mean of the last 10 steps), "eval_acc", "s_per_step",
        "mean_iterations"}}`` plus ``"max_loss_diff"`` (largest step-wise gap between the curves, with ``compare``),
        ``"plot"`` and ``"metrics"`` (paths).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    device = check_deer_train_args(method, device)
    if noise is None:
        noise = min(0.3, 0.1 * (4096 / seq_len) ** 0.5)
    task = LongMemoryTask(T=seq_len, n_classes=classes, in_dim=classes + 2, cue_frac=0.1, noise=noise)
    torch.manual_seed(seed)
    deer = DEERGRUClassifier(task.in_dim, hidden, classes, n_layers=layers, mode="deer", method=method,
                             atol=1e-6, rtol=1e-6, max_iter=max_iter, fallback=fallback,
                             chrono=seq_len if chrono and seq_len >= 3 else None)
    models = {"deer": deer}
    if compare:
        seq = copy.deepcopy(deer)
        seq.mode = "sequential"
        models["sequential"] = seq
    console.print(f"[bold]DEER-GRU[/bold] on the long-memory task: T = {seq_len:,}, noise {noise:.3g}, {classes} "
                  f"classes (chance {1 / classes:.2f}), GRU width {hidden} × {layers} layer{'s' * (layers > 1)}, "
                  f"batch {batch}, {steps} Adam steps, {device}"
                  + (", beside the sequential GRU from the same weights" if compare else ""))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, TrainResult] = {}
    summary: dict[str, Any] = {}
    metrics = out_dir / "metrics.jsonl"
    with metrics.open("w") as f, Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                                          console=console, disable=not progress) as bar:
        for mode, model in models.items():
            task_id = bar.add_task(f"{mode:<10}", total=steps, status="")

            def on_step(step: int, loss: float, acc: float, iters: list[int], mode: str = mode,
                        task_id: Any = task_id, model: DEERGRUClassifier = model) -> None:
                f.write(json.dumps({"mode": mode, "step": step, "loss": loss, "acc": acc, "iterations": iters,
                                    "fallbacks": model.last_fallbacks}) + "\n")
                f.flush()  # a run cut short keeps the steps it made
                its = f" · {iters[0]} Newton iterations" if iters else ""
                bar.update(task_id, advance=1, status=f"loss {loss:.4f} · acc {acc:.2f}{its}")

            t0 = time.perf_counter()
            res = train_long_memory(model, task, steps=steps, batch=batch, lr=lr, seed=seed, eval_batch=eval_batch,
                                    device=device, on_step=on_step)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            results[mode] = res
            tail = res.losses[-10:]
            iters = [it[0] for it in res.iterations if it]
            summary[mode] = {"first_loss": res.losses[0], "final_loss": sum(tail) / len(tail),
                             "eval_acc": res.eval_accuracy, "s_per_step": wall / steps,
                             "mean_iterations": sum(iters) / len(iters) if iters else None,
                             "fallback_steps": sum(1 for n in res.fallbacks if n)}
    if compare:
        summary["max_loss_diff"] = max(abs(a - b) for a, b in zip(results["deer"].losses,
                                                                    results["sequential"].losses, strict=True))
    summary["plot"] = str(_plot(results, out_dir / "deer_train.png", seq_len, 1 / classes))
    summary["metrics"] = str(metrics)
    for mode in MODES:
        if mode in summary:
            r = summary[mode]
            acc = f"{r['eval_acc']:.3f}" if r["eval_acc"] is not None else "-"
            console.print(f"{mode:<10} loss {r['first_loss']:.3f} → {r['final_loss']:.3f}, held-out accuracy {acc}, "
                          f"{r['s_per_step']:.3f} s/step"
                          + (f", {r['fallback_steps']} step(s) fell back to the sequential GRU"
                             if r["fallback_steps"] else ""))
    if compare:
        speed = summary["sequential"]["s_per_step"] / summary["deer"]["s_per_step"]
        console.print(f"largest step-wise loss gap {summary['max_loss_diff']:.2e}; DEER {speed:.2f}× the sequential "
                      f"GRU's speed; plot: {summary['plot']}")
    return summary
