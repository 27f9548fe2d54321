"""Benchmark definitions and the runner behind ``pflow-dist bench``.

A :class:`Bench` names its cases, builds inputs once per case, and lists implementations: ``"ours"`` and the peers.
The runner times every implementation on the same inputs in one process, in each mode, compares each output with the
float64 reference when the bench has one, and returns :class:`~pflow_dist.bench.harness.BenchRow` rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..testing.compare import error_stats
from .harness import BenchRow, command_line, device_name, measure, versions

__all__ = ["BENCHES", "Bench", "Case", "Impl", "get_bench", "own_process_group", "run_bench"]

Inputs = dict[str, torch.Tensor]

# name -> (module defining BENCH, one-line description); modules are imported only when used.
BENCHES: dict[str, tuple[str, str]] = {
    "attention": ("pflow_dist.bench.attention", "sliding-window + global-token attention vs SDPA and FlexAttention"),
    "deer": ("pflow_dist.bench.deer", "DEER GRU (parallel Newton over T) vs torch.nn.GRU (cuDNN) and the loop"),
    "flow": ("pflow_dist.bench.flow", "flow layer (rank-1, gated, rank-R) vs fla and a plain-torch chunked form"),
    "projection": ("pflow_dist.bench.projection", "bi-level l1,inf projection vs the exact l1,inf projection"),
    "gru": ("pflow_dist.bench.gru", "GRU over long T: the sequential cell loop vs torch.nn.GRU (cuDNN on GPU)"),
    "scan": ("pflow_dist.bench.scan", "diagonal affine scan vs a torch baseline and accelerated-scan; HBM copy"),
}


@dataclass(frozen=True)
class Case:
    """One input configuration; ``name`` is what rows carry in ``case`` (e.g. ``"B4-T8192-H16-D128"``)."""

    name: str
    params: dict[str, int]


@dataclass(frozen=True)
class Impl:
    """An implementation under test.

    Attributes:
        name: ``"ours"`` or the peer's name (e.g. ``"fla"``, ``"cudnn"``).
        run: maps the inputs to a tuple of outputs (the first one is compared with the reference and receives the
            upstream gradient in ``fwd+bwd``).
        unavailable: returns why the implementation cannot run here (``None`` when it can).
        package: the distribution whose version is recorded (e.g. ``"fla-core"``).
        reference: its own float64 reference, for an implementation of a different function than the bench's
            reference (e.g. the rank-R sum form beside the product form); ``None``: the bench's.
        context: a context manager factory entered around the check and the timed modes of each case (state the
            implementation needs and must not leave behind, e.g. a process group of its own).
    """

    name: str
    run: Callable[[Inputs], tuple[torch.Tensor, ...]]
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    package: str | None = None
    reference: Callable[[Inputs], torch.Tensor] | None = None
    context: Callable[[], AbstractContextManager] | None = None


@dataclass(frozen=True)
class Bench:
    """A benchmark: cases, input construction, implementations and an optional float64 reference.

    Attributes:
        grad_inputs: names of the inputs that receive gradients in ``fwd+bwd`` mode.
        reference: float64 output for the error column (skipped when ``None`` or ``check_limit`` says so).
        check_limit: returns False for cases too large for the reference.
        finalize: adds bench-specific metrics to the finished rows (e.g. the copy bandwidth measured in the same run,
            solver iterations); called once with the rows and the cases that ran.
    """

    name: str
    description: str
    cases: Callable[[bool], list[Case]]
    make_inputs: Callable[[Case, torch.dtype, torch.device], Inputs]
    impls: Sequence[Impl]
    grad_inputs: Sequence[str]
    modes: Sequence[str] = ("fwd", "fwd+bwd")
    default_dtype: torch.dtype = torch.bfloat16
    reference: Callable[[Inputs], torch.Tensor] | None = None
    check_limit: Callable[[Case], bool] = lambda case: True
    shapes: Callable[[Inputs], dict[str, list[int]]] = field(
        default=lambda inputs: {k: list(v.shape) for k, v in inputs.items()}
    )
    finalize: Callable[[list[BenchRow], torch.device, list[Case]], list[BenchRow]] | None = None


@contextmanager
def own_process_group():
    """An :class:`Impl` context for a sequence-parallel op measured outside a distributed job: a gloo group of this
    process alone (its combine, with ``algorithm="doubling"``, has nobody to talk to and sends nothing), torn down
    after the case so that nothing run later in the process finds a default group; a job's group is used as it is."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def get_bench(name: str) -> Bench:
    """Load a benchmark by name; ``ValueError`` lists the known names."""
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHES))}")
    return importlib.import_module(BENCHES[name][0]).BENCH


