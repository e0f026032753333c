"""MetricWriter (only documented names; scalars, histogram, position image) and the progress line."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vcppo_megatron.algorithms.position_stats import PositionStats
from vcppo_megatron.config.schema import Config
from vcppo_megatron.logging import MetricWriter, ProgressLine, UndocumentedMetricError, check_tag
from vcppo_megatron.logging.metric_names import documented_names
from vcppo_megatron.logging.tensorboard import HPARAM_METRICS, flatten_settings

ROOT = Path(__file__).resolve().parents[2]


def test_documented_names_cover_issue_metrics_and_placeholders():
    exact, _ = documented_names()
    assert {"critic/values/std", "response_length/min", "response_length/truncated_frac",
            "actor/lr", "perf/tokens_per_s", "perf/peak_memory_gb", "position/bias"} <= exact
    for tag in ["rl/position/advantages/bucket_03", "eval/aime24/pass@32", "eval/math500/avg@4",
                "rl/time/rollout_s", "rl/critic/returns/max", "sft/loss"]:
        check_tag(tag)
    with pytest.raises(UndocumentedMetricError, match=r"'rl/actor/made_up'.*not documented in .*METRICS.md"):
        check_tag("rl/actor/made_up")
    with pytest.raises(UndocumentedMetricError, match="expected '<phase>/<name>'"):
        check_tag("train/reward/mean")
    with pytest.raises(UndocumentedMetricError, match="not documented"):
        check_tag("eval/aime24/pass@32/extra")          # a placeholder is one segment only


def test_writer_rejects_undocumented_before_writing_and_writes_documented(tmp_path):
    writer = MetricWriter(tmp_path)
    with pytest.raises(UndocumentedMetricError, match="rl/reward/median"):
        writer.scalars("rl", {"reward/mean": 0.5, "reward/median": 0.1}, 0)
    with pytest.raises(ValueError, match="non-finite"):
        writer.scalars("rl", {"reward/mean": float("nan")}, 0)
    writer.scalars("rl", {"reward/mean": 0.25, "response_length/mean": 7.0}, 1)
    writer.scalars("rl", {"reward/mean": 0.5}, 2)
    writer.histogram("rl", "response_length/histogram", torch.tensor([3, 5, 5, 9]), 2)
    with pytest.raises(UndocumentedMetricError):
        writer.histogram("rl", "lengths", [1, 2], 2)
    acc = PositionStats(bucket_size=2, num_buckets=3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, 9.0], [1.0, 0.0, 9.0, 9.0, 9.0, 9.0]])
    for name in ("advantages", "values", "returns"):
        acc.add(name, adv, mask)
    writer.position_view("rl", acc.reduce(), 2, step=2)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.value for e in events.Scalars("rl/reward/mean")] == [0.25, 0.5]
    assert "rl/reward/median" not in tags["scalars"]
    means = [events.Scalars(f"rl/position/advantages/bucket_0{b}")[0].value for b in range(3)]
    assert means == pytest.approx([(3 + 2 + 1 + 0) / 4, (1 + 0) / 2, -1.0])   # falls with position
    assert tags["images"] == ["rl/position/bias"]
    image = events.Images("rl/position/bias")[0]
    assert image.width == 480 and image.height == 300
    hist = events.Histograms("rl/response_length/histogram")[0].histogram_value
    assert (hist.num, hist.min, hist.max, hist.sum) == (4, 3, 9, 22)


def test_progress_line_format_and_eta():
    now = [100.0]
    stream = io.StringIO()
    line = ProgressLine("rl", total=10, stream=stream, clock=lambda: now[0])
    now[0] = 130.0                                      # 3 steps in 30 s -> 70 s left
    text = line.step(2, {"reward/mean": 0.25, "reward/accuracy": 0.625,
                         "response_length/mean": 812.34, "critic/value_loss": 0.01234})
    assert text == ("[rl 3/10]  elapsed 00:30 eta 01:10  reward +0.250  acc 0.625  len 812.3  "
                    "vloss 0.0123")
    assert stream.getvalue() == text + "\n"
    with pytest.raises(ValueError, match="total = 0"):
        ProgressLine("rl", 0)



def test_disabled_writer_checks_names_and_writes_nothing(tmp_path):
    writer = MetricWriter(tmp_path / "tb", enabled=False)       # a rank other than the logging one
    writer.scalars("rl", {"reward/mean": 1.0}, 0)
    with pytest.raises(UndocumentedMetricError):
        writer.scalars("rl", {"reward/nope": 1.0}, 0)
    acc = PositionStats(2, 2)
    acc.add("entropy", torch.ones(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"position stats \['entropy'\]: expected names among"):
        writer.position_view("rl", acc.reduce(), 2, step=0)
    writer.close()
    assert not (tmp_path / "tb").exists()


def test_run_settings_reach_the_hparams_view_and_position_charts_the_custom_scalars(tmp_path):
    """Read back with TensorBoard's own event reader and plugin protos: the run's flattened config
    in the HParams session, its metric columns, and one multi-line chart per position quantity
    whose regex matches the bucket tags the writer logs."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = Config()
    writer = MetricWriter(tmp_path)
    with pytest.raises(UndocumentedMetricError):
        writer.run_settings(cfg, ["eval/made/up/too/deep"])
    writer.run_settings(cfg, ["eval/synthetic_eval/avg@4"])
    acc = PositionStats(bucket_size=2, num_buckets=3)
    for name in ("advantages", "values", "returns"):
        acc.add(name, torch.randn(2, 6), torch.ones(2, 6))
    writer.position_view("rl", acc.reduce(), 2, step=0)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == [*HPARAM_METRICS, "eval/synthetic_eval/avg@4"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    logged = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in session.hparams.items()}
    flat = flatten_settings(cfg)
    assert len(flat) > 80 and set(logged) == set(flat)
    assert logged["algo.lam_actor"] == pytest.approx(cfg.algo.lam_actor)
    assert logged["algo.advantage_estimator"] == "gae" and logged["actor.model_path"] == "null"
    assert logged["algo.whiten_advantages"] == "false" and logged["trainer.seed"] == cfg.trainer.seed
    for tag in HPARAM_METRICS:
        check_tag(tag)
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert len(charts) == 5 and "value_pretrain: advantages by response position" not in charts
    scalar_tags = events.Tags()["scalars"]
    for quantity in ("advantages", "values", "returns"):
        (regex,) = charts[f"rl: {quantity} by response position"]
        matched = sorted(t for t in scalar_tags if re.search(regex, t))
        assert matched == [f"rl/position/{quantity}/bucket_0{b}" for b in range(3)], (regex, matched)
