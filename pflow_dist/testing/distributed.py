"""Run a function on N real ``torch.distributed`` processes (gloo on CPU) and collect what each rank returns.

Used by every distributed test: no mocks, real process groups. A rank that raises makes the whole call fail with
that rank's traceback, and the other ranks are terminated instead of hanging in a collective; a run that outlives
``timeout_s`` is killed and reported.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedRunError", "run_distributed"]


class DistributedRunError(RuntimeError):
    """A rank failed, or the run timed out."""


_ERROR_GRACE_S = 3.0
_COLLECTIVE_MARKERS = ("distributed_c10d", "gloo", "NCCL", "Connection reset", "Connection closed")


def _describe(errors: dict[int, str], world_size: int) -> str:
    """Report the root cause first: a rank whose error is not a failed collective (a peer that went away)."""
    order = sorted(errors, key=lambda r: (any(m in errors[r] for m in _COLLECTIVE_MARKERS), r))
    first = order[0]
    msg = f"rank {first} of {world_size} failed:\n{errors[first]}"
    for r in order[1:]:
        last = errors[r].strip().splitlines()[-1] if errors[r].strip() else ""
        msg += f"\n(rank {r} also failed: {last[:200]})"
    return msg


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    backend: str,
    collective_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    torch.set_num_threads(1)  # N ranks share few cores: avoid oversubscription
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        # every rank through the rendezvous before any can finish: gloo may return from init on one rank while a
        # peer still connects, and a rank that ran a collective-free fn and destroyed its group at once made that
        # peer fail ("connectFullMesh failed ... Connection closed by peer", seen under load)
        dist.barrier()
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle: tensors travel by value (torch's queue would pass shared memory that dies with this process)
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report every failure, including SystemExit/KeyboardInterrupt in the child
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 180.0,
    collective_timeout_s: float = 60.0,
) -> list[Any]:
    """Spawn ``world_size`` processes, init a process group in each, run ``fn(rank, world_size, *args)``.

    Args:
        fn: a module-level (picklable) function; its return value must be picklable (tensors are copied by value).
        world_size: number of ranks (2–4 on a small CPU box).
        backend: ``"gloo"`` on CPU, ``"nccl"`` on GPUs.
        timeout_s: wall-clock limit for the whole run.
        collective_timeout_s: timeout of every collective (passed to ``init_process_group``), so a rank waiting on
            a peer that died fails instead of hanging.

    Returns:
        The per-rank return values, indexed by rank.

    Raises:
        DistributedRunError: a rank raised (its traceback is included) or the run timed out.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="pflow_dist_pg_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, init_file, backend, collective_timeout_s, fn, args, results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outs: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        grace_end = float("inf")
        try:
            while len(outs) + len(errors) < world_size:
                now = time.monotonic()
                if errors and now >= grace_end:
                    break
                if now >= deadline:
                    missing = sorted(set(range(world_size)) - set(outs) - set(errors))
                    raise DistributedRunError(f"distributed run timed out after {timeout_s:.0f}s; ranks {missing} "
                                              "did not finish")
                try:
                    rank, status, payload = results.get(timeout=min(deadline - now, 0.5))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outs
                            and r not in errors]
                    if dead and not errors:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise DistributedRunError(
                            f"rank(s) {dead} died without reporting (exit codes {codes})") from None
                    continue
                if status == "error":
                    if not errors:  # give the other ranks a moment: the first report may be a peer's broken pipe
                        grace_end = time.monotonic() + _ERROR_GRACE_S
                    errors[rank] = payload
                else:
                    outs[rank] = pickle.loads(payload)
            if errors:
                raise DistributedRunError(_describe(errors, world_size))
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [outs[r] for r in range(world_size)]