def _timed_callable(impl: Impl, inputs: Inputs, mode: str, grad_names: Sequence[str]) -> Callable[[], Any]:
    if mode == "fwd":
        def fwd() -> Any:
            with torch.no_grad():
                return impl.run(inputs)
        return fwd
    if mode != "fwd+bwd":
        raise ValueError(f"unknown mode {mode!r}; expected 'fwd' or 'fwd+bwd'")
    leaves = {k: (v.detach().requires_grad_(True) if k in grad_names else v) for k, v in inputs.items()}
    with torch.no_grad():
        first = impl.run(inputs)[0]
    grad_out = torch.randn_like(first)
    params = [leaves[k] for k in grad_names if k in leaves]

    def fwd_bwd() -> Any:
        out = impl.run(leaves)[0]
        return torch.autograd.grad(out, params, grad_out, allow_unused=True)

    return fwd_bwd


def _error_message(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_bench(
    bench: Bench,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    quick: bool = False,
    case_filter: Sequence[str] = (),
    modes: Sequence[str] | None = None,
    impl_filter: Sequence[str] = (),
    warmup: int = 3,
    rep: int = 10,
    check: bool = True,
    on_row: Callable[[BenchRow], None] | None = None,
) -> list[BenchRow]:
    """Run a benchmark: every case × mode × implementation, on the same inputs per case.

    Args:
        device: where to run.
        dtype: input dtype (the bench's default when ``None``).
        quick: the small case list (CPU smoke runs).
        case_filter: keep only these case names (all when empty).
        modes: subset of the bench's modes.
        impl_filter: keep only these implementations (all when empty).
        warmup, rep: see :func:`~pflow_dist.bench.harness.measure`.
        check: compare each output with the float64 reference (``extra.rel_err``).
        on_row: called with every finished row (progress output).

    Returns:
        The rows, in run order. An implementation that raises (or is unavailable) gets a row with ``status`` and
        ``error`` instead of stopping the run.
    """
    dtype = dtype or bench.default_dtype
    cases = bench.cases(quick)
    if case_filter:
        known = {c.name for c in cases}
        missing = [c for c in case_filter if c not in known]
        if missing:
            raise ValueError(f"unknown case(s) {missing} for bench {bench.name!r}; known: {sorted(known)}")
        cases = [c for c in cases if c.name in case_filter]
    modes = list(modes or bench.modes)
    for m in modes:
        if m not in bench.modes:
            raise ValueError(f"bench {bench.name!r} has modes {list(bench.modes)}, got {m!r}")
    impls = [i for i in bench.impls if not impl_filter or i.name in impl_filter]
    if not impls:
        raise ValueError(f"no implementation left after filter {list(impl_filter)}; known: "
                         f"{[i.name for i in bench.impls]}")
    dev_name = device_name(device)
    peers = [i.package for i in bench.impls if i.package]
    vers = versions(*peers)
    cmd = command_line()
    rows: list[BenchRow] = []
    for case in cases:
        inputs = bench.make_inputs(case, dtype, device)
        checked = check and bench.check_limit(case)
        # the bench's float64 reference, unless every implementation brings its own
        uses_bench_ref = checked and bench.reference and any(i.reference is None for i in impls)
        ref = bench.reference(inputs) if uses_bench_ref else None
        for impl in impls:
            reason = impl.unavailable(device)
            with impl.context() if reason is None and impl.context is not None else nullcontext():
                err_extra: dict[str, Any] = {}
                own_ref = impl.reference is not None and checked and reason is None
                if reason is None and (ref is not None or own_ref):
                    try:
                        with torch.no_grad():
                            out = impl.run(inputs)[0]
                        st = error_stats(impl.reference(inputs) if own_ref else ref, out)
                        err_extra = {"rel_err": st.rms_ratio, "max_abs_err": st.max_abs}
                    except Exception as e:  # the timing below reports the failure
                        err_extra = {"check_error": _error_message(e)}
                for mode in modes:
                    row = BenchRow(
                        bench=bench.name, case=case.name, mode=mode, impl=impl.name, device=dev_name,
                        dtype=str(dtype).replace("torch.", ""), shapes=bench.shapes(inputs), median_ms=None,
                        p20_ms=None, p80_ms=None, n_rep=0, peak_mem_bytes=None, versions=vers, command=cmd,
                        extra=dict(err_extra),
                    )
                    if reason is not None:
                        row.status, row.error = "unavailable", reason
                    else:
                        try:
                            t = measure(_timed_callable(impl, inputs, mode, bench.grad_inputs), device, warmup, rep)
                            row.median_ms, row.p20_ms, row.p80_ms = t.median_ms, t.p20_ms, t.p80_ms
                            row.n_rep, row.peak_mem_bytes = t.n_rep, t.peak_mem_bytes
                        except Exception as e:  # a peer that refuses (e.g. fla's gated bwd on Hopper) is a result
                            row.status, row.error = "error", _error_message(e)
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
        del inputs, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bench.finalize is not None:
        rows = bench.finalize(rows, device, cases)
    return rows
