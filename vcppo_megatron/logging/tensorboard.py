"""TensorBoard writer that accepts only metric names documented in docs/METRICS.md."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from vcppo_megatron.algorithms.position_stats import BucketStats, PositionStats
from vcppo_megatron.logging.metric_names import DEFAULT_METRICS_DOC, check_tag
from vcppo_megatron.logging.plot import line_plot

POSITION_QUANTITIES = ("advantages", "values", "returns")


class MetricWriter:
    """Writes `<phase>/<name>` scalars, histograms and images; undocumented names raise."""

    def __init__(self, log_dir: str | Path, metrics_doc: Path = DEFAULT_METRICS_DOC,
                 enabled: bool = True) -> None:
        """`enabled=False` (ranks other than the logging rank) checks names but writes nothing."""
        self.metrics_doc = Path(metrics_doc)
        self._writer = SummaryWriter(str(log_dir)) if enabled else None

    def _tag(self, phase: str, name: str) -> str:
        tag = f"{phase}/{name}"
        check_tag(tag, self.metrics_doc)
        return tag

    def scalars(self, phase: str, metrics: Mapping[str, float], step: int) -> None:
        """Write every metric; all names are checked before anything is written."""
        tags = {self._tag(phase, name): float(v) for name, v in metrics.items()}
        bad = [t for t, v in tags.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"step {step}: non-finite metrics {bad}: expected finite values")
        if self._writer is not None:
            for tag, value in tags.items():
                self._writer.add_scalar(tag, value, step)

    def histogram(self, phase: str, name: str, values: torch.Tensor | np.ndarray, step: int) -> None:
        """Histogram of `values` (e.g. response lengths)."""
        tag = self._tag(phase, name)
        if self._writer is not None:
            self._writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def position_view(self, phase: str, stats: Mapping[str, BucketStats], bucket_size: int,
                      step: int) -> None:
        """The VC-PPO Fig. 2 view: per-bucket mean scalars, and one plot of all quantities."""
        unknown = sorted(set(stats) - set(POSITION_QUANTITIES))
        if unknown:
            raise ValueError(f"position stats {unknown}: expected names among {POSITION_QUANTITIES}")
        self.scalars(phase, PositionStats.scalars(dict(stats)), step)
        tag = self._tag(phase, "position/bias")
        if self._writer is None or not stats:
            return
        series = {name: st.mean.tolist() for name, st in stats.items()}
        starts = [b * bucket_size for b in range(len(next(iter(stats.values())).mean))]
        image = line_plot(series, starts, title=f"mean by response position ({bucket_size}-token buckets)")
        self._writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        """Flush pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
