"""HF <-> Megatron adapters (name maps, TP/PP split/merge), distributed checkpoints, conversion."""
from vcppo_megatron.checkpoint.convert import (
    HF_SUBDIR,
    ConversionError,
    copy_hf_files,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)
from vcppo_megatron.checkpoint.dist import (
    CheckpointError,
    CheckpointReadError,
    load_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from vcppo_megatron.checkpoint.hf_weights import (
    LAYER_SPECS,
    hf_sources,
    hf_to_megatron,
    hf_to_megatron_param,
    interleave_qkv,
    layer_spec_of,
    load_into_model,
    local_name,
    megatron_to_hf,
    pp_stage,
    spec_name,
    split_qkv,
    tp_merge,
    tp_shard,
)

__all__ = ["HF_SUBDIR", "LAYER_SPECS", "layer_spec_of", "local_name", "spec_name", "CheckpointError", "CheckpointReadError", "ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf",
           "copy_hf_files",
           "hf_sources", "hf_to_megatron", "hf_to_megatron_param", "interleave_qkv", "load_checkpoint",
           "load_into_model", "megatron_to_hf", "pp_stage", "read_checkpoint_meta", "resolve_checkpoint_dir",
           "save_checkpoint", "split_qkv", "tp_merge", "tp_shard"]
