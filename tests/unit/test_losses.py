"""Loss values against independent float64 loops over sequences and tokens; clip behaviour."""
from __future__ import annotations

import math

import pytest
import torch

from loss_problem import forward, make_problem
from vcppo_megatron.algorithms.losses import (actor_loss, critic_loss, global_counts,
                                              kl_penalty, ppo_clip_loss)
from vcppo_megatron.algorithms.metrics import MetricAccumulator

F64 = torch.float64


def _rows(p):
    """Per-row python lists of the valid tokens: (logp, old, ref, adv, ret, old_v, v, ent)."""
    logp, ent, values = forward(p["x"], p["tokens"], p["w"], p["w_v"])
    out = []
    for i in range(logp.shape[0]):
        keep = [t for t in range(logp.shape[1]) if p["response_mask"][i, t] > 0]
        out.append([(float(logp[i, t]), float(p["old_logprobs"][i, t]), float(p["ref_logprobs"][i, t]),
                     float(p["advantages"][i, t]), float(p["returns"][i, t]),
                     float(p["old_values"][i, t]), float(values[i, t]), float(ent[i, t]))
                    for t in keep])
    return out, logp, ent, values


def _loop_agg(rows, per_token, mode, only=None):
    """Reference aggregation: VAPO eq. 7 (token-mean) or eq. 6 (seq-mean-token-mean)."""
    rows = [r for i, r in enumerate(rows) if only is None or only[i]]
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(per_token(tok) for r in rows for tok in r) / n
    seqs = [r for r in rows if r]
    return sum(sum(per_token(tok) for tok in r) / len(r) for r in seqs) / len(seqs)


def _loop_pg(tok, eps_low=0.2, eps_high=0.28, dual=None):
    logp, old, _, adv = tok[:4]
    ratio = math.exp(logp - old)
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
    loss = -min(ratio * adv, clipped * adv)
    if dual is not None and adv < 0:
        loss = min(loss, -dual * adv)
    return loss


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_actor_loss_matches_loop(mode, dual):
    p = make_problem(seed=1)
    rows, logp, ent, _ = _rows(p)
    counts = global_counts(p["response_mask"], p["is_positive"])
    mu, beta, c_ent = 0.1, 0.05, 0.01
    loss, m = actor_loss(logp, p["old_logprobs"], p["advantages"], p["response_mask"], counts,
                         eps_low=0.2, eps_high=0.28, loss_agg_mode=mode, dual_clip=dual,
                         is_positive=p["is_positive"], nll_coef=mu, ref_logprobs=p["ref_logprobs"],
                         kl_coef=beta, kl_estimator="k3", entropy=ent, entropy_coef=c_ent)
    pg = _loop_agg(rows, lambda t: _loop_pg(t, dual=dual), mode)
    nll = _loop_agg(rows, lambda t: -t[0], "token-mean", only=p["is_positive"].tolist())  # eq. 9
    kl = _loop_agg(rows, lambda t: math.exp(t[2] - t[0]) - (t[2] - t[0]) - 1, mode)
    entropy = _loop_agg(rows, lambda t: t[7], mode)
    want = pg + mu * nll + beta * kl - c_ent * entropy                                 # eq. 10
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(m["actor/pg_loss"]) == pytest.approx(pg, rel=1e-12)
    assert float(m["actor/nll_loss"]) == pytest.approx(nll, rel=1e-12)
    assert float(m["actor/kl_loss"]) == pytest.approx(kl, rel=1e-12)
    assert float(m["actor/entropy"]) == pytest.approx(_loop_agg(rows, lambda t: t[7], "token-mean"),
                                                      rel=1e-12)
    assert float(m["actor/approx_kl"]) == pytest.approx(
        _loop_agg(rows, lambda t: 0.5 * (t[0] - t[1]) ** 2, "token-mean"), rel=1e-12)
    low = _loop_agg(rows, lambda t: float(math.exp(t[0] - t[1]) < 0.8 and t[3] < 0), "token-mean")
    high = _loop_agg(rows, lambda t: float(math.exp(t[0] - t[1]) > 1.28 and t[3] > 0), "token-mean")
    assert float(m["actor/clip_low_frac"]) == pytest.approx(low, rel=1e-12)
    assert float(m["actor/clip_high_frac"]) == pytest.approx(high, rel=1e-12)


@pytest.mark.parametrize("value_clip", [None, 0.2])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_critic_loss_matches_loop(value_clip, mode):
    p = make_problem(seed=2)
    rows, _, _, values = _rows(p)
    counts = global_counts(p["response_mask"])
    loss, _ = critic_loss(values, p["old_values"], p["returns"], p["response_mask"], counts,
                          value_clip=value_clip, loss_agg_mode=mode)

    def per_token(t):
        ret, old_v, v = t[4], t[5], t[6]
        unclipped = 0.5 * (v - ret) ** 2
        if value_clip is None:
            return unclipped
        v_clip = old_v + min(max(v - old_v, -value_clip), value_clip)
        return max(unclipped, 0.5 * (v_clip - ret) ** 2)

    assert float(loss) == pytest.approx(_loop_agg(rows, per_token, mode), rel=1e-12)


