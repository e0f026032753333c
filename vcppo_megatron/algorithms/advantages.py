"""The one entry point the trainer calls for advantages and value targets, per `algo.advantage_estimator`.

- `gae`: decoupled GAE (VC-PPO eq. 3-5, §3.3; VAPO eq. 4-5, gae.py): advantages with λ_actor (or
  the length-adaptive λ), value targets with λ_critic; in value pretraining (VC-PPO §3.2) the
  targets use λ = 1 (Monte-Carlo returns) whatever λ_critic is.
- `grpo`: group-normalised outcome rewards (grpo.py); no critic, so no value targets.

Then, with `algo.whiten_advantages`, the advantages are whitened over the global batch (all ranks
of `group`), as verl's GAE does.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from vcppo_megatron.algorithms.gae import decoupled_gae, whiten_advantages
from vcppo_megatron.algorithms.grpo import grpo_advantages
from vcppo_megatron.config.schema import AlgoConfig

__all__ = ["compute_advantages", "needs_critic"]


def needs_critic(algo: AlgoConfig) -> bool:
    """Whether the estimator uses a value model (GRPO does not: none is built or trained)."""
    return algo.advantage_estimator == "gae"


def compute_advantages(algo: AlgoConfig, *, token_rewards: Tensor, values: Tensor | None,
                       response_mask: Tensor, group_ids: Tensor, value_pretrain: bool,
                       group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor | None]:
    """(advantages [N, R], value targets [N, R] or None without a critic), float32.

    token_rewards, values, response_mask: response-aligned [N, R]; group_ids [N]: one id per prompt
    (the responses sampled for it form its GRPO group); value_pretrain: the policy is frozen and the
    targets are λ = 1 returns; group: the data-parallel group whitening reduces over.
    """
    if algo.advantage_estimator == "gae":
        if values is None:
            raise ValueError("algo.advantage_estimator = 'gae' needs the critic's values, got None")
        adv, returns = decoupled_gae(token_rewards, values, response_mask, gamma=algo.gamma,
                                     lam_actor=algo.lam_actor,
                                     lam_critic=1.0 if value_pretrain else algo.lam_critic,
                                     length_adaptive_alpha=algo.length_adaptive_alpha)
    elif algo.advantage_estimator == "grpo":
        if value_pretrain:
            raise ValueError("algo.advantage_estimator = 'grpo' has no critic to pretrain: expected "
                             "trainer.value_pretrain_steps = 0")
        adv, returns = grpo_advantages(token_rewards, response_mask, group_ids), None
    else:
        raise ValueError(f"algo.advantage_estimator = {algo.advantage_estimator!r}: expected 'gae' or 'grpo'")
    if algo.whiten_advantages:
        adv = whiten_advantages(adv, response_mask, group=group)
    return adv, returns
