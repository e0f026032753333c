"""GRPO advantages against a float64 loop, and `compute_advantages`, the trainer's one entry point:
it runs the configured estimator (decoupled GAE or GRPO), λ = 1 targets in value pretraining, and
whitening; GRPO builds no value targets. The cross-rank grouping is in
tests/distributed/test_gae_whitening.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vcppo_megatron.algorithms.advantages import compute_advantages, needs_critic
from vcppo_megatron.algorithms.gae import decoupled_gae, whiten_advantages
from vcppo_megatron.algorithms.grpo import GRPO_EPS, grpo_advantages, grpo_advantages_reference
from vcppo_megatron.config.schema import AlgoConfig


def _batch(n_groups: int, size: int, R: int, seed: int, *, shuffle: bool = True):
    """Rows of `n_groups` groups of `size` responses, ±1 outcome on the last token, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n_groups).repeat_interleave(size) * 7 + 3       # ids need not be 0..G-1
    if shuffle:
        ids = ids[torch.randperm(len(ids), generator=g)]
    lengths = torch.randint(1, R + 1, (len(ids),), generator=g)
    mask = torch.arange(R)[None, :] < lengths[:, None]
    rewards = torch.zeros(len(ids), R)
    rewards[torch.arange(len(ids)), lengths - 1] = torch.randint(0, 2, (len(ids),), generator=g).float() * 2 - 1
    return rewards, mask.float(), ids


@pytest.mark.parametrize("n_groups, size, seed", [(5, 4, 0), (3, 16, 1), (7, 2, 2), (4, 1, 3)])
def test_grpo_matches_float64_loop(n_groups, size, seed):
    rewards, mask, ids = _batch(n_groups, size, R=9, seed=seed)
    rewards[mask.bool()] += 0.01 * torch.randn(int(mask.sum()), generator=torch.Generator().manual_seed(seed))
    got = grpo_advantages(rewards, mask, ids)
    ref = grpo_advantages_reference(rewards, mask, ids)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    assert float((got.double() - ref).abs().max()) < 1e-5
    assert (got[mask == 0] == 0).all()
    if size == 1:                                          # a group of one has no baseline: 0
        assert (got == 0).all()


def test_grpo_closed_form_for_one_group():
    """Outcomes (1, 1, -1, -1): mean 0, unbiased std sqrt(4/3): advantages ±sqrt(3)/2 on every token."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float32)
    rewards = torch.zeros(4, 3)
    for i, (last, r) in enumerate([(1, 1.0), (0, 1.0), (2, -1.0), (1, -1.0)]):
        rewards[i, last] = r
    got = grpo_advantages(rewards, mask, torch.zeros(4, dtype=torch.long))
    a = (3 ** 0.5 / 2) / (1 + GRPO_EPS * (3 ** 0.5 / 2))     # 1 / (sqrt(4/3) + eps)
    want = torch.tensor([[a, a, 0], [a, 0, 0], [-a, -a, -a], [-a, -a, 0]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_grpo_all_equal_group_gets_zero_and_groups_are_independent():
    rewards, mask, _ = _batch(2, 4, R=5, seed=4, shuffle=False)
    rewards[:4] = 0.0                              # group 0: all outcomes equal
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    got = grpo_advantages(rewards, mask, ids)
    assert (got[:4] == 0).all()
    alone = grpo_advantages(rewards[4:], mask[4:], ids[4:])
    torch.testing.assert_close(got[4:], alone)     # other groups do not leak into a group's statistics


def test_grpo_rejects_bad_shapes():
    rewards, mask, ids = _batch(2, 2, R=3, seed=5)
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(rewards, mask, ids.float())
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(rewards, mask, ids[:-1])
    with pytest.raises(ValueError, match="equal"):
        grpo_advantages(rewards, mask[:, :-1], ids)


def _gae_inputs(seed: int = 6):
    rewards, mask, ids = _batch(4, 4, R=11, seed=seed)
    values = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(seed)) * mask
    return rewards, values, mask, ids


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("value_pretrain", [False, True])
def test_compute_advantages_gae_is_decoupled_gae(value_pretrain, whiten):
    rewards, values, mask, ids = _gae_inputs()
    algo = AlgoConfig(lam_actor=0.9, lam_critic=0.97, length_adaptive_alpha=None, whiten_advantages=whiten)
    assert needs_critic(algo)
    adv, ret = compute_advantages(algo, token_rewards=rewards, values=values, response_mask=mask,
                                  group_ids=ids, value_pretrain=value_pretrain, group=None)
    # value pretraining regresses on λ = 1 Monte-Carlo returns (VC-PPO §3.2), whatever λ_critic is
    want_adv, want_ret = decoupled_gae(rewards, values, mask, gamma=1.0, lam_actor=0.9,
                                       lam_critic=1.0 if value_pretrain else 0.97, backend="reference")
    if whiten:
        want_adv = whiten_advantages(want_adv, mask)
    torch.testing.assert_close(adv, want_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, want_ret, atol=1e-5, rtol=1e-5)
    if value_pretrain:                 # λ = 1, γ = 1: the target is the return-to-go, the final reward
        torch.testing.assert_close(ret, rewards.sum(-1, keepdim=True) * mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("whiten", [False, True])
def test_compute_advantages_grpo_needs_no_values(whiten):
    rewards, _, mask, ids = _gae_inputs()
    algo = AlgoConfig(advantage_estimator="grpo", whiten_advantages=whiten)
    assert not needs_critic(algo)
    adv, ret = compute_advantages(algo, token_rewards=rewards, values=None, response_mask=mask,
                                  group_ids=ids, value_pretrain=False, group=None)
    want = grpo_advantages_reference(rewards, mask, ids)
    if whiten:
        want = whiten_advantages(want, mask)
    assert ret is None
    assert float((adv.double() - want.double()).abs().max()) < 1e-5


def test_compute_advantages_rejects_missing_values_and_grpo_value_pretraining():
    rewards, _, mask, ids = _gae_inputs()
    kw = dict(token_rewards=rewards, response_mask=mask, group_ids=ids, group=None)
    with pytest.raises(ValueError, match="needs the critic's values"):
        compute_advantages(AlgoConfig(), values=None, value_pretrain=False, **kw)
    with pytest.raises(ValueError, match="value_pretrain_steps = 0"):
        compute_advantages(AlgoConfig(advantage_estimator="grpo"), values=None, value_pretrain=True, **kw)
    bad = dataclasses.replace(AlgoConfig(), advantage_estimator="vtrace")
    with pytest.raises(ValueError, match="'vtrace'"):
        compute_advantages(bad, values=rewards, value_pretrain=False, **kw)
