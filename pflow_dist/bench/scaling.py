"""Scaling experiments (``pflow-dist scale``): weak and strong scaling of a sequence-parallel layer over ranks.

Weak scaling keeps the tokens per rank fixed (T = tokens · P, ideal: constant step time); strong scaling keeps the
sequence fixed (T = tokens, ideal: time ∝ 1/P). Every world size runs in its own group of real processes (gloo on CPU,
NCCL on GPUs, one GPU per rank), or, inside a torchrun job (``in_job``), on a sub-group of the job's first P ranks;
each rank times fwd+bwd (or fwd) of the op (the flow layer ``sp_flow``, the diagonal scan ``sp_scan``, or the DEER-GRU
``sp_deer``) on its shard, and the slowest rank's median is the step time. :func:`run_sweep` repeats this over
sequence lengths and batch sizes. Rows are :class:`~pflow_dist.bench.harness.BenchRow` with ``bench = "scale-weak" |
"scale-strong"`` and the scaling metrics in ``extra``: ``world_size, tokens, batch, tokens_per_s,
tokens_per_s_per_rank, efficiency, comm_bytes`` (and ``iterations``, the Newton iterations of the DEER forward).

Implementations (``impls``), each swept over the same world sizes and inputs:
- ``ours``: :func:`pflow_dist.dist.sp_flow` (the delta rule; gated with ``gated=True``);
- ``fla-cp``: fla's context parallelism, ``chunk_gated_delta_rule(..., cp_context=build_cp_context(...))`` (fla.ops.cp;
  CUDA, half precision, B = 1, the gated rule, a sequence divisible by every world size; on one rank fla runs without
  a context). A world size where an implementation fails gets a row with ``status = "error"`` and the reason (fla's
  gated backward refuses to run with Triton 3.6 on Hopper: ``passes="fwd"`` still compares the forward).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..testing.distributed import run_distributed
from .harness import BenchRow, command_line, device_name, versions
from .scaling_report import markdown_table, plot, point_line  # the sweep's reports, re-exported

__all__ = ["ScaleConfig", "comm_bytes", "failure_text", "find_longest", "is_out_of_memory", "longest_search",
           "markdown_table", "op_inputs", "plot", "point_line", "run_scaling", "run_sweep", "sweep_configs"]

MODES = ("weak", "strong", "longest")
IMPLS = ("ours", "fla-cp")
PASSES = ("fwd+bwd", "fwd")
OPS = ("flow", "scan", "deer")
DEER_METHOD = "quasi"  # the DEER solver the scaling runs use (the fastest on one GPU: pflow_dist.bench.deer)
_DEER_SETUP_WORDS = 15  # float64 words per rank that sp_deer's input check all-gathers (pflow_dist/dist/sp_deer.py)
_DEER_AGREE_WORDS = 3  # float64 words per rank of its per-iteration convergence agreement


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
    impls: tuple[str, ...] = ("ours",)
    gated: bool = False
    passes: str = "fwd+bwd"
    op: str = "flow"
    in_job: bool = False  # this process is one rank of a running job (torchrun): see run_scaling
    max_tokens: int = 2**27  # mode "longest": the longest sequence tried

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.op != "flow" and (self.gated or self.impls != ("ours",)):
            raise ValueError(f"op {self.op!r} takes neither gated=True nor a peer implementation, got "
                             f"gated={self.gated}, impls={self.impls}")
        if self.op == "deer" and (self.heads != 1 or self.dtype not in ("float32", "float64")):
            raise ValueError("op 'deer' (sp_deer, a GRU with dim inputs and dim hidden units) takes heads=1 and "
                             f"float32/float64, got heads={self.heads}, dtype={self.dtype}")
        if not self.impls or any(i not in IMPLS for i in self.impls):
            raise ValueError(f"impls must be a non-empty subset of {IMPLS}, got {self.impls}")
        if self.passes not in PASSES:
            raise ValueError(f"passes must be one of {PASSES}, got {self.passes!r}")
        if "fla-cp" in self.impls:
            self._check_fla_cp()
        if not self.world_sizes or any(p < 1 for p in self.world_sizes):
            raise ValueError(f"world_sizes must be positive, got {self.world_sizes}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.in_job:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("in_job=True needs the job's process group initialised (e.g. under torchrun)")
            if max(self.world_sizes) > dist.get_world_size():
                raise ValueError(f"world size {max(self.world_sizes)} needs that many ranks; the job has "
                                 f"{dist.get_world_size()}")
        elif self.device == "cuda" and max(self.world_sizes) > torch.cuda.device_count():
            raise ValueError(f"world size {max(self.world_sizes)} needs that many GPUs, "
                             f"{torch.cuda.device_count()} visible")
        if self.mode == "longest" and self.max_tokens < self.tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be at least the first try, tokens ({self.tokens})")
        if self.mode != "weak" and self.tokens < max(self.world_sizes):
            raise ValueError(f"strong scaling of {self.tokens} tokens cannot use {max(self.world_sizes)} ranks")
        if min(self.tokens, self.batch, self.heads, self.dim, self.warmup + 1, self.rep) < 1:
            raise ValueError(f"tokens, batch, heads, dim and rep must be >= 1 (warmup >= 0), got {self}")

    def _check_fla_cp(self) -> None:
        why = []
        if self.device != "cuda":
            why.append("CUDA GPUs (its kernels and affine chains are Triton on NVIDIA)")
        if self.dtype not in ("bfloat16", "float16"):
            why.append(f"bf16/fp16 inputs (got {self.dtype})")
        if self.batch != 1:
            why.append(f"batch 1 (it packs sequences with cu_seqlens; got {self.batch})")
        if not self.gated:
            why.append("gated=True (fla's CP covers chunk_gated_delta_rule; ours then runs the same gated rule)")
        bad = [p for p in self.world_sizes if self.total_tokens(p) % p]
        if bad:
            why.append(f"a sequence divisible by every world size (not by {bad})")
        if self.chunk_size not in (16, 32, 64):
            why.append(f"chunk_size 16, 32 or 64 (got {self.chunk_size})")
        if why:
            raise ValueError("impl 'fla-cp' needs " + "; ".join(why))

    def total_tokens(self, world: int) -> int:
        return self.tokens * world if self.mode == "weak" else self.tokens  # strong and longest: the whole sequence


def comm_bytes(cfg: ScaleConfig, world: int, algorithm: str | None = None, iterations: int | None = None) -> int:
    """Bytes the busiest rank sends + receives in one step of ``sp_flow`` / ``sp_scan`` / ``sp_deer`` (no initial
    state).

    Forward, the combine of the shards' maps (flow: M [B, H, K, K] and D [B, H, K, V]; diagonal scan: M and D
    [B, N]; fp32); backward, the same combine of (Mᵀ, ∂L/∂S_in) (:func:`pflow_dist.dist.incoming_state`). Its
    ``auto`` algorithm is a ring all-gather on NCCL (each rank sends and receives P−1 maps) and recursive doubling on
    gloo (in round d = 1, 2, 4, ... rank v sends one map to v + d and receives one from v − d, where those exist);
    ``algorithm`` ("allgather" / "doubling") overrides that choice. ``passes="fwd"`` halves it.

    DEER (``op="deer"``, quasi-Newton, n = dim, in the config's dtype) combines per Newton iteration the diagonal
    (M, D) [B, n] of its linearisation and all-gathers the convergence check (3 words per rank), after one
    all-gather of the input check (15 words per rank); its backward combines (Mᵀ [B, n, n], ∂L/∂h_in [B, n]) once.
    ``iterations`` (the forward's Newton iterations, known after the run) is then required.
    """
    if world < 1 or algorithm not in (None, "allgather", "doubling"):
        raise ValueError(f"world must be >= 1 and algorithm None, 'allgather' or 'doubling', got {world}, "
                         f"{algorithm!r}")
    if (algorithm or ("allgather" if cfg.device == "cuda" else "doubling")) == "allgather":
        messages = 2 * (world - 1)
    else:
        rounds = [2**i for i in range(math.ceil(math.log2(world)))] if world > 1 else []
        messages = max(sum((v + d < world) + (v - d >= 0) for d in rounds) for v in range(world))
    if cfg.op == "deer":
        if iterations is None or iterations < 1:
            raise ValueError(f"op 'deer' needs the forward's Newton iterations (>= 1), got {iterations}")
        word, n, gathered = (8 if cfg.dtype == "float64" else 4), cfg.dim, 2 * (world - 1)  # all_gather: P-1 out, in
        fwd = gathered * _DEER_SETUP_WORDS * 8 + iterations * (messages * 2 * cfg.batch * n * word
                                                                + gathered * _DEER_AGREE_WORDS * 8)
        return fwd + (0 if cfg.passes == "fwd" else messages * cfg.batch * (n * n + n) * word)
    if cfg.op == "flow":
        m = cfg.batch * cfg.heads * (cfg.dim * cfg.dim + cfg.dim * cfg.dim) * 4  # one rank's (M, D), K = V = dim
    else:
        m = cfg.batch * 2 * cfg.heads * cfg.dim * 4  # diagonal M and D over N = heads · dim channels
    return messages * m * (1 if cfg.passes == "fwd" else 2)


def _layer(cfg: ScaleConfig, impl: str, world: int, device: torch.device, group: dist.ProcessGroup,
           iterations: list[int]) -> Callable[..., torch.Tensor]:
    """``f(*leaves, g) -> output`` on this rank's shard for ``impl`` (imported in the child process): the flow layer
    ``(q, k, v, beta, g)``, the diagonal scan ``(a, b, None)`` or the DEER-GRU ``(x, None)`` (its Newton iterations
    appended to ``iterations``)."""
    if cfg.op == "deer":
        from ..dist import sp_deer  # noqa: PLC0415

        torch.manual_seed(0)  # the same weights on every rank
        gru = torch.nn.GRU(cfg.dim, cfg.dim, batch_first=True).to(device=device, dtype=getattr(torch, cfg.dtype))

        def deer(x, _):
            h, _, info = sp_deer(gru, x, method=DEER_METHOD, group=group, backend=cfg.backend)
            iterations.append(info.iterations)
            return h

        return deer
    if cfg.op == "scan":
        from ..dist import sp_scan  # noqa: PLC0415

        return lambda a, b, _: sp_scan(a, b, group=group, backend=cfg.backend)[0]
    if impl == "ours":
        from ..dist import sp_flow  # noqa: PLC0415

        return lambda q, k, v, beta, g: sp_flow(q, k, v, beta, g, group=group, chunk_size=cfg.chunk_size,
                                                backend=cfg.backend, check_finite=False)[0]
    from fla.ops.cp import build_cp_context  # noqa: PLC0415 - the peer, on the GPU image
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: PLC0415

    T = cfg.total_tokens(world)
    ctx = None
    if world > 1:
        cu = torch.tensor([0, T], dtype=torch.long)
        ctx = build_cp_context(cu.to(device), group=group, cu_seqlens_cpu=cu)
    return lambda q, k, v, beta, g: chunk_gated_delta_rule(q, k, v, g, beta, cp_context=ctx,
                                                           chunk_size=cfg.chunk_size)[0]


def _worker(rank: int, world: int, cfg: ScaleConfig, impl: str = "ours") -> dict:
    """One spawned rank (:func:`~pflow_dist.testing.distributed.run_distributed`, one GPU per rank on CUDA)."""
    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return _measure(rank, world, cfg, impl, dist.group.WORLD, device)


OUTPUT_LIKE = {"flow": "v", "scan": "b", "deer": "x"}  # the input whose shape and dtype the op's output has


def op_inputs(op: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
              gen: torch.Generator, gated: bool = False) -> dict[str, torch.Tensor]:
    """The inputs of a sequence-parallel op as the scaling runs and ``sp-check`` draw them, on ``device`` from
    ``gen`` in ``dtype`` (on the host, 2^20 tokens × 16 heads × 128 took minutes per point).

    Args:
        op: ``"flow"``: ``q, k, v [B, T, H, D]`` (k L2-normalised), ``beta [B, T, H]`` in (0, 1) and, when ``gated``,
            ``g = logsigmoid(N(4, 1)) [B, T, H]`` (float32, float64 for float64); ``"scan"``: decays ``a`` in
            (0.5, 1) (a long memory, as in the recurrences it stands for) and ``b``, both ``[B, T, H·D]``;
            ``"deer"``: ``x [B, T, D]``.
        shape: ``(B, T, H, D)``.

    Raises:
        ValueError: an unknown op.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    B, T, H, D = shape
    r = lambda *s, dt=dtype: torch.randn(*s, generator=gen, device=device, dtype=dt)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, device=device, dtype=dtype)  # noqa: E731
    if op == "scan":
        return {"a": 0.5 + 0.5 * u(B, T, H * D), "b": r(B, T, H * D)}
    if op == "deer":
        return {"x": r(B, T, D)}
    x = {"q": r(B, T, H, D), "k": F.normalize(r(B, T, H, D), dim=-1), "v": r(B, T, H, D), "beta": u(B, T, H)}
    if gated:
        x["g"] = F.logsigmoid(r(B, T, H, dt=torch.float64 if dtype == torch.float64 else torch.float32) + 4)
    return x


def _measure(rank: int, world: int, cfg: ScaleConfig, impl: str, group: dist.ProcessGroup,
             device: torch.device) -> dict:
    """Time ``impl`` on this rank's shard over ``group`` (``world`` ranks, this one is ``rank`` in it); the slowest
    rank's median and the largest peak memory."""
    T_local = cfg.total_tokens(world) // world + (1 if rank < cfg.total_tokens(world) % world else 0)
    gen = torch.Generator(device=device).manual_seed(rank)
    x = op_inputs(cfg.op, (cfg.batch, T_local, cfg.heads, cfg.dim), getattr(torch, cfg.dtype), device, gen, cfg.gated)
    g = x.pop("g", None)  # the gate is an input, not a leaf, in the timed step
    do = torch.randn(x[OUTPUT_LIKE[cfg.op]].shape, generator=gen, device=device, dtype=x[OUTPUT_LIKE[cfg.op]].dtype)
    leaves = [t.requires_grad_(True) for t in x.values()]
    iterations: list[int] = []
    layer = _layer(cfg, impl, world, device, group, iterations)

    def step() -> None:
        if cfg.passes == "fwd":
            with torch.no_grad():
                layer(*leaves, g)
        else:
            torch.autograd.grad(layer(*leaves, g), leaves, do)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=group)

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
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
    stats = torch.tensor([statistics.median(times), float(peak)], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    return {"seconds": stats[0].item(), "peak_mem_bytes": int(stats[1].item()), "device": device_name(device),
            "iterations": iterations[-1] if iterations else None}


def _in_job(cfg: ScaleConfig, impl: str, world: int) -> dict:
    """Measure on the first ``world`` ranks of a job that is already running (torchrun: every rank calls this with
    the same arguments) through a sub-group; the others wait. Every rank returns rank 0's result, or every rank
    raises the first error (so the ranks stay in step)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))  # collective over the whole job
    res, err = None, None
    if rank < world:
        device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
        try:
            res = _measure(rank, world, cfg, impl, group, device)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            err = f"rank {rank}: {type(e).__name__}: {e}"
    outs: list = [None] * size
    dist.all_gather_object(outs, (res, err))
    dist.destroy_process_group(group)
    errors = [e for _, e in outs if e]
    if errors:
        raise RuntimeError(errors[0])
    return outs[0][0]


def _measure_point(cfg: ScaleConfig, impl: str, world: int) -> BenchRow:
    """One (implementation, world size) point of ``cfg`` as a row: timed, or ``status = "error"`` with the reason."""
    T = cfg.total_tokens(world)
    if cfg.op == "flow":
        case, shapes = "", {"q_local": [cfg.batch, T // world, cfg.heads, cfg.dim]}
    elif cfg.op == "deer":
        case, shapes = "deer-", {"x_local": [cfg.batch, T // world, cfg.dim]}
    else:
        case, shapes = f"{cfg.op}-", {"a_local": [cfg.batch, T // world, cfg.heads * cfg.dim]}
    case += f"P{world}-T{T}-B{cfg.batch}-H{cfg.heads}-D{cfg.dim}" + ("-gated" if cfg.gated else "")
    row = BenchRow(
        bench=f"scale-{cfg.mode}", case=case, mode=cfg.passes, impl=impl, device="", dtype=cfg.dtype, shapes=shapes,
        median_ms=None, p20_ms=None, p80_ms=None, n_rep=cfg.rep, peak_mem_bytes=None, versions=versions(),
        command=command_line(),
        extra={"world_size": world, "tokens": T, "batch": cfg.batch, "config": asdict(cfg),
               "comm_bytes": comm_bytes(cfg, world) if impl == "ours" and cfg.op != "deer" else None},
    )
    try:
        if cfg.in_job:
            res = _in_job(cfg, impl, world)
        else:
            res = run_distributed(_worker, world, cfg, impl, backend="nccl" if cfg.device == "cuda" else "gloo",
                                  timeout_s=1800, collective_timeout_s=600)[0]
    except Exception as e:  # a peer that refuses (or runs out of memory) is a result; the callers decide
        row.status, (row.error, row.extra["out_of_memory"]) = "error", failure_text(e)
        row.device = device_name(torch.device(cfg.device))
        return row
    tok_s = cfg.batch * T / res["seconds"]
    row.device, row.median_ms = res["device"], res["seconds"] * 1e3
    row.peak_mem_bytes = res["peak_mem_bytes"] if res["peak_mem_bytes"] >= 0 else None
    row.extra.update(tokens_per_s=tok_s, tokens_per_s_per_rank=tok_s / world)
    if cfg.op == "deer":
        row.extra.update(iterations=res["iterations"], comm_bytes=comm_bytes(cfg, world, iterations=res["iterations"]))
    return row


def run_scaling(cfg: ScaleConfig, on_point: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """Run the sweep; efficiency is relative to the smallest world size measured.

    With ``cfg.in_job`` this process is one rank of a running job (torchrun, possibly over several nodes, the
    default process group initialised): every rank must call this, and each world size P runs on the job's first P
    ranks through a sub-group. Otherwise each world size gets a fresh group of spawned processes on this machine.
    ``mode="longest"`` goes to :func:`find_longest` (up to ``cfg.max_tokens``).

    Args:
        cfg: the sweep.
        on_point: called with each row as it is measured (progress).

    Returns:
        One row per implementation and world size (the same rows on every rank of a job).

    Raises:
        RuntimeError: ``ours`` failed at its first world size (a bug rather than a result).
    """
    if cfg.mode == "longest":
        return find_longest(cfg, on_point=on_point)
    rows: list[BenchRow] = []
    for impl in cfg.impls:
        base: BenchRow | None = None  # efficiency is relative to this implementation's smallest world size
        for world in sorted(cfg.world_sizes):
            row = _measure_point(cfg, impl, world)
            if row.status != "ok" and impl == "ours" and base is None:
                raise RuntimeError(f"ours failed at its first point ({row.case}): {row.error}")
            if row.status == "ok":
                base = base or row
                p0, t0 = base.extra["world_size"], base.median_ms
                ideal = t0 if cfg.mode == "weak" else t0 * p0 / world
                row.extra["efficiency"] = ideal / row.median_ms
            rows.append(row)
            if on_point is not None:
                on_point(row)
    return rows


_OOM_MARKERS = ("out of memory", "OutOfMemoryError", "can't allocate memory")


def is_out_of_memory(error: str) -> bool:
    """Whether an error text (a rank's traceback) reports an allocation failure (CUDA or CPU allocator)."""
    return any(m in error for m in _OOM_MARKERS)


def failure_text(error: BaseException, limit: int = 800) -> tuple[str, bool]:
    """``(text for the row, out of memory?)``: the verdict reads the whole message (a rank's traceback puts the
    allocator's words first and its advice after them), the text keeps its start and end within ``limit``."""
    full = f"{type(error).__name__}: {error}"
    text = full if len(full) <= limit else f"{full[:limit // 2]} [...] {full[-limit // 2:]}"
    return text, is_out_of_memory(full)


def longest_search(start: int, cap: int, granule: int, runs: Callable[[int], bool], refine: int = 3) -> int | None:
    """The largest sequence length that ``runs``: double from ``start`` (multiples of ``granule``) until a length
    fails or would pass ``cap``, then ``refine`` bisection steps between the last success and the first failure.
    Returns None when ``start`` itself fails."""
    if min(start, cap, granule) < 1 or refine < 0:
        raise ValueError(f"start, cap and granule must be >= 1 and refine >= 0, got {start}, {cap}, {granule}, "
                         f"{refine}")
    step = lambda t: max(granule, t // granule * granule)  # noqa: E731
    T, ok, fail = step(start), None, None
    while True:
        if runs(T):
            ok = T
            if 2 * T > cap:
                break
            T = step(2 * T)
        else:
            fail = T
            break
    if ok is None or fail is None:
        return ok
    for _ in range(refine):
        mid = step((ok + fail) // 2)
        if mid in (ok, fail):
            break
        if runs(mid):
            ok = mid
        else:
            fail = mid
    return ok


def find_longest(cfg: ScaleConfig, refine: int = 3,
                 on_point: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """For each implementation and world size, the longest whole sequence (``cfg.tokens`` is the first try, at most
    ``cfg.max_tokens``) that one step of the op runs in (:func:`longest_search`; lengths are multiples of
    ``64 · world``). Every try is a row; the longest that ran has ``extra["longest"] = True``.

    Raises:
        RuntimeError: a try failed for another reason than running out of memory.
    """
    rows: list[BenchRow] = []
    for impl in cfg.impls:
        for world in sorted(cfg.world_sizes):
            tried: dict[int, BenchRow] = {}

            def runs(T: int, impl: str = impl, world: int = world, tried: dict = tried) -> bool:
                row = _measure_point(replace(cfg, tokens=T, mode="longest"), impl, world)
                if row.status != "ok" and not row.extra.get("out_of_memory"):
                    raise RuntimeError(f"{impl} failed at {row.case} for another reason than memory: {row.error}")
                tried[T] = row
                rows.append(row)
                if on_point is not None:
                    on_point(row)
                return row.status == "ok"

            best = longest_search(cfg.tokens, cfg.max_tokens, 64 * world, runs, refine)
            if best is not None:
                tried[best].extra["longest"] = True
    return rows


def sweep_configs(base: ScaleConfig, tokens: Sequence[int], batches: Sequence[int]) -> list[ScaleConfig]:
    """One config per (tokens, batch) pair, ``base`` giving everything else, each validated.

    Raises:
        ValueError: an empty list, or a pair that makes an invalid :class:`ScaleConfig`.
    """
    if not tokens or not batches:
        raise ValueError(f"tokens and batches must be non-empty, got {list(tokens)} and {list(batches)}")
    return [replace(base, tokens=t, batch=b) for t in tokens for b in batches]


def run_sweep(base: ScaleConfig, tokens: Sequence[int], batches: Sequence[int],
              on_point: Callable[[BenchRow], None] | None = None) -> list[BenchRow]:
    """:func:`run_scaling` for every (tokens, batch) pair (:func:`sweep_configs`, all validated before any run); each
    pair's efficiency is relative to its own smallest world size."""
    return [row for cfg in sweep_configs(base, tokens, batches) for row in run_scaling(cfg, on_point)]
