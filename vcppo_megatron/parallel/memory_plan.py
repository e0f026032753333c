"""Check a recipe's parallel layout against a cluster and estimate per-GPU memory of each role.

Pure arithmetic on the HF config.json and the Config (no torch, no GPU): used by tools/plan.py.
Assumptions, printed with the plan: bf16 weights; fp32 gradient buffers (Megatron DDP reducing in
fp32); the distributed optimizer (fp32 master weights + Adam m, v = 12 bytes/param, sharded over
data parallelism); activations per `parallel.recompute_activations` and `sequence_parallel` (full
recompute: one checkpointed [tokens, hidden] input per layer and per in-flight micro-batch, plus one
layer's working set; none: every layer's working set);
fp32 logits of one micro-batch; colocation with the inactive roles offloaded to host memory, so
each phase (rollout, actor update, critic update) has the GPU to itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vcppo_megatron.config.loader import ConfigError
from vcppo_megatron.config.schema import Config, ParallelConfig

GIB = 1024 ** 3
RESERVED_BYTES = 4 * GIB
"""CUDA context, NCCL buffers and allocator fragmentation, per GPU."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an HF decoder config that memory depends on."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelShape":
        """Read a parsed config.json; name the missing field and file otherwise."""
        def need(name: str) -> Any:
            if name not in hf:
                raise ConfigError(f"{source}: field {name!r} is missing (needed for the memory plan)")
            return hf[name]
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        return cls(hidden, need("num_hidden_layers"), heads, hf.get("num_key_value_heads") or heads,
                   need("intermediate_size"), need("vocab_size"), hf.get("head_dim") or hidden // heads,
                   bool(hf.get("tie_word_embeddings", False)))

    def params(self, lm_head: bool) -> tuple[int, int]:
        """(parameters of the transformer layers, of the embedding + output layer)."""
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        attn = h * self.num_attention_heads * self.head_dim + 2 * h * kv \
            + self.num_attention_heads * self.head_dim + 2 * kv + self.num_attention_heads * self.head_dim * h
        mlp = 3 * h * self.ffn_hidden_size
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = (0 if self.tie_word_embeddings else embed) if lm_head else h + 1
        return self.num_layers * layer, embed + head + h


@dataclass
class GpuPlan:
    """Per-GPU bytes of one phase, by item."""

    role: str
    layout: str
    items: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def total(self) -> float:
        """Sum of the items plus the reserved bytes."""
        return sum(self.items.values()) + RESERVED_BYTES

    def describe(self, gpu_bytes: float) -> str:
        """A few lines: each item in GiB and the total against the GPU."""
        parts = "  ".join(f"{k}={v / GIB:.1f}" for k, v in self.items.items())
        return (f"{self.role:<7} [{self.layout}]  {parts}  reserved={RESERVED_BYTES / GIB:.1f}  "
                f"total={self.total / GIB:.1f} / {gpu_bytes / GIB:.1f} GiB"
                + (f"\n        {self.note}" if self.note else ""))


class PlanError(ConfigError):
    """The layout does not fit the cluster or the model; the message names what and why."""


def _check_layout(role: str, layout: ParallelConfig, shape: ModelShape, world: int) -> int:
    """Check TP / PP against the model and the world size; return the data-parallel size."""
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    key = f"{role}.parallel"
    if shape.num_attention_heads % tp:
        raise PlanError(f"'{key}.tensor_parallel_size' = {tp}: must divide the attention heads "
                        f"({shape.num_attention_heads})")
    if shape.num_query_groups % tp:
        raise PlanError(f"'{key}.tensor_parallel_size' = {tp}: must divide the query groups / KV heads "
                        f"({shape.num_query_groups})")
    if shape.num_layers % pp:
        raise PlanError(f"'{key}.pipeline_parallel_size' = {pp}: must divide the layers ({shape.num_layers})")
    if world % (tp * pp):
        raise PlanError(f"'{key}': tensor_parallel_size x pipeline_parallel_size = {tp * pp} must divide "
                        f"the world size {world} (world = TP x PP x DP)")
    return world // (tp * pp)


