"""``python -m pflow_dist.bench NAME [--case C ...] [--out FILE.jsonl]``: the ``pflow-dist bench`` runner with argparse
only, for GPU images that lack the CLI's dependencies (typer). ``python -m pflow_dist.bench combine ...`` runs the
multi-process benchmark of the cross-rank combine (:mod:`pflow_dist.bench.combine`, its own options)."""

from __future__ import annotations

import argparse
import sys

import torch

from .harness import write_jsonl
from .registry import BENCHES, get_bench, run_bench
from .report import format_row, print_table


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["combine"]:  # one process group per world size: not a single-process Bench
        from .combine import main as combine_main

        return combine_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m pflow_dist.bench", description=__doc__)
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--case", action="append", default=[])
    p.add_argument("--mode", action="append", default=None)
    p.add_argument("--impl", action="append", default=[])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_bench(get_bench(a.name), device=device, dtype=getattr(torch, a.dtype) if a.dtype else None,
                     quick=a.quick, case_filter=a.case, modes=a.mode, impl_filter=a.impl, warmup=a.warmup, rep=a.rep,
                     check=not a.no_check, on_row=lambda r: print(format_row(r), flush=True))
    print_table(rows)
    if a.out:
        print(f"wrote {len(rows)} rows to {write_jsonl(rows, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
