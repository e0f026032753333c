"""Registry: HF config (Qwen2/Qwen2.5, Llama-3) -> Megatron TransformerConfig + GPT layer spec."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from vcppo_megatron.models.attention import SDPAttention
from vcppo_megatron.models.norm import RMSNorm

HFConfig = Union[Mapping[str, Any], Any]          # a transformers PretrainedConfig or its dict

ATTENTION_BACKENDS = ("auto", "te", "sdpa", "unfused")
# Megatron's llama3 RoPE scaling hard-codes these; other values cannot be represented exactly
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


@dataclass
class GPTArchitecture:
    """What GPTModel needs besides the layer spec: TransformerConfig plus embedding/RoPE settings."""

    config: TransformerConfig
    layer_spec: ModuleSpec
    vocab_size: int
    max_sequence_length: int
    rotary_base: float
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    tie_word_embeddings: bool = False
    model_type: str = ""
    layer_norm: Any = None                  # final norm (RMSNorm, TENorm); None: Megatron's default


def hf_get(hf_config: HFConfig, name: str, default: Any = None) -> Any:
    """Read one field from a PretrainedConfig or a config.json dict."""
    if isinstance(hf_config, Mapping):  # a parsed config.json: absent fields take HF's default
        return hf_config[name] if name in hf_config else default
    return getattr(hf_config, name, default)


def _require(hf_config: HFConfig, name: str) -> Any:
    """Read a field that must be present, naming it when it is not."""
    value = hf_get(hf_config, name)
    if value is None:
        raise ValueError(f"HF config field {name!r} is missing (model_type={hf_get(hf_config, 'model_type')!r})")
    return value


def _rope(hf_config: HFConfig) -> tuple[float, float | None]:
    """Return (rope_theta, llama3 scaling factor or None); raise for scalings Megatron can't match."""
    params = dict(hf_get(hf_config, "rope_parameters") or hf_get(hf_config, "rope_scaling") or {})
    theta = params.get("rope_theta", hf_get(hf_config, "rope_theta"))
    if theta is None:
        raise ValueError("HF config has no rope_theta (top level or in rope_parameters)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: 'default', 'llama3'")
    for key, expected in _MEGATRON_LLAMA3_ROPE.items():
        if float(params.get(key, float("nan"))) != expected:
            raise ValueError(f"llama3 rope scaling field {key}={params.get(key)!r} is not supported: "
                             f"Megatron-Core implements only {key}={expected}")
    return float(theta), float(params["factor"])


def _check_supported(hf_config: HFConfig) -> str:
    """Return the model_type, raising a clear error for an unsupported model_type/architecture."""
    model_type = hf_get(hf_config, "model_type")
    archs = list(hf_get(hf_config, "architectures") or [])
    supported = ", ".join(f"{t} ({a})" for t, a in sorted(SUPPORTED_ARCHITECTURES.items()))
    if model_type not in _ADAPTERS:
        raise ValueError(f"model_type={model_type!r} (architectures={archs}) is not supported; "
                         f"supported model_type (architecture): {supported}")
    bad = [a for a in archs if a != SUPPORTED_ARCHITECTURES[model_type]]
    if bad:
        raise ValueError(f"architectures={bad} is not supported for model_type={model_type!r}; "
                         f"supported model_type (architecture): {supported}")
    if hf_get(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_get(hf_config, 'hidden_act')!r} is not supported, expected 'silu'")
    return model_type