def test_clip_higher_keeps_gradient_of_rising_low_probability_tokens():
    """ratio 1.25 with A > 0: clipped (no gradient) at eps_high=0.2, free at eps_high=0.28."""
    old = torch.zeros(1, 1, dtype=F64)
    adv = torch.ones(1, 1, dtype=F64)
    for eps_high, has_grad in [(0.2, False), (0.28, True)]:
        logp = torch.full((1, 1), math.log(1.25), dtype=F64, requires_grad=True)
        loss, ind = ppo_clip_loss(logp, old, adv, eps_low=0.2, eps_high=eps_high)
        loss.sum().backward()
        assert (logp.grad.abs().item() > 0) == has_grad
        assert ind["clip_high"].item() == (not has_grad)


def test_lower_clip_and_dual_clip():
    old = torch.zeros(1, 1, dtype=F64)
    neg = -torch.ones(1, 1, dtype=F64)
    # ratio 0.7 < 1 - eps_low with A < 0: clipped, loss = -(0.8 * A), no gradient
    logp = torch.full((1, 1), math.log(0.7), dtype=F64, requires_grad=True)
    loss, ind = ppo_clip_loss(logp, old, neg, eps_low=0.2, eps_high=0.2)
    loss.sum().backward()
    assert loss.item() == pytest.approx(0.8) and logp.grad.item() == 0 and ind["clip_low"].item() == 1
    # ratio 5 with A < 0: plain PPO loss 5, dual clip bounds it at c·|A| = 3 with no gradient
    logp = torch.full((1, 1), math.log(5.0), dtype=F64, requires_grad=True)
    plain, _ = ppo_clip_loss(logp, old, neg, eps_low=0.2, eps_high=0.2)
    dual, ind = ppo_clip_loss(logp, old, neg, eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    dual.sum().backward()
    assert plain.item() == pytest.approx(5.0) and dual.item() == pytest.approx(3.0)
    assert logp.grad.item() == 0 and ind["clip_dual"].item() == 1


def test_kl_estimators():
    g = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    logp, logq = torch.log_softmax(logits_p, 0), torch.log_softmax(logits_q, 0)
    exact = float((logp.exp() * (logp - logq)).sum())
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    k1 = kl_penalty(logp[samples], logq[samples], "k1")
    k3 = kl_penalty(logp[samples], logq[samples], "k3")
    assert (k3 >= 0).all()
    assert float(k1.mean()) == pytest.approx(exact, abs=0.02)
    assert float(k3.mean()) == pytest.approx(exact, abs=0.02)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, logq, "k2")


def test_missing_inputs_raise_clear_errors():
    p = make_problem()
    logp, _, _ = forward(p["x"], p["tokens"], p["w"], p["w_v"])
    counts = global_counts(p["response_mask"], p["is_positive"])
    common = (logp, p["old_logprobs"], p["advantages"], p["response_mask"], counts)
    with pytest.raises(ValueError, match="is_positive"):
        actor_loss(*common, eps_low=0.2, eps_high=0.2, loss_agg_mode="token-mean", nll_coef=0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        actor_loss(*common, eps_low=0.2, eps_high=0.2, loss_agg_mode="token-mean", kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        actor_loss(*common, eps_low=0.2, eps_high=0.2, loss_agg_mode="token-mean", entropy_coef=0.1)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        actor_loss(*common, eps_low=0.2, eps_high=0.2, loss_agg_mode="seq-sum")


def test_metric_accumulator_statistics_match_direct_computation():
    p = make_problem(seed=3)
    mask = p["response_mask"] > 0
    acc = MetricAccumulator()
    for i in range(0, 16, 4):
        rows = slice(i, i + 4)
        acc.add_stats("advantages", p["advantages"][rows], p["response_mask"][rows])
        acc.add_explained_variance("ev", p["old_values"][rows], p["returns"][rows],
                                   p["response_mask"][rows])
    out = acc.reduce()
    adv = p["advantages"][mask]
    assert out["advantages/mean"] == pytest.approx(float(adv.mean()), rel=1e-12)
    assert out["advantages/std"] == pytest.approx(float(adv.std(unbiased=False)), rel=1e-9)
    assert out["advantages/min"] == float(adv.min()) and out["advantages/max"] == float(adv.max())
    ret, val = p["returns"][mask], p["old_values"][mask]
    want = 1 - float((ret - val).var(unbiased=False) / ret.var(unbiased=False))
    assert out["ev"] == pytest.approx(want, rel=1e-9)
    perfect = MetricAccumulator()
    perfect.add_explained_variance("ev", p["returns"], p["returns"], p["response_mask"])
    assert perfect.reduce()["ev"] == pytest.approx(1.0)
    constant = MetricAccumulator()
    constant.add_explained_variance("ev", p["old_values"], torch.ones_like(p["returns"]),
                                    p["response_mask"])
    assert "ev" not in constant.reduce()                   # undefined when Var(R) = 0
