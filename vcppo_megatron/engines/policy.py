"""PolicyEngine: per-token log-probs and entropy (vocab-parallel, chunked) for the actor loss."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from megatron.core.process_groups_config import ProcessGroupCollection

from vcppo_megatron.checkpoint.convert import SafetensorsIndex
from vcppo_megatron.config.schema import OptimConfig
from vcppo_megatron.engines.core import Engine, EngineCore
from vcppo_megatron.engines.logprobs import vocab_parallel_logprobs
from vcppo_megatron.models.gpt import gather_sequence_shards
from vcppo_megatron.models.registry import hf_get
from vcppo_megatron.parallel.groups import RoleLayout


class HiddenStatesOutput(torch.nn.Module):
    """Stands in for GPTModel.output_layer: returns the final hidden states, keeps the LM weight.

    The same Parameter object (name `output_layer.weight`, its TP and tied-embedding attributes)
    stays registered, so checkpoints, DDP and the tied-embedding grad all-reduce see no change;
    the projection to the vocabulary happens chunked in `vocab_parallel_logprobs`.
    """

    def __init__(self, output_layer: Optional[torch.nn.Module], *, sequence_parallel: bool = False,
                 tp_group: Any = None) -> None:
        super().__init__()
        self.weight = None if output_layer is None else output_layer.weight
        self.sequence_parallel, self.tp_group = sequence_parallel, tp_group

    def forward(self, hidden: Tensor, weight: Optional[Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> tuple[Tensor, None]:
        """hidden [s, b, h] (or its sequence shard, gathered) -> the whole hidden (GPTModel
        transposes it to [b, s, h]); vocab_parallel_logprobs all-reduces its gradient over TP."""
        return gather_sequence_shards(hidden, self.sequence_parallel, self.tp_group), None


class PolicyEngine(Engine):
    """Actor engine: `forward_backward` gives loss_fn {"log_probs", "entropy"} per micro-batch.

    Both are [rows, seq] fp32 and aligned with the token they score: position t holds
    log p(input_ids[t] | input_ids[<t]) and the entropy of that distribution; position 0 is 0.
    Micro-batches are length-sorted under `max_tokens_per_micro_batch` and trimmed to their
    longest row: padding computed <= max_k rows_k x (longest - shortest row) (engines/batching.py).
    fp32 logits exist only per chunk of `logprob_chunk_size` tokens (engines/logprobs.py).
    """

    def __init__(self, hf_config: Any, pgs: ProcessGroupCollection, layout: RoleLayout, *,
                 optim: OptimConfig, logprob_chunk_size: int = 1024, **core_kwargs: Any) -> None:
        if logprob_chunk_size < 1:
            raise ValueError(f"logprob_chunk_size={logprob_chunk_size}, expected >= 1")
        def hidden_states_head(model: torch.nn.Module) -> None:
            # before DDP wraps the model: with overlap_param_gather its forward pre-hooks (on every
            # module it saw) are what wait for the output weight's all-gather
            if layout.is_last_stage:
                model.output_layer = HiddenStatesOutput(
                    model.output_layer, sequence_parallel=model.config.sequence_parallel, tp_group=pgs.tp)

        self.core = EngineCore(hf_config, pgs, layout, value_head=False, optim=optim,
                               prepare_model=hidden_states_head, **core_kwargs)
        self.chunk_size = logprob_chunk_size
        self.tie = bool(hf_get(hf_config, "tie_word_embeddings", False))

    def load_hf_state(self, hf_state: Mapping[str, Tensor]) -> None:
        """Load an HF causal LM state dict (this rank's TP shard of its PP stage)."""
        self.core.load_megatron_state(self.core.hf_full_state(dict(hf_state), tie_word_embeddings=self.tie),
                                      tie_word_embeddings=self.tie)

    def load_hf_dir(self, model_dir: str | Path) -> None:
        """Load an HF causal LM directory (safetensors) one parameter at a time (see
        EngineCore.load_hf_params): each rank reads only the tensors of its stage."""
        index = SafetensorsIndex(Path(model_dir))
        self.core.load_hf_params(index.get, tie_word_embeddings=self.tie)

    def _lm_weight(self) -> Tensor:
        """This TP rank's vocab shard of the output projection (the embedding when tied)."""
        return self.core.raw_model.shared_embedding_or_output_weight() if self.tie \
            else self.core.raw_model.output_layer.weight

    def _head(self, hidden: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        """hidden [b, s, h] -> log-probs and entropy of the next tokens, shifted onto them."""
        ids = mb["input_ids"]
        logp, ent = vocab_parallel_logprobs(hidden[:, :-1], self._lm_weight(), ids[:, 1:],
                                            chunk_size=self.chunk_size, tp_group=self.core.pgs.tp)
        zero = logp.new_zeros(ids.shape[0], 1)
        return {"log_probs": torch.cat([zero, logp], 1), "entropy": torch.cat([zero, ent], 1)}
