"""vLLM rollout: group sampling with per-token log-probs, and in-place weight updates (issue 5)."""
from vcppo_megatron.rollout.batch import FittedPrompts, RolloutBatch, fit_prompts
from vcppo_megatron.rollout.engine import RolloutEngine

__all__ = ["FittedPrompts", "RolloutBatch", "RolloutEngine", "fit_prompts"]