def train_plan(role: str, cfg: Config, shape: ModelShape, world: int, gpus_per_node: int) -> GpuPlan:
    """Weights, gradients, optimizer states and activations per GPU while `role` trains."""
    layout: ParallelConfig = getattr(cfg, role).parallel
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    if tp > gpus_per_node:
        raise PlanError(f"'{role}.parallel.tensor_parallel_size' = {tp}: exceeds the {gpus_per_node} "
                        f"GPUs of a node (tensor parallelism must stay inside NVLink)")
    dp = _check_layout(role, layout, shape, world)
    layers, outer = shape.params(lm_head=role == "actor")
    # the first stage holds its layers plus the embedding (and the output layer when PP = 1)
    per_gpu = (layers / pp + outer / (1 if pp == 1 else 2)) / tp
    mb = cfg.batch.micro_batch_size
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    per_rank_mini = cfg.batch.global_mini_batch_size // dp
    in_flight = min(pp, max(1, per_rank_mini // mb))
    h = shape.hidden_size
    tokens = seq * mb
    sp = tp if layout.sequence_parallel else 1
    layer_acts = tokens * 2 * (8 * h / sp + 4 * shape.ffn_hidden_size / tp)  # bf16 tensors kept per layer
    if layout.recompute_activations == "full":
        checkpoints = (shape.num_layers / pp) * in_flight * tokens * h * 2 / sp
        working = 2 * layer_acts                  # one layer recomputed, plus its gradients
    else:
        checkpoints = (shape.num_layers / pp) * in_flight * layer_acts
        working = layer_acts
    logits = tokens * shape.vocab_size / tp * 4 * 2 if role == "actor" else tokens * 4 * 2
    return GpuPlan(role, f"TP{tp} PP{pp} DP{dp}", {
        "weights": per_gpu * 2, "grads": per_gpu * 4, "optimizer": per_gpu * 12 / dp,
        "activations": checkpoints + working + logits})


def rollout_plan(cfg: Config, shape: ModelShape, world: int, gpus_per_node: int,
                 gpu_bytes: float) -> GpuPlan:
    """vLLM weights and KV cache per GPU; checks that a full-length sequence fits in the cache."""
    tp = cfg.rollout.tensor_parallel_size
    if tp > gpus_per_node:
        raise PlanError(f"'rollout.tensor_parallel_size' = {tp}: exceeds the {gpus_per_node} GPUs of a node "
                        f"(a vLLM engine must stay inside one node)")
    if shape.num_attention_heads % tp or shape.num_query_groups % tp:
        raise PlanError(f"'rollout.tensor_parallel_size' = {tp}: must divide the attention heads "
                        f"({shape.num_attention_heads}) and KV heads ({shape.num_query_groups})")
    if world % tp:
        raise PlanError(f"'rollout.tensor_parallel_size' = {tp}: must divide the world size {world}")
    layers, outer = shape.params(lm_head=True)
    weights = (layers + outer) / tp * 2
    if cfg.rollout.kv_cache_bytes is not None:
        kv = float(cfg.rollout.kv_cache_bytes)
    else:
        kv = cfg.rollout.gpu_memory_utilization * gpu_bytes - weights - RESERVED_BYTES
    kv_per_token = 2 * shape.num_layers * shape.num_query_groups * shape.head_dim * 2 / tp
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    if kv < kv_per_token * seq:
        raise PlanError(f"rollout: KV cache of {max(kv, 0) / GIB:.1f} GiB per GPU holds "
                        f"{max(kv, 0) / kv_per_token:.0f} tokens, less than one sequence of {seq} "
                        f"(rollout.max_prompt_tokens + rollout.max_response_tokens); raise "
                        f"'rollout.gpu_memory_utilization' or 'rollout.tensor_parallel_size'")
    return GpuPlan("rollout", f"TP{tp} x {world // tp} engines", {"weights": weights, "kv_cache": kv},
                   f"KV cache holds {kv / kv_per_token / seq:.0f} full-length sequences per engine")


def make_plan(cfg: Config, hf_config: Mapping[str, Any], nodes: int, gpus_per_node: int,
              gpu_gib: float = 80.0, source: str = "config.json") -> list[GpuPlan]:
    """Validate the layout and batch sizes; return the rollout, actor and critic plans, or raise PlanError."""
    from vcppo_megatron.config.batch_sizes import derive_batch_sizes
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: expected positive integers")
    shape = ModelShape.from_hf(hf_config, source)
    world, gpu_bytes = nodes * gpus_per_node, gpu_gib * GIB
    plans = [rollout_plan(cfg, shape, world, gpus_per_node, gpu_bytes)]
    for role in ("actor", "critic"):
        plans.append(train_plan(role, cfg, shape, world, gpus_per_node))
    try:
        derive_batch_sizes(cfg, world)
    except ConfigError as err:
        raise PlanError(f"batch sizes do not divide on {world} GPUs: {err}") from None
    for plan in plans:
        if plan.total > gpu_bytes:
            biggest = max(plan.items, key=plan.items.get)
            raise PlanError(f"{plan.role} [{plan.layout}] needs {plan.total / GIB:.1f} GiB per GPU, over the "
                            f"{gpu_gib:g} GiB of a GPU (largest: {biggest} {plan.items[biggest] / GIB:.1f} GiB); "
                            f"raise {plan.role}'s tensor/pipeline parallel size, set its "
                            f"parallel.recompute_activations=full, or lower the sequence length or micro_batch_size")
    return plans


def read_hf_config(path: Path) -> dict[str, Any]:
    """Parse a config.json, naming the file on failure."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: cannot read the model's config.json: {err}") from None
