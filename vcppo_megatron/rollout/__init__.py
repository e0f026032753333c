"""vLLM rollout: group sampling with per-token log-probs, in-place weight updates, and the bucketed
weight sync from Megatron actor shards (issue 5)."""
from typing import Any

from vcppo_megatron.rollout.batch import FittedPrompts, RolloutBatch, fit_prompts
from vcppo_megatron.rollout.engine import RolloutEngine

# rollout.sync imports megatron.core (through the checkpoint package): loaded on first use, so
# `import vcppo_megatron.rollout` stays light for tools that only sample (tools/evaluate.py)
_SYNC_NAMES = ("SyncStats", "export_hf_dir", "hf_weight_buckets", "iter_bucket_tensors",
               "sync_to_rollout", "unwrap_model")


def __getattr__(name: str) -> Any:
    """Lazy access to the weight-sync API in vcppo_megatron.rollout.sync."""
    if name in _SYNC_NAMES:
        from vcppo_megatron.rollout import sync

        return getattr(sync, name)
    raise AttributeError(f"module 'vcppo_megatron.rollout' has no attribute {name!r}")


__all__ = ["FittedPrompts", "RolloutBatch", "RolloutEngine", "fit_prompts", *_SYNC_NAMES]
