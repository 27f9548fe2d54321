"""Training: one typed config tree (``config``), the DeepSpeed JSON generated from it (``ds_config``), two engines
(DeepSpeed and plain torch, ``engine``), the one loop (``loop.Trainer``), exact-resume checkpoints (``checkpoint``)
and metrics (``metrics``). Entry point: ``python -m pflow_dist.train --config configs/....yaml [key=value ...]``."""

from .config import DataConfig, OptimConfig, ParallelConfig, RunConfig, TrainConfig, load_config
from .loop import Trainer


def train(cfg: RunConfig, console=None) -> dict:
    """Build a :class:`Trainer` for ``cfg``, train, close; returns the summary of :meth:`Trainer.train`."""
    trainer = Trainer(cfg, console=console)
    try:
        return trainer.train()
    finally:
        trainer.close()


__all__ = ["DataConfig", "OptimConfig", "ParallelConfig", "RunConfig", "TrainConfig", "Trainer", "load_config",
           "train"]
