"""The console progress line of a step: phase, step/total, ETA, reward, length and a few more."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from tqdm import tqdm

# (label, metric name, format) in display order; a metric absent from a step is left out
FIELDS = [("reward", "reward/mean", "{:+.3f}"), ("acc", "reward/accuracy", "{:.3f}"),
          ("len", "response_length/mean", "{:.1f}"), ("vloss", "critic/value_loss", "{:.4f}"),
          ("ev", "critic/explained_variance", "{:+.3f}"), ("ent", "actor/entropy", "{:.3f}"),
          ("clip_hi", "actor/clip_high_frac", "{:.3f}"), ("tok/s", "perf/tokens_per_s", "{:.0f}")]


class ProgressLine:
    """Prints one line per step of a phase (log-friendly, safe beside tqdm bars)."""

    def __init__(self, phase: str, total: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if total < 1:
            raise ValueError(f"total = {total}: expected >= 1 steps in phase {phase!r}")
        self.phase, self.total, self.stream, self.clock = phase, total, stream, clock
        self.t_start = clock()

    def format(self, step: int, metrics: Mapping[str, float]) -> str:
        """The line after `step` (0-based) finished; ETA from the mean step time so far."""
        done = step + 1
        elapsed = self.clock() - self.t_start
        eta = elapsed / done * (self.total - done)
        parts = [f"[{self.phase} {done}/{self.total}]",
                 f"elapsed {tqdm.format_interval(elapsed)} eta {tqdm.format_interval(eta)}"]
        parts += [f"{label} {fmt.format(metrics[name])}" for label, name, fmt in FIELDS
                  if name in metrics]
        return "  ".join(parts)

    def step(self, step: int, metrics: Mapping[str, float]) -> str:
        """Print and return the line of `step`."""
        line = self.format(step, metrics)
        tqdm.write(line, file=self.stream or sys.stdout)
        return line
