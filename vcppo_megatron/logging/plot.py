"""Line plots drawn with matplotlib (Agg, no display) as RGB arrays, for TensorBoard images."""
from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def line_plot(series: dict[str, list[float]], x_labels: list[int], title: str = "",
              width: int = 480, height: int = 300, xlabel: str = "response position (bucket start)",
              ylabel: str = "mean") -> np.ndarray:
    """An RGB [height, width, 3] uint8 image: one line per series over `x_labels` (NaN points skipped)."""
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.asarray(x_labels, dtype=np.float64)
    for name, values in series.items():
        y = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], marker="o", markersize=3, linewidth=1.5, label=name)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if series:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
