"""Issue 14, item 15 on one GPU: megatron DDP's overlapped gradient reduce and parameter gather on
NCCL (one rank; CUDA streams and asynchronous NCCL collectives, which the 2-rank gloo test in
tests/distributed/test_ddp_overlap.py cannot exercise) give the plain run's gradients, grad norms
and parameters: three optimizer steps, fp32 and bf16 weights, several buckets."""
from __future__ import annotations

import pytest
import torch

from cuda_utils import cuda_role  # noqa: F401  (fixture)
from ddp_overlap_steps import train_steps
from model_fixtures import tiny_hf_model

pytestmark = pytest.mark.gpu
OVERLAP = dict(overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=3000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_overlapped_ddp_on_nccl_equals_the_plain_run(cuda_role, dtype):
    hf = tiny_hf_model("qwen2_untied")
    ref_grads, ref_norms, ref_params, _, ref_buckets = train_steps(hf, params_dtype=dtype)
    grads, norms, params, _, buckets = train_steps(hf, params_dtype=dtype, **OVERLAP)
    assert ref_buckets == 1 and buckets > 2, (ref_buckets, buckets)
    assert params.is_cuda and all(g.is_cuda for g in grads[0].values())
    for step, (ref, got) in enumerate(zip(ref_grads, grads)):
        bad = [n for n in ref if not torch.equal(ref[n], got[n])]
        assert not bad, (step, bad[:5])
    assert norms == pytest.approx(ref_norms, rel=1e-6, abs=0), (norms, ref_norms)
    assert torch.equal(params, ref_params)
    assert all(float(g.abs().sum()) > 0 for g in ref_grads[0].values()), "a gradient that is zero proves nothing"
    print(f"{dtype}: overlap on {buckets} buckets on NCCL: {len(grads)} steps' gradients, grad norms {norms} "
          f"and final parameters equal to one non-overlapped bucket")
