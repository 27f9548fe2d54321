# Training metrics: throughput, an MFU estimate, peak memory, a rank-0 progress bar and a JSONL log.
#
# MFU = achieved model FLOP/s ÷ the accelerator's peak (PaLM, Chowdhery et al. 2022, App. B): model FLOPs per token
# come from FlowLM.flops_per_token (6 × matmul parameters + the flow op's chunked matmuls); the peaks are the vendor's
# dense (no sparsity) tensor-core numbers. On CPU there is no meaningful peak: MFU is reported as None unless
# train.peak_tflops is set.
"""Throughput / MFU / memory helpers, the rank-0 progress bar, and the metrics JSONL writer."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLog", "Progress", "peak_memory_mb", "peak_tflops"]

# vendor dense peaks, TFLOP/s: (bf16, tf32)
_PEAKS = {"H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0), "L40S": (362.1, 181.0),
          "A10": (125.0, 62.5), "L4": (121.0, 60.0)}


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The accelerator's dense peak in TFLOP/s for ``precision`` ("bf16" or "fp32" = TF32), or None if unknown."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in _PEAKS.items():
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory (MiB) on ``device``; on CPU the process's peak resident set size (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class Progress:
    """A rich progress bar over optimizer steps that also prints lines above itself; silent when disabled.

    Args:
        total: the last step.
        start: the first step (after a resume).
        enabled: draw it (rank 0 with ``train.progress``).
        console: a ``rich.console.Console`` (default: a new one on stdout).
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, console: Any = None) -> None:
        self.enabled = enabled
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.console = console or Console()
        self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console)
        self._task = self._bar.add_task("train", total=total, completed=start, info="")
        self._bar.start()

    def update(self, step: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def print(self, line: str) -> None:
        if self.enabled:
            self.console.print(line, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class MetricsLog:
    """Append metric rows (dicts) to ``out_dir/metrics.jsonl`` (when set) and keep them in memory."""

    def __init__(self, out_dir: str | Path | None, enabled: bool = True) -> None:
        self.rows: list[dict[str, Any]] = []
        self.path = Path(out_dir) / "metrics.jsonl" if (out_dir and enabled) else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        row = {"time": time.time(), **row}
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
