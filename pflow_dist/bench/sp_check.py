"""``pflow-dist sp-check``: a sequence-parallel op on P ranks against the single-device op on the whole sequence, at
full size (issue 5: "correctness vs 1 GPU").

Every rank draws the same full inputs from one seed on its device, runs the op on the whole sequence (fwd+bwd, its own
device: the "1 GPU" result) and keeps its slice, then runs the sequence-parallel op on its shard over the group; the row
of each rank holds the relative RMS difference of its output, every input gradient and, on the last rank, the final
state. Ops: ``flow`` (``sp_flow`` vs ``chunk_flow``: q, k, v, beta, g), ``scan`` (``sp_scan`` vs ``scan``: a, b and
the replicated initial state) and ``deer`` (``sp_deer`` vs ``deer_rnn``, quasi-Newton GRU: x and the GRU's parameter
gradients, summed over the ranks as data-parallel training would). Flow and scan differ by rounding only (the chunk
states associate differently across ranks); DEER also by where each Newton solve stopped within its tolerance. The
tolerance is per dtype (``TOLERANCE``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ..testing.distributed import run_distributed
from .harness import BenchRow, command_line, device_name, versions
from .scaling import OUTPUT_LIKE, op_inputs

__all__ = ["OPS", "TOLERANCE", "CheckConfig", "check_sequence_parallel"]

OPS = ("flow", "scan", "deer")

TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2, "float16": 1e-2}  # relative RMS, per tensor


@dataclass(frozen=True)
class CheckConfig:
    """One check: ``world`` ranks, a sequence of ``tokens`` (any T ≥ world); flow inputs ``[B, T, H, D]``, scan
    ``[B, T, H·D]``, deer ``[B, T, D]`` (heads = 1)."""

    op: str = "flow"
    world: int = 2
    tokens: int = 4096
    batch: int = 1
    heads: int = 2
    dim: int = 32
    dtype: str = "float32"
    gated: bool = False
    chunk_size: int = 64
    device: str = "cpu"
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.world < 1 or self.tokens < self.world:
            raise ValueError(f"need world >= 1 and tokens >= world, got world={self.world}, tokens={self.tokens}")
        if min(self.batch, self.heads, self.dim, self.chunk_size) < 1:
            raise ValueError("batch, heads, dim and chunk_size must be >= 1")
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in TOLERANCE or (self.op == "deer" and self.dtype not in ("float32", "float64")):
            raise ValueError(f"dtype must be one of {sorted(TOLERANCE)} (deer: float32 or float64), got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.gated and self.op != "flow":
            raise ValueError(f"gated is a flow option, got op={self.op!r}")
        if self.op == "deer" and self.heads != 1:
            raise ValueError(f"op 'deer' takes heads=1 (one GRU of dim units), got heads={self.heads}")
        if self.device == "cuda" and self.world > torch.cuda.device_count():
            raise ValueError(f"{self.world} ranks need {self.world} GPUs (one per rank), "
                             f"{torch.cuda.device_count()} visible")


@dataclass
class _Problem:
    """One op's check: full inputs (``sharded`` ones are cut along dim 1, ``replicated`` ones are the same tensor on
    every rank), the output and final-state gradients, the op on the whole sequence and on a shard, its parameters."""

    inputs: dict[str, torch.Tensor]
    sharded: list[str]
    replicated: list[str]
    do: torch.Tensor
    dS: torch.Tensor
    full: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    shard: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    params: list[torch.Tensor] = field(default_factory=list)


def _problem(cfg: CheckConfig, device: torch.device) -> _Problem:
    from ..dist import sp_deer, sp_flow, sp_scan  # noqa: PLC0415
    from ..ops.deer import deer_rnn  # noqa: PLC0415
    from ..ops.flow import chunk_flow  # noqa: PLC0415
    from ..ops.scan import scan  # noqa: PLC0415

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    dt = getattr(torch, cfg.dtype)
    state_dt = torch.float64 if dt == torch.float64 else torch.float32  # states: fp32 at least
    B, T, H, D = shape = cfg.batch, cfg.tokens, cfg.heads, cfg.dim
    x = op_inputs(cfg.op, shape, dt, device, gen, cfg.gated)
    r = lambda *s, dt=dt: torch.randn(*s, generator=gen, device=device, dtype=dt)  # noqa: E731
    do = r(*x[OUTPUT_LIKE[cfg.op]].shape)
    group = dist.group.WORLD
    if cfg.op == "scan":
        x["initial_state"] = r(B, H * D)
        kw = dict(output_final_state=True, backend=cfg.backend)
        return _Problem(x, ["a", "b"], ["initial_state"], do, r(B, H * D, dt=state_dt),
                        lambda **t: scan(**t, **kw), lambda **t: sp_scan(**t, group=group, **kw))
    if cfg.op == "deer":
        torch.manual_seed(cfg.seed)
        gru = torch.nn.GRU(D, D, batch_first=True).to(device=device, dtype=dt)
        kw = dict(method="quasi", backend=cfg.backend)
        return _Problem(x, ["x"], [], do, r(B, D),
                        lambda x: deer_rnn(gru, x, **kw)[:2], lambda x: sp_deer(gru, x, group=group, **kw)[:2],
                        list(gru.parameters()))
    kw = dict(chunk_size=cfg.chunk_size, backend=cfg.backend, check_finite=False, output_final_state=True)
    return _Problem(x, list(x), [], do, r(B, H, D, D, dt=state_dt),
                    lambda **t: chunk_flow(**t, **kw), lambda **t: sp_flow(**t, group=group, **kw))


def _rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    """‖ref − got‖ / ‖ref‖ on the tensors' device (float64 sums; a full-size tensor is not copied to the host)."""
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(got.shape)}")
    wide = torch.float64 if torch.float64 in (ref.dtype, got.dtype) else torch.float32
    num = torch.linalg.vector_norm(ref.to(wide) - got.to(wide), dtype=torch.float64)
    den = torch.linalg.vector_norm(ref, dtype=torch.float64)
    return (num / den).item() if den > 0 else (0.0 if num == 0 else float("inf"))


