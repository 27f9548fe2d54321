"""Benchmark harness: time ours and a peer in one process on the same inputs, record peak memory, write JSONL.

Timing follows the usual GPU method: warm-up calls first (autotuning and compilation happen there), then ``rep``
timed calls bracketed by CUDA events, reporting the median and the 20th/80th percentiles. On CPU the clock is
``time.perf_counter``. Peak memory is ``torch.cuda.max_memory_allocated`` over one extra call after
``reset_peak_memory_stats`` (inputs included); on CPU it is not measured (``None``).

Every row carries ``bench, case, mode, impl, device`` so the rows of ours and of the peer for one case can be paired
again from the file (:func:`ratios`).
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["BenchRow", "Timing", "device_name", "measure", "ratios", "read_jsonl", "versions", "write_jsonl"]

OURS = "ours"


@dataclass(frozen=True)
class Timing:
    """Timing statistics of one callable, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n_rep: int
    peak_mem_bytes: int | None


@dataclass
class BenchRow:
    """One JSONL row: one implementation, one case, one mode.

    Attributes:
        bench: the benchmark's name (``pflow-dist bench --list``).
        case: shape and options, e.g. ``"B4-T8192-H16-D128"``.
        mode: ``"fwd"``, ``"fwd+bwd"``, ...
        impl: ``"ours"`` or the peer's name.
        device: the device name (``torch.cuda.get_device_name`` or the CPU model).
        dtype: input dtype.
        shapes: named input shapes.
        median_ms, p20_ms, p80_ms, n_rep: timing.
        peak_mem_bytes: CUDA peak over one call (``None`` on CPU).
        versions: python/torch/triton/CUDA and the peer's version.
        command: the command line that produced the row.
        status: ``"ok"``, or ``"error"`` / ``"unavailable"`` with ``error`` saying why (a peer that refuses to run).
        extra: benchmark-specific metrics (relative error vs the float64 reference, tokens/s, ...).
    """

    bench: str
    case: str
    mode: str
    impl: str
    device: str
    dtype: str
    shapes: dict[str, list[int]]
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    n_rep: int
    peak_mem_bytes: int | None
    versions: dict[str, str]
    command: str
    status: str = "ok"
    error: str | None = None
    timestamp: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int = 3, rep: int = 10) -> Timing:
    """Time ``fn`` on ``device``: ``warmup`` untimed calls, then ``rep`` timed calls; also its peak memory.

    Args:
        fn: a callable with no arguments (closes over its inputs).
        device: where ``fn`` runs (CUDA events on CUDA, ``perf_counter`` elsewhere).
        warmup: untimed calls first (compilation, autotuning, caches).
        rep: timed calls.

    Returns:
        :class:`Timing` with median and 20/80th percentiles in ms, and peak memory in bytes (CUDA only).
    """
    if warmup < 0 or rep < 1:
        raise ValueError(f"need warmup >= 0 and rep >= 1, got warmup={warmup}, rep={rep}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak: int | None = torch.cuda.max_memory_allocated(device)
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], rep, peak)


def device_name(device: torch.device) -> str:
    """A readable device name: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _pkg_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(*peers: str) -> dict[str, str]:
    """Versions of python, torch, triton, CUDA and of the given peer distributions (those installed)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "pflow-dist", *peers):
        v = _pkg_version(name)
        if v is not None:
            out[name] = v
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def command_line() -> str:
    """The command that is running, quoted for a shell (``python -m pkg ...`` kept as such)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    argv[0] = Path(argv[0]).name
    return " ".join(shlex.quote(a) for a in argv)


def write_jsonl(rows: Iterable[BenchRow], path: str | Path) -> Path:
    """Append rows to a JSONL file (created with its folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(asdict(row), sort_keys=True) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read the rows of a JSONL results file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def ratios(rows: Iterable[dict[str, Any] | BenchRow]) -> list[dict[str, Any]]:
    """Pair each peer row with ours (same bench, case, mode, device) and compute ``speedup = peer_ms / ours_ms``.

    Returns:
        One dict per (case, mode, peer): ``bench, case, mode, device, peer, ours_ms, peer_ms, speedup``
        (``speedup`` > 1 means ours is faster; ``None`` when either side did not run).
    """
    dicts = [asdict(r) if isinstance(r, BenchRow) else r for r in rows]
    key = lambda r: (r["bench"], r["case"], r["mode"], r["device"])  # noqa: E731
    ours = {key(r): r for r in dicts if r["impl"] == OURS}
    out = []
    for r in dicts:
        if r["impl"] == OURS or key(r) not in ours:
            continue
        o = ours[key(r)]
        ok = o.get("median_ms") and r.get("median_ms") and o.get("status") == "ok" and r.get("status") == "ok"
        out.append({
            "bench": r["bench"], "case": r["case"], "mode": r["mode"], "device": r["device"], "peer": r["impl"],
            "ours_ms": o.get("median_ms"), "peer_ms": r.get("median_ms"),
            "speedup": (r["median_ms"] / o["median_ms"]) if ok else None,
        })
    return out
