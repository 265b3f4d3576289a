"""What every benchmark plot does before and after drawing: a headless backend, one file per figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: Path, fname: str) -> Path:
    """Lay out ``fig``, write it to ``out / fname`` and free it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out / fname
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
