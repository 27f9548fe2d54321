"""Readable output of benchmark rows: one table with times, memory, errors and the speedup of ours over each peer."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .harness import OURS, BenchRow, ratios

__all__ = ["format_row", "print_table"]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_row(row: BenchRow) -> str:
    """One line for progress output."""
    if row.status != "ok":
        return f"{row.case:<28} {row.mode:<8} {row.impl:<14} {row.status}: {row.error}"
    mem = "-" if row.peak_mem_bytes is None else f"{row.peak_mem_bytes / 2**20:.0f} MiB"
    err = row.extra.get("rel_err")
    return (f"{row.case:<28} {row.mode:<8} {row.impl:<14} {row.median_ms:10.3f} ms  {mem:>10}"
            + ("" if err is None else f"  rel_err {err:.2e}"))


def print_table(rows: Sequence[BenchRow], console: Console | None = None) -> None:
    """Print all rows and, per case and mode, the speedup of ours over every peer (peer_ms / ours_ms)."""
    console = console or Console(width=160)
    table = Table(title=f"{rows[0].bench} on {rows[0].device}" if rows else "no rows")
    for col in ("case", "mode", "impl", "median ms", "p20–p80 ms", "peak MiB", "rel err", "status"):
        table.add_column(col, justify="right" if "ms" in col or "MiB" in col or "err" in col else "left")
    for r in rows:
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        spread = "-" if r.p20_ms is None else f"{r.p20_ms:.3f}–{r.p80_ms:.3f}"
        table.add_row(r.case, r.mode, r.impl, _fmt(r.median_ms, ".3f"), spread, _fmt(mem, ".0f"),
                      _fmt(r.extra.get("rel_err"), ".2e"), r.status)
    console.print(table)
    for impl, error in dict.fromkeys((r.impl, r.error) for r in rows if r.status != "ok"):
        console.print(f"  {impl}: {error}", highlight=False)
    pairs = ratios(rows)
    if pairs:
        t2 = Table(title=f"speedup of {OURS} (peer ms / ours ms; > 1 means ours is faster)")
        for col in ("case", "mode", "peer", "ours ms", "peer ms", "speedup"):
            t2.add_column(col)
        for p in pairs:
            t2.add_row(p["case"], p["mode"], p["peer"], _fmt(p["ours_ms"], ".3f"), _fmt(p["peer_ms"], ".3f"),
                       "-" if p["speedup"] is None else f"{p['speedup']:.2f}×")
        console.print(t2)
