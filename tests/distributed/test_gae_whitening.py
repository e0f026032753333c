"""Masked advantage whitening over 2 gloo ranks equals single-rank whitening of the concatenated
batch (statistics all-reduced in float64 over an explicit group); GAE itself is row-local.
All distributed GAE checks share this one spawn."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dist_utils import run_gloo
from vcppo_megatron.algorithms.gae import decoupled_gae, whiten_advantages

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


def test_whitening_two_gloo_ranks_equals_concatenated_batch():
    run_gloo(_worker, 2)
