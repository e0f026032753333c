"""Check a recipe's parallel layout against a cluster and price the GPU memory timeline per GPU.

Pure arithmetic on the HF config.json and the Config (no torch, no GPU): used by tools/plan.py and,
on a GPU, by the trainer to size vLLM's KV cache. What is resident in each phase comes from
`parallel/memory_timeline.py` (the same description the colocation code follows); this module only
gives each part its bytes. Assumptions, printed with the plan:
- training weights in `<role>.params_dtype` (bf16: 2 bytes/param); fp32 gradient buffers (Megatron
  DDP reducing in fp32); the distributed optimizer's fp32 master weights + Adam m, v = 12 bytes/param
  (8 with fp32 weights, whose masters are the weights), sharded over data parallelism;
- per pipeline stage the first one's share: its layers plus the embedding (and the output layer
  when PP = 1), split over TP;
- activations per `parallel.recompute_activations` and `sequence_parallel` (full recompute: one
  checkpointed [tokens, hidden] input per layer and per in-flight micro-batch, plus one layer's
  working set twice; none: every layer's working set); fp32 logits of one micro-batch and their
  gradient (the actor; the critic's are one value per token); forward-only passes: one layer's
  working set and one fp32 copy of the logits;
- vLLM: weights in `rollout.dtype` over `rollout.tensor_parallel_size`; KV cache
  `rollout.kv_cache_bytes`, or when null what is left of `rollout.gpu_memory_utilization` of the
  GPU in the rollout phase; its runtime (CUDA graphs, sampler and activation workspace, not freed
  by sleep mode) VLLM_RUNTIME_BYTES;
- the weight sync holds one bucket plus four copies of the largest HF tensor (the TP gather buffer
  and the merged tensor on the trainer side, about two on vLLM's layerwise reload);
- RESERVED_BYTES per GPU for the CUDA context, NCCL buffers and allocator fragmentation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vcppo_megatron.config.loader import ConfigError
from vcppo_megatron.config.schema import Config, ParallelConfig
from vcppo_megatron.algorithms.advantages import needs_critic
from vcppo_megatron.parallel.memory_timeline import ROLES, Timeline, part

GIB = 1024 ** 3
RESERVED_BYTES = 4 * GIB
"""CUDA context, NCCL buffers and allocator fragmentation, per GPU."""
VLLM_RUNTIME_BYTES = 4 * GIB
"""vLLM's allocations outside its sleep-mode pool (CUDA graphs, sampler buffers for max_num_seqs
full-vocabulary rows, prefill activation workspace): resident from its start on. An estimate, to
be replaced by a measurement on the cluster."""
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


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
    torch_dtype: str = "bfloat16"

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
                   bool(hf.get("tie_word_embeddings", False)), str(hf.get("torch_dtype") or "bfloat16"))

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

    def largest_tensor(self) -> int:
        """Elements of the largest HF tensor (the embedding, or a fused gate/up / qkv weight)."""
        qkv = (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim * self.hidden_size
        return max(self.vocab_size * self.hidden_size, 2 * self.ffn_hidden_size * self.hidden_size, qkv)


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


def _check_rollout(cfg: Config, shape: ModelShape, world: int) -> None:
    tp = cfg.rollout.tensor_parallel_size
    if shape.num_attention_heads % tp or shape.num_query_groups % tp:
        raise PlanError(f"'rollout.tensor_parallel_size' = {tp}: must divide the attention heads "
                        f"({shape.num_attention_heads}) and KV heads ({shape.num_query_groups})")
    if world % tp:
        raise PlanError(f"'rollout.tensor_parallel_size' = {tp}: must divide the world size {world}")


def _role_bytes(role: str, cfg: Config, shape: ModelShape, world: int) -> tuple[str, dict[str, float]]:
    """(layout string, bytes per GPU of the role's parts and work buffers)."""
    layout: ParallelConfig = getattr(cfg, role).parallel
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    dp = _check_layout(role, layout, shape, world)
    layers, outer = shape.params(lm_head=role == "actor")
    per_gpu = (layers / pp + outer / (1 if pp == 1 else 2)) / tp
    fp32 = getattr(cfg, role).params_dtype == "float32"
    mb = cfg.batch.micro_batch_size
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    in_flight = min(pp, max(1, cfg.batch.global_mini_batch_size // dp // mb))
    h, tokens = shape.hidden_size, seq * mb
    sp = tp if layout.sequence_parallel else 1
    layer_acts = tokens * 2 * (8 * h / sp + 4 * shape.ffn_hidden_size / tp)  # bf16 tensors kept per layer
    if layout.recompute_activations == "full":
        train_acts = (shape.num_layers / pp) * in_flight * tokens * h * 2 / sp + 2 * layer_acts
    else:
        train_acts = (shape.num_layers / pp) * in_flight * layer_acts + layer_acts
    logits = tokens * shape.vocab_size / tp * 4 if role == "actor" else tokens * 4
    return f"TP{tp} PP{pp} DP{dp}", {
        part(role, "weights"): per_gpu * (4 if fp32 else 2), part(role, "grads"): per_gpu * 4,
        part(role, "optimizer"): per_gpu * (8 if fp32 else 12) / dp,
        f"{role}.activations": (train_acts, 2 * logits), f"{role}.forward": (layer_acts, logits)}


def _vllm_weight_bytes(cfg: Config, shape: ModelShape) -> float:
    layers, outer = shape.params(lm_head=True)
    dtype = shape.torch_dtype if cfg.rollout.dtype == "auto" else cfg.rollout.dtype
    return (layers + outer) / cfg.rollout.tensor_parallel_size * _DTYPE_BYTES.get(dtype, 2)


def _kv_bytes_per_token(cfg: Config, shape: ModelShape) -> float:
    dtype = shape.torch_dtype if cfg.rollout.dtype == "auto" else cfg.rollout.dtype
    return (2 * shape.num_layers * shape.num_query_groups * shape.head_dim * _DTYPE_BYTES.get(dtype, 2)
            / cfg.rollout.tensor_parallel_size)


@dataclass
class PhaseBytes:
    """Per-GPU bytes of one phase of one step, by item; and what that phase keeps in host memory."""

    step: str
    phase: str
    gpu: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Bytes on the GPU, reserved included."""
        return sum(self.gpu.values())


COLUMNS = (("actor.weights", "aW"), ("actor.grads", "aG"), ("actor.optimizer", "aO"),
           ("critic.weights", "cW"), ("critic.grads", "cG"), ("critic.optimizer", "cO"),
           ("vllm.weights", "vW"), ("vllm.kv_cache", "KV"), ("vllm.runtime", "vRT"),
           ("activations", "act"), ("logits", "logit"), ("sync_buffers", "sync"), ("reserved", "resv"))


@dataclass
class MemoryPlan:
    """The priced timeline: one PhaseBytes per (step, phase) row, and the rollout sizes derived."""

    timeline: Timeline
    rows: list[PhaseBytes]
    layouts: dict[str, str]
    kv_cache_bytes: float
    kv_sequences: float
    vllm_fraction: float
    """vLLM's own share of the GPU (weights + KV cache + runtime): what vLLM checks against the free
    memory when it starts (its `gpu_memory_utilization`)."""
    gpu_bytes: float

    @property
    def peak(self) -> PhaseBytes:
        """The row with the most bytes on the GPU."""
        return max(self.rows, key=lambda r: r.total)

    def row(self, step: str, phase: str) -> PhaseBytes:
        """The row of `phase` in `step` ('start', 'rl' or 'value_pretrain')."""
        return next(r for r in self.rows if (r.step, r.phase) == (step, phase))

    def table(self) -> str:
        """The timeline as a table in GiB: one line per phase, one column per part."""
        head = f"{'step':<15}{'phase':<14}" + "".join(f"{short:>7}" for _, short in COLUMNS) \
            + f"{'total':>8}{'host':>7}"
        lines = [head]
        for r in self.rows:
            cells = "".join(f"{r.gpu[k] / GIB:>7.1f}" if r.gpu.get(k) else f"{'-':>7}" for k, _ in COLUMNS)
            lines.append(f"{r.step:<15}{r.phase:<14}{cells}{r.total / GIB:>8.1f}{sum(r.host.values()) / GIB:>7.1f}")
        return "\n".join(lines)


def timeline_plan(cfg: Config, hf_config: Mapping[str, Any], world: int, gpu_bytes: float,
                  source: str = "config.json") -> MemoryPlan:
    """Price every phase of the timeline per GPU; raise PlanError if a phase does not fit."""
    shape = ModelShape.from_hf(hf_config, source)
    timeline = Timeline.from_config(cfg)
    _check_rollout(cfg, shape, world)
    sizes: dict[str, Any] = {}
    layouts = {}
    for role in ROLES:
        layouts[role], role_sizes = _role_bytes(role, cfg, shape, world)
        if role == "critic" and not needs_critic(cfg.algo):    # GRPO: no critic is built
            role_sizes = {k: ((0.0, 0.0) if isinstance(v, tuple) else 0.0) for k, v in role_sizes.items()}
        sizes.update(role_sizes)
    sizes["vllm.weights"] = _vllm_weight_bytes(cfg, shape)
    sizes["vllm.runtime"] = float(VLLM_RUNTIME_BYTES)
    sizes["sync_buffers"] = (cfg.rollout.sync_bucket_bytes                 # the actor's weights, converted
                             + 4 * shape.largest_tensor() * _DTYPE_BYTES[cfg.actor.params_dtype])

    def price(step: str, name: str, kv: float) -> PhaseBytes:
        row = PhaseBytes(step, name)
        for p in sorted(timeline.resident(name)):
            row.gpu[p] = kv if p == "vllm.kv_cache" else sizes[p]
        acts = [sizes[w] for w in timeline.work(name, step) if isinstance(sizes.get(w), tuple)]
        if acts:                                    # forward / backward passes run one after another
            row.gpu["activations"], row.gpu["logits"] = max(acts, key=sum)
        for w in timeline.work(name, step):
            if not isinstance(sizes.get(w), tuple):
                row.gpu[w] = sizes[w]
        row.gpu["reserved"] = float(RESERVED_BYTES)
        row.host = {p: sizes[p] for p in sorted(timeline.host(name, step))}
        return row

    def check(row: PhaseBytes) -> None:
        if row.total > gpu_bytes:
            biggest = max(row.gpu, key=row.gpu.get)
            roles = [r for r in ROLES if row.phase in ("load", f"{r}_update")]
            where = f" [{', '.join(f'{r} {layouts[r]}' for r in roles)}]" if roles else ""
            raise PlanError(
                f"phase {row.phase} ({row.step}){where} needs {row.total / GIB:.1f} GiB per GPU, over the "
                f"{gpu_bytes / GIB:g} GiB of a GPU (largest: {biggest} {row.gpu[biggest] / GIB:.1f} GiB); "
                f"raise the tensor/pipeline parallel size, set parallel.recompute_activations=full, lower the "
                f"sequence length or micro_batch_size, or lower rollout.gpu_memory_utilization / kv_cache_bytes"
                + ("" if timeline.offload else "; or set trainer.offload_during_rollout=true"))

    names = timeline.rows(cfg.trainer.value_pretrain_steps > 0)
    for step, name in names:                    # the phases without a KV cache first: they do not depend on it
        if "vllm.kv_cache" not in timeline.resident(name):
            check(price(step, name, 0.0))
    if cfg.rollout.kv_cache_bytes is not None:
        kv = float(cfg.rollout.kv_cache_bytes)
    else:           # the rollout phase fills gpu_memory_utilization of the GPU; the KV cache gets the rest
        kv = cfg.rollout.gpu_memory_utilization * gpu_bytes - price("rl", "rollout", 0.0).total
    per_token = _kv_bytes_per_token(cfg, shape)
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    if kv < per_token * seq:
        rollout = price("rl", "rollout", 0.0)
        raise PlanError(f"rollout: KV cache of {max(kv, 0) / GIB:.1f} GiB per GPU holds "
                        f"{max(kv, 0) / per_token:.0f} tokens, less than one sequence of {seq} "
                        f"(rollout.max_prompt_tokens + rollout.max_response_tokens); the rollout phase's "
                        f"other parts take {rollout.total / GIB:.1f} GiB "
                        f"({', '.join(f'{k} {v / GIB:.1f}' for k, v in rollout.gpu.items() if v)}); raise "
                        f"'rollout.gpu_memory_utilization' or 'rollout.tensor_parallel_size'")
    rows = [price(step, name, kv) for step, name in names]
    for row in rows:
        check(row)
    vllm_fraction = (sizes["vllm.weights"] + kv + sizes["vllm.runtime"]) / gpu_bytes
    return MemoryPlan(timeline, rows, layouts, kv, kv / per_token / seq, vllm_fraction, gpu_bytes)


def make_plan(cfg: Config, hf_config: Mapping[str, Any], nodes: int, gpus_per_node: int,
              gpu_gib: float = 80.0, source: str = "config.json") -> MemoryPlan:
    """Validate the layout and batch sizes on a cluster; return the priced timeline, or raise PlanError."""
    from vcppo_megatron.config.batch_sizes import derive_batch_sizes
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: expected positive integers")
    if cfg.rollout.tensor_parallel_size > gpus_per_node:
        raise PlanError(f"'rollout.tensor_parallel_size' = {cfg.rollout.tensor_parallel_size}: exceeds the "
                        f"{gpus_per_node} GPUs of a node (a vLLM engine must stay inside one node)")
    for key, tp in (("actor.parallel", cfg.actor.parallel.tensor_parallel_size),
                    ("critic.parallel", cfg.critic.parallel.tensor_parallel_size)):
        if tp > gpus_per_node:
            raise PlanError(f"'{key}.tensor_parallel_size' = {tp}: exceeds the {gpus_per_node} "
                            f"GPUs of a node (tensor parallelism must stay inside NVLink)")
    world = nodes * gpus_per_node
    plan = timeline_plan(cfg, hf_config, world, gpu_gib * GIB, source)
    try:
        derive_batch_sizes(cfg, world)
    except ConfigError as err:
        raise PlanError(f"batch sizes do not divide on {world} GPUs: {err}") from None
    return plan


def read_hf_config(path: Path) -> dict[str, Any]:
    """Parse a config.json, naming the file on failure."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: cannot read the model's config.json: {err}") from None

