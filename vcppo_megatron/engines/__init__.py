"""PolicyEngine / ValueEngine on Megatron-Core: forward_backward(batch, loss_fn, forward_only), step."""
from vcppo_megatron.engines.batching import computed_tokens, split_micro_batches, validate_batch
from vcppo_megatron.engines.core import Engine, EngineCore
from vcppo_megatron.engines.logprobs import vocab_parallel_logprobs
from vcppo_megatron.engines.policy import PolicyEngine
from vcppo_megatron.engines.value import ValueEngine, causal_lm_config

__all__ = ["Engine", "EngineCore", "PolicyEngine", "ValueEngine", "causal_lm_config", "computed_tokens",
           "split_micro_batches", "validate_batch", "vocab_parallel_logprobs"]
