# Ray Train launcher for the one training loop (pflow_dist.train.Trainer), after Ray Train V2's TorchTrainer
# (docs.ray.io/en/latest/train/user-guides/fault-tolerance.html and .../checkpoints.html; Ray 2.60, V2 default).
#
# Why segments: Ray restores a failed worker group only from a checkpoint that was *reported*
# (``ray.train.report(metrics, checkpoint=...)``, a barrier over all workers). Each worker therefore trains in
# segments of ``train.ckpt_every`` steps with ``Trainer.train(until=...)`` (which saves where it stops), then
# reports the segment's per-step losses together with that step's checkpoint directory. After a crash, Ray starts a
# fresh group; each worker copies ``ray.train.get_checkpoint()`` into its own local ``ckpt_dir`` and the Trainer
# resumes exactly from ``ckpt_dir/latest`` (weights, optimizer, scheduler, RNG; the data position is the step).
# Steps trained after the last report are recomputed, but were never reported: the reported history has every step
# exactly once.
#
# Each worker saves into a private local directory and reports it; Ray merges the workers' directories into one
# checkpoint in ``storage_path`` (rank 0 writes the model states and ``latest``, every rank its RNG / ZeRO shards),
# so no shared filesystem is needed between nodes except the storage path itself.
"""Ray Train launcher: ``python -m pflow_dist.launch.ray_train --config F --num-workers N [--use-gpu] ...``.

``launch_ray`` builds ``TorchTrainer`` + ``ScalingConfig`` + ``RunConfig(CheckpointConfig, FailureConfig)`` and fits;
``train_loop_per_worker`` is what runs inside each Ray Train worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["launch_ray", "main", "probe_address", "resolve_config", "train_loop_per_worker"]

DEFAULT_GCS_PORT = 6379  # `ray start --head` default
DEFAULT_CLIENT_PORT = 10001  # Ray Client (ray://) default


# ---- configuration -----------------------------------------------------------------------------------------------

def resolve_config(config_path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                   num_workers: int = 1) -> dict[str, Any]:
    """Load and validate the run config on the driver, adapted to Ray Train; returned as a plain dict.

    The dict (not the YAML path) is what travels to the workers, so remote nodes need no copy of the config file.
    With ``num_workers > 1`` the engine must be DeepSpeed (``parallel.engine=plain`` is one process) and is switched
    to it; the progress bar is switched off (worker logs are line-based).

    Args:
        config_path: a YAML run config (``configs/...``) or None for the defaults.
        overrides: ``section.key=value`` strings.
        num_workers: Ray Train workers: data-parallel × sequence-parallel ranks (``parallel.sp_size`` consecutive
            workers share each sequence).

    Returns:
        ``RunConfig.to_dict()`` of the adapted config.

    Example::

        >>> d = resolve_config("configs/demo_mqar.yaml", ["train.steps=4"], num_workers=2)
        >>> d["parallel"]["engine"], d["train"]["steps"]
        ('deepspeed', 4)
    """
    from pflow_dist.train.config import load_config

    if config_path is not None and not Path(config_path).is_file():
        raise FileNotFoundError(f"config {config_path} does not exist")
    overrides = list(overrides)
    if num_workers > 1:
        overrides.append("parallel.engine=deepspeed")
    cfg = load_config(config_path, overrides + ["train.progress=false"])
    return cfg.to_dict()


def _segment_ends(start: int, steps: int, every: int) -> list[int]:
    """The steps at which a worker reports: every ``every`` steps after ``start`` (multiples of ``every``), and
    ``steps``. ``every == 0``: one segment."""
    if every <= 0:
        return [steps] if start < steps else []
    ends = list(range((start // every + 1) * every, steps, every))
    return ends + [steps] if start < steps else []


# ---- inside a Ray Train worker -----------------------------------------------------------------------------------

def _make_trainer_cls():
    from pflow_dist.train import Trainer

    class RayTrainer(Trainer):
        """The Trainer with an optional one-shot fault (tests only): after finishing step ``fault["at_step"]`` on
        rank ``fault["rank"]``, the process exits with ``os._exit(1)`` when ``fault["marker"]`` does not exist yet
        (it is created first, so the restarted group runs through). ``fault["delay_s"]`` (default 0) sleeps before
        the exit: Ray's controller collects reports on its health-check poll (2 s by default), so a crash right after
        a report can lose that report; the run is still correct (the segment is redone) but resumes from further back.
        """

        def __init__(self, cfg, fault: dict[str, Any] | None = None, **kw) -> None:
            self._fault = fault
            super().__init__(cfg, **kw)

        def train_step(self) -> float:
            loss = super().train_step()
            f = self._fault
            if f and self.step + 1 == int(f["at_step"]) and self.rank == int(f.get("rank", 0)):
                try:
                    fd = os.open(f["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return loss
                os.write(fd, f"rank {self.rank} exits after step {self.step + 1}\n".encode())
                os.close(fd)
                time.sleep(float(f.get("delay_s", 0.0)))
                os._exit(1)  # a hard crash: no Python cleanup, no report
            return loss

    return RayTrainer


def _keep_only(ckpt_dir: Path, tag: str) -> None:
    """Delete every step directory but ``tag``: the older ones were already reported (persisted by Ray)."""
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name != tag:
            shutil.rmtree(p, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Run the Trainer in one Ray Train worker; Ray has already created the torch.distributed group.

    Args:
        config: ``{"run": resolve_config(...) dict, "run_key": names the worker's local checkpoint directory
            (unique per storage path and run name), "fault": optional one-shot fault (tests, see RayTrainer)}``.

    Each segment of ``train.ckpt_every`` steps ends with ``ray.train.report(metrics, checkpoint)``; ``metrics`` holds
    ``step``, ``loss``, the eval metrics, and the segment's per-step ``steps`` / ``losses`` / ``lrs`` (the reported
    history: concatenated over all checkpoints, every step appears exactly once, also across restarts).

    Example (what ``launch_ray`` does)::

        TorchTrainer(train_loop_per_worker, train_loop_config={"run": resolve_config(path, [], 2)}, ...)
    """
    import ray.train
    from ray.train import Checkpoint

    from pflow_dist.train.checkpoint import latest_tag, step_tag
    from pflow_dist.train.config import config_from_dict

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    run = json.loads(json.dumps(config["run"]))  # a private copy
    # one local directory per (run, rank), the same on every attempt: a crashed attempt's leftovers (possibly GBs of
    # checkpoint) are removed by the next one instead of piling up in /tmp
    local = Path(tempfile.gettempdir()) / "pflow_ray" / str(config.get("run_key", "run")) / f"rank{rank}"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    run["train"]["ckpt_dir"] = str(local)
    run["train"]["resume"] = True
    if rank != 0:
        run["train"]["out_dir"] = None  # metrics.jsonl is rank 0's
    cfg = config_from_dict(run)
    trainer = None
    try:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                shutil.copytree(d, local, dirs_exist_ok=True)
            if latest_tag(local) is None:
                raise RuntimeError(f"the checkpoint Ray restored ({restored.path}) has no 'latest' file")
        trainer = _make_trainer_cls()(cfg, fault=config.get("fault"))
        if restored is not None and trainer.step == 0:
            raise RuntimeError(f"Ray restored {restored.path} but the Trainer did not resume from it")
        for end in _segment_ends(trainer.step, cfg.train.steps, cfg.train.ckpt_every):
            before = trainer.step
            summary = trainer.train(until=end)
            rows = [r for r in trainer.history["train"] if r["step"] > before]
            metrics = {
                "step": trainer.step, "loss": summary["loss"], "world_size": trainer.world,
                "steps": [r["step"] for r in rows], "losses": [r["loss"] for r in rows],
                "lrs": [r["lr"] for r in rows], "tokens_per_s": summary["tokens_per_s"],
                "resumed_from_step": before if restored is not None else None,
                **{k: summary[k] for k in ("eval_loss", "eval_acc") if k in summary},
            }
            restored = None  # only the first segment after a restore is "resumed"
            tag = step_tag(trainer.step)
            _keep_only(local, tag)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=f"checkpoint_{tag}", delete_local_checkpoint_after_upload=False)
    finally:
        if trainer is not None:
            trainer.close()
        shutil.rmtree(local, ignore_errors=True)
        try:
            local.parent.rmdir()  # the run's folder, once the last rank on this node is done
        except OSError:
            pass


