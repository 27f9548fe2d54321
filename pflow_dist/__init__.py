"""pflow_dist: very long sequence recurrent models on one GPU and many.

Layers (imports point downward): ``pflow_dist.kernels`` (Triton kernels + float64 references) ← ``pflow_dist.ops``
(differentiable ops) ← ``pflow_dist.dist`` (sequence parallelism) ← models ← train ← launchers and the CLI.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pflow-dist")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
