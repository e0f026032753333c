"""Position-bucket statistics (VC-PPO Fig. 2 view) against a float64 loop, and 1 vs 2 gloo ranks."""
from __future__ import annotations

import math

import torch

from dist_utils import run_gloo
from vcppo_megatron.algorithms.position_stats import PositionStats

BUCKET, NUM_BUCKETS = 3, 4          # positions 0-2, 3-5, 6-8, 9+ (last bucket open-ended)


def make_batch(seed: int, n: int = 6, r: int = 14) -> dict[str, torch.Tensor]:
    """Random advantages / values / returns with ragged response masks (one empty response)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, r + 1, (n,), generator=g)
    lengths[0] = 0
    mask = (torch.arange(r)[None] < lengths[:, None]).float()
    out = {k: torch.randn(n, r, generator=g) for k in ("advantages", "values", "returns")}
    out["values"][mask == 0] = float("nan")           # garbage off the mask must not leak in
    out["mask"] = mask
    return out


def loop_reference(batches: list[dict[str, torch.Tensor]], name: str) -> list[tuple[float, float, int]]:
    """(mean, std, count) per bucket by a plain Python float64 loop over tokens."""
    vals: list[list[float]] = [[] for _ in range(NUM_BUCKETS)]
    for b in batches:
        x, m = b[name].double().tolist(), b["mask"].tolist()
        for row_x, row_m in zip(x, m):
            for pos, (v, keep) in enumerate(zip(row_x, row_m)):
                if keep:
                    vals[min(pos // BUCKET, NUM_BUCKETS - 1)].append(v)
    out = []
    for v in vals:
        if not v:
            out.append((math.nan, math.nan, 0))
            continue
        mean = sum(v) / len(v)
        out.append((mean, math.sqrt(sum((a - mean) ** 2 for a in v) / len(v)), len(v)))
    return out


def accumulate(batches: list[dict[str, torch.Tensor]]) -> PositionStats:
    acc = PositionStats(BUCKET, NUM_BUCKETS)
    for b in batches:
        for name in ("advantages", "values", "returns"):
            acc.add(name, b[name], b["mask"])
    return acc


def check_against_loop(stats, batches) -> None:
    for name in ("advantages", "values", "returns"):
        ref = loop_reference(batches, name)
        st = stats[name]
        for k, (mean, std, count) in enumerate(ref):
            assert int(st.count[k]) == count, (name, k)
            if count:
                assert abs(float(st.mean[k]) - mean) <= 1e-12, (name, k)
                assert abs(float(st.std[k]) - std) <= 1e-12, (name, k)
            else:
                assert math.isnan(float(st.mean[k]))


def _two_ranks(rank: int, world_size: int, seeds: list[int]) -> None:
    import torch.distributed as dist

    mine = [make_batch(s) for s in seeds[rank::world_size]]        # micro-batches of this rank
    everything = [make_batch(s) for s in seeds]
    reduced = accumulate(mine).reduce(dist.group.WORLD)
    single = accumulate(everything).reduce()
    for name in single:
        for field in ("mean", "std", "count"):
            a, b = getattr(reduced[name], field), getattr(single[name], field)
            assert torch.allclose(a, b, rtol=0, atol=1e-12, equal_nan=True), (rank, name, field)
    check_against_loop(reduced, everything)
    assert PositionStats.scalars(reduced) == PositionStats.scalars(single)


def test_matches_float64_loop_with_empty_and_open_last_bucket():
    batches = [make_batch(1), make_batch(2, r=5)]            # a short batch leaves buckets 2, 3 empty
    stats = accumulate(batches).reduce()
    check_against_loop(stats, batches)
    assert int(stats["advantages"].count[3]) > 0             # positions 9..13 land in the last bucket
    only_short = accumulate([make_batch(2, r=5)]).reduce()
    scalars = PositionStats.scalars(only_short)
    assert "position/advantages/bucket_01" in scalars and "position/advantages/bucket_02" not in scalars
    assert scalars["position/returns/bucket_00"] == float(only_short["returns"].mean[0])


def test_one_rank_equals_two_gloo_ranks():
    run_gloo(_two_ranks, 2, [11, 12, 13, 14, 15])            # uneven: 3 micro-batches vs 2


def test_rejects_bad_shapes_and_sizes():
    import pytest

    with pytest.raises(ValueError, match="bucket_size = 0"):
        PositionStats(0, 4)
    with pytest.raises(ValueError, match=r"x \(2, 3\) and mask \(2, 4\)"):
        PositionStats(2, 2).add("advantages", torch.zeros(2, 3), torch.ones(2, 4))