def _run(fn, leaves: dict[str, torch.Tensor], params: list[torch.Tensor], do: torch.Tensor,
         dS: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Output, final state and the gradients of ``<o, do> + <S, dS>`` for the leaves and the parameters."""
    o, S = fn(**leaves)
    loss = (o.to(S.dtype) * do.to(S.dtype)).sum() + ((S * dS.to(S.dtype)).sum() if dS is not None else 0)
    grads = torch.autograd.grad(loss, [*leaves.values(), *params])
    return o.detach(), S.detach(), dict(zip(leaves, grads, strict=False)), list(grads[len(leaves):])


def _worker(rank: int, world: int, cfg: CheckConfig) -> dict:
    from ..dist import shard_bounds  # noqa: PLC0415

    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pb = _problem(cfg, device)
    s, e = shard_bounds(cfg.tokens, world)[rank]
    last = rank == world - 1
    names = pb.sharded + pb.replicated
    cut = lambda n, t: t if n in pb.replicated else t[:, s:e]  # noqa: E731

    leaves = {n: pb.inputs[n].clone().requires_grad_(True) for n in names}
    o, S, grads, pgrads = _run(pb.full, leaves, pb.params, pb.do, pb.dS)
    ref = {"o": o[:, s:e].clone(), **{"d" + n: cut(n, grads[n]).clone() for n in names}}
    ref.update({f"dparam{i}": g for i, g in enumerate(pgrads)})
    if last:
        ref["final_state"] = S
    del leaves, o, S, grads  # the whole sequence's graph and gradients are gone before the shard runs

    leaves = {n: cut(n, pb.inputs[n]).clone().requires_grad_(True) for n in names}
    o_p, S_p, grads_p, pgrads_p = _run(pb.shard, leaves, pb.params, pb.do[:, s:e], pb.dS if last else None)
    got = {"o": o_p, **{"d" + n: grads_p[n] for n in names}}
    for i, g in enumerate(pgrads_p):  # a sequence-parallel layer's parameter gradients are per-shard partial sums
        dist.all_reduce(g)
        got[f"dparam{i}"] = g
    if last:
        got["final_state"] = S_p
    errors = {k: _rel_rms(ref[k], got[k]) for k in ref}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
    return {"errors": errors, "tokens": e - s, "device": device_name(device), "peak_mem_bytes": peak}


def check_sequence_parallel(cfg: CheckConfig) -> list[BenchRow]:
    """Run the check on ``cfg.world`` spawned ranks (gloo on CPU, NCCL with one GPU per rank on CUDA).

    Returns:
        One row per rank: ``extra["errors"]`` (relative RMS difference per tensor), ``extra["ok"]`` (all within
        ``TOLERANCE[cfg.dtype]``), ``extra["worst"]`` (the largest).

    Raises:
        DistributedRunError: a rank failed (its traceback is in the message).
    """
    outs = run_distributed(_worker, cfg.world, cfg, backend="nccl" if cfg.device == "cuda" else "gloo",
                           timeout_s=1800, collective_timeout_s=600)
    tol, rows = TOLERANCE[cfg.dtype], []
    case = (f"{'' if cfg.op == 'flow' else cfg.op + '-'}P{cfg.world}-T{cfg.tokens}-B{cfg.batch}-H{cfg.heads}-D{cfg.dim}"
            + ("-gated" if cfg.gated else ""))
    local = {"flow": [cfg.heads, cfg.dim], "scan": [cfg.heads * cfg.dim], "deer": [cfg.dim]}  # a shard: [B, T_p, ...]
    for rank, out in enumerate(outs):
        worst = max(out["errors"].values())
        rows.append(BenchRow(
            bench="sp-check", case=case, mode="fwd+bwd", impl="ours", device=out["device"], dtype=cfg.dtype,
            shapes={"local": [cfg.batch, out["tokens"], *local[cfg.op]]}, median_ms=None, p20_ms=None,
            p80_ms=None, n_rep=1, peak_mem_bytes=out["peak_mem_bytes"] if out["peak_mem_bytes"] >= 0 else None,
            versions=versions(), command=command_line(),
            extra={"rank": rank, "errors": out["errors"], "worst": worst, "tolerance": tol, "ok": worst <= tol,
                   "config": asdict(cfg)},
        ))
    return rows
