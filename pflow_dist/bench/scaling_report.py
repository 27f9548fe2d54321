"""Reports of a scaling sweep (:mod:`pflow_dist.bench.scaling`): a Markdown table and a PNG plot of its rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..plotting import save_figure
from .harness import BenchRow

__all__ = ["markdown_table", "plot", "point_line"]


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table of a sweep (one line per implementation, (tokens, batch) and world size; failed points show
    the error; DEER rows add their Newton iterations)."""
    iters = any("iterations" in r.extra for r in rows)
    cols = ["impl", "ranks", "tokens", "B", "step ms", "tokens/s", "tokens/s/rank", "efficiency", "peak MiB/rank",
            "comm bytes/rank"] + (["iterations"] if iters else [])
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in rows:
        e = r.extra
        tokens = f"**{e['tokens']}** (longest)" if e.get("longest") else e["tokens"]
        head = f"| {r.impl} | {e['world_size']} | {tokens} | {e['batch']} |"
        if r.status != "ok":
            lines.append(f"{head} {_failure(r, 80)} |" + " |" * (len(cols) - 5))
            continue
        mem = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.0f}"
        comm = "-" if e["comm_bytes"] is None else e["comm_bytes"]
        eff = f"{e['efficiency']:.0%}" if "efficiency" in e else "-"
        lines.append(f"{head} {r.median_ms:.2f} | {e['tokens_per_s']:.3g} | {e['tokens_per_s_per_rank']:.3g} | "
                     f"{eff} | {mem} | {comm} |" + (f" {e.get('iterations', '-')} |" if iters else ""))
    return "\n".join(lines)


def _failure(row: BenchRow, width: int) -> str:
    """A failed point in one line: "out of memory", or the status and the error's last line (a rank's traceback
    ends with the exception), at most ``width`` characters of it."""
    if row.extra.get("out_of_memory"):
        return "out of memory"
    lines = (row.error or "").strip().splitlines()
    return f"{row.status}: {(lines[-1] if lines else '')[:width]}"


def point_line(row: BenchRow) -> str:
    """One line for a measured point as it arrives (the progress output of a long sweep), e.g.
    ``ours P=2 T=2097152 B=1: 412.3 ms, 5.09e+06 tokens/s, 61.2 GiB/rank`` or ``... : out of memory``."""
    e = row.extra
    head = f"{row.impl} P={e['world_size']} T={e['tokens']} B={e['batch']}"
    if row.status != "ok":
        return f"{head}: {_failure(row, 120)}"
    mem = "" if row.peak_mem_bytes is None else f", {row.peak_mem_bytes / 2**30:.1f} GiB/rank"
    return f"{head}: {row.median_ms:.1f} ms, {e['tokens_per_s']:.3g} tokens/s{mem}"


def plot(rows: Sequence[BenchRow], path: str | Path) -> Path:
    """Two panels: tokens/s against ranks (with the ideal line) and efficiency; for ``mode="longest"`` one panel of
    the sequence lengths tried per world size (the longest that ran joined by a line). Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = rows[0].bench.removeprefix("scale-")
    if mode == "longest":
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in dict.fromkeys(r.impl for r in rows):
            mine = [r for r in rows if r.impl == impl]
            for ok, marker in ((True, "o"), (False, "x")):
                pts = [(r.extra["world_size"], r.extra["tokens"]) for r in mine if (r.status == "ok") == ok]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), marker=marker, label=f"{impl} {'ran' if ok else 'failed'}")
            best = sorted((r.extra["world_size"], r.extra["tokens"]) for r in mine if r.extra.get("longest"))
            if best:
                ax.plot(*zip(*best, strict=True), "-", alpha=0.6, label=f"{impl} longest")
        ax.set(xscale="log", yscale="log", xlabel="ranks", ylabel="sequence length (tokens)",
               title=f"longest sequence, {rows[0].device}")
        ranks = sorted({r.extra["world_size"] for r in rows})
        ax.set_xticks(ranks, [str(p) for p in ranks])
        ax.legend(fontsize="small")
        return save_figure(fig, path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    P: list[int] = []
    # one line per implementation and sweep point; tokens and batch in the label only when the sweep varies them
    point = lambda r: (r.extra["config"]["tokens"], r.extra["batch"])  # noqa: E731
    points = list(dict.fromkeys(point(r) for r in rows))
    for impl, pt in dict.fromkeys((r.impl, point(r)) for r in rows):
        ok = [r for r in rows if r.impl == impl and point(r) == pt and r.status == "ok"]
        if not ok:
            continue
        label = impl if len(points) == 1 else f"{impl} T={pt[0]} B={pt[1]}"
        P = sorted(set(P) | {r.extra["world_size"] for r in ok})
        p = [r.extra["world_size"] for r in ok]
        tps = [r.extra["tokens_per_s"] for r in ok]
        (line,) = ax1.plot(p, tps, "o-", label=label)
        ax1.plot(p, [tps[0] * x / p[0] for x in p], "--", color=line.get_color(), alpha=0.5, label=f"{label} ideal")
        ax2.plot(p, [100 * r.extra["efficiency"] for r in ok], "o-", color=line.get_color(), label=label)
    ax1.set(xscale="log", yscale="log", xlabel="ranks", ylabel="tokens/s", title=f"{mode} scaling, {rows[0].device}")
    ax1.set_xticks(P, [str(p) for p in P])
    ax1.legend(fontsize="small")
    ax2.axhline(100, color="k", ls="--")
    ax2.legend(fontsize="small")
    cfg = rows[0].extra["config"]
    title = (f"{cfg.get('op', 'flow')} H{cfg['heads']} D{cfg['dim']} {cfg['dtype']}"
             + (" gated" if cfg["gated"] else ""))
    top = max([110.0] + [100 * r.extra["efficiency"] + 10 for r in rows if r.status == "ok"])  # superlinear too
    ax2.set(xscale="log", xlabel="ranks", ylabel="efficiency %", ylim=(0, top), title=title)
    ax2.set_xticks(P, [str(p) for p in P])
    return save_figure(fig, path)
