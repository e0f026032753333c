"""PPO / VC-PPO / VAPO losses as pure torch functions.

Notation follows the papers: VC-PPO (arXiv 2503.01491) eq. 2 is the clipped surrogate; VAPO
(arXiv 2504.05118) eq. 6 the sequence-level and eq. 7 the token-level aggregation, eq. 8 the
clip-higher surrogate, eq. 9-10 the positive-example NLL loss.

Global normalisation. Every term is divided by counts of the *global* batch (all micro-batches
on all data-parallel ranks), computed once by `global_counts` and handed in. A micro-batch's loss
is therefore its share of the global loss: summing the losses (and gradients) of all micro-batches
and all data-parallel ranks gives exactly the loss (and gradient) of the global batch in one
piece. Engines must SUM gradients over micro-batches and data-parallel ranks, not average them.

Shapes: per-token tensors are [batch, T] over response tokens; `response_mask` is 1.0 on tokens
that count (0 on padding and on masked tool output); per-sequence tensors are [batch].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

LossAggMode = Literal["token-mean", "seq-mean-token-mean"]
KLEstimator = Literal["k1", "k3"]


@dataclass(frozen=True)
class GlobalCounts:
    """Normalisers of one global batch (all micro-batches on all data-parallel ranks)."""

    num_tokens: float
    """Valid response tokens (mask sum)."""
    num_seqs: float
    """Responses with at least one valid token."""
    num_positive_tokens: float
    """Valid tokens of responses with positive reward (VAPO eq. 9's Σ_{o∈T} |o|)."""


def global_counts(response_mask: Tensor, is_positive: Tensor | None = None,
                  group: dist.ProcessGroup | None = None) -> GlobalCounts:
    """Count the global batch: this rank's whole batch, summed over the data-parallel `group`.

    Call it once per mini-batch on the rank's full share of that mini-batch (before splitting into
    micro-batches); pass `group=None` when not distributed.
    """
    seq_len = response_mask.sum(-1, dtype=torch.float64)
    positive = torch.zeros_like(seq_len) if is_positive is None else is_positive.to(seq_len.dtype)
    local = torch.stack([seq_len.sum(), (seq_len > 0).to(seq_len.dtype).sum(),
                         (seq_len * positive).sum()])
    if group is not None:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    num_tokens, num_seqs, num_positive_tokens = (float(x) for x in local.tolist())
    return GlobalCounts(num_tokens, num_seqs, num_positive_tokens)


def aggregate(per_token: Tensor, response_mask: Tensor, mode: LossAggMode,
              counts: GlobalCounts) -> Tensor:
    """This micro-batch's share of the global mean of a per-token quantity."""
    masked = per_token * response_mask
    if mode == "token-mean":
        # VAPO eq. 7: every token of the global batch weighs 1 / Σ_i |o_i|
        return masked.sum() / max(counts.num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        # VAPO eq. 6: mean over tokens within a response, then mean over the G responses
        seq_len = response_mask.sum(-1)
        per_seq = masked.sum(-1) / seq_len.clamp(min=1)
        return per_seq.sum() / max(counts.num_seqs, 1.0)
    raise ValueError(f"loss_agg_mode = {mode!r}: expected 'token-mean' or 'seq-mean-token-mean'")


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, *,
                  eps_low: float, eps_high: float,
                  dual_clip: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss (VAPO eq. 8, optional dual clip) and clip indicators."""
    ratio = torch.exp(logprobs - old_logprobs)                      # r_t(θ), VC-PPO eq. 2
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)                        # -min(r·A, clip(r)·A)
    indicators = {
        "clip_low": ((ratio < 1.0 - eps_low) & (advantages < 0)).to(logprobs.dtype),
        "clip_high": ((ratio > 1.0 + eps_high) & (advantages > 0)).to(logprobs.dtype),
    }
    if dual_clip is not None:
        # dual clip: for A < 0 the loss is bounded by -c·A, so huge ratios cannot blow it up
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        indicators["clip_dual"] = dual.to(logprobs.dtype)
    return loss, indicators


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *,
               value_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-token 0.5·(V - R)², with optional clipping of V to old ± value_clip; and the clip indicator."""
    loss = 0.5 * (values - returns) ** 2
    if value_clip is None:
        return loss, torch.zeros_like(loss)
    values_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    loss_clipped = 0.5 * (values_clipped - returns) ** 2
    return torch.maximum(loss, loss_clipped), (loss_clipped > loss).to(values.dtype)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π: k1 or k3."""
    log_ratio = logprobs - ref_logprobs                             # log π/π_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0              # ≥ 0, unbiased
    raise ValueError(f"kl_estimator = {estimator!r}: expected 'k1' or 'k3'")


def actor_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
               counts: GlobalCounts, *, eps_low: float, eps_high: float,
               loss_agg_mode: LossAggMode, dual_clip: float | None = None,
               is_positive: Tensor | None = None, nll_coef: float = 0.0,
               ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
               kl_estimator: KLEstimator = "k3", entropy: Tensor | None = None,
               entropy_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss of one micro-batch: PPO surrogate + μ·NLL + β·KL - entropy bonus.

    Returns the micro-batch's share of the global loss and additive metrics (each a share of its
    global mean; sum them over micro-batches and ranks).
    """
    mask = response_mask.to(logprobs.dtype)
    pg, indicators = ppo_clip_loss(logprobs, old_logprobs, advantages,
                                   eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    pg_loss = aggregate(pg, mask, loss_agg_mode, counts)            # VAPO eq. 6 / 7 / 8
    total = pg_loss
    token_mean = lambda x: aggregate(x.detach(), mask, "token-mean", counts)  # noqa: E731
    metrics = {"actor/pg_loss": pg_loss.detach(),
               "actor/approx_kl": token_mean(0.5 * (logprobs - old_logprobs) ** 2),
               **{f"actor/{k}_frac": token_mean(v) for k, v in indicators.items()}}
    if nll_coef > 0:
        if is_positive is None:
            raise ValueError("nll_coef > 0 needs is_positive (which responses have reward > 0)")
        # VAPO eq. 9: mean NLL over the tokens of correct responses, globally normalised
        positive_mask = mask * is_positive.to(mask.dtype)[:, None]
        nll = (-logprobs * positive_mask).sum() / max(counts.num_positive_tokens, 1.0)
        total = total + nll_coef * nll                              # VAPO eq. 10
        metrics["actor/nll_loss"] = nll.detach()
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs (the reference policy's log-probs)")
        kl = aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, loss_agg_mode, counts)
        total = total + kl_coef * kl                                # β·KL, VC-PPO eq. 1
        metrics["actor/kl_loss"] = kl.detach()
    if entropy is not None:
        ent = aggregate(entropy, mask, loss_agg_mode, counts)
        if entropy_coef > 0:
            total = total - entropy_coef * ent
        metrics["actor/entropy"] = token_mean(entropy)
    elif entropy_coef > 0:
        raise ValueError("entropy_coef > 0 needs the per-token entropy")
    metrics["actor/loss"] = total.detach()
    return total, metrics


def critic_loss(values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor,
                counts: GlobalCounts, *, value_clip: float | None = None,
                loss_agg_mode: LossAggMode = "token-mean") -> tuple[Tensor, dict[str, Tensor]]:
    """The value loss of one micro-batch (its share of the global loss) and additive metrics."""
    mask = response_mask.to(values.dtype)
    per_token, clipped = value_loss(values, old_values, returns, value_clip=value_clip)
    loss = aggregate(per_token, mask, loss_agg_mode, counts)
    metrics = {"critic/value_loss": loss.detach(),
               "critic/value_clip_frac": aggregate(clipped, mask, "token-mean", counts)}
    return loss, metrics
