"""Build a Megatron GPTModel for a role (policy: LM head; critic: scalar value head) from an HF config."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from vcppo_megatron.models.registry import HFConfig, architecture_from_hf, block_spec


def gather_sequence_shards(hidden: Tensor, sequence_parallel: bool, tp_group: Any) -> Tensor:
    """Under sequence parallelism the final hidden states are split over the TP ranks along the
    sequence ([s/tp, b, h]); gather them to [s, b, h] on every rank. Backward keeps each rank's
    rows of the gradient, so the caller's gradient must already be whole on every TP rank (a
    replicated head, or one that all-reduces its partial gradients, as the vocab-parallel
    log-prob head does). Without sequence parallelism: the identity."""
    if not sequence_parallel:
        return hidden
    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=tp_group)


class ValueHead(torch.nn.Module):
    """Replicated scalar head, value = hidden @ weight.T + bias, standing in for GPTModel.output_layer
    (same call signature). Its parameters are named `weight` [1, hidden] and `bias` [1] like the LM
    head's, which GPTModel's sharded_state_dict (distributed checkpoints) expects to find."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, *, sequence_parallel: bool = False,
                 tp_group: Any = None, device: Optional[torch.device | int] = None) -> None:
        super().__init__()
        # zero init: identical on every TP rank, no RNG needed
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        self.sequence_parallel, self.tp_group = sequence_parallel, tp_group

    def forward(self, hidden: Tensor, weight: Optional[Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> tuple[Tensor, None]:
        """hidden [s, b, h] (or its sequence shard) -> values [s, b, 1] (GPTModel transposes them)."""
        hidden = gather_sequence_shards(hidden, self.sequence_parallel, self.tp_group)
        return torch.nn.functional.linear(hidden, self.weight, self.bias), None


def build_gpt_model(
    hf_config: HFConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    value_head: bool = False,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    attention_backend: str = "auto",
    parallel_output: bool = True,
    pg_collection: Optional[ProcessGroupCollection] = None,
    vp_stage: Optional[int] = None,
    **config_overrides: Any,
) -> GPTModel:
    """GPTModel for this pipeline stage; `value_head=True` swaps the LM head for a scalar value head."""
    arch = architecture_from_hf(
        hf_config, params_dtype=params_dtype, tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        attention_backend=attention_backend, **config_overrides)
    model = GPTModel(
        config=arch.config,
        transformer_layer_spec=block_spec(arch, get_num_layers_to_build(
            arch.config, vp_stage, None if pg_collection is None else pg_collection.pp.rank())),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and not value_head,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        rope_scaling=arch.rope_scaling,
        rope_scaling_factor=arch.rope_scaling_factor,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    if value_head and post_process:
        model.output_layer = ValueHead(arch.config.hidden_size, params_dtype,
                                       sequence_parallel=arch.config.sequence_parallel,
                                       tp_group=None if pg_collection is None else pg_collection.tp,
                                       device=torch.cuda.current_device() if torch.cuda.is_available()
                                       and not arch.config.use_cpu_initialization else None)  # as megatron's layers
    # the torch norm fallback (no Apex / Transformer Engine, e.g. on CPU) keeps its weights in fp32;
    # TE creates them in params_dtype. One dtype per model, as Megatron's distributed optimizer
    # assumes: with both in one param group its checkpoint maps states to the wrong parameters.
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype != params_dtype:
                param.data = param.data.to(params_dtype)
    return model
