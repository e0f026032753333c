"""The gradient of one global batch is the same processed as 1 or 8 micro-batches, on 1 rank or
2 gloo ranks, for every loss term (issue: peers normalised per micro-batch; see docs/ARCHITECTURE)."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from dist_utils import run_gloo
from loss_problem import TERMS, grads_and_metrics, make_problem, rel_err
from vcppo_megatron.algorithms.losses import global_counts
from vcppo_megatron.algorithms.metrics import MetricAccumulator

TOL = 1e-6
BATCH = 16


def _full_batch(term: str, p: dict):
    counts = global_counts(p["response_mask"], p["is_positive"])
    return grads_and_metrics(term, p, slice(0, BATCH), counts, num_micro_batches=1)


@pytest.mark.parametrize("term", sorted(TERMS))
def test_eight_micro_batches_equal_one(term):
    p = make_problem()
    ref_grad, ref_metrics = _full_batch(term, p)
    assert ref_grad.abs().max() > 0, "the term must produce a gradient"
    counts = global_counts(p["response_mask"], p["is_positive"])
    grad, metrics = grads_and_metrics(term, p, slice(0, BATCH), counts, num_micro_batches=8)
    assert rel_err(grad, ref_grad) <= TOL
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        assert abs(float(metrics[k] - ref_metrics[k])) <= TOL * max(1.0, abs(float(ref_metrics[k]))), k


def test_problem_exercises_every_clip():
    """The data must hit each clip branch, or the invariance tests would miss them."""
    p = make_problem()
    counts = global_counts(p["response_mask"], p["is_positive"])
    _, m = grads_and_metrics("all", p, slice(0, BATCH), counts, num_micro_batches=1)
    for name in ("actor/clip_low_frac", "actor/clip_high_frac", "actor/clip_dual_frac"):
        assert 0.0 < float(m[name]) < 1.0, name
    _, m = grads_and_metrics("value_clipped", p, slice(0, BATCH), counts, num_micro_batches=1)
    assert 0.0 < float(m["critic/value_clip_frac"]) < 1.0


def test_per_micro_batch_normalisation_would_be_caught():
    """The peers' bug (counts recomputed per micro-batch) changes the gradient well beyond TOL."""
    p = make_problem()
    ref_grad, _ = _full_batch("nll", p)
    w = p["w"].clone().requires_grad_(True)
    w_v = p["w_v"].clone().requires_grad_(True)
    from loss_problem import term_loss
    for i in range(8):
        rows = slice(2 * i, 2 * i + 2)
        local = global_counts(p["response_mask"][rows], p["is_positive"][rows])
        # scale so that a per-micro-batch mean of equal-sized micro-batches is compared fairly
        loss, _ = term_loss("nll", p, rows, local, w, w_v)
        (loss / 8).backward()
    assert rel_err(w.grad.flatten(), ref_grad[: w.numel()]) > 1e-3


def _two_rank_worker(rank: int, world_size: int) -> None:
    group = dist.group.WORLD
    p = make_problem()
    half = BATCH // world_size
    rows = slice(rank * half, (rank + 1) * half)
    counts = global_counts(p["response_mask"][rows], p["is_positive"][rows], group=group)
    assert counts == global_counts(p["response_mask"], p["is_positive"])
    failures = []
    for term in sorted(TERMS):
        ref_grad, ref_metrics = _full_batch(term, p)
        grad, metrics = grads_and_metrics(term, p, rows, counts, num_micro_batches=4)
        dist.all_reduce(grad, group=group)                      # data-parallel SUM of gradients
        acc = MetricAccumulator()
        acc.add_shares(metrics)
        reduced = acc.reduce(group)
        if rel_err(grad, ref_grad) > TOL:
            failures.append(f"{term}: grad rel err {rel_err(grad, ref_grad):.2e}")
        for k, v in ref_metrics.items():
            if abs(reduced[k] - float(v)) > TOL * max(1.0, abs(float(v))):
                failures.append(f"{term}: metric {k} {reduced[k]} != {float(v)}")
    # masked statistics and explained variance: 2 ranks x 4 micro-batches == one piece
    acc_dist, acc_one = MetricAccumulator(), MetricAccumulator()
    m = p["response_mask"]
    for i in range(4):
        sub = slice(rows.start + 2 * i, rows.start + 2 * i + 2)
        acc_dist.add_stats("returns", p["returns"][sub], m[sub])
        acc_dist.add_explained_variance("critic/explained_variance", p["old_values"][sub],
                                        p["returns"][sub], m[sub])
    acc_one.add_stats("returns", p["returns"], m)
    acc_one.add_explained_variance("critic/explained_variance", p["old_values"], p["returns"], m)
    got, want = acc_dist.reduce(group), acc_one.reduce()
    for k in want:
        if abs(got[k] - want[k]) > TOL * max(1.0, abs(want[k])):
            failures.append(f"stat {k}: {got[k]} != {want[k]}")
    assert not failures, "\n".join(failures)


def test_two_gloo_ranks_equal_one_rank_for_every_term():
    run_gloo(_two_rank_worker, 2)