def _common_fields(hf_config: HFConfig) -> dict[str, Any]:
    """TransformerConfig fields shared by the Qwen2 and Llama families (RMSNorm, SwiGLU, RoPE, GQA)."""
    hidden = _require(hf_config, "hidden_size")
    heads = _require(hf_config, "num_attention_heads")
    return dict(
        num_layers=_require(hf_config, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_require(hf_config, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=hf_get(hf_config, "num_key_value_heads") or heads,
        kv_channels=hf_get(hf_config, "head_dim") or hidden // heads,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_get(hf_config, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=float(hf_get(hf_config, "attention_dropout", 0.0) or 0.0),
    )


def _qwen2_fields(hf_config: HFConfig) -> dict[str, Any]:
    """Qwen2/Qwen2.5: bias on q/k/v only."""
    if hf_get(hf_config, "use_sliding_window", False):
        raise ValueError("Qwen2 use_sliding_window=True is not supported, expected False")
    return dict(_common_fields(hf_config), add_qkv_bias=True)


def _llama_fields(hf_config: HFConfig) -> dict[str, Any]:
    """Llama-3: no biases."""
    for name in ("attention_bias", "mlp_bias"):
        if hf_get(hf_config, name, False):
            raise ValueError(f"Llama {name}=True is not supported, expected False")
    return dict(_common_fields(hf_config), add_qkv_bias=False)


_ADAPTERS: dict[str, Callable[[HFConfig], dict[str, Any]]] = {"qwen2": _qwen2_fields, "llama": _llama_fields}
SUPPORTED_ARCHITECTURES: dict[str, str] = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


# the config's per-role `layer_spec` -> attention_backend ('local' runs torch SDPA attention)
LAYER_SPEC_BACKENDS = {"auto": "auto", "transformer_engine": "te", "local": "sdpa"}


def have_transformer_engine() -> bool:
    """Whether megatron-core found Transformer Engine (`import transformer_engine` works)."""
    return bool(gpt_layer_specs.HAVE_TE)


def check_transformer_engine() -> None:
    """Raise a clear error when the Transformer Engine spec cannot run here."""
    if not have_transformer_engine():
        raise ValueError("layer_spec=transformer_engine (attention_backend='te') needs Transformer Engine, but "
                         "`import transformer_engine` fails here: install transformer-engine[pytorch] (the NGC "
                         "PyTorch container has it) or choose layer_spec: local (or auto)")
    if not torch.cuda.is_available():
        raise ValueError("layer_spec=transformer_engine (attention_backend='te') needs a CUDA device, none is "
                         "available: choose layer_spec: local (or auto)")


def te_layer_spec() -> tuple[ModuleSpec, Any]:
    """megatron's Transformer Engine layer spec and its final norm (TENorm)."""
    from megatron.core.extensions.transformer_engine import TENorm

    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(), TENorm


def resolve_attention_backend(attention_backend: str = "auto") -> str:
    """'auto' -> 'te' when Transformer Engine is importable on a GPU, else 'sdpa'; 'te' is checked."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={attention_backend!r}, expected one of {ATTENTION_BACKENDS}")
    if attention_backend == "auto":
        return "te" if have_transformer_engine() and torch.cuda.is_available() else "sdpa"
    if attention_backend == "te":
        check_transformer_engine()
    return attention_backend


def layer_spec_name(attention_backend: str) -> str:
    """The Megatron name layout ('transformer_engine' or 'local') an attention backend builds."""
    return "transformer_engine" if resolve_attention_backend(attention_backend) == "te" else "local"


def gpt_layer_spec(attention_backend: str = "auto") -> ModuleSpec:
    """Layer spec: 'te' (Transformer Engine), 'sdpa' (local + SDPA), 'unfused' (local), 'auto'.

    The local specs use this package's RMSNorm (models/norm.py), which supports sequence
    parallelism; Transformer Engine's norms do so themselves.
    """
    attention_backend = resolve_attention_backend(attention_backend)
    if attention_backend == "te":
        return te_layer_spec()[0]
    spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def block_spec(arch: GPTArchitecture, layers: int) -> Union[ModuleSpec, TransformerBlockSubmodules]:
    """What GPTModel takes as `transformer_layer_spec` for a stage of `layers` layers: the layer
    spec, or with a local spec the block of them with this package's final norm."""
    if arch.layer_norm is None:
        return arch.layer_spec
    return TransformerBlockSubmodules(layer_specs=[arch.layer_spec] * layers, layer_norm=arch.layer_norm)


def architecture_from_hf(
    hf_config: HFConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    attention_backend: str = "auto",
    **config_overrides: Any,
) -> GPTArchitecture:
    """Map an HF config to a GPTArchitecture; `config_overrides` set further TransformerConfig fields."""
    model_type = _check_supported(hf_config)
    fields = _ADAPTERS[model_type](hf_config)
    fields.update(
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    fields.update(config_overrides)
    vocab = _require(hf_config, "vocab_size")
    if vocab % tensor_model_parallel_size:
        raise ValueError(f"HF config vocab_size={vocab} is not divisible by tensor_model_parallel_size="
                         f"{tensor_model_parallel_size}: Megatron splits the embedding and LM head evenly "
                         f"over the TP ranks; expected a TP size that divides the vocabulary")
    theta, scaling_factor = _rope(hf_config)
    backend = resolve_attention_backend(attention_backend)
    layer_spec, layer_norm = te_layer_spec() if backend == "te" else (gpt_layer_spec(backend), RMSNorm)
    return GPTArchitecture(
        config=TransformerConfig(**fields),
        layer_spec=layer_spec,
        layer_norm=layer_norm,
        vocab_size=_require(hf_config, "vocab_size"),
        max_sequence_length=_require(hf_config, "max_position_embeddings"),
        rotary_base=theta,
        rope_scaling=scaling_factor is not None,
        rope_scaling_factor=scaling_factor if scaling_factor is not None else 8.0,
        tie_word_embeddings=bool(hf_get(hf_config, "tie_word_embeddings", False)),
        model_type=model_type,
    )
