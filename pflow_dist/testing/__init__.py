"""Test infrastructure shared by the suite and by GPU checks: tolerances, the Triton interpreter, gloo spawns."""

from .compare import ErrorStats, assert_close, error_stats
from .distributed import DistributedRunError, run_distributed
from .triton_mode import enable_interpreter_if_no_cuda, interpreting, kernel_device, triton_available

__all__ = [
    "DistributedRunError",
    "ErrorStats",
    "assert_close",
    "enable_interpreter_if_no_cuda",
    "error_stats",
    "interpreting",
    "kernel_device",
    "run_distributed",
    "triton_available",
]
