"""Figures as PNG files, drawn without a display."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def png_figure(path: Path, *grid: int, tight: bool = True, **options: Any) -> Iterator[Any]:
    """``plt.subplots(*grid, **options)`` on the Agg backend (stages run on machines with no
    display); when the block ends the figure is laid out (``tight_layout`` unless ``tight`` is
    false, e.g. with ``layout="constrained"``), saved to ``path`` at 100 dpi and closed.
    Yields ``(figure, axes)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **options)
    try:
        yield fig, axes
        if tight:
            fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
