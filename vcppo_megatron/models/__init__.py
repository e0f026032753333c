"""Model registry: HF config -> Megatron TransformerConfig + layer spec; value head; attention backend."""
from vcppo_megatron.models.attention import SDPAttention
from vcppo_megatron.models.gpt import ValueHead, build_gpt_model
from vcppo_megatron.models.registry import (
    ATTENTION_BACKENDS,
    SUPPORTED_ARCHITECTURES,
    GPTArchitecture,
    architecture_from_hf,
    gpt_layer_spec,
)

__all__ = [
    "ATTENTION_BACKENDS", "SUPPORTED_ARCHITECTURES", "GPTArchitecture", "SDPAttention", "ValueHead",
    "architecture_from_hf", "build_gpt_model", "gpt_layer_spec",
]
