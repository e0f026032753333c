"""Rule-based verifier reward of VC-PPO §4.1: +1 for a correct final answer, -1 otherwise."""
from vcppo_megatron.rewards.extract import extract_answer, normalize_answer, strip_thinking
from vcppo_megatron.rewards.math_verifier import (
    batch_math_reward,
    math_reward,
    shutdown_reward_pools,
    verify_answer,
)

__all__ = [
    "batch_math_reward",
    "extract_answer",
    "math_reward",
    "normalize_answer",
    "shutdown_reward_pools",
    "strip_thinking",
    "verify_answer",
]
