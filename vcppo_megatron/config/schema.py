"""The configuration: one frozen dataclass per component; defaults live here and nowhere else.

Each field carries its documentation as an attribute docstring (the string literal below it;
docs/CONFIG.md is generated from them) and its valid range as `field(metadata=...)` bounds,
checked by `vcppo_megatron.config.loader` before anything starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


def param(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None) -> Any:
    """A dataclass field with optional numeric bounds (checked by the loader)."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"bounds": bounds})
    return dataclasses.field(default=default, metadata={"bounds": bounds})


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout of one role; data parallelism takes the remaining ranks."""

    tensor_parallel_size: int = param(1, ge=1)
    """Tensor-parallel ranks (must divide attention heads and query groups)."""
    pipeline_parallel_size: int = param(1, ge=1)
    """Pipeline stages (must divide the number of layers)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: shard norm/residual activations over the TP ranks (needs tensor_parallel_size > 1)."""
    recompute_activations: Literal["none", "full"] = "none"
    """`full`: keep only each layer's input and recompute the layer in the backward pass (long sequences); `none`: keep all activations."""
    overlap_grad_reduce: bool = False
    """Reduce-scatter each bucket of gradients over data parallelism as soon as the last micro-batch's backward pass has produced it, overlapping the rest of the backward pass (megatron DDP); off: one reduce after the backward pass."""
    overlap_param_gather: bool = False
    """All-gather the parameters updated by the distributed optimizer bucket by bucket during the next forward pass instead of right after the step (needs `overlap_grad_reduce`); the weight sync and checkpoints wait for the gather first."""
    ddp_bucket_size: int | None = param(None, ge=1)
    """Parameters per gradient-reduce / parameter-gather bucket when overlapping; null: megatron's default, max(40M, 1M x data-parallel size)."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32; false keeps them in `params_dtype` (bf16: half the reduce traffic and gradient memory, less precise sums)."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (warm-up then constant, as in VAPO §5.1)."""

    lr: float = param(1e-6, gt=0)
    """Peak learning rate."""
    weight_decay: float = param(0.0, ge=0)
    """Decoupled weight decay of AdamW."""
    adam_beta1: float = param(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = param(0.999, ge=0, lt=1)
    """AdamW beta2."""
    adam_eps: float = param(1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = param(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    lr_warmup_steps: int = param(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to `lr`."""


@dataclass(frozen=True)
class ActorConfig:
    """The policy model."""

    model_path: str | None = None
    """HF checkpoint directory of the SFT policy; null builds the tiny random model of `tiny_model`."""
    parallel: ParallelConfig = param(factory=ParallelConfig)
    """Tensor / pipeline layout of the actor."""
    optim: OptimConfig = param(factory=lambda: OptimConfig(lr=1e-6))
    """Optimizer of the actor (VC-PPO §4: lr 1e-6)."""
    params_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype of the training weights and activations; the distributed optimizer keeps fp32 master weights and reduces gradients in fp32."""
    layer_spec: Literal["auto", "transformer_engine", "local"] = "auto"
    """Megatron layer spec: `transformer_engine` (fused norm + linear, TE attention; needs Transformer Engine and a GPU), `local` (megatron's own layers, torch SDPA attention), `auto` (Transformer Engine when it imports on a GPU, else local). Printed at start."""


@dataclass(frozen=True)
class CriticConfig:
    """The value model: the policy's trunk with a scalar value head."""

    model_path: str | None = None
    """HF checkpoint directory to initialise from; null builds the tiny random model of `tiny_model`."""
    init_from: Literal["policy", "reward_model"] = "policy"
    """`policy`: trunk from an HF causal LM (VC-PPO); `reward_model`: an HF sequence classifier with one label (baseline PPO)."""
    parallel: ParallelConfig = param(factory=ParallelConfig)
    """Tensor / pipeline layout of the critic."""
    optim: OptimConfig = param(factory=lambda: OptimConfig(lr=2e-6))
    """Optimizer of the critic (VC-PPO §4: lr 2e-6)."""
    params_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype of the training weights and activations; the distributed optimizer keeps fp32 master weights and reduces gradients in fp32."""
    layer_spec: Literal["auto", "transformer_engine", "local"] = "auto"
    """Megatron layer spec of the critic (as `actor.layer_spec`)."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the random Qwen2-style model built locally when no checkpoint is given (demo, tests)."""

    hidden_size: int = param(64, ge=1)
    """Hidden size."""
    num_layers: int = param(2, ge=1)
    """Transformer layers."""
    num_attention_heads: int = param(2, ge=1)
    """Attention heads (hidden_size / heads >= 32 for vLLM's CPU attention)."""
    num_query_groups: int = param(1, ge=1)
    """Key/value heads (grouped-query attention)."""
    ffn_hidden_size: int = param(128, ge=1)
    """SwiGLU intermediate size."""
    max_position_embeddings: int = param(512, ge=1)
    """Longest sequence (prompt + response) the model supports."""


@dataclass(frozen=True)
class AlgoConfig:
    """PPO / VC-PPO / VAPO algorithm settings (VC-PPO Alg. 1; VAPO §4)."""

    gamma: float = param(1.0, ge=0, le=1)
    """Discount factor γ (1.0 in RLHF, VC-PPO §2.3)."""
    advantage_estimator: Literal["gae", "grpo"] = "gae"
    """`gae`: decoupled GAE with a critic (VC-PPO §3.3; the λ settings below); `grpo`: each response's outcome reward normalised within its prompt's group, (r − mean) / (std + 1e-6) on every token (DeepSeekMath GRPO; VC-PPO Table 2's comparison): no critic is built or trained and value pretraining is off (needs `batch.samples_per_prompt` >= 2)."""
    lam_actor: float = param(0.95, ge=0, le=1)
    """GAE λ for the policy's advantages (VC-PPO §4.2 and Table 4 recommend [0.95, 1))."""
    lam_critic: float = param(1.0, ge=0, le=1)
    """GAE λ for the critic's value targets (VC-PPO §3.3: 1.0, Monte-Carlo returns)."""
    length_adaptive_alpha: float | None = param(None, gt=0)
    """VAPO eq. 5: per-sequence λ_actor = 1 - 1/(α·length); null uses `lam_actor` (VAPO: 0.05)."""
    eps_low: float = param(0.2, ge=0)
    """Lower clip range: the ratio is clipped at 1 - eps_low (VAPO eq. 8)."""
    eps_high: float = param(0.2, ge=0)
    """Upper clip range: the ratio is clipped at 1 + eps_high (clip-higher; VAPO: 0.28)."""
    dual_clip: float | None = param(None, gt=1)
    """Dual-clip bound c > 1 on the loss of negative-advantage tokens; null disables it."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """Aggregation of the actor's policy loss: `token-mean`: VAPO eq. 7; `seq-mean-token-mean`: VAPO eq. 6 (baseline PPO). The critic's is `critic_loss_agg_mode`."""
    critic_loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """Aggregation of the critic's squared error, independent of the actor's `loss_agg_mode`: `token-mean` regresses every state alike (VC-PPO Alg. 1, line 12; verl's value loss); `seq-mean-token-mean` averages within each response first, weighting the states of short responses more."""
    value_clip: float | None = param(None, gt=0)
    """Clip the new value to old ± this before the squared error; null disables it."""
    nll_coef: float = param(0.0, ge=0)
    """μ of VAPO eq. 10: weight of the NLL loss on responses with positive reward (VAPO: 0.1)."""
    kl_coef: float = param(0.0, ge=0)
    """Weight of the KL penalty to the reference policy (VC-PPO §4: 0)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator: k1 = log π - log π_ref; k3 = exp(-k1) + k1 - 1 (unbiased, non-negative)."""
    entropy_coef: float = param(0.0, ge=0)
    """Weight of the entropy bonus."""
    ppo_epochs: int = param(1, ge=1)
    """Passes over each rollout batch."""
    whiten_advantages: bool = False
    """Normalise advantages to zero mean and unit variance over the global batch (every data-parallel rank's responses), after the estimator; verl's GAE, which the papers ran, always does (examples/vcppo.yaml, vapo.yaml turn it on)."""


@dataclass(frozen=True)
class BatchConfig:
    """Batch sizes, named by scope: `global_` (all ranks), `per_dp_rank_`, `micro_` (one forward). Units: `global_prompts_per_step` counts PROMPTS; every other size counts RESPONSES (sequences), whatever `samples_per_prompt` is. verl, which the papers ran, counts its mini-batch in prompts (×n responses): VAPO's "mini-batch 512" of 512 prompts × 16 samples is 8192 responses here, one optimizer step per RL step."""

    global_prompts_per_step: int = param(512, ge=1)
    """PROMPTS sampled per RL step, over all ranks (VAPO: 512; baseline PPO: 8192). The step's rollout batch is global_prompts_per_step × samples_per_prompt responses."""
    samples_per_prompt: int = param(16, ge=1)
    """Responses sampled per prompt (group sampling; VAPO: 16; baseline PPO: 1)."""
    global_mini_batch_size: int = param(512, ge=1)
    """RESPONSES per optimizer step, over all ranks; optimizer steps per RL step = ppo_epochs × rollout batch / this (VAPO: 8192 = 512 prompts × 16, one update per step; baseline PPO: 512 responses, 16 updates per step)."""
    micro_batch_size: int = param(1, ge=1)
    """RESPONSES per forward/backward on one data-parallel rank (gradient accumulation up to the per-rank mini-batch)."""
    global_sft_batch_size: int = param(64, ge=1)
    """Examples (prompt + solution sequences) per optimizer step of the SFT cold start, over all ranks."""


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling settings of the rollout engine."""

    temperature: float = param(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = param(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_prompt_tokens: int = param(1024, ge=1)
    """Longest prompt; longer ones follow `on_long_prompt`."""
    max_response_tokens: int = param(8192, ge=1)
    """Most tokens generated per response (VC-PPO: 8k or 16k context)."""
    on_long_prompt: Literal["truncate", "skip"] = "skip"
    """What to do with a prompt longer than `max_prompt_tokens` (counted and reported either way)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations of the vLLM engine; `auto` takes the checkpoint's `torch_dtype`."""
    tensor_parallel_size: int = param(1, ge=1)
    """Tensor-parallel ranks of the vLLM engine (> 1 runs under torchrun via vLLM's external launcher)."""
    kv_cache_bytes: int | None = param(None, ge=1)
    """KV-cache size in bytes per rank; required on CPU; null on GPU: what the memory timeline's rollout phase leaves of `gpu_memory_utilization` of the GPU (tools/plan.py prints it)."""
    gpu_memory_utilization: float = param(0.5, gt=0, le=1)
    """Fraction of GPU memory the rollout phase may fill when `kv_cache_bytes` is null: vLLM's weights, KV cache and runtime plus what the training engines keep resident (their weights; everything without `trainer.offload_during_rollout`) and the reserved bytes (memory timeline, docs/ARCHITECTURE.md)."""
    sync_bucket_bytes: int = param(256 << 20, ge=1)
    """Bytes per bucket when the actor's weights are gathered into the rollout engine after an update."""
    sleep_level: int = param(0, ge=0, le=2)
    """Colocation, GPU only (vLLM's sleep mode; ignored on CPU): after sampling the engine sleeps while the actor and critic run. 1 moves its weights to host memory and frees the KV cache; 2 frees both in RL (the weight sync refills them; value pretraining sleeps at 1); 0 keeps it resident."""
    logprob_check_interval: int = param(1, ge=0)
    """Every this many RL steps the rollout also returns vLLM's log-probs of the sampled tokens and the step reports `rollout/logprob_abs_diff` against the actor's old log-probs (a large value means the model, tokenizer or weight sync disagree); 0 never. The trainer itself recomputes π_old with the actor, so this is a check only (it costs 10-20 % of generation on the tiny CPU model)."""


@dataclass(frozen=True)
class RewardConfig:
    """The rule-based verifier (VC-PPO §4.1)."""

    correct_reward: float = 1.0
    """Reward of a correct final answer."""
    wrong_reward: float = -1.0
    """Reward of a wrong or missing final answer."""
    timeout_s: float = param(5.0, gt=0)
    """Time limit to verify one response; over it the response scores `wrong_reward`."""
    num_workers: int = param(2, ge=0)
    """Verifier processes; 0 verifies in the calling process."""


@dataclass(frozen=True)
class DataConfig:
    """Prompt data."""

    train_path: str | None = None
    """jsonl / parquet file of training problems (parquet as written by HF `datasets`' `Dataset.to_parquet`); null uses the built-in synthetic task `task`."""
    task: Literal["sums", "chain_sums", "chain_sums_graded"] = "sums"
    """The built-in synthetic task (data/synthetic.py) when `train_path` / `eval_path` are null: `sums` (short: copy a sum of single digits, then its value; the quick demo) or `chain_sums` (long chain of thought: the sum worked out with running totals, 100-200 tokens; data/chain_sums.py), or `chain_sums_graded` (the same chains, the prompt opened by a pace tag that sets how often the cold-start demonstrations slip: a success rate the prompt shows, so a critic can learn it)."""
    problem_key: str | tuple[str, ...] = ("problem", "question")
    """Field holding the problem text, or a list of names of which each file uses the first it has (reported when loading; GSM8K's own files: `question`); a dotted name reaches into nested objects / parquet structs (`extra_info.question`)."""
    answer_key: str | tuple[str, ...] = ("answer", "solution")
    """Field holding the ground-truth answer, read per `answer_format`; a list as for `problem_key` (MATH's own files have only `solution`)."""
    answer_format: Literal["auto", "field", "gsm8k", "boxed"] = "auto"
    """How the answer field holds the answer: `field` as is; `gsm8k` after the last `####` of a worked solution (GSM8K's own rows); `boxed` in the last `\\boxed{}` of a worked solution (MATH's own rows); `auto` picks one per file from its first row, reports the choice with the file's load summary and requires it of every row."""
    on_bad_row: Literal["skip", "fail"] = "fail"
    """A malformed row is reported with file:line and the field, then skipped or fatal."""
    shuffle: bool = True
    """Visit the training problems in a new seeded random order every epoch."""
    prompt_template: Literal["auto", "chat", "plain", "none"] = "auto"
    """Prompt format (data/chat_template.py): `auto` uses the tokenizer's chat template if it has one; the synthetic task always sends the bare problem."""
    eval_path: str | tuple[str, ...] | None = None
    """Held-out set(s): a jsonl / parquet file or a list of them (`[datasets/gsm8k_test.jsonl, datasets/math500.jsonl]`), read like `train_path` and scored before, during and after RL, each under its file name without suffix (`eval/gsm8k_test/...`); null uses held-out synthetic problems."""
    synthetic_problems: int = param(4096, ge=1)
    """Size of the training pool of the built-in synthetic task (when `train_path` is null)."""
    synthetic_max_operands: int = param(4, ge=1, le=16)
    """The synthetic task's problems are sums of 1 to this many single-digit numbers (more are harder; the prompt shows how many, so the critic can learn each problem's difficulty)."""


@dataclass(frozen=True)
class RewardModelConfig:
    """Reward-model training, `python -m vcppo_megatron.train_reward_model` (trainer/reward_model.py): the model baseline PPO's critic starts from (VC-PPO §3.1, VAPO §5.1; `critic.init_from: reward_model`). A one-label HF sequence classifier, initialised from the SFT policy `actor.model_path`, regresses the verifier's reward of the policy's own samples at each response's last token only."""

    train_prompts: int = param(256, ge=1)
    """Prompts of the training pool the SFT policy is sampled on (`rollout.temperature` / `top_p`)."""
    eval_prompts: int = param(64, ge=1)
    """Held-out prompts (the evaluation set), sampled afresh, on which the trained model's AUC is measured."""
    samples_per_prompt: int = param(4, ge=1)
    """Responses sampled per prompt."""
    epochs: int = param(2, ge=1)
    """Passes over the training samples."""
    batch_size: int = param(32, ge=1)
    """Responses per optimizer step."""
    lr: float = param(1e-5, gt=0)
    """Learning rate (AdamW, constant; betas, epsilon, weight decay and gradient clipping of `critic.optim`)."""
    output_dir: str | None = None
    """HF directory written (config, safetensors with `score.weight`, tokenizer, metrics.json); null: `<trainer.output_dir>/reward_model`."""


@dataclass(frozen=True)
class TrainerConfig:
    """The run: length, seeds, output directories."""

    seed: int = param(1234, ge=0)
    """Seed of every random generator (data order, sampling, initialisation)."""
    sft_steps: int = param(0, ge=0)
    """Optimizer steps of the SFT cold start (phase 0; 0 skips it)."""
    sft_lr: float = param(1e-5, gt=0)
    """Learning rate of the SFT cold start (AdamW, otherwise as `actor.optim`)."""
    value_pretrain_steps: int = param(0, ge=0)
    """Steps of value pretraining with the policy frozen (phase 1, VC-PPO §3.2; 0 skips it); a step is one rollout batch, as in `num_steps`."""
    value_pretrain_patience: int = param(0, ge=0)
    """Stop value pretraining early once the explained variance has not improved by `value_pretrain_min_delta` for this many steps (VC-PPO §3.2: train until the value loss and EV plateau); 0 runs all `value_pretrain_steps`."""
    value_pretrain_min_delta: float = param(0.01, ge=0)
    """Smallest gain in explained variance that counts as an improvement for `value_pretrain_patience`."""
    offload_during_rollout: bool = False
    """Colocation (memory timeline): each engine holds its gradient buffers and optimizer state only for its own update; in start-up, rollout, the forward passes, the sync and the other role's update it frees its gradient buffers and, on GPU with bf16 weights, moves its optimizer state (Adam moments, fp32 master weights) to host memory. Its weights stay on the GPU. Off: both engines keep everything resident."""
    num_steps: int = param(100, ge=0)
    """RL steps to run (phase 2). One RL step = one rollout batch (`batch.global_prompts_per_step` prompts) and ppo_epochs × rollout batch / `batch.global_mini_batch_size` optimizer steps of each role; VAPO's "5,000 steps" (the axis of its Fig. 1) are optimizer steps."""
    eval_problems: int = param(64, ge=1)
    """Held-out problems scored (greedy) before and after RL."""
    output_dir: str = "runs/default"
    """Directory of TensorBoard logs and checkpoints; a run resumes from the latest checkpoint found here."""
    checkpoint_interval: int = param(10, ge=1)
    """Value-pretraining and RL steps between checkpoints (VC-PPO ablates value checkpoints at 50 / 100 / 150 steps); one is also saved on SIGTERM / SIGUSR1, and at the end of each phase."""
    checkpoint_optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """Optimizer state in checkpoints: `dp_reshardable` (fully parallel save; resumes at the same TP / PP) or `fully_reshardable` (resumes at any TP / PP / DP; the save gathers each model shard's optimizer state over data parallelism, 12 bytes per parameter of the shard)."""
    value_checkpoint: str | None = None
    """Critic checkpoint (a checkpoint root or a step directory) to start RL from; skips value pretraining."""
    keep_last_checkpoints: int | None = param(3, ge=0)
    """Checkpoint retention: after each save keep the newest N readable checkpoints per role (actor, critic) and delete older ones (~0.9 TB per actor + critic checkpoint at 32B); 0 or null keeps all. Never deleted: the steps in `keep_checkpoint_steps`, the end of value pretraining, the actor checkpoints that kept critic checkpoints pair with, and unreadable ones set aside at resume (`step_*.unreadable`)."""
    keep_checkpoint_steps: tuple[int, ...] = param((), ge=0)
    """Global steps whose checkpoints retention never deletes, e.g. value-pretraining checkpoints to start other runs from with `value_checkpoint` (VC-PPO ablates 50 / 100 / 150 steps)."""
    eval_every_steps: int = param(0, ge=0)
    """RL steps between evaluations on the held-out set (greedy accuracy, avg@k, pass@k); 0: only before and after RL (greedy) and after RL (sampled)."""
    eval_samples: int = param(32, ge=1)
    """Samples per held-out problem in the sampled evaluation (VAPO: avg@32)."""
    eval_temperature: float = param(1.0, gt=0)
    """Sampling temperature of the sampled evaluation (VAPO: 1.0)."""
    eval_top_p: float = param(0.7, gt=0, le=1)
    """Top-p of the sampled evaluation (VAPO: 0.7)."""
    position_bucket_size: int = param(256, ge=1)
    """Response tokens per bucket of the position-bias view (`position/...` metrics)."""
    position_num_buckets: int = param(32, ge=1)
    """Buckets of the position-bias view; later positions fall into the last one."""


@dataclass(frozen=True)
class Config:
    """A whole run's configuration."""

    actor: ActorConfig = param(factory=ActorConfig)
    """The policy."""
    critic: CriticConfig = param(factory=CriticConfig)
    """The value model."""
    tiny_model: TinyModelConfig = param(factory=TinyModelConfig)
    """Shape of the random model used when a role has no `model_path`."""
    algo: AlgoConfig = param(factory=AlgoConfig)
    """Algorithm settings."""
    batch: BatchConfig = param(factory=BatchConfig)
    """Batch sizes."""
    rollout: RolloutConfig = param(factory=RolloutConfig)
    """Sampling."""
    reward: RewardConfig = param(factory=RewardConfig)
    """Verifier."""
    data: DataConfig = param(factory=DataConfig)
    """Data."""
    reward_model: RewardModelConfig = param(factory=RewardModelConfig)
    """Reward-model training (its own command; the trainer does not read it)."""
    trainer: TrainerConfig = param(factory=TrainerConfig)
    """Run settings."""
