"""How long before the time limit a SLURM job must be told to stop (`--signal=B:USR1@SECONDS`).

The trainer polls the signal between steps (`trainer/signals.py`), so from the moment USR1 arrives
it may still have to finish the step in flight (and a sampled evaluation, when one is due), then
write a checkpoint, then exit and let the shell requeue the job:

    margin = T_step + T_eval + T_checkpoint + T_exit

    T_step       = tokens of the longest step / (GPUs x tokens per second per GPU; by default 400 for
                   a 32B model, scaled inversely with the actor's parameters), where the longest
                   step has every response at max length: global_prompts_per_step x samples_per_prompt
                   x (max_prompt_tokens + max_response_tokens); or a measured step time (the largest
                   `time/step_s` of the run) when given
    T_eval       = eval_problems x (eval_samples + 1 greedy) x (max_prompt_tokens + max_response_tokens) /
                   (GPUs x tokens per second per GPU), when trainer.eval_every_steps > 0, else 0
    T_checkpoint = checkpoint bytes / file-system write bandwidth; an RL checkpoint holds the actor
                   and the critic, each with its weights (params_dtype) and its optimizer state (fp32
                   master weights + Adam m, v = 12 bytes per parameter)
    T_exit       = EXIT_SECONDS: the processes' exit, `scontrol requeue`, and SLURM's 60 s signal
                   resolution

Pure arithmetic (no torch); printed by tools/plan.py, documented in slurm/README.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from vcppo_megatron.config.schema import Config

EXIT_SECONDS = 300
"""Exit, requeue and SLURM's signal-time resolution (it may signal up to 60 s early)."""
TOKENS_PER_S_PER_GPU = 400.0
"""Default end-to-end throughput of a colocated PPO step (rollout + actor + critic) on one H100,
for a 32B model: NeMo-RL reports 571 tokens/s/GPU for GRPO (no critic) on Qwen3-32B, H100; the
critic's forward and update add about a third. Replace with `perf/tokens_per_s` / GPUs measured."""
REFERENCE_PARAMS = 32_763_876_352
"""Parameters of the model TOKENS_PER_S_PER_GPU is for (Qwen2.5-32B). Other sizes scale it by
REFERENCE_PARAMS / actor parameters (compute-bound: FLOPs per token ∝ parameters), so a 0.5B recipe is
not planned at a 32B model's speed."""
WRITE_BYTES_PER_S = 2e9
"""Default write bandwidth of the checkpoint file system for one job (a conservative parallel FS)."""
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class PreemptionMargin:
    """The terms of the margin, in seconds, and the bytes of one RL checkpoint."""

    step_s: float
    eval_s: float
    checkpoint_s: float
    exit_s: float
    checkpoint_bytes: float
    step_measured: bool

    @property
    def seconds(self) -> int:
        """The margin, rounded up to whole minutes."""
        return 60 * math.ceil((self.step_s + self.eval_s + self.checkpoint_s + self.exit_s) / 60)

    def describe(self) -> str:
        """Two lines: the terms and the sbatch option."""
        step = "measured" if self.step_measured else "longest step estimated"
        return (f"preemption margin: step {self.step_s / 60:.0f} min ({step}) + eval {self.eval_s / 60:.0f} min + "
                f"checkpoint {self.checkpoint_bytes / 1e12:.2f} TB {self.checkpoint_s / 60:.0f} min + exit "
                f"{self.exit_s / 60:.0f} min = {self.seconds // 60} min\n"
                f"  recommended: #SBATCH --signal=B:USR1@{self.seconds}")


def checkpoint_bytes(cfg: Config, actor_params: int, critic_params: int) -> float:
    """Bytes of one RL checkpoint: each role's weights plus its optimizer state (12 bytes/param)."""
    return sum(n * (_DTYPE_BYTES[dtype] + 12) for n, dtype in ((actor_params, cfg.actor.params_dtype),
                                                               (critic_params, cfg.critic.params_dtype)))


def default_tokens_per_s_per_gpu(actor_params: int) -> float:
    """TOKENS_PER_S_PER_GPU (a 32B model) scaled by REFERENCE_PARAMS / actor_params."""
    return TOKENS_PER_S_PER_GPU * REFERENCE_PARAMS / actor_params


def preemption_margin(cfg: Config, world: int, actor_params: int, critic_params: int, *,
                      tokens_per_s_per_gpu: float | None = None,
                      write_bytes_per_s: float = WRITE_BYTES_PER_S,
                      step_seconds: float | None = None) -> PreemptionMargin:
    """The margin of a recipe on `world` GPUs (see the module docstring for the formula).

    `tokens_per_s_per_gpu` None: TOKENS_PER_S_PER_GPU scaled to the actor's size (REFERENCE_PARAMS)."""
    if tokens_per_s_per_gpu is None:
        tokens_per_s_per_gpu = default_tokens_per_s_per_gpu(actor_params)
    if tokens_per_s_per_gpu <= 0 or write_bytes_per_s <= 0 or (step_seconds is not None and step_seconds <= 0):
        raise ValueError(f"tokens_per_s_per_gpu = {tokens_per_s_per_gpu}, write_bytes_per_s = "
                         f"{write_bytes_per_s}, step_seconds = {step_seconds}: expected positive numbers")
    seq = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    rate = world * tokens_per_s_per_gpu
    step_tokens = cfg.batch.global_prompts_per_step * cfg.batch.samples_per_prompt * seq
    step_s = step_seconds if step_seconds is not None else step_tokens / rate
    tc = cfg.trainer
    eval_s = tc.eval_problems * (tc.eval_samples + 1) * seq / rate if tc.eval_every_steps else 0.0
    ckpt = checkpoint_bytes(cfg, actor_params, critic_params)
    return PreemptionMargin(step_s, eval_s, ckpt / write_bytes_per_s, EXIT_SECONDS, ckpt, step_seconds is not None)
