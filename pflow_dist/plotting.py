"""Figure output shared by the commands that draw plots (demo, deer-train, scale)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["save_figure"]


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Lay out a matplotlib ``fig``, write it to ``path`` (its folder created if missing), close it; return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
