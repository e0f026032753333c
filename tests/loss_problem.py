"""A small float64 problem on which every loss term has a gradient: the loss-invariance tests' data.

Policy: logits = x @ W over a 7-token vocabulary; critic: values = x @ w_v. The batch has
variable lengths, an empty response, masked tokens inside responses, ratios far enough from 1
to hit every clip (low, high, dual) and a mix of positive and negative responses.
"""
from __future__ import annotations

import torch

from vcppo_megatron.algorithms.losses import GlobalCounts, actor_loss, critic_loss

F64 = torch.float64
FEATURES, VOCAB = 5, 7

# Each term switches on one part of the loss (pg is always there); "all" switches on everything.
TERMS: dict[str, dict] = {
    "pg_token_mean": dict(loss_agg_mode="token-mean"),
    "pg_seq_mean_token_mean": dict(loss_agg_mode="seq-mean-token-mean"),
    "pg_dual_clip": dict(loss_agg_mode="token-mean", dual_clip=3.0),
    "nll": dict(loss_agg_mode="token-mean", nll_coef=0.1),
    "kl_k1": dict(loss_agg_mode="token-mean", kl_coef=0.05, kl_estimator="k1"),
    "kl_k3": dict(loss_agg_mode="seq-mean-token-mean", kl_coef=0.05, kl_estimator="k3"),
    "entropy": dict(loss_agg_mode="token-mean", entropy_coef=0.01),
    "value": dict(critic=True),
    "value_clipped": dict(critic=True, value_clip=0.2),
    "value_seq_mean": dict(critic=True, loss_agg_mode="seq-mean-token-mean"),
    "all": dict(loss_agg_mode="seq-mean-token-mean", dual_clip=3.0, nll_coef=0.1, kl_coef=0.05,
                kl_estimator="k3", entropy_coef=0.01),
}


def make_problem(seed: int = 0, batch: int = 16, seq: int = 12) -> dict[str, torch.Tensor]:
    """Random inputs and the starting parameters (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, FEATURES, generator=g, dtype=F64)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=g)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[3] = 0                                    # an empty response
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(F64)
    mask[1, 2] = mask[5, 1] = mask[9, 4] = 0.0        # masked tokens inside responses
    w0 = 0.5 * torch.randn(FEATURES, VOCAB, generator=g, dtype=F64)
    wv0 = torch.randn(FEATURES, generator=g, dtype=F64)
    logp0, _, values0 = forward(x, tokens, w0, wv0)
    return dict(
        x=x, tokens=tokens, response_mask=mask, w=w0, w_v=wv0,
        old_logprobs=logp0 + 0.8 * torch.randn(batch, seq, generator=g, dtype=F64),
        ref_logprobs=logp0 + 0.3 * torch.randn(batch, seq, generator=g, dtype=F64),
        advantages=torch.randn(batch, seq, generator=g, dtype=F64),
        returns=torch.randn(batch, seq, generator=g, dtype=F64),
        old_values=values0 + 0.3 * torch.randn(batch, seq, generator=g, dtype=F64),
        is_positive=torch.rand(batch, generator=g) < 0.4,
    )


def forward(x, tokens, w, w_v):
    """Per-token log-probs of `tokens`, per-token entropy and values."""
    logits = x @ w
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, tokens[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy, x @ w_v


def term_loss(term: str, p: dict, rows: slice, counts: GlobalCounts, w, w_v):
    """The loss of `term` on the rows `rows` (one micro-batch) and its additive metrics."""
    kw = dict(TERMS[term])
    logprobs, entropy, values = forward(p["x"][rows], p["tokens"][rows], w, w_v)
    mask = p["response_mask"][rows]
    if kw.pop("critic", False):
        return critic_loss(values, p["old_values"][rows], p["returns"][rows], mask, counts, **kw)
    return actor_loss(logprobs, p["old_logprobs"][rows], p["advantages"][rows], mask, counts,
                      eps_low=0.2, eps_high=0.28, is_positive=p["is_positive"][rows],
                      ref_logprobs=p["ref_logprobs"][rows], entropy=entropy, **kw)


def grads_and_metrics(term: str, p: dict, rows: slice, counts: GlobalCounts,
                      num_micro_batches: int):
    """Gradient (w.r.t. W and w_v) and summed metrics of `rows` processed in micro-batches."""
    w = p["w"].clone().requires_grad_(True)
    w_v = p["w_v"].clone().requires_grad_(True)
    start, stop = rows.start, rows.stop
    size = (stop - start) // num_micro_batches
    metrics: dict[str, torch.Tensor] = {}
    for i in range(num_micro_batches):
        loss, m = term_loss(term, p, slice(start + i * size, start + (i + 1) * size), counts, w, w_v)
        loss.backward()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (w, w_v)]
    return torch.cat([g.flatten() for g in grads]), metrics


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))