# ---- on the driver -----------------------------------------------------------------------------------------------

def probe_address(address: str, timeout_s: float = 10.0) -> tuple[str, int]:
    """Check that something listens at a Ray address before ``ray.init`` (which can wait minutes on a dead one).

    Args:
        address: ``host:port`` (the GCS, default port 6379) or ``ray://host:port`` (Ray Client, default 10001).
        timeout_s: TCP connect timeout.

    Returns:
        ``(host, port)`` that answered.

    Raises:
        ValueError: a malformed address.
        ConnectionError: nothing answered within ``timeout_s`` (the message names the address and what to check).

    Example::

        >>> probe_address("127.0.0.1:1", timeout_s=1)  # doctest: +SKIP
        ConnectionError: no Ray cluster answers at 127.0.0.1:1 ...
    """
    rest, default = (address[len("ray://"):], DEFAULT_CLIENT_PORT) if address.startswith("ray://") else \
        (address, DEFAULT_GCS_PORT)
    host, _, port_s = rest.rpartition(":") if ":" in rest else (rest, ":", str(default))
    host = host.strip("[]")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"Ray address must look like host:port or ray://host:port, got {address!r}")
    try:
        with socket.create_connection((host, int(port_s)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(
            f"no Ray cluster answers at {address!r} ({host}:{port_s}) within {timeout_s:g} s: {e}. Start one with "
            f"`ray start --head --port={port_s}`, check the address (GCS port {DEFAULT_GCS_PORT}, Ray Client "
            f"ray://...:{DEFAULT_CLIENT_PORT}), or omit --address to start a local Ray.") from e
    return host, int(port_s)


def _wait_for_resources(ray, need: dict[str, float], wait_s: float) -> dict[str, float]:
    """The cluster's resources once they cover ``need`` (an autoscaler may add nodes: poll up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) < v}
        if not short:
            return have
        if time.monotonic() >= deadline:
            what = "; ".join(f"{k}: needs {v:g}, the cluster has {h:g}" for k, (v, h) in short.items())
            hint = (" use_gpu=True needs GPU nodes: drop --use-gpu to train on CPUs, or connect to a cluster with "
                    "GPUs" if "GPU" in short else " lower --num-workers / --cpus-per-worker or add nodes")
            raise ValueError(f"the Ray cluster cannot host this run ({what}; Ray Train also needs 1 CPU for its "
                             f"controller).{hint}")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def launch_ray(config_path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), num_workers: int = 1,
               use_gpu: bool = False, address: str | None = None, storage_path: str | Path | None = None,
               max_failures: int = 0, name: str | None = None, cpus_per_worker: float = 1.0,
               keep_checkpoints: int | None = 2, connect_timeout_s: float = 10.0, resources_wait_s: float = 0.0,
               num_cpus: int | None = None, fault: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``config_path`` with Ray Train: ``num_workers`` data-parallel workers, checkpoints reported every
    ``train.ckpt_every`` steps, restarts from the last one on worker failure.

    Args:
        config_path: YAML run config (``configs/...``); ``overrides``: ``section.key=value`` strings.
        num_workers: Ray Train workers (ranks); > 1 uses the DeepSpeed engine (gloo on CPU, NCCL on GPU).
        use_gpu: one GPU per worker; fails with a ValueError when the cluster has too few GPUs.
        address: None: ``ray.init()`` (joins ``RAY_ADDRESS`` when set, e.g. in a RayJob, else starts a local Ray);
            ``host:port`` / ``ray://host:port``: connect, failing with ConnectionError when nothing answers within
            ``connect_timeout_s``; ``"auto"``: the cluster started on this machine by ``ray start``.
        storage_path: where Ray persists checkpoints (a shared path or URI for multi-node; default ~/ray_results).
        max_failures: worker-group restarts allowed (-1: unlimited).
        name: run name (default: the config file's stem); re-running the same name and storage path resumes it.
        cpus_per_worker: CPUs reserved per worker; ``keep_checkpoints``: checkpoints kept in storage (None: all).
        resources_wait_s: how long to wait for the cluster to have the CPUs/GPUs the run needs (autoscaling).
        num_cpus: logical CPUs of a Ray started here (default: enough for the workers and the controller).
        fault: tests only, a one-shot worker crash (see ``RayTrainer``).

    Returns:
        ``{"metrics": last reported metrics, "checkpoint": its path, "history": [{"step", "loss", "lr"}, ...] and
        "reports": [metrics without the per-step lists, ...] over the kept checkpoints, "path": the run's storage
        path}``.

    Example::

        >>> out = launch_ray("configs/demo_mqar.yaml", ["train.steps=4", "train.ckpt_every=2"], num_workers=2,
        ...                  storage_path="/tmp/ray_runs")  # doctest: +SKIP
        >>> out["metrics"]["step"]  # doctest: +SKIP
        4
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if max_failures < -1:
        raise ValueError(f"max_failures must be >= -1 (-1: unlimited), got {max_failures}")
    if keep_checkpoints is not None and keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be >= 1 or None (keep all), got {keep_checkpoints}")
    run = resolve_config(config_path, overrides, num_workers)
    if not use_gpu and run["train"]["device"] == "cuda":
        raise ValueError("train.device='cuda' but use_gpu=False: pass --use-gpu or train.device=cpu")
    if use_gpu and run["train"]["device"] == "cpu":
        raise ValueError("use_gpu=True but train.device='cpu': drop --use-gpu or set train.device=auto")
    if address not in (None, "auto", "local"):
        probe_address(address, connect_timeout_s)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_here = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False}
        if address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
            kw["num_cpus"] = num_cpus or max(os.cpu_count() or 1, int(num_workers * cpus_per_worker) + 1)
        ray.init(address=address, **kw)
        started_here = True
    try:
        need = {"CPU": num_workers * cpus_per_worker + 1}
        if use_gpu:
            need["GPU"] = float(num_workers)
        _wait_for_resources(ray, need, resources_wait_s)
        if storage_path is not None and "://" not in str(storage_path):
            storage_path = str(Path(storage_path).expanduser().resolve())
        resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        name = name or (Path(config_path).stem if config_path else "pflow")
        run_key = f"{name}-{hashlib.sha1(f'{storage_path}|{name}'.encode()).hexdigest()[:10]}"
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"run": run, "fault": fault, "run_key": run_key},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                failure_config=FailureConfig(max_failures=max_failures)),
        )
        result = trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    history, reports = [], []
    for _, m in sorted(result.best_checkpoints or [], key=lambda cm: cm[1]["step"]):
        history += [{"step": s, "loss": loss, "lr": lr} for s, loss, lr in zip(m["steps"], m["losses"], m["lrs"])]
        reports.append({k: v for k, v in m.items() if k not in ("steps", "losses", "lrs")})
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "history": history, "reports": reports, "path": result.path}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pflow_dist.launch.ray_train", description=__doc__)
    p.add_argument("--config", help="YAML run config (configs/...)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 train.ckpt_every=50")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (data-parallel ranks, "
                   "times parallel.sp_size for sequence parallelism)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--address", default=None, help="host:port or ray://host:port of a running cluster, or 'auto' "
                   "(default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage-path", default=None, help="checkpoint storage (shared path or URI for multi-node)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts allowed (-1: unlimited)")
    p.add_argument("--name", default=None, help="run name (default: the config's stem)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept in storage (0: all)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for --address to answer")
    p.add_argument("--resources-wait", type=float, default=0.0,
                   help="seconds to wait for the cluster to have the CPUs/GPUs asked for (autoscaling)")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the last reported metrics and the checkpoint path as JSON."""
    a = parse_args(argv)
    try:
        out = launch_ray(a.config, a.overrides, num_workers=a.num_workers, use_gpu=a.use_gpu, address=a.address,
                         storage_path=a.storage_path, max_failures=a.max_failures, name=a.name,
                         cpus_per_worker=a.cpus_per_worker, keep_checkpoints=a.keep_checkpoints or None,
                         connect_timeout_s=a.connect_timeout, resources_wait_s=a.resources_wait)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = dict(out["metrics"] or {})
    for k in ("steps", "losses", "lrs"):
        m.pop(k, None)
    print(json.dumps({"metrics": m, "checkpoint": out["checkpoint"], "path": out["path"]}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
