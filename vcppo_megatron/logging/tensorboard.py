"""TensorBoard writer that accepts only metric names documented in docs/METRICS.md.

Besides scalars, histograms and the position-bias image, each run records its settings in the
HParams view (`run_settings`) and a custom-scalars layout with one multi-line chart per position
quantity, so `tensorboard --logdir` over several runs (the arms of a study) compares their
settings, metrics and position bias side by side.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from vcppo_megatron.algorithms.position_stats import BucketStats, PositionStats
from vcppo_megatron.logging.metric_names import DEFAULT_METRICS_DOC, check_tag
from vcppo_megatron.logging.plot import line_plot

POSITION_QUANTITIES = ("advantages", "values", "returns")
POSITION_PHASES = ("value_pretrain", "rl")
HPARAM_METRICS = ("eval/accuracy", "rl/reward/accuracy", "rl/response_length/mean",
                  "rl/critic/explained_variance", "value_pretrain/critic/explained_variance")
"""Metrics the HParams view shows beside each run's settings (more may be passed)."""


def flatten_settings(settings: Any, prefix: str = "") -> dict[str, float | int | str]:
    """A config dataclass or nested mapping as {"section.key": value}: numbers and strings as they
    are; None, booleans and anything else in their YAML / string form ("null", "true", "false")."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        settings = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    out: dict[str, float | int | str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out.update(flatten_settings(value, name + "."))
        elif value is None or isinstance(value, bool):       # torch's hparams would make a bool 0 / 1
            out[name] = "null" if value is None else str(value).lower()
        elif isinstance(value, (int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def position_layout() -> dict[str, dict[str, list]]:
    """Custom-scalars layout: per phase and quantity, one chart of all its position buckets."""
    return {"position (VC-PPO Fig. 2)": {
        f"{phase}: {quantity} by response position": ["Multiline", [rf"^{phase}/position/{quantity}/bucket_\d+$"]]
        for phase in POSITION_PHASES for quantity in POSITION_QUANTITIES
        if (phase, quantity) != ("value_pretrain", "advantages")}}       # the policy is frozen there


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

    def run_settings(self, settings: Any, metrics: Sequence[str] = ()) -> None:
        """Record the run's settings (a config dataclass or mapping) in the HParams view with
        `HPARAM_METRICS` and `metrics` as its metric columns, and the position charts' layout."""
        for tag in metrics:
            check_tag(tag, self.metrics_doc)
        if self._writer is None:
            return
        columns = {tag: 0.0 for tag in (*HPARAM_METRICS, *metrics)}
        for summary in hparams(flatten_settings(settings), columns):
            self._writer.file_writer.add_summary(summary)
        self._writer.add_custom_scalars(position_layout())

    def flush(self) -> None:
        """Flush pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
