# Checkpoints that resume exactly and load safely.
#
# Exact resume needs every piece of state that decides the next steps: parameters, optimizer moments, the
# scheduler's step, the data position (here the step counter: batches are a pure function of (seed, step)) and the
# RNG streams (torch CPU / CUDA, Python, NumPy). Safe loading: ``torch.load(weights_only=True)`` — only tensors and
# plain containers are unpickled, never arbitrary objects. DeepSpeed's own loader uses ``weights_only=False``
# (deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py), so the engine's checkpoint engine is replaced
# by one that loads with ``weights_only=True`` and an explicit allow-list of the few DeepSpeed/PyTorch classes its
# checkpoints contain (found by saving ZeRO 0–3 checkpoints and loading them; tests/train cover it).
"""Checkpoint save/load for the plain path, RNG state capture, and a weights-only loader for DeepSpeed."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "deepspeed_safe_globals",
    "get_rng_state",
    "install_safe_deepspeed_loader",
    "latest_tag",
    "load_plain",
    "safe_load",
    "save_plain",
    "set_rng_state",
    "step_tag",
]

LATEST = "latest"  # the file DeepSpeed also uses to name the newest tag


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag written in ``ckpt_dir/latest``, or None when there is no complete checkpoint."""
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag) or not (Path(ckpt_dir) / tag).is_dir():
        raise ValueError(f"{f} names tag {tag!r}, which is not a checkpoint directory in {ckpt_dir}")
    return tag


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / LATEST)  # atomic: a crash mid-save leaves the previous checkpoint as latest


def get_rng_state() -> dict[str, Any]:
    """Every RNG stream the loop may draw from, as tensors and plain values (weights-only loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(path: str | Path, map_location: Any = "cpu", extra_safe_globals: list | tuple = ()) -> Any:
    """``torch.load(weights_only=True)``, allowing only ``extra_safe_globals`` beyond tensors and containers."""
    with torch.serialization.safe_globals(list(extra_safe_globals)):
        return torch.load(path, map_location=map_location, weights_only=True)


def save_plain(ckpt_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, client_state: dict[str, Any]) -> Path:
    """Save a single-process checkpoint to ``ckpt_dir/step{N}/state.pt`` and point ``latest`` at it.

    Args:
        ckpt_dir: the checkpoint directory (created).
        step: optimizer steps done.
        model, optimizer, scheduler: their ``state_dict()`` is saved.
        client_state: extra tensors / plain values (RNG states, data position, metrics history).

    Returns:
        The tag directory.
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / step_tag(step)
    tag_dir.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "client": client_state}
    tmp = tag_dir / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, tag_dir / "state.pt")
    _write_latest(ckpt_dir, tag_dir.name)
    return tag_dir


def load_plain(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, tag: str | None = None) -> dict[str, Any] | None:
    """Load the ``latest`` (or ``tag``) single-process checkpoint into model/optimizer/scheduler (weights only).

    Returns:
        The saved ``client_state``, or None when ``ckpt_dir`` holds no checkpoint.
    """
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    state = safe_load(Path(ckpt_dir) / tag / "state.pt")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["client"]


# ---- DeepSpeed ---------------------------------------------------------------------------------------------------

def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoints: ``LossScaler``, ``ZeroStageEnum`` and
    ``fragment_address`` in ZeRO 1–3 optimizer states (fp32 and bf16; listed with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``), ``DynamicLossScaler`` with fp16."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # pragma: no cover - other DeepSpeed versions: the load error names the class to allow
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def install_safe_deepspeed_loader(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` unpickle with ``weights_only=True`` (allow-list: :func:`deepspeed_safe_globals`).

    Only the default ``TorchCheckpointEngine`` is replaced; other engines (e.g. a fast-writer config) are left alone
    and reported by a ``TypeError``, so an unsafe loader is never used silently.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise TypeError(f"expected DeepSpeed's TorchCheckpointEngine to replace, got {type(current).__name__}")

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location, extra_safe_globals=deepspeed_safe_globals())

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe
