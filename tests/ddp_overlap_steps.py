"""A few optimizer steps of a policy NLL loss through megatron DDP, with or without the overlap
options: the run that tests/distributed/test_ddp_overlap.py (2 gloo ranks) and
tests/unit/test_cuda_overlap.py (1 NCCL rank on a GPU) compare, overlapped against plain."""
from __future__ import annotations

from typing import Any

import torch

from model_fixtures import VOCAB

STEPS, ROWS, SEQ = 3, 4, 10


def step_batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    """This rank's rows for `step` (host tensors, as the trainer hands them over)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (ROWS,), generator=g)
    mask = (torch.arange(SEQ)[None] < lengths[:, None])
    return {"input_ids": ids, "attention_mask": mask.long(), "loss_mask": mask.float()}


def train_steps(hf: Any, **options: Any) -> tuple[list[dict[str, torch.Tensor]], list[float], torch.Tensor,
                                                   list[torch.Tensor], int]:
    """(per-step gradients, grad norms, params after the last step, params seen after each step
    before any gather, number of DDP bucket groups) of STEPS steps on this rank's rows."""
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine
    from vcppo_megatron.parallel.groups import build_role_groups

    pgs, layout = build_role_groups(1, 1)
    # no clipping: the clip factor depends on the grad norm, a sum over shards whose order follows
    # the bucketing; Adam itself is elementwise, so the steps are then bit-identical
    policy = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(lr=1e-2, grad_clip=0.0),
                          attention_backend="sdpa",
                          max_tokens_per_micro_batch=2 * SEQ, **options)
    policy.load_hf_state(hf.state_dict())
    core = policy.core
    core.model.force_all_reduce = True            # whole gradients on every rank, to compare them
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    grads, norms, stale = [], [], []
    for step in range(STEPS):
        batch = step_batch(rank, step)
        total = float(batch["loss_mask"].sum()) * world

        def loss_fn(o, mb, total=total):
            return -(o["log_probs"] * mb["loss_mask"]).sum() / total, {}

        policy.zero_grad()
        with policy.train_mode():
            policy.forward_backward(batch, loss_fn, full_grads=True)
        grads.append({n: g.clone() for n, g in core.main_grads().items()})
        norms.append(policy.step()["grad_norm"])
        stale.append(torch.cat([p.detach().flatten().clone() for p in core.raw_model.parameters()]))
    core.gather_params()
    params = torch.cat([p.detach().flatten() for p in core.raw_model.parameters()])
    return grads, norms, params, stale, len(core.model.bucket_groups)
