"""``python -m pflow_dist.bench combine``: the cross-rank combine (dist/combine.py), all-gather vs recursive doubling.

Each world size runs in its own group of real processes (gloo on CPU, NCCL with one GPU per rank on CUDA). Every rank
holds one flow map of a layer's heads, ``M [B, H, K, K]`` and ``D [B, H, K, V]`` (default B1 H16 K=V=128 fp32: 1 MiB
each), and calls ``incoming_state(M, D, S0, algorithm=...)``, forward or forward + backward. Each timed call starts
after a barrier; a call's time is the slowest rank's (the combine is done when the last rank has its state), and the
row reports the median and 20/80th percentiles over calls. Rows are
:class:`~pflow_dist.bench.harness.BenchRow` with ``bench = "combine"``, ``impl`` = the algorithm and, in ``extra``,
``world_size``, ``bytes_in_per_rank`` (what the busiest rank receives in the forward) and ``rounds``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from ..testing.distributed import run_distributed
from .harness import BenchRow, command_line, device_name, versions, write_jsonl

__all__ = ["main", "run_combine_bench"]

ALGORITHMS = ("allgather", "doubling")
MODES = ("fwd", "fwd+bwd")


def _worker(rank: int, world: int, shape: tuple[int, int, int, int], warmup: int, rep: int, cuda: bool) -> dict:
    from ..dist.combine import incoming_state

    B, H, K, V = shape
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    gen = torch.Generator().manual_seed(rank)
    M = (torch.randn(B, H, K, K, generator=gen) * (0.9 / K**0.5)).to(device)
    D = torch.randn(B, H, K, V, generator=gen).to(device)
    S0 = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(99)).to(device)
    up = torch.randn(B, H, K, V, generator=gen).to(device)
    times: dict[str, list[float]] = {}

    def call(algorithm: str, mode: str):
        if mode == "fwd":
            with torch.no_grad():
                return incoming_state(M, D, S0, dist.group.WORLD, algorithm=algorithm)
        m, d = M.detach().requires_grad_(True), D.detach().requires_grad_(True)
        S = incoming_state(m, d, S0, dist.group.WORLD, algorithm=algorithm)
        return torch.autograd.grad(S, [m, d], up)

    for algorithm in ALGORITHMS:
        for mode in MODES:
            out = []
            for i in range(warmup + rep):
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                call(algorithm, mode)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    out.append((time.perf_counter() - t0) * 1e3)
            times[f"{algorithm}/{mode}"] = out
    return times


def run_combine_bench(world_sizes: list[int], shape: tuple[int, int, int, int] = (1, 16, 128, 128), warmup: int = 3,
                      rep: int = 20, cuda: bool = False) -> list[BenchRow]:
    """Time both combine algorithms at each world size; returns one row per (world size, algorithm, mode)."""
    if any(p < 2 for p in world_sizes):
        raise ValueError(f"world sizes must be >= 2, got {world_sizes}")
    if cuda and max(world_sizes) > torch.cuda.device_count():
        raise ValueError(f"world size {max(world_sizes)} needs that many GPUs, {torch.cuda.device_count()} visible")
    B, H, K, V = shape
    map_bytes = 4 * B * H * K * (K + V)
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    dev_name = f"{device_name(dev)} ({'nccl' if cuda else 'gloo'}, {os.cpu_count()} cores)"
    rows = []
    for P in world_sizes:
        load = os.getloadavg()[0]  # other work on the box skews CPU timings: recorded beside them
        per_rank = run_distributed(_worker, P, shape, warmup, rep, cuda, backend="nccl" if cuda else "gloo",
                                   timeout_s=600)
        rounds = math.ceil(math.log2(P))
        for key in per_rank[0]:
            algorithm, mode = key.split("/")
            slowest = [max(r[key][i] for r in per_rank) for i in range(rep)]
            q = statistics.quantiles(slowest, n=5, method="inclusive") if rep > 1 else [slowest[0]] * 4
            rows.append(BenchRow(
                bench="combine", case=f"P{P}-B{B}-H{H}-K{K}-V{V}", mode=mode, impl=algorithm, device=dev_name,
                dtype="float32", shapes={"M": [B, H, K, K], "D": [B, H, K, V]},
                median_ms=statistics.median(slowest), p20_ms=q[0], p80_ms=q[3], n_rep=rep, peak_mem_bytes=None,
                versions=versions(), command=command_line(),
                extra={"world_size": P, "load_avg_1m_before": round(load, 2),
                       "rounds": 1 if algorithm == "allgather" else rounds,
                       "bytes_in_per_rank": map_bytes * (P - 1 if algorithm == "allgather" else rounds)},
            ))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pflow_dist.bench combine", description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--shape", type=int, nargs=4, default=[1, 16, 128, 128], metavar=("B", "H", "K", "V"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    p.add_argument("--out")
    a = p.parse_args(argv)
    rows = run_combine_bench(a.world, tuple(a.shape), a.warmup, a.rep, a.cuda)
    for r in rows:
        print(f"{r.case:24s} {r.mode:8s} {r.impl:10s} median {r.median_ms:8.2f} ms  "
              f"[p20 {r.p20_ms:.2f}, p80 {r.p80_ms:.2f}]  in/rank {r.extra['bytes_in_per_rank'] / 2**20:.0f} MiB")
    if a.out:
        print(f"wrote {len(rows)} rows to {write_jsonl(rows, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
