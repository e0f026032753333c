"""What tools/reproduce.py measures per run, read from the run's TensorBoard events.

Tags are those of docs/METRICS.md: `eval/<dataset>/avg@<n>`, `eval/<dataset>/pass@<k>`,
`eval/accuracy` (greedy), `rl/response_length/mean`, `rl/position/<quantity>/bucket_<b>`,
`value_pretrain/critic/value_loss`, `value_pretrain/critic/explained_variance`.
"""
from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

Scalars = dict[str, dict[int, float]]
FIRST_RL_STEPS = 5          # the position view averages the first RL steps (VC-PPO Fig. 2: the start of RL)


def read_scalars(tb_dir: Path) -> Scalars:
    """tag -> {step: value} over a run's event files (later files win: a resumed run rewrites steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Scalars = {}
    files = sorted(Path(tb_dir).glob("events.out.tfevents.*"), key=os.path.getmtime)
    for f in files:
        ev = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ev.Reload()
        for tag in ev.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in ev.Scalars(tag)})
    return out


def _series(scalars: Scalars, tag: str) -> list[tuple[int, float]]:
    return sorted(scalars.get(tag, {}).items())


def eval_tags(scalars: Scalars) -> dict[str, str]:
    """{'avg@n': tag, 'pass@k': tag, ...} of the held-out set's sampled evaluation."""
    out = {}
    for tag in scalars:
        m = re.fullmatch(r"eval/(.+)/((?:avg|pass)@\d+)", tag)
        if m:
            out[m.group(2)] = tag
    return out


def position_means(scalars: Scalars, quantity: str, phase: str = "rl", first_steps: int = FIRST_RL_STEPS) -> list[float]:
    """Mean of `position/<quantity>/bucket_<b>` over the first steps of `phase`, bucket by bucket."""
    buckets = sorted((int(m.group(1)), tag) for tag in scalars
                     if (m := re.fullmatch(rf"{phase}/position/{quantity}/bucket_(\d+)", tag)))
    out = []
    for _, tag in buckets:
        vals = [v for _, v in _series(scalars, tag)[:first_steps]]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def reached_buckets(scalars: Scalars, bucket_size: int, phase: str = "rl", first_steps: int = FIRST_RL_STEPS) -> int | None:
    """How many leading position buckets every response of the first steps fills completely: the
    buckets whose last position is below the shortest response (`<phase>/response_length/min`).
    Their means are over every response; later buckets hold only the longer (often the over-long,
    wrong) responses, so a trend across them mixes position with which responses are there.
    None when the run did not log the shortest length."""
    lows = [v for _, v in _series(scalars, f"{phase}/response_length/min")[:first_steps]]
    if not lows or bucket_size < 1:
        return None
    return int(min(lows) // bucket_size)


def summarize_run(scalars: Scalars, start_eval: Scalars | None = None, bucket_size: int | None = None) -> dict[str, Any]:
    """The measurements of one run. `start_eval`: the SFT run's scalars (its final evaluation is
    every arm's step-0 evaluation: same policy, same seed, same held-out set). `bucket_size`: the
    run's `trainer.position_bucket_size` (for the buckets every response fills)."""
    s: dict[str, Any] = {}
    length = _series(scalars, "rl/response_length/mean")
    if length:
        vals = [v for _, v in length]
        s["length"] = {"steps": [k for k, _ in length], "values": vals,
                       "first": vals[0], "min": min(vals), "last": vals[-1]}
    acc = _series(scalars, "rl/reward/accuracy")
    if acc:
        s["train_accuracy"] = {"steps": [k for k, _ in acc], "values": [v for _, v in acc]}
    greedy = _series(scalars, "eval/accuracy")
    if greedy:          # before RL, at every trainer.eval_every_steps (runs since 2026-12-01) and after RL
        s["greedy"] = {"before": greedy[0][1], "after": greedy[-1][1],
                       "steps": [k for k, _ in greedy], "values": [v for _, v in greedy]}
    evals = {}
    start_tags = eval_tags(start_eval) if start_eval else {}
    for name, tag in eval_tags(scalars).items():
        series = dict(scalars[tag])
        if name in start_tags and 0 not in series:
            series[0] = _series(start_eval, start_tags[name])[-1][1]
        steps = sorted(series)
        evals[name] = {"steps": steps, "values": [series[k] for k in steps]}
    s["eval"] = evals
    s["position"] = {q: position_means(scalars, q) for q in ("advantages", "values", "returns")}
    s["position"]["reached"] = reached_buckets(scalars, bucket_size) if bucket_size else None
    vloss = _series(scalars, "value_pretrain/critic/value_loss")
    if vloss:
        s["value_pretrain"] = {"steps": [k for k, _ in vloss], "value_loss": [v for _, v in vloss],
                               "explained_variance": [v for _, v in _series(scalars, "value_pretrain/critic/explained_variance")]}
    return s


def final_eval(summary: dict[str, Any], name: str) -> tuple[float, float] | None:
    """(step-0 value, last value) of an evaluation metric ('avg@4', 'pass@2', ...)."""
    e = summary.get("eval", {}).get(name)
    if not e or not e["values"]:
        return None
    start = e["values"][0] if e["steps"][0] == 0 else math.nan
    return start, e["values"][-1]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) of the finite values; NaN when none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against their index (NaN entries dropped); NaN with < 2 points."""
    pts = [(i, y) for i, y in enumerate(ys) if math.isfinite(y)]
    if len(pts) < 2:
        return math.nan
    mx = statistics.fmean(i for i, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    den = sum((i - mx) ** 2 for i, _ in pts)
    return sum((i - mx) * (y - my) for i, y in pts) / den
