"""GRPO's outcome advantage (DeepSeekMath, arXiv 2402.03300, §4.1.2): the row VC-PPO Table 2 compares.

For the G responses o_1..o_G sampled for one prompt (its group) with outcome rewards r_1..r_G:

    Â_{i,t} = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + eps)     for every token t of o_i

No value model: the group mean is the baseline. `std` is the unbiased sample standard deviation
(n − 1 in the denominator, as torch.std and verl's `compute_grpo_outcome_advantage`, which the
papers ran); a group of one response has advantage 0. A response's outcome reward is the sum of
its per-token rewards (the verifier's score sits on its last token). Outputs are float32, 0 where
the response mask is 0.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["GRPO_EPS", "grpo_advantages", "grpo_advantages_reference"]

GRPO_EPS = 1e-6
"""Added to the group's standard deviation (verl's value): an all-equal group gets advantage 0."""


def _validate(token_rewards: Tensor, response_mask: Tensor, group_ids: Tensor) -> None:
    """Shapes: token_rewards and response_mask [N, R], group_ids [N] integers."""
    if token_rewards.dim() != 2 or token_rewards.shape != response_mask.shape:
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)}, response_mask "
                         f"{tuple(response_mask.shape)}: expected equal [N, R] shapes")
    if group_ids.shape != token_rewards.shape[:1] or group_ids.is_floating_point():
        raise ValueError(f"group_ids: expected an integer [N] = [{token_rewards.shape[0]}] tensor, got "
                         f"{group_ids.dtype} {tuple(group_ids.shape)}")


def grpo_advantages(token_rewards: Tensor, response_mask: Tensor, group_ids: Tensor, *,
                    eps: float = GRPO_EPS) -> Tensor:
    """[N, R] float32 advantages: each response's group-normalised outcome on all its tokens."""
    _validate(token_rewards, response_mask, group_ids)
    mask = response_mask.to(torch.float64)
    r = (token_rewards.double() * mask).sum(-1)                       # outcome reward r_i
    _, group = torch.unique(group_ids, return_inverse=True)
    g = int(group.max()) + 1 if len(group) else 0
    n = torch.zeros(g, dtype=torch.float64).index_add_(0, group, torch.ones_like(r))
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, group, r) / n
    dev = r - mean[group]                                             # r_i − mean(group)
    var = torch.zeros(g, dtype=torch.float64).index_add_(0, group, dev * dev) / (n - 1).clamp_min(1.0)
    adv = dev / (var.sqrt()[group] + eps)                             # a group of one: dev = 0
    return (adv[:, None] * mask).float()


def grpo_advantages_reference(token_rewards: Tensor, response_mask: Tensor, group_ids: Tensor, *,
                              eps: float = GRPO_EPS) -> Tensor:
    """Float64 loop over responses and groups of the module-docstring definition (tests)."""
    _validate(token_rewards, response_mask, group_ids)
    rew = token_rewards.double().numpy()
    m = response_mask.double().numpy()
    ids = group_ids.tolist()
    outcome = [float(sum(rew[i, t] * m[i, t] for t in range(rew.shape[1]))) for i in range(len(ids))]
    members: dict[int, list[int]] = {}
    for i, gid in enumerate(ids):
        members.setdefault(gid, []).append(i)
    out = np.zeros(rew.shape)
    for rows in members.values():
        scores = [outcome[i] for i in rows]
        mean = sum(scores) / len(scores)
        std = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5 if len(scores) > 1 else 0.0
        for i in rows:
            for t in range(rew.shape[1]):
                out[i, t] = (outcome[i] - mean) / (std + eps) * m[i, t]
    return torch.from_numpy(out)
