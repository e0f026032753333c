"""Tiny random HF causal LMs (Qwen2 tied/untied, Llama-3 with llama3 RoPE scaling) for model tests."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

VOCAB, SEQ, BATCH = 128, 11, 2
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-6)


def tiny_hf_model(name: str, seed: int = 0) -> PreTrainedModel:
    """A fp32 eval-mode HF model: 'qwen2_tied', 'qwen2_untied' or 'llama3'."""
    torch.manual_seed(seed)
    if name.startswith("qwen2"):
        cfg = Qwen2Config(**_COMMON, max_position_embeddings=256, rope_theta=1e6,
                          tie_word_embeddings=name == "qwen2_tied",
                          architectures=["Qwen2ForCausalLM"])
        model = Qwen2ForCausalLM(cfg)
    elif name == "llama3":
        cfg = LlamaConfig(**_COMMON, max_position_embeddings=16384, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192},
                          rope_theta=500000.0, architectures=["LlamaForCausalLM"])
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny model {name!r}")
    with torch.no_grad():                                  # non-trivial norms and biases
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def tiny_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [b, s], position_ids [b, s])."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids, torch.arange(SEQ)[None].expand(BATCH, -1)
