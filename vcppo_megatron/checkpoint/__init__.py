"""HF <-> Megatron adapters (name maps, TP/PP split/merge) and distributed checkpoints."""
from vcppo_megatron.checkpoint.hf_weights import (
    hf_to_megatron,
    interleave_qkv,
    load_into_model,
    megatron_to_hf,
    pp_stage,
    split_qkv,
    tp_merge,
    tp_shard,
)

__all__ = ["hf_to_megatron", "interleave_qkv", "load_into_model", "megatron_to_hf", "pp_stage",
           "split_qkv", "tp_merge", "tp_shard"]
