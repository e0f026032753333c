"""Masked advantage whitening over 2 gloo ranks equals single-rank whitening of the concatenated
batch (statistics all-reduced in float64 over an explicit group); GAE itself is row-local. GRPO's
groups survive `gather_samples`: two ranks' prompts with the same local index stay two groups.
All distributed advantage checks share this one spawn."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dist_utils import run_gloo
from vcppo_megatron.algorithms.gae import decoupled_gae, whiten_advantages
from vcppo_megatron.algorithms.grpo import grpo_advantages, grpo_advantages_reference
from vcppo_megatron.trainer.experience import Samples, build_experience, gather_samples

TOL = 1e-6
BATCH, T = 8, 257


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (BATCH,), generator=g)
    lengths[5] = 0                                                     # an all-masked row
    mask = (torch.arange(T)[None, :] < lengths[:, None]) & (torch.rand(BATCH, T, generator=g) > 0.2)
    rewards = torch.zeros(BATCH, T)
    rewards[torch.arange(BATCH), (lengths - 1).clamp_min(0)] = torch.randn(BATCH, generator=g)
    values = torch.randn(BATCH, T, generator=g)
    return rewards, values, mask


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / max(1.0, float(ref.abs().max())))


def _worker(rank: int, world_size: int) -> None:
    group = dist.new_group(list(range(world_size)))                    # explicit, not global state
    r, v, m = _problem()
    kw = dict(gamma=1.0, lam_actor=0.95, lam_critic=1.0, length_adaptive_alpha=0.05)
    full_adv, full_ret = decoupled_gae(r, v, m, **kw)
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    adv, ret = decoupled_gae(r[rows], v[rows], m[rows], **kw)          # row-local: no communication
    assert _rel(adv, full_adv[rows]) <= TOL and _rel(ret, full_ret[rows]) <= TOL
    for shift_mean in (True, False):
        expect = whiten_advantages(full_adv, m, shift_mean=shift_mean)[rows]
        got = whiten_advantages(adv, m[rows], group=group, shift_mean=shift_mean)
        assert _rel(got, expect) <= TOL, (rank, shift_mean, _rel(got, expect))
        local_only = whiten_advantages(adv, m[rows], shift_mean=shift_mean)
        assert _rel(local_only, expect) > 1e-3, "local statistics must differ from global ones"
        assert (got[~m[rows]] == 0).all()
    _grpo_groups_across_ranks(rank, group)


def _grpo_groups_across_ranks(rank: int, group: dist.ProcessGroup) -> None:
    """Each rank samples 2 prompts x 3 responses (local prompt_index 0, 0, 0, 1, 1, 1); after the
    gather both ranks hold 4 groups, and GRPO over them equals the float64 loop on the true groups."""
    rewards = {0: [1.0, -1.0, -1.0, 1.0, 1.0, -1.0], 1: [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]}
    local = Samples(prompt_ids=[[rank + 5, p] for p in (1, 1, 1, 2, 2, 2)],
                    response_ids=[[7] * (1 + i + rank) for i in range(6)], rewards=rewards[rank],
                    truncated=[False] * 6, prompt_index=[0, 0, 0, 1, 1, 1], num_skipped_prompts=rank)
    out = gather_samples(local, group, contributes=True)
    assert out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert out.rewards == rewards[0] + rewards[1] and out.num_skipped_prompts == 1
    exp = build_experience(out, pad_token_id=0)
    ids = torch.tensor(out.prompt_index)
    adv = grpo_advantages(exp.token_rewards(), exp.response_mask(), ids)
    truth = torch.arange(4).repeat_interleave(3)                       # (rank, prompt) in gather order
    ref = grpo_advantages_reference(exp.token_rewards(), exp.response_mask(), truth)
    assert float((adv.double() - ref).abs().max()) < 1e-6
    merged = grpo_advantages(exp.token_rewards(), exp.response_mask(), ids % 2)     # without the offset
    assert float((merged.double() - ref).abs().max()) > 0.1, "merging the ranks' groups must show"
    one = gather_samples(local, group, contributes=rank == 1)         # a rank of a rollout TP group
    assert one.prompt_index == [0, 0, 0, 1, 1, 1] and one.rewards == rewards[1]


def test_whitening_two_gloo_ranks_equals_concatenated_batch():
    run_gloo(_worker, 2)
