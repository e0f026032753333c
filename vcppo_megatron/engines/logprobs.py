"""Vocab-parallel, token-chunked log-probs and entropy from last hidden states.

The output projection, log-softmax and entropy run per chunk of `chunk_size` tokens inside one
autograd Function: the fp32 logits of a chunk, [chunk_size, vocab / tp], are the largest
temporary, forward and backward (the backward recomputes them). Logits are sharded over the
tensor-parallel group: max, sum-exp, target logit and Σ p·z are all-reduced over it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(t: Tensor, group: Optional[dist.ProcessGroup], op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce over the TP group (skipped for a single rank)."""
    if group is not None and group.size() > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_stats(h: Tensor, weight: Tensor, targets: Tensor, vocab_start: int,
                 group: Optional[dist.ProcessGroup]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp32 local logits z [c, v_local], global log Z [c], target logit [c], Σ p·z [c]."""
    z = (h @ weight.t()).to(torch.promote_types(h.dtype, torch.float32))
    m = z.max(dim=-1).values
    _all_reduce(m, group, dist.ReduceOp.MAX)
    e = torch.sub(z, m[:, None]).exp_()
    sums = torch.stack([e.sum(-1), torch.linalg.vecdot(e, z)])             # [2, c]
    del e
    local = targets - vocab_start
    inside = (local >= 0) & (local < z.shape[1])
    z_t = torch.where(inside, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0],
                      torch.zeros_like(m))
    both = torch.cat([sums, z_t[None]])                                    # one all-reduce
    _all_reduce(both, group)
    sum_e, sum_ez, z_t = both
    log_z = m + torch.log(sum_e)
    return z, log_z, z_t, sum_ez / sum_e


class _ChunkedLogProbs(torch.autograd.Function):
    """hidden [t, h] x weight shard [v_local, h] -> (log p(target) [t], entropy [t]), fp32 or wider."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int,
                vocab_start: int, group: Optional[dist.ProcessGroup]) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        ent = torch.empty_like(logp)
        log_z_all = torch.empty_like(logp)
        for s in range(0, n, chunk_size):
            sl = slice(s, min(s + chunk_size, n))
            _, log_z, z_t, mean_z = _chunk_stats(hidden[sl], weight, targets[sl], vocab_start, group)
            logp[sl] = z_t - log_z
            ent[sl] = log_z - mean_z                                       # H = log Z - Σ p·z
            log_z_all[sl] = log_z
        ctx.save_for_backward(hidden, weight, targets, log_z_all, ent)
        ctx.chunk_size, ctx.vocab_start, ctx.group = chunk_size, vocab_start, group
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor, g_ent: Tensor):
        hidden, weight, targets, log_z_all, ent = ctx.saved_tensors
        n, v_local = hidden.shape[0], weight.shape[0]
        g_hidden = torch.zeros_like(hidden)
        acc = torch.promote_types(hidden.dtype, torch.float32)            # fp32 or wider
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for s in range(0, n, ctx.chunk_size):
            sl = slice(s, min(s + ctx.chunk_size, n))
            h = hidden[sl]
            # two [chunk, v_local] buffers: log p (reused in place for dz) and p
            logp_all = (h @ weight.t()).to(acc).sub_(log_z_all[sl, None])
            p = torch.exp(logp_all)
            # d logp_t / dz_j = 1[j = t] - p_j ;  dH / dz_j = -p_j (log p_j + H)
            dz = logp_all.add_(ent[sl, None]).mul_(g_ent[sl, None]).add_(g_logp[sl, None]).mul_(p).neg_()
            del p
            local = targets[sl] - ctx.vocab_start
            inside = (local >= 0) & (local < v_local)
            # + g_logp at each row's target column when this shard holds it (no host sync)
            g_target = torch.where(inside, g_logp[sl].to(dz.dtype), 0.0)
            dz.scatter_add_(1, local.clamp(0, v_local - 1)[:, None], g_target[:, None])
            dz = dz.to(hidden.dtype)
            g_hidden[sl] = dz @ weight
            g_weight += (dz.t() @ h).to(acc)
        _all_reduce(g_hidden, ctx.group)       # hidden is replicated over TP: sum its partial grads
        return g_hidden, g_weight.to(weight.dtype), None, None, None, None


def vocab_parallel_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int,
                            tp_group: Optional[dist.ProcessGroup] = None) -> tuple[Tensor, Tensor]:
    """Per-token log p(target) and entropy (fp32, shape of `targets`) from hidden [..., h].

    `weight` is this TP rank's vocab shard [vocab / tp, h] (rank r holds rows r·v..(r+1)·v);
    gradients flow to `hidden` and `weight` through both outputs.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}, expected >= 1")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)}: "
                         "expected hidden = targets.shape + (hidden_size,)")
    tp_rank = 0 if tp_group is None else tp_group.rank()
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    logp, ent = _ChunkedLogProbs.apply(flat_h, weight, targets.reshape(-1), chunk_size,
                                       tp_rank * weight.shape[0], tp_group)
    return logp.view(targets.shape), ent.view(targets.shape)
