"""The demo end to end on a few steps: it runs every phase, writes finite TensorBoard scalars,
and every scalar it writes is documented in docs/METRICS.md."""
from __future__ import annotations

import math
import re
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vcppo_megatron import demo

ROOT = Path(__file__).resolve().parents[2]


def _documented_names() -> set[str]:
    names = set()
    for row in (ROOT / "docs" / "METRICS.md").read_text().splitlines():
        if not row.startswith("| `"):
            continue
        cell = row.split("|")[1]
        first = re.findall(r"`([^`]+)`", cell)
        base = first[0]
        names.add(base)
        stem = base.rsplit("/", 1)[0]
        names.update(f"{stem}/{s.strip('/')}" for s in first[1:])
    return names


def test_demo_runs_all_phases_and_logs_documented_finite_scalars(tmp_path, capsys):
    code = demo.main(["--config", str(ROOT / "examples" / "tiny_cpu.yaml"),
                      f"trainer.output_dir={tmp_path}", "trainer.sft_steps=60",
                      "trainer.value_pretrain_steps=2", "trainer.num_steps=2",
                      "trainer.eval_problems=16", "batch.global_prompts_per_step=8",
                      "batch.global_mini_batch_size=16", "algo.nll_coef=0.1",
                      "algo.dual_clip=3.0", "algo.value_clip=0.5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "[value_pretrain 2/2]" in out and "[rl 2/2]" in out and "before RL" in out
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    documented = _documented_names()
    phases = {"sft", "value_pretrain", "rl", "eval"}
    for tag in tags:
        phase, name = tag.split("/", 1)
        assert phase in phases, tag
        assert name in documented, f"{name} (tag {tag}) is not documented in docs/METRICS.md"
        values = [e.value for e in events.Scalars(tag)]
        assert all(math.isfinite(v) for v in values), tag
    for needed in ["rl/actor/pg_loss", "rl/actor/nll_loss", "rl/actor/clip_dual_frac",
                   "rl/critic/explained_variance", "value_pretrain/critic/value_loss",
                   "eval/accuracy", "sft/loss"]:
        assert needed in tags, needed
    assert len(events.Scalars("eval/accuracy")) == 2          # before and after RL


def test_demo_rejects_bad_config_before_starting(capsys):
    code = demo.main(["--config", str(ROOT / "examples" / "tiny_cpu.yaml"), "algo.lam_actor=2"])
    assert code == 2
    assert "'algo.lam_actor' = 2" in capsys.readouterr().err
