"""Data-parallel overlap options (parallel.overlap_grad_reduce / overlap_param_gather /
ddp_bucket_size / grad_reduce_in_fp32) on 2 gloo ranks (DP = 2), one spawn.

Three optimizer steps of a policy NLL loss, each rank its own rows: with both overlaps on and
small buckets (several reduce / gather buckets), every step's gradient (all-reduced over DP) and
grad norm, and the parameters after the last step, equal the non-overlapped run bit for bit (a sum
of two fp32 numbers does not depend on the bucketing). Between steps the overlapped model's
parameters are stale until gathered (the other rank's shard arrives in the next forward pass),
which `gather_params` (weight sync, checkpoints) resolves. grad_reduce_in_fp32=False keeps bf16
gradient buffers."""
from __future__ import annotations

import pytest
import torch

from ddp_overlap_steps import STEPS
from ddp_overlap_steps import train_steps as _run
from dist_utils import run_gloo
from model_fixtures import tiny_hf_model


def _worker(rank: int, world: int) -> None:
    from vcppo_megatron.platform import setup_device

    setup_device()
    hf = tiny_hf_model("qwen2_untied")
    ref_grads, ref_norms, ref_params, ref_steps, ref_buckets = _run(hf)
    grads, norms, params, steps, buckets = _run(hf, overlap_grad_reduce=True, overlap_param_gather=True,
                                                ddp_bucket_size=3000)
    assert ref_buckets == 1 and buckets > 2, (ref_buckets, buckets)
    for step, (ref, got) in enumerate(zip(ref_grads, grads)):
        bad = [n for n in ref if not torch.equal(ref[n], got[n])]
        assert not bad, (step, bad[:5])
    assert norms == pytest.approx(ref_norms, rel=1e-6, abs=0), (norms, ref_norms)
    assert torch.equal(params, ref_params)
    # before the gather the overlapped model holds the other rank's shard from before the step
    assert not torch.equal(steps[-1], ref_steps[-1]), "parameter gather was not deferred"
    # and the next forward pass gathered it: step 2's gradients above used whole parameters
    # grad_reduce_in_fp32=False: gradient buffers in the training dtype
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine
    from vcppo_megatron.parallel.groups import build_role_groups

    pgs, layout = build_role_groups(1, 1)
    for fp32, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        eng = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(), attention_backend="sdpa",
                           params_dtype=torch.bfloat16, grad_reduce_in_fp32=fp32)
        assert {g.dtype for g in eng.core.main_grads().values()} == {dtype}, fp32
    if rank == 0:
        print(f"overlap on {buckets} buckets: {STEPS} steps' gradients, grad norms {norms} and final "
              f"parameters equal to one non-overlapped bucket")


def test_overlapped_grad_reduce_and_param_gather_equal_the_plain_run():
    run_gloo(_worker, 2)


def test_param_gather_overlap_needs_grad_reduce_overlap():
    from dist_utils import one_gloo_rank
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine
    from vcppo_megatron.parallel.groups import build_role_groups

    with one_gloo_rank():
        pgs, layout = build_role_groups(1, 1)
        with pytest.raises(ValueError, match="overlap_param_gather=True needs parallel.overlap_grad_reduce=True"):
            PolicyEngine(tiny_hf_model("qwen2_untied").config, pgs, layout, optim=OptimConfig(),
                         attention_backend="sdpa", overlap_param_gather=True)
