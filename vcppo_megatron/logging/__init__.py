"""TensorBoard writer restricted to the metric names of docs/METRICS.md; console progress line."""
from vcppo_megatron.logging.metric_names import UndocumentedMetricError, check_tag, documented_names
from vcppo_megatron.logging.progress import ProgressLine
from vcppo_megatron.logging.tensorboard import MetricWriter

__all__ = ["MetricWriter", "ProgressLine", "UndocumentedMetricError", "check_tag",
           "documented_names"]
