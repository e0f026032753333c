"""Model registry: HF config -> Megatron TransformerConfig + layer spec; value head (issue 4; not yet implemented)."""
