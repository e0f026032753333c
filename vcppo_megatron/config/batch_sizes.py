"""Batch sizes derived from the config and the world size, checked to divide, printed at start."""
from __future__ import annotations

from dataclasses import dataclass

from vcppo_megatron.config.loader import ConfigError
from vcppo_megatron.config.schema import Config, ParallelConfig


@dataclass(frozen=True)
class RoleBatchSizes:
    """Sizes seen by one role (actor or critic) under its parallel layout."""

    data_parallel_size: int
    """world_size / (tensor_parallel_size * pipeline_parallel_size)."""
    per_dp_rank_mini_batch_size: int
    """Responses one data-parallel rank processes per optimizer step."""
    micro_batches_per_mini_batch: int
    """Gradient-accumulation steps: per_dp_rank_mini_batch_size / micro_batch_size."""


@dataclass(frozen=True)
class BatchSizes:
    """All derived batch sizes of a run."""

    world_size: int
    global_rollout_batch_size: int
    """Responses per RL step: global_prompts_per_step * samples_per_prompt."""
    mini_batches_per_step: int
    """Optimizer steps per PPO epoch: global_rollout_batch_size / global_mini_batch_size."""
    actor: RoleBatchSizes
    critic: RoleBatchSizes

    def describe(self) -> str:
        """A few lines for the start-of-run log."""
        lines = [f"world_size={self.world_size}  "
                 f"global_rollout_batch_size={self.global_rollout_batch_size}  "
                 f"mini_batches_per_step={self.mini_batches_per_step}"]
        for role in ("actor", "critic"):
            r: RoleBatchSizes = getattr(self, role)
            lines.append(f"{role}: data_parallel_size={r.data_parallel_size}  "
                         f"per_dp_rank_mini_batch_size={r.per_dp_rank_mini_batch_size}  "
                         f"micro_batches_per_mini_batch={r.micro_batches_per_mini_batch}")
        return "\n".join(lines)


def derive_batch_sizes(cfg: Config, world_size: int) -> BatchSizes:
    """Derive every batch size for `world_size` ranks; raise ConfigError if one does not divide."""
    b = cfg.batch
    rollout = b.global_prompts_per_step * b.samples_per_prompt
    _divides("batch.global_mini_batch_size", b.global_mini_batch_size,
             "the global rollout batch (batch.global_prompts_per_step * batch.samples_per_prompt)",
             rollout)
    return BatchSizes(
        world_size=world_size,
        global_rollout_batch_size=rollout,
        mini_batches_per_step=rollout // b.global_mini_batch_size,
        actor=_role_sizes("actor", cfg.actor.parallel, cfg, world_size),
        critic=_role_sizes("critic", cfg.critic.parallel, cfg, world_size),
    )


def _role_sizes(role: str, layout: ParallelConfig, cfg: Config, world_size: int) -> RoleBatchSizes:
    model_parallel = layout.tensor_parallel_size * layout.pipeline_parallel_size
    _divides(f"{role}.parallel.tensor_parallel_size * {role}.parallel.pipeline_parallel_size",
             model_parallel, "the world size", world_size)
    dp = world_size // model_parallel
    _divides("batch.global_mini_batch_size", cfg.batch.global_mini_batch_size,
             f"by the {role}'s data-parallel size", dp, by=True)
    per_rank = cfg.batch.global_mini_batch_size // dp
    _divides("batch.micro_batch_size", cfg.batch.micro_batch_size,
             f"the {role}'s per_dp_rank_mini_batch_size "
             f"(batch.global_mini_batch_size / data_parallel_size)", per_rank)
    return RoleBatchSizes(dp, per_rank, per_rank // cfg.batch.micro_batch_size)


def _divides(key: str, value: int, what: str, total: int, by: bool = False) -> None:
    if by:
        if value % total:
            raise ConfigError(f"'{key}' = {value}: expected a multiple of {total} (divisible {what})")
    elif total % value:
        raise ConfigError(f"'{key}' = {value}: expected a divisor of {what} = {total}")
