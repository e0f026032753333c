"""ValueEngine: per-token values from the trunk + replicated scalar value head (models/gpt.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from megatron.core.process_groups_config import ProcessGroupCollection

from vcppo_megatron.checkpoint.convert import SafetensorsIndex
from vcppo_megatron.config.schema import OptimConfig
from vcppo_megatron.engines.core import Engine, EngineCore
from vcppo_megatron.models.registry import SUPPORTED_ARCHITECTURES, hf_get
from vcppo_megatron.parallel.groups import RoleLayout


def causal_lm_config(hf_config: Any) -> dict[str, Any]:
    """An HF config (causal LM or 1-label sequence classifier) as the causal-LM config dict the
    model registry accepts (the trunk is the same; only `architectures` differs)."""
    cfg = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = hf_get(cfg, "model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"critic model_type={model_type!r}, expected one of {sorted(SUPPORTED_ARCHITECTURES)}")
    archs = hf_get(cfg, "architectures") or []     # absent: allowed, set to the causal LM below
    allowed = {SUPPORTED_ARCHITECTURES[model_type], SUPPORTED_ARCHITECTURES[model_type].replace(
        "ForCausalLM", "ForSequenceClassification")}
    bad = [a for a in archs if a not in allowed]
    if bad:
        raise ValueError(f"critic architectures={bad}: expected one of {sorted(allowed)}")
    cfg["architectures"] = [SUPPORTED_ARCHITECTURES[model_type]]
    return cfg


class ValueEngine(Engine):
    """Critic engine: `forward_backward` gives loss_fn {"values": [rows, seq]} per micro-batch;
    values[:, t] is the value head applied to the final hidden state at token t."""

    def __init__(self, hf_config: Any, pgs: ProcessGroupCollection, layout: RoleLayout, *,
                 optim: OptimConfig, **core_kwargs: Any) -> None:
        self.hf_config = causal_lm_config(hf_config)
        self.core = EngineCore(self.hf_config, pgs, layout, value_head=True, optim=optim, **core_kwargs)

    def load_hf_state(self, hf_state: Mapping[str, Tensor], *, init_from: str) -> None:
        """Load the trunk from an HF causal LM (`init_from="policy"`: lm_head dropped, head zero) or
        from a 1-label reward model (`"reward_model"`: `score.weight` becomes the head, bias 0)."""
        state = dict(hf_state)
        head = self._head_tensors(state.pop("score.weight", None), init_from)
        state.pop("lm_head.weight", None)
        full = self.core.hf_full_state(state, tie_word_embeddings=False)
        full.update({k: v.to(next(iter(full.values())).dtype) for k, v in head.items()})
        self.core.load_megatron_state(full, tie_word_embeddings=False)

    def load_hf_dir(self, model_dir: str | Path, *, init_from: str) -> None:
        """`load_hf_state` from an HF directory (safetensors), one parameter at a time: each rank
        reads only the tensors of its stage."""
        index = SafetensorsIndex(Path(model_dir))
        score = index.get("score.weight") if "score.weight" in index.files else None
        self.core.load_hf_params(index.get, tie_word_embeddings=False,
                                 extra=self._head_tensors(score, init_from))

    def load_hf_stream(self, named_tensors: Iterable[tuple[str, Tensor]]) -> dict[str, int]:
        """The trunk from a stream of a causal LM's full HF tensors (the policy's weight-sync
        buckets), value head zero; only the tensors of this rank's stage are kept, each until its
        parameters are loaded (see EngineCore.load_hf_stream)."""
        return self.core.load_hf_stream(named_tensors, tie_word_embeddings=False,
                                        extra=self._head_tensors(None, "policy"))

    def _head_tensors(self, score: Tensor | None, init_from: str) -> dict[str, Tensor]:
        """The value head's full weight and bias: from a reward model's score, or zero."""
        if init_from == "reward_model":
            if score is None:
                raise KeyError("reward model state has no 'score.weight': expected a 1-label "
                               "sequence-classification checkpoint")
            if score.shape[0] != 1:
                raise ValueError(f"reward model score.weight shape {tuple(score.shape)}: expected num_labels=1")
            weight = score.clone()
        elif init_from == "policy":
            weight = torch.zeros(1, hf_get(self.hf_config, "hidden_size"))
        else:
            raise ValueError(f"init_from={init_from!r}, expected 'policy' or 'reward_model'")
        return {"output_layer.weight": weight, "output_layer.bias": torch.zeros(1, dtype=weight.dtype)}

    @staticmethod
    def _head(values: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        """GPTModel output [b, s, 1] -> {"values": [b, s]} fp32."""
        return {"values": values[..., 0].float()}
