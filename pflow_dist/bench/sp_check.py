"""``pflow-dist sp-check``: the sequence-parallel flow layer on P ranks against the single-device op on the whole
sequence, at full size (issue 5: "correctness vs 1 GPU").

Every rank draws the same full inputs from one seed on its device, runs the flow op on the whole sequence (fwd+bwd,
its own device: the "1 GPU" result) and keeps its slice, then runs ``sp_flow`` on its shard over the group; the row
of each rank holds the relative RMS difference of its output, gradients (q, k, v, beta and g) and, on the last rank,
the final state. Both sides run the same kernels in the same dtype, so the differences are rounding, from the other
association of the chunk states across ranks; the tolerance is per dtype (``TOLERANCE``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..testing.distributed import run_distributed
from .harness import BenchRow, command_line, device_name, versions

__all__ = ["TOLERANCE", "CheckConfig", "check_sequence_parallel"]

TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2, "float16": 1e-2}  # relative RMS, per tensor


@dataclass(frozen=True)
class CheckConfig:
    """One check: ``world`` ranks, a sequence of ``tokens`` (any T ≥ world), ``[B, T, H, D]`` inputs."""

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
        if self.dtype not in TOLERANCE:
            raise ValueError(f"dtype must be one of {sorted(TOLERANCE)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and self.world > torch.cuda.device_count():
            raise ValueError(f"{self.world} ranks need {self.world} GPUs (one per rank), "
                             f"{torch.cuda.device_count()} visible")


def _inputs(cfg: CheckConfig, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    dt = getattr(torch, cfg.dtype)
    B, T, H, D = cfg.batch, cfg.tokens, cfg.heads, cfg.dim
    r = lambda *s, dt=dt: torch.randn(*s, generator=gen, device=device, dtype=dt)  # noqa: E731
    x = {"q": r(B, T, H, D), "k": F.normalize(r(B, T, H, D), dim=-1), "v": r(B, T, H, D),
         "beta": torch.rand(B, T, H, generator=gen, device=device, dtype=dt)}
    state_dt = torch.float64 if dt == torch.float64 else torch.float32  # the gate and the state: fp32 at least
    if cfg.gated:
        x["g"] = F.logsigmoid(r(B, T, H, dt=state_dt) + 4)
    x["do"], x["dS"] = r(B, T, H, D), r(B, H, D, D, dt=state_dt)
    return x


def _rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    """‖ref − got‖ / ‖ref‖ on the tensors' device (float64 sums; a full-size tensor is not copied to the host)."""
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(got.shape)}")
    wide = torch.float64 if torch.float64 in (ref.dtype, got.dtype) else torch.float32
    num = torch.linalg.vector_norm(ref.to(wide) - got.to(wide), dtype=torch.float64)
    den = torch.linalg.vector_norm(ref, dtype=torch.float64)
    return (num / den).item() if den > 0 else (0.0 if num == 0 else float("inf"))


def _run(fn, leaves: dict[str, torch.Tensor], do: torch.Tensor, dS: torch.Tensor | None):
    """Output, final state and the gradients of ``<o, do> + <S, dS>`` for the leaves."""
    o, S = fn(**leaves)
    loss = (o.to(S.dtype) * do.to(S.dtype)).sum() + ((S * dS).sum() if dS is not None else 0)
    return o.detach(), S.detach(), dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def _worker(rank: int, world: int, cfg: CheckConfig) -> dict:
    from ..dist import shard_bounds, sp_flow  # noqa: PLC0415
    from ..ops.flow import chunk_flow  # noqa: PLC0415

    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    x = _inputs(cfg, device)
    names = ["q", "k", "v", "beta"] + (["g"] if cfg.gated else [])
    s, e = shard_bounds(cfg.tokens, world)[rank]
    last = rank == world - 1
    kw = dict(chunk_size=cfg.chunk_size, backend=cfg.backend, check_finite=False, output_final_state=True)

    leaves = {n: x[n].clone().requires_grad_(True) for n in names}
    o, S, grads = _run(lambda **t: chunk_flow(**t, **kw), leaves, x["do"], x["dS"])
    ref = {"o": o[:, s:e].clone(), **{"d" + n: grads[n][:, s:e].clone() for n in names}}
    if last:
        ref["final_state"] = S
    del leaves, o, S, grads  # the whole sequence's graph and gradients are gone before the shard runs

    leaves = {n: x[n][:, s:e].clone().requires_grad_(True) for n in names}
    o_p, S_p, grads_p = _run(lambda **t: sp_flow(**t, group=dist.group.WORLD, **kw), leaves, x["do"][:, s:e],
                             x["dS"] if last else None)
    got = {"o": o_p, **{"d" + n: grads_p[n] for n in names}}
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
    case = f"P{cfg.world}-T{cfg.tokens}-B{cfg.batch}-H{cfg.heads}-D{cfg.dim}" + ("-gated" if cfg.gated else "")
    for rank, out in enumerate(outs):
        worst = max(out["errors"].values())
        rows.append(BenchRow(
            bench="sp-check", case=case, mode="fwd+bwd", impl="ours", device=out["device"], dtype=cfg.dtype,
            shapes={"q_local": [cfg.batch, out["tokens"], cfg.heads, cfg.dim]}, median_ms=None, p20_ms=None,
            p80_ms=None, n_rep=1, peak_mem_bytes=out["peak_mem_bytes"] if out["peak_mem_bytes"] >= 0 else None,
            versions=versions(), command=command_line(),
            extra={"rank": rank, "errors": out["errors"], "worst": worst, "tolerance": tol, "ok": worst <= tol,
                   "config": asdict(cfg)},
        ))
    return rows
