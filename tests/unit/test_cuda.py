"""The CUDA paths of the engines and of the weight sync's Megatron side, on one GPU (`gpu` marker:
CI has none; tools/gpu_checks.sh runs these on the H100 with the benchmarks).

- The policy engine on CUDA (local spec, SDPA attention; TF32 off) gives HF's log-probs, entropy
  and gradients within 1e-5 for a batch handed over on the host, in several micro-batches.
- offload() moves the bf16 optimizer's fp32 state to host memory (CUDA memory falls by about
  12 bytes per parameter) and training afterwards equals a run that never offloaded, bit for bit.
- The weight sync's buckets, gathered from the CUDA model, equal the HF state dict exactly.
The issue-14 checks are in test_cuda_*.py (one file per group of items, one step each in
tools/gpu_checks.sh); the shared set-up is tests/cuda_utils.py.
"""
from __future__ import annotations

import pytest
import torch

from cuda_utils import cuda_policy as _cuda_policy
from cuda_utils import cuda_role  # noqa: F401  (fixture)
from model_fixtures import tiny_hf_model
from test_engines import _batch, _hf_per_token, _loss, _train_steps

pytestmark = pytest.mark.gpu
TOL = 1e-5


def test_policy_on_cuda_matches_hf(cuda_role):
    hf = tiny_hf_model("qwen2_tied")
    batch = _batch()                                          # host tensors, as the trainer passes
    eng = _cuda_policy(cuda_role, hf, max_tokens_per_micro_batch=16)
    assert eng.core.device.type == "cuda"
    with eng.eval_mode():
        out = eng.forward_backward(batch, None, forward_only=True)
    assert out["num_micro_batches"] >= 3
    lp, ent = out["outputs"]["log_probs"], out["outputs"]["entropy"]
    assert lp.device.type == ent.device.type == "cuda"         # outputs stay on the device (issue 14, 13)
    lp, ent = lp.cpu(), ent.cpu()
    ref_lp, ref_ent = _hf_per_token(hf, batch)                # HF in fp32 on the CPU
    valid = batch["attention_mask"].bool()
    d_lp, d_ent = float((lp - ref_lp)[valid].abs().max()), float((ent - ref_ent)[valid].abs().max())
    hf.zero_grad()
    _loss(ref_lp, ref_ent, batch).backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters() if k != "lm_head.weight"}
    ref_grads = eng.core.hf_full_state(hf_grads, tie_word_embeddings=True)
    eng.zero_grad()
    with eng.train_mode():
        eng.forward_backward(batch, lambda o, mb: (_loss(o["log_probs"], o["entropy"], mb), {}))
    got = eng.core.main_grads()
    d_grad = max(float((got[k].cpu() - ref_grads[k]).abs().max()) for k in got)
    print(f"CUDA: |logp - HF| {d_lp:.2e}  |H - HF| {d_ent:.2e}  |grad - HF| {d_grad:.2e}")
    assert max(d_lp, d_ent, d_grad) <= TOL
    assert eng.step()["stepped"]


def test_offload_moves_optimizer_state_to_host_on_cuda(cuda_role):
    hf = tiny_hf_model("qwen2_tied")
    kw = dict(params_dtype=torch.bfloat16)
    plain, offloaded = _cuda_policy(cuda_role, hf, **kw), _cuda_policy(cuda_role, hf, **kw)
    _train_steps(plain, offload_between=False)
    _train_steps(offloaded, offload_between=True)
    for (name, a), (_, b) in zip(plain.core.raw_model.named_parameters(),
                                 offloaded.core.raw_model.named_parameters()):
        assert torch.equal(a, b), name
    params = sum(p.numel() for p in offloaded.core.raw_model.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    offloaded.offload()
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    # fp32 master weights + two Adam moments (12 B / param) plus the fp32 gradient buffer (4 B)
    print(f"offload freed {freed / 2**20:.2f} MiB for {params} parameters")
    assert freed >= 0.9 * 16 * params, (freed, params)
    offloaded.onload()
    assert torch.cuda.memory_allocated() >= before - 0.1 * 16 * params


def test_sync_buckets_from_cuda_model_equal_hf_state_dict(cuda_role):
    from vcppo_megatron.rollout.sync import hf_weight_buckets

    pgs, _ = cuda_role
    hf = tiny_hf_model("qwen2_untied")
    eng = _cuda_policy(cuda_role, hf)
    got = {n: t for b in hf_weight_buckets(eng.core.model, hf.config, bucket_bytes=1 << 16,
                                           tp_group=pgs.tp, pp_group=pgs.pp) for n, t in b}
    ref = hf.state_dict()
    assert sorted(got) == sorted(ref)
    for name, t in got.items():
        assert t.device.type == "cuda" and torch.equal(t.cpu(), ref[name]), name
