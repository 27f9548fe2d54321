"""Tile sweep of the diagonal scan's Triton kernels: ``python -m pflow_dist.bench.scan_sweep [--case B,T,N ...]``.

Runs the forward of :func:`pflow_dist.kernels.scan.diag.diag_scan_triton` (fp32) for every algorithm (look-back,
segmented look-back, loop, three-pass) over rows of 8/16/32 channels, 2048-8192-element tiles, 2/4/8 warps, 2-8
tiles per segment and 1-3 pipeline stages (and ``auto``), checks each result against the three-pass one, and writes
one JSON line per configuration: time, fraction of the device copy bandwidth measured in the same run (3 tensors
moved: a, b in, h out), relative error. ``diag_tile_config`` and the
``auto`` dispatch come from its H200 output (``benchmarks/results/scan_sweep_h200.jsonl``). On CPU it runs through the
Triton interpreter (tiny cases, for tests).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from ..kernels.scan.diag import diag_scan_triton, to_channel_major
from .harness import measure
from .scan import copy_bandwidth

DEFAULT_CASES = ((16, 2**16, 256), (4, 2**18, 256), (1, 2**20, 256), (1, 2**22, 64), (1, 2**24, 16))


def configs(B: int, N: int) -> Iterator[dict]:
    """The keyword sets swept for one ``[B, T, N]`` case (``diag_scan_triton`` arguments)."""
    for bn, elems, warps in itertools.product((8, 16, 32), (2048, 4096, 8192), (2, 4, 8)):
        if bn <= max(8, N):
            yield dict(algorithm="lookback", block_n=bn, block_t=elems // bn, num_warps=warps)
    # segmented look-back: a program streams `segment` tiles, looks back once, re-reads them (L2)
    for (bn, elems, warps), segment, stages in itertools.product(((32, 4096, 2), (16, 8192, 4), (32, 2048, 2)),
                                                                (2, 4, 8), (1, 2, 3)):
        if bn <= max(8, N):
            yield dict(algorithm="lookback", block_n=bn, block_t=elems // bn, num_warps=warps, segment=segment,
                       num_stages=stages)
    for bn, elems, warps in itertools.product((16, 32), (2048, 4096), (2, 4)):
        if B * -(-N // bn) >= 64:  # a loop program per (sequence, channel group): only with enough of them
            yield dict(algorithm="loop", block_n=bn, block_t=elems // bn, num_warps=warps)
    yield dict(algorithm="chunk")
    yield dict(algorithm="auto")


def wide_configs(B: int, N: int) -> Iterator[dict]:
    """Look-back over wide rows (64-256 channels: a tile is then a few KiB-long contiguous runs of memory instead of
    128-byte stripes, and the scan along time stays inside each thread), against the current default and ``auto``."""
    for bn, elems, warps, window in itertools.product((64, 128, 256), (4096, 8192), (2, 4, 8), (2, 16)):
        if bn <= N:
            yield dict(algorithm="lookback", block_n=bn, block_t=elems // bn, num_warps=warps, window=window)
    yield dict(algorithm="lookback")
    yield dict(algorithm="auto")


def cm_configs(B: int, N: int) -> Iterator[dict]:
    """Channel-major memory (``[B, N, T]`` stored, T contiguous): look-back over 1-4 time runs of 1k-16k elements per
    tile on 2-8 warps, segmented look-back, the loop kernel where there are sequences enough, and ``auto``."""
    for bn, elems, warps in itertools.product((1, 2, 4), (1024, 2048, 4096), (2, 4, 8)):
        yield dict(algorithm="lookback", block_n=bn, block_t=elems // bn, num_warps=warps)
    for elems, warps in itertools.product((8192, 16384), (1, 2, 4)):  # single runs longer than 4096 steps
        yield dict(algorithm="lookback", block_n=1, block_t=elems, num_warps=warps)
    for segment, stages in itertools.product((4, 8), (1, 2)):
        yield dict(algorithm="lookback", block_n=1, block_t=2048, num_warps=4, segment=segment, num_stages=stages)
    for bn, elems, warps in itertools.product((1, 2), (1024, 2048, 4096, 8192), (2, 4)):
        if B * N // bn >= 64:
            yield dict(algorithm="loop", block_n=bn, block_t=elems // bn, num_warps=warps)
    yield dict(algorithm="auto")


GRIDS = {"full": configs, "wide": wide_configs, "cm": cm_configs}
CHANNEL_MAJOR_GRIDS = ("cm",)  # grids run on [B, N, T]-stored inputs


def sweep(cases: Sequence[tuple[int, int, int]], device: torch.device, warmup: int = 3, rep: int = 20,
          grid: Callable[[int, int], Iterable[dict]] = configs, channel_major: bool = False,
          adjoint: bool = False) -> Iterator[dict]:
    """Yield one result row per (case, configuration in ``grid(B, N)``); a configuration that fails gets an
    ``error`` row instead of ``ms``/``err``. ``channel_major``: the inputs are stored ``[B, N, T]`` (the reference
    stays the three-pass scan of ``[B, T, N]`` memory). ``adjoint``: time the backward kernel instead (reverse scan of
    an upstream gradient with da: a, ḡ, h in, λ and da out, 5 tensors; the error is the worse of λ and da)."""
    bw = copy_bandwidth(device)
    for B, T, N in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        a = 0.9 + 0.1 * torch.rand(B, T, N, device=device, generator=gen)
        b = torch.randn(B, T, N, device=device, generator=gen)
        h = diag_scan_triton(a, b, None, algorithm="chunk")[0] if adjoint else None

        def call(a, b, h, kw):
            if adjoint:  # b is the upstream gradient here
                lam, _, da = diag_scan_triton(a, b, None, reverse=True, h=h, want_da=True, **kw)
                return lam, da
            return (diag_scan_triton(a, b, None, **kw)[0],)

        ref = call(a, b, h, dict(algorithm="chunk"))
        if channel_major:
            a, b, h = (None if x is None else to_channel_major(x) for x in (a, b, h))
        for kw in grid(B, N):
            row: dict = dict(case=f"B{B}-T{T}-N{N}", **kw, **({"layout": "BNT"} if channel_major else {}),
                             **({"kernel": "adjoint"} if adjoint else {}))
            try:
                out = call(a, b, h, kw)
                row["err"] = max(((o - r).abs().max() / r.abs().max()).item() for o, r in zip(out, ref))
                run = lambda a=a, b=b, h=h, kw=kw: call(a, b, h, kw)  # noqa: E731
                row["ms"] = measure(run, device, warmup, rep).median_ms
                if bw is not None:
                    row["copy_GBps"] = bw
                    row["frac"] = (5 if adjoint else 3) * a.numel() * 4 / (row["ms"] * 1e-3) / 1e9 / bw
            except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is a result too
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            yield row


def _case(text: str) -> tuple[int, int, int]:
    try:
        B, T, N = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is B,T,N (three integers), got {text!r}") from None
    if min(B, T, N) < 1:
        raise argparse.ArgumentTypeError(f"B, T and N must be positive, got {text!r}")
    return B, T, N


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=_case, action="append", help="B,T,N (repeatable; default: 2^28 elements "
                        "at T = 2^16 ... 2^24)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full",
                        help="full: every algorithm over 8-32-channel rows; wide: look-back over 64-256-channel rows; "
                        "cm: every algorithm on channel-major ([B, N, T]-stored) inputs")
    parser.add_argument("--adjoint", action="store_true", help="time the backward (reverse scan + da) kernel")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rep", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("scan_sweep.jsonl"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    with args.out.open("w") as f:
        for row in sweep(args.case or DEFAULT_CASES, device, args.warmup, args.rep, GRIDS[args.grid],
                         channel_major=args.grid in CHANNEL_MAJOR_GRIDS, adjoint=args.adjoint):
            f.write(json.dumps(row) + "\n")
            f.flush()
            cfg = {k: v for k, v in row.items() if k in ("algorithm", "block_n", "block_t", "num_warps", "segment",
                                                         "num_stages", "window")}
            result = row.get("error") or (f"{row['ms']:.3f} ms" + (f", {100 * row['frac']:.1f}% of copy"
                                                                  if "frac" in row else "") + f", err {row['err']:.1e}")
            print(f"[{time.perf_counter() - t0:6.1f} s] {row['case']} {cfg}: {result}", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
