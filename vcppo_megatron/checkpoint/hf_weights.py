"""HF (Qwen2/Llama) <-> Megatron GPTModel state dicts: name map, qkv/fc1 layouts, TP and PP slicing.

Pure tensor functions; no communication. Megatron names come in the two layouts of megatron's
layer specs (`LAYER_SPECS`): the local spec has separate norm modules (`input_layernorm.weight`,
`pre_mlp_layernorm.weight`); the Transformer Engine spec fuses each norm into the linear after it,
TE's LayerNormLinear holding it as `layer_norm_weight` (`self_attention.linear_qkv.layer_norm_weight`,
`mlp.linear_fc1.layer_norm_weight`; transformer_engine/pytorch/module/layernorm_linear.py registers
the name, megatron-core 0.16.1's get_gpt_layer_with_transformer_engine_spec puts the layers there
and leaves input_layernorm / pre_mlp_layernorm as IdentityOp), and every TE module adds an
`_extra_state` entry (FP8 metadata; never a weight). Functions that read Megatron names accept
either layout; those that write take `layer_spec`.
Layouts: `linear_qkv` rows are interleaved by query group, [q heads of the group; k; v] per group;
SwiGLU `linear_fc1` rows are [gate; up] (on each TP rank: [gate shard; up shard]).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import Tensor

_LAYER = re.compile(r"^(model\.layers|decoder\.layers)\.(\d+)\.(.+)$")
# HF per-layer name -> Megatron per-layer name (one-to-one tensors)
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_GLOBAL_DIRECT = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}
_IGNORED_HF = re.compile(r"(rotary_emb\.inv_freq)$")

LAYER_SPECS = ("local", "transformer_engine")
# per-layer Megatron names that differ between the layouts: local spec -> Transformer Engine spec
_TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_LOCAL_NAMES = {te: local for local, te in _TE_NAMES.items()}


def _replace_suffix(name: str, table: Mapping[str, str]) -> str:
    """`name` with a dotted suffix from `table` replaced by its value (unchanged if none matches)."""
    for old, new in table.items():
        if name == old or name.endswith("." + old):
            return name[:len(name) - len(old)] + new
    return name


def local_name(name: str) -> str:
    """A Megatron parameter name (or layer-stacked checkpoint key) in the local spec's layout."""
    return _replace_suffix(name, _LOCAL_NAMES)


def spec_name(name: str, layer_spec: str) -> str:
    """A Megatron name (either layout) in the layout of `layer_spec` ('local' / 'transformer_engine')."""
    if layer_spec not in LAYER_SPECS:
        raise ValueError(f"layer_spec={layer_spec!r}, expected one of {LAYER_SPECS}")
    name = local_name(name)
    return name if layer_spec == "local" else _replace_suffix(name, _TE_NAMES)


def layer_spec_of(names: Iterable[str]) -> str:
    """The layout a set of Megatron names (a state dict, checkpoint keys) is in."""
    return "transformer_engine" if any(_replace_suffix(n, _LOCAL_NAMES) != n for n in names) else "local"

# TP layout of each Megatron parameter: split dim 0 (column/vocab parallel) or dim 1 (row parallel)
_COLUMN = ("embedding.word_embeddings.weight", "output_layer.weight")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _is_value_head(name: str, tensor: Tensor) -> bool:
    """The critic's scalar head `output_layer.weight` [1, hidden]: replicated, never split (an LM
    head of the same name has one row per vocabulary entry)."""
    return name.endswith("output_layer.weight") and tensor.shape[0] == 1


