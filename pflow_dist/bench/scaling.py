"""Scaling experiments (``pflow-dist scale``): weak and strong scaling of a sequence-parallel layer over ranks.

Weak scaling keeps the tokens per rank fixed (T = tokens · P, ideal: constant step time); strong scaling keeps the
sequence fixed (T = tokens, ideal: time ∝ 1/P). Every world size runs in its own group of real processes (gloo on CPU,
NCCL on GPUs, one GPU per rank); each rank times fwd+bwd of the layer on its shard, and the slowest rank's median is the
step time. Rows are :class:`~pflow_dist.bench.harness.BenchRow` with ``bench = "scale-weak" | "scale-strong"`` and the
scaling metrics in ``extra``: ``world_size, tokens, tokens_per_s, tokens_per_s_per_rank, efficiency, comm_bytes``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..testing.distributed import run_distributed
from .harness import BenchRow, command_line, device_name, versions

__all__ = ["ScaleConfig", "comm_bytes_flow", "markdown_table", "plot", "run_scaling"]

MODES = ("weak", "strong")


@dataclass(frozen=True)
class ScaleConfig:
    """One sweep. ``tokens`` is per rank for weak scaling and the whole sequence for strong scaling."""

    mode: str = "weak"
    world_sizes: tuple[int, ...] = (1, 2)
    tokens: int = 4096
    batch: int = 1
    heads: int = 2
    dim: int = 32
    dtype: str = "float32"
    device: str = "cpu"
    warmup: int = 1
    rep: int = 3
    chunk_size: int = 64
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.world_sizes or any(p < 1 for p in self.world_sizes):
            raise ValueError(f"world_sizes must be positive, got {self.world_sizes}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and max(self.world_sizes) > torch.cuda.device_count():
            raise ValueError(f"world size {max(self.world_sizes)} needs that many GPUs, "
                             f"{torch.cuda.device_count()} visible")
        if self.mode == "strong" and self.tokens < max(self.world_sizes):
            raise ValueError(f"strong scaling of {self.tokens} tokens cannot use {max(self.world_sizes)} ranks")
        if min(self.tokens, self.batch, self.heads, self.dim, self.warmup + 1, self.rep) < 1:
            raise ValueError(f"tokens, batch, heads, dim and rep must be >= 1 (warmup >= 0), got {self}")

    def total_tokens(self, world: int) -> int:
        return self.tokens * world if self.mode == "weak" else self.tokens


def comm_bytes_flow(cfg: ScaleConfig, world: int) -> int:
    """Bytes each rank sends+receives in one fwd+bwd of ``sp_flow``: the all-gather of the flow maps (M, D) forward
    (P maps of B·H·(K² + K·V) fp32) and the all-reduce of their gradients backward (2× the buffer, ring)."""
    if world == 1:
        return 0
    m = cfg.batch * cfg.heads * (cfg.dim * cfg.dim + cfg.dim * cfg.dim) * 4  # one rank's (M, D), K = V = dim
    gather = 2 * (world - 1) * m  # ring all-gather: P−1 maps sent and P−1 received
    n = world * m + cfg.batch * cfg.heads * cfg.dim * cfg.dim * 4  # gradient buffer: P maps + the initial state
    reduce = 2 * 2 * (world - 1) / world * n  # ring all-reduce: 2(P−1)/P of the buffer, sent and received
    return int(gather + reduce)


def _worker(rank: int, world: int, cfg: ScaleConfig) -> dict:
    from ..dist import sp_flow  # imported in the child: the parent need not import the ops

    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg.dtype)
    T_local = cfg.total_tokens(world) // world + (1 if rank < cfg.total_tokens(world) % world else 0)
    gen = torch.Generator().manual_seed(rank)
    B, H, D = cfg.batch, cfg.heads, cfg.dim
    mk = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q, v = mk(B, T_local, H, D), mk(B, T_local, H, D)
    k = F.normalize(mk(B, T_local, H, D).float(), dim=-1).to(dtype)
    beta = torch.rand(B, T_local, H, generator=gen).to(device=device, dtype=dtype)
    leaves = [x.requires_grad_(True) for x in (q, k, v, beta)]
    do = mk(B, T_local, H, D)

    def step() -> None:
        o, _ = sp_flow(*leaves, group=dist.group.WORLD, chunk_size=cfg.chunk_size, backend=cfg.backend)
        torch.autograd.grad(o, leaves, do)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    for _ in range(cfg.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(cfg.rep):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
    peak_t = torch.tensor([peak], dtype=torch.int64)
    dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    return {"seconds": slowest.item(), "peak_mem_bytes": int(peak_t.item()), "device": device_name(device)}


def run_scaling(cfg: ScaleConfig, on_point: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Run the sweep; efficiency is relative to the smallest world size measured.

    Returns:
        One row per world size (``impl = "ours"``, ``mode = "fwd+bwd"``).
    """
    rows: list[BenchRow] = []
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    vers, cmd = versions(), command_line()
    for world in sorted(cfg.world_sizes):
        res = run_distributed(_worker, world, cfg, backend=backend, timeout_s=1800, collective_timeout_s=600)[0]
        T = cfg.total_tokens(world)
        tok_s = cfg.batch * T / res["seconds"]
        row = BenchRow(
            bench=f"scale-{cfg.mode}", case=f"P{world}-T{T}-B{cfg.batch}-H{cfg.heads}-D{cfg.dim}", mode="fwd+bwd",
            impl="ours", device=res["device"], dtype=cfg.dtype,
            shapes={"q_local": [cfg.batch, T // world, cfg.heads, cfg.dim]}, median_ms=res["seconds"] * 1e3,
            p20_ms=None, p80_ms=None, n_rep=cfg.rep,
            peak_mem_bytes=res["peak_mem_bytes"] if res["peak_mem_bytes"] >= 0 else None, versions=vers, command=cmd,
            extra={"world_size": world, "tokens": T, "tokens_per_s": tok_s, "tokens_per_s_per_rank": tok_s / world,
                   "comm_bytes": comm_bytes_flow(cfg, world), "config": asdict(cfg)},
        )
        base = rows[0] if rows else row
        p0, t0 = base.extra["world_size"], base.median_ms
        ideal = t0 if cfg.mode == "weak" else t0 * p0 / world
        row.extra["efficiency"] = ideal / row.median_ms
        rows.append(row)
        if on_point is not None:
            on_point(row)
    return rows


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table of a sweep (one line per world size)."""
    lines = ["| ranks | tokens | step ms | tokens/s | tokens/s/rank | efficiency | peak MiB/rank | comm bytes/rank |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r.extra
        mem = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.0f}"
        lines.append(f"| {e['world_size']} | {e['tokens']} | {r.median_ms:.2f} | {e['tokens_per_s']:.3g} | "
                     f"{e['tokens_per_s_per_rank']:.3g} | {e['efficiency']:.0%} | {mem} | {e['comm_bytes']} |")
    return "\n".join(lines)


def plot(rows: Sequence[BenchRow], path: str | Path) -> Path:
    """Two panels: tokens/s against ranks (with the ideal line) and efficiency; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P = [r.extra["world_size"] for r in rows]
    tps = [r.extra["tokens_per_s"] for r in rows]
    mode = rows[0].bench.removeprefix("scale-")
    ideal = [tps[0] * p / P[0] for p in P] if mode in ("weak", "strong") else tps
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(P, tps, "o-", label="measured")
    ax1.plot(P, ideal, "k--", label="ideal")
    ax1.set(xscale="log", yscale="log", xlabel="ranks", ylabel="tokens/s", title=f"{mode} scaling, {rows[0].device}")
    ax1.set_xticks(P, [str(p) for p in P])
    ax1.legend()
    ax2.plot(P, [100 * r.extra["efficiency"] for r in rows], "o-")
    ax2.axhline(100, color="k", ls="--")
    ax2.set(xscale="log", xlabel="ranks", ylabel="efficiency %", ylim=(0, 110), title=rows[0].case.split("-", 1)[1])
    ax2.set_xticks(P, [str(p) for p in P])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
