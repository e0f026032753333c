"""A minimal line plot rendered with Pillow (no plotting library needed) for TensorBoard images."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def line_plot(series: dict[str, list[float]], x_labels: list[int], title: str = "",
              width: int = 480, height: int = 300) -> np.ndarray:
    """An RGB [H, W, 3] uint8 image of one line per series over buckets (NaN points skipped)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, width - 100, 24, height - 30
    finite = [v for vals in series.values() for v in vals if math.isfinite(v)]
    lo, hi = (min(finite + [0.0]), max(finite + [0.0])) if finite else (-1.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    n = max(len(x_labels), 2)

    def xy(i: int, v: float) -> tuple[float, float]:
        return (left + (right - left) * i / (n - 1), bottom - (bottom - top) * (v - lo) / (hi - lo))

    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.line([xy(0, 0.0), xy(n - 1, 0.0)], fill=(160, 160, 160))           # zero line
    draw.text((4, top - 4), f"{hi:.3g}", fill=(0, 0, 0))
    draw.text((4, bottom - 8), f"{lo:.3g}", fill=(0, 0, 0))
    for i in (0, len(x_labels) - 1):
        if x_labels:
            draw.text((xy(i, lo)[0] - 8, bottom + 6), str(x_labels[i]), fill=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0))
    for c, (name, vals) in enumerate(series.items()):
        colour = COLOURS[c % len(COLOURS)]
        points = [xy(i, v) for i, v in enumerate(vals) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for p in points:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        draw.text((right + 8, top + 14 * c), name, fill=colour)
    return np.asarray(img)