def interleave_qkv(q: Tensor, k: Tensor, v: Tensor, num_query_groups: int) -> Tensor:
    """Stack HF q/k/v (weights [out, in] or biases [out]) into Megatron's per-group qkv layout."""
    per = lambda t: t.reshape(num_query_groups, -1, *t.shape[1:])          # noqa: E731
    return torch.cat([per(q), per(k), per(v)], dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: Tensor, num_heads: int, num_query_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of interleave_qkv: Megatron qkv -> HF (q, k, v)."""
    q_per_group = num_heads // num_query_groups
    grouped = qkv.reshape(num_query_groups, q_per_group + 2, -1, *qkv.shape[1:])
    q, k, v = grouped.split([q_per_group, 1, 1], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))  # type: ignore[return-value]


def hf_to_megatron(
    hf_state: Mapping[str, Tensor], *, num_heads: int, num_query_groups: int, tie_word_embeddings: bool,
    layer_spec: str = "local",
) -> dict[str, Tensor]:
    """Full HF state dict -> full (TP=1, PP=1) Megatron GPTModel state dict (global layer indices),
    named for `layer_spec`."""
    out: dict[str, Tensor] = {}
    layers: dict[int, dict[str, Tensor]] = {}
    for name, tensor in hf_state.items():
        if _IGNORED_HF.search(name) or (tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name in _GLOBAL_DIRECT:
            out[_GLOBAL_DIRECT[name]] = tensor
            continue
        match = _LAYER.match(name)
        if match is None or match.group(1) != "model.layers":
            raise KeyError(f"HF parameter {name!r} has no Megatron mapping")
        layers.setdefault(int(match.group(2)), {})[match.group(3)] = tensor
    for i, p in sorted(layers.items()):
        pre = f"decoder.layers.{i}."
        for hf_name, mg_name in _LAYER_DIRECT.items():
            out[pre + mg_name] = p.pop(hf_name)
        out[pre + "mlp.linear_fc1.weight"] = torch.cat([p.pop("mlp.gate_proj.weight"),
                                                        p.pop("mlp.up_proj.weight")], dim=0)
        for kind in ("weight", "bias"):
            if f"self_attn.q_proj.{kind}" in p:
                out[pre + f"self_attention.linear_qkv.{kind}"] = interleave_qkv(
                    p.pop(f"self_attn.q_proj.{kind}"), p.pop(f"self_attn.k_proj.{kind}"),
                    p.pop(f"self_attn.v_proj.{kind}"), num_query_groups)
        if p:
            raise KeyError(f"HF parameters of layer {i} have no Megatron mapping: {sorted(p)}")
    return out if layer_spec == "local" else {spec_name(k, layer_spec): v for k, v in out.items()}


def megatron_to_hf(
    mg_state: Mapping[str, Tensor], *, num_heads: int, num_query_groups: int, tie_word_embeddings: bool
) -> dict[str, Tensor]:
    """Full (TP=1, PP=1) Megatron GPTModel state dict (either layer spec's names) -> HF state dict
    (lm_head re-tied if tied)."""
    to_hf_global = {v: k for k, v in _GLOBAL_DIRECT.items()}
    to_hf_layer = {v: k for k, v in _LAYER_DIRECT.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in mg_state.items():
        if name.endswith("_extra_state"):
            continue
        name = local_name(name)
        if name in to_hf_global:
            if not (tie_word_embeddings and name == "output_layer.weight"):
                out[to_hf_global[name]] = tensor
            continue
        match = _LAYER.match(name)
        if match is None or match.group(1) != "decoder.layers":
            raise KeyError(f"Megatron parameter {name!r} has no HF mapping")
        pre, local = f"model.layers.{match.group(2)}.", match.group(3)
        if local in to_hf_layer:
            out[pre + to_hf_layer[local]] = tensor
        elif local == "mlp.linear_fc1.weight":
            out[pre + "mlp.gate_proj.weight"], out[pre + "mlp.up_proj.weight"] = tensor.chunk(2, dim=0)
        elif local.startswith("self_attention.linear_qkv."):
            kind = local.rsplit(".", 1)[1]
            q, k, v = split_qkv(tensor, num_heads, num_query_groups)
            for proj, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[pre + f"self_attn.{proj}.{kind}"] = t
        else:
            raise KeyError(f"Megatron parameter {name!r} has no HF mapping")
    if tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def tp_shard(name: str, tensor: Tensor, *, tp_rank: int, tp_size: int, num_query_groups: int) -> Tensor:
    """This TP rank's shard of a full Megatron parameter (replicated ones are returned whole)."""
    if name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
        groups = tensor.reshape(num_query_groups, -1, *tensor.shape[1:])   # split whole query groups
        return groups.chunk(tp_size, dim=0)[tp_rank].reshape(-1, *tensor.shape[1:])
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = tensor.chunk(2, dim=0)                                  # [gate shard; up shard]
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    if name.endswith(_COLUMN) and not _is_value_head(name, tensor):
        return tensor.chunk(tp_size, dim=0)[tp_rank]
    if name.endswith(_ROW):
        return tensor.chunk(tp_size, dim=1)[tp_rank]
    return tensor


def tp_merge(name: str, shards: list[Tensor], *, num_query_groups: int) -> Tensor:
    """Inverse of tp_shard: the full parameter from every TP rank's shard, in rank order."""
    if name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
        return torch.cat(shards, dim=0)                    # each shard holds whole query groups
    if name.endswith("mlp.linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if name.endswith(_COLUMN) and not _is_value_head(name, shards[0]):
        return torch.cat(shards, dim=0)
    if name.endswith(_ROW):
        return torch.cat(shards, dim=1)
    return shards[0]


def pp_stage(
    mg_state: Mapping[str, Tensor], *, layers: Iterable[int], pre_process: bool, post_process: bool,
    tie_word_embeddings: bool,
) -> dict[str, Tensor]:
    """The part of a full Megatron state dict one pipeline stage holds, layers renumbered from 0."""
    renumber = {g: i for i, g in enumerate(layers)}
    out: dict[str, Tensor] = {}
    for name, tensor in mg_state.items():
        match = _LAYER.match(name)
        if match is not None:
            if int(match.group(2)) in renumber:
                out[f"decoder.layers.{renumber[int(match.group(2))]}.{match.group(3)}"] = tensor
        elif name.startswith("embedding.") and pre_process:
            out[name] = tensor
        elif name.startswith(("decoder.final_layernorm.", "output_layer.")) and post_process:
            out[name] = tensor
    if tie_word_embeddings and post_process and not pre_process:
        out["output_layer.weight"] = mg_state["embedding.word_embeddings.weight"]  # tied copy
    return out


def load_into_model(model: torch.nn.Module, mg_state: Mapping[str, Tensor]) -> None:
    """Copy a Megatron state dict (in the model's layout) into `model`; every parameter must be
    covered exactly."""
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = expected - set(mg_state), set(mg_state) - expected
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing={sorted(missing)} unexpected={sorted(unexpected)}")
    model.load_state_dict(dict(mg_state), strict=False)


def hf_sources(mg_name: str, *, tie_word_embeddings: bool) -> list[str]:
    """HF tensor names one full Megatron parameter (either layout) is built from (global layer indices)."""
    mg_name = local_name(mg_name)
    to_hf_global = {v: k for k, v in _GLOBAL_DIRECT.items()}
    if mg_name in to_hf_global:
        if tie_word_embeddings and mg_name == "output_layer.weight":
            return ["model.embed_tokens.weight"]
        return [to_hf_global[mg_name]]
    match = _LAYER.match(mg_name)
    if match is None or match.group(1) != "decoder.layers":
        raise KeyError(f"Megatron parameter {mg_name!r} has no HF mapping")
    pre, local = f"model.layers.{match.group(2)}.", match.group(3)
    to_hf_layer = {v: k for k, v in _LAYER_DIRECT.items()}
    if local in to_hf_layer:
        return [pre + to_hf_layer[local]]
    if local == "mlp.linear_fc1.weight":
        return [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"]
    if local.startswith("self_attention.linear_qkv."):
        kind = local.rsplit(".", 1)[1]
        return [pre + f"self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")]
    raise KeyError(f"Megatron parameter {mg_name!r} has no HF mapping")


def hf_to_megatron_param(mg_name: str, sources: list[Tensor], *, num_query_groups: int) -> Tensor:
    """One full Megatron parameter from its HF source tensors (in hf_sources order)."""
    mg_name = local_name(mg_name)
    if mg_name.endswith("mlp.linear_fc1.weight"):
        return torch.cat(sources, dim=0)
    if ".self_attention.linear_qkv." in mg_name:
        return interleave_qkv(*sources, num_query_groups)
    (tensor,) = sources
    return tensor
