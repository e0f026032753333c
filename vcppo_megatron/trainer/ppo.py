"""PPO updates on the Megatron engines: loss closures over the experience layout, epochs x mini-batches.

Global loss normalisation (docs/ARCHITECTURE.md): for each mini-batch the token / sequence counts
of the whole mini-batch over all data-parallel ranks are computed once (`global_counts`), every
micro-batch's loss is its share of the global loss, and the engines sum gradients over
micro-batches and ranks. Logged loss metrics are means over the step's optimizer steps.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vcppo_megatron.algorithms.losses import (
    GlobalCounts,
    actor_loss,
    critic_loss,
    global_counts,
)
from vcppo_megatron.config.schema import AlgoConfig
from vcppo_megatron.engines.core import LossFn
from vcppo_megatron.trainer.experience import values_of_tokens


def actor_loss_fn(algo: AlgoConfig, counts: GlobalCounts) -> LossFn:
    """Policy loss of a micro-batch (VAPO eq. 6-10 per `algo`) from the engine's per-token outputs."""

    def loss_fn(outs: dict[str, Tensor], mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return actor_loss(outs["log_probs"], mb["old_log_probs"], mb["advantages"], mb["loss_mask"],
                          counts, eps_low=algo.eps_low, eps_high=algo.eps_high,
                          loss_agg_mode=algo.loss_agg_mode, dual_clip=algo.dual_clip,
                          is_positive=mb["is_positive"], nll_coef=algo.nll_coef,
                          entropy=outs["entropy"], entropy_coef=algo.entropy_coef)

    return loss_fn


def critic_loss_fn(algo: AlgoConfig, counts: GlobalCounts) -> LossFn:
    """Value loss of a micro-batch: V(s_t) of each response token against its return, aggregated by
    `algo.critic_loss_agg_mode` (token mean by default: VC-PPO Alg. 1 regresses every state alike)."""

    def loss_fn(outs: dict[str, Tensor], mb: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return critic_loss(values_of_tokens(outs["values"]), mb["old_values"], mb["returns"],
                           mb["loss_mask"], counts, value_clip=algo.value_clip,
                           loss_agg_mode=algo.critic_loss_agg_mode)

    return loss_fn


@dataclass
class UpdateResult:
    """Metrics of one role's update over a step: loss shares averaged over optimizer steps."""

    shares: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    lr: float = 0.0
    optimizer_steps: int = 0


def ppo_update(engine: Any, batch: dict[str, Tensor], make_loss_fn: Callable[[GlobalCounts], LossFn], *,
               epochs: int, mini_batches: int, generator: torch.Generator,
               dp_group: dist.ProcessGroup | None) -> UpdateResult:
    """`epochs` passes over this replica's rows in `mini_batches` shuffled mini-batches, one
    optimizer step each. `batch` holds input_ids, attention_mask, loss_mask and the loss inputs, on
    the engine's device: mini-batches are cut there (the shuffle, drawn from the host `generator`,
    goes over once per epoch) and no per-token output is kept."""
    n = batch["input_ids"].shape[0]
    if n % mini_batches:
        raise ValueError(f"{n} rows on this data-parallel rank: expected a multiple of the "
                         f"{mini_batches} mini-batches per step")
    per = n // mini_batches
    total = epochs * mini_batches
    shares: dict[str, Tensor] = {}
    norms: list[float] = []
    lr = 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(batch["input_ids"].device)
        for k in range(mini_batches):
            rows = order[k * per:(k + 1) * per]
            mb = {key: t[rows] for key, t in batch.items()}
            counts = global_counts(mb["loss_mask"], mb["is_positive"], group=dp_group)
            engine.zero_grad()
            with engine.train_mode():
                out = engine.forward_backward(mb, make_loss_fn(counts), return_outputs=False)
            stats = engine.step()
            for name, value in out["metrics"].items():
                shares[name] = shares.get(name, 0.0) + value.detach().double() / total
            norms.append(stats["grad_norm"])
            lr = stats["lr"]
    return UpdateResult(shares={k: float(v) for k, v in shares.items()},
                        grad_norm=sum(norms) / len(norms), lr=lr, optimizer_steps=total)
