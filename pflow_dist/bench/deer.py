"""``pflow-dist bench deer``: a GRU over long sequences by DEER (parallel Newton) vs ``torch.nn.GRU`` (cuDNN).

Same inputs as ``bench gru`` (input size = hidden size nh, nn.GRU's init, x ~ N(0, 1), h0 = 0, fp32). Implementations:
- ``ours``: ``pflow_dist.ops.deer.deer_rnn(..., method="quasi")`` (diagonal Jacobian: look-back diagonal scan);
- ``ours-newton``: ``method="newton"`` (structured dense Jacobian, chunked dense scan, n ≤ 64);
- ``torch.nn.GRU``: cuDNN over contiguous chunks of 2^14 steps carrying the hidden state (DESIGN.md §10's "chunked":
  2^16-step strided slices got CUDNN_STATUS_NOT_SUPPORTED on H100); gradients flow through the chunks;
- ``deer-jax``: the method's own code (machine-discovery/deer ``seq1d``, JAX, full Jacobians), same GRU and inputs
  (:mod:`pflow_dist.bench.deer_jax`; needs jax and the deer source).
``pflow-dist bench deer`` (and ``python -m pflow_dist.bench.deer``) add to every row (``finalize_rows``) the Newton
iterations and the max abs error of each method against the sequential cuDNN result (TF32 off) on the same inputs.
``--crossover`` runs ours and cuDNN over a grid of (B, nh, T) instead and reports, per (B, nh), from which T on DEER is
the faster (:func:`crossover`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

import torch

from ..kernels.deer.naive import GRUWeights, naive_gru
from .gru import _gru_module, _inputs
from .harness import BenchRow
from .registry import Bench, Case, Impl

_QUICK = [(2, 8, 64), (1, 16, 256)]
_FULL = [(1, 8, 2**20), (16, 32, 2**20), (16, 32, 17984), (16, 64, 17984), (16, 256, 17984)]
_CUDNN_CHUNK = 2**14


# crossover grid: DEER's work grows with B·nh·T (times the iterations), cuDNN's time mostly with T (one step after the
# other, each parallel over B·nh): short sequences of many large states are where cuDNN can win. B·nh·T ≤ 2^28 keeps
# DEER's fwd+bwd within one GPU's memory (60 GB at 2^29 in deer_h100.jsonl).
_CROSSOVER_BN = ((16, 32), (16, 64), (64, 64), (256, 64), (16, 256), (64, 256))
_CROSSOVER_T = (256, 1024, 4096, 17984, 65536)
_CROSSOVER_QUICK = ((2, 8, 16), (2, 8, 48))


def _case_list(shapes) -> list[Case]:
    return [Case(f"B{b}-nh{n}-T{t}", {"B": b, "nh": n, "T": t}) for b, n, t in shapes]


def _cases(quick: bool) -> list[Case]:
    return _case_list(_QUICK if quick else _FULL)


def crossover_cases(quick: bool) -> list[Case]:
    """The ``--crossover`` grid: T from 256 to 65536 for each (B, nh), B·nh·T ≤ 2^28 (tiny on CPU with ``quick``)."""
    if quick:
        return _case_list(_CROSSOVER_QUICK)
    return _case_list((b, n, t) for b, n in _CROSSOVER_BN for t in _CROSSOVER_T if b * n * t <= 2**28)


def crossover(rows: Sequence[BenchRow], ours: str = "ours", peer: str = "torch.nn.GRU") -> list[dict]:
    """Per (B, nh, mode): ours' speedup over ``peer`` (peer ms / ours ms) at each T measured by both, and
    ``ours_faster_from_T``, the shortest T from which ours is faster at that and every longer T (None: at none)."""
    ms = {(r.case, r.mode, r.impl): r.median_ms for r in rows if r.status == "ok" and r.median_ms}
    groups: dict[tuple[int, int, str], dict[int, float]] = {}
    for r in rows:
        if r.impl != ours or (r.case, r.mode, peer) not in ms or (r.case, r.mode, ours) not in ms:
            continue
        (b, n), t = r.shapes["h0"], r.shapes["x"][1]  # h0 [B, nh], x [B, T, I]
        groups.setdefault((b, n, r.mode), {})[t] = ms[(r.case, r.mode, peer)] / ms[(r.case, r.mode, ours)]
    out = []
    for (b, n, mode), by_t in sorted(groups.items()):
        ts = sorted(by_t)
        wins_from = next((t for i, t in enumerate(ts) if all(by_t[u] > 1 for u in ts[i:])), None)
        out.append({"B": b, "nh": n, "mode": mode, "speedup_by_T": {t: by_t[t] for t in ts},
                    "ours_faster_from_T": wins_from})
    return out


def _weights(inp) -> GRUWeights:
    return GRUWeights(inp["weight_ih"], inp["weight_hh"], inp["bias_ih"], inp["bias_hh"])


def _deer(method: str):
    def run(inp):
        from ..ops.deer import deer_rnn

        h, hT, _ = deer_rnn(_weights(inp), inp["x"], inp["h0"], method)
        return h, hT

    return run


def _jax(inp):
    from .deer_jax import jax_deer_gru

    return jax_deer_gru(inp["x"], inp["h0"], inp["weight_ih"], inp["weight_hh"], inp["bias_ih"], inp["bias_hh"])


def _jax_unavailable(device: torch.device) -> str | None:
    from .deer_jax import unavailable

    return unavailable(device)


def _cudnn(inp):
    x = inp["x"]
    module = _gru_module(x.shape[-1], x.device, x.dtype)
    params = {f"{k}_l0": inp[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    h = inp["h0"].unsqueeze(0)
    outs = []
    for t0 in range(0, x.shape[1], _CUDNN_CHUNK):
        o, h = torch.func.functional_call(module, params, (x[:, t0:t0 + _CUDNN_CHUNK].contiguous(), h))
        outs.append(o)
    return torch.cat(outs, dim=1), h[0]


def _reference(inp) -> torch.Tensor:
    return naive_gru(inp["x"].double(), inp["h0"].double(), _weights(inp).to(torch.float64))[0]


BENCH = Bench(
    name="deer",
    description=__doc__.splitlines()[0],
    cases=_cases,
    make_inputs=_inputs,
    impls=[Impl("ours", _deer("quasi")), Impl("ours-newton", _deer("newton")), Impl("torch.nn.GRU", _cudnn),
           Impl("deer-jax", _jax, unavailable=_jax_unavailable, package="jax")],
    grad_inputs=("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh"),
    default_dtype=torch.float32,
    reference=_reference,
    check_limit=lambda case: case.params["T"] * case.params["B"] <= 2**16,
)


def _solve_for_stats(impl: str, inp) -> tuple[torch.Tensor, dict]:
    """``(h, extra stats)`` of one DEER implementation on ``inp`` (its Newton iterations where it reports them)."""
    if impl == "deer-jax":
        return _jax(inp)[0], {}
    from ..ops.deer import deer_rnn

    h, _, info = deer_rnn(_weights(inp), inp["x"], inp["h0"], {"ours": "quasi", "ours-newton": "newton"}[impl])
    return h, {"iterations": info.iterations}


def finalize_rows(rows: list[BenchRow], device: torch.device, cases: list[Case]) -> list[BenchRow]:
    """Add ``iterations`` and ``max_abs_err_vs_sequential`` (against cuDNN in fp32 with TF32 off, on the same
    inputs) to the DEER rows."""
    stats: dict[tuple[str, str], dict] = {}
    for case in cases:
        inp = _inputs(case, torch.float32, device)
        with torch.no_grad():
            try:  # the reference in true fp32: cuDNN may otherwise use TF32 (torch.backends.cudnn.allow_tf32)
                tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
                seq = _cudnn(inp)[0]
            except Exception:  # cuDNN refused: compare with the float64 loop only where it is affordable
                seq = _reference(inp).float() if case.params["T"] * case.params["B"] <= 2**16 else None
            finally:
                torch.backends.cudnn.allow_tf32 = tf32
            impls = ["ours", "ours-newton"] + (["deer-jax"] if _jax_unavailable(device) is None else [])
            for impl in impls:
                try:
                    h, extra = _solve_for_stats(impl, inp)
                    stats[(case.name, impl)] = {**extra, "max_abs_err_vs_sequential":
                                                None if seq is None else (h - seq).abs().max().item()}
                except Exception as e:  # recorded, like a failing peer
                    stats[(case.name, impl)] = {"stats_error": f"{type(e).__name__}: {str(e)[:200]}"}
        del inp, seq
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row.extra.update(stats.get((row.case, row.impl), {}))
        if row.impl == "deer-jax":
            # JAX allocates outside torch: its high-water mark over the whole process (JAX cannot reset it per case)
            from .deer_jax import jax_peak_bytes

            row.peak_mem_bytes = None
            row.extra["jax_peak_bytes_process"] = jax_peak_bytes()
    return rows


BENCH = dataclasses.replace(BENCH, finalize=finalize_rows)


def main(argv: list[str] | None = None) -> None:
    """``python -m pflow_dist.bench.deer [--quick] [--case ...] [--out FILE]``: run, add iterations/errors, JSONL."""
    from .harness import write_jsonl
    from .registry import run_bench
    from .report import format_row, print_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--case", action="append", default=[])
    p.add_argument("--impl", action="append", default=[])
    p.add_argument("--mode", action="append", default=[])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rep", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--crossover", action="store_true",
                   help="ours vs cuDNN over a (B, nh, T) grid; the crossover summary goes to <out>.crossover.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = dataclasses.replace(BENCH, cases=crossover_cases) if args.crossover else BENCH
    impls = args.impl or (["ours", "torch.nn.GRU"] if args.crossover else [])
    rows = run_bench(bench, device=device, quick=args.quick, case_filter=args.case, impl_filter=impls,
                     modes=args.mode or None, warmup=args.warmup, rep=args.rep,
                     on_row=lambda r: print(format_row(r), flush=True))
    from rich.console import Console

    print_table(rows, Console())
    for r in rows:
        if "iterations" in r.extra:
            print(f"{r.case:<20} {r.mode:<8} {r.impl:<12} {r.median_ms or float('nan'):10.2f} ms  "
                  f"iters={r.extra['iterations']}  max|err| vs cuDNN={r.extra['max_abs_err_vs_sequential']}")
    if args.out:
        write_jsonl(rows, args.out)
    if args.crossover:
        summary = crossover(rows)
        for c in summary:
            speedups = "  ".join(f"T={t}: {s:.2f}x" for t, s in c["speedup_by_T"].items())
            print(f"B={c['B']:<4} nh={c['nh']:<4} {c['mode']:<8} ours from T={c['ours_faster_from_T']}  {speedups}")
        if args.out:
            with open(f"{args.out}.crossover.json", "w") as f:
                json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()

