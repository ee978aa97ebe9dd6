"""Figures for every eval app: drawn on matplotlib's Agg canvas without pyplot (no global backend
state is touched) and saved as PNG files written whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.files import write_atomic


def figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, axes [rows, cols]) with a constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> None:
    """Write the figure to `path` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
