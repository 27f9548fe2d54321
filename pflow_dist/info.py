"""``pflow-dist info``: versions, CUDA devices, the Triton backend, Ray and DeepSpeed availability."""

from __future__ import annotations

import importlib.util
import os
import platform
from importlib import metadata
from typing import Any

import psutil
import torch

__all__ = ["collect_info"]

_PACKAGES = ("pflow-dist", "torch", "triton", "numpy", "ray", "deepspeed", "fla-core", "accelerated-scan")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _triton_backend() -> str:
    if importlib.util.find_spec("triton") is None:
        return "unavailable (triton not installed)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return f"cuda (sm_{major}{minor})"
    return "none: no CUDA device; set TRITON_INTERPRET=1 to run kernels on CPU through the interpreter"


def collect_info() -> dict[str, Any]:
    """Everything ``pflow-dist info`` prints, as a dict (also used in bug reports and benchmark metadata)."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                            "capability": f"{p.major}.{p.minor}"})
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "packages": {name: _version(name) for name in _PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cuda_devices": devices,
        "triton_backend": _triton_backend(),
        "distributed_backends": {b: getattr(torch.distributed, f"is_{b}_available", lambda: False)()
                                 for b in ("gloo", "nccl", "mpi")},
        "ray_available": importlib.util.find_spec("ray") is not None,
        "deepspeed_available": importlib.util.find_spec("deepspeed") is not None,
    }
