"""The CUDA paths of the engines and of the weight sync's Megatron side, on one GPU (`gpu` marker:
CI has none; tools/gpu_checks.sh runs these on the H100 with the benchmarks).

- The policy engine on CUDA (local spec, SDPA attention; TF32 off) gives HF's log-probs, entropy
  and gradients within 1e-5 for a batch handed over on the host, in several micro-batches.
- offload() moves the bf16 optimizer's fp32 state to host memory (CUDA memory falls by about
  12 bytes per parameter) and training afterwards equals a run that never offloaded, bit for bit.
- The weight sync's buckets, gathered from the CUDA model, equal the HF state dict exactly.
- The colocation hand-over with real bf16 actor and critic engines (vLLM played by a stand-in: the
  GPU machine has no vLLM): in every phase of the memory timeline the CUDA memory they hold equals
  the timeline's resident parts, priced from the engines' own tensors.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import _free_port
from model_fixtures import tiny_hf_model
from test_engines import _batch, _hf_per_token, _loss, _train_steps, part_bytes
from vcppo_megatron.config.schema import OptimConfig
from vcppo_megatron.engines import PolicyEngine

pytestmark = pytest.mark.gpu
TOL = 1e-5


@pytest.fixture(scope="module")
def cuda_role():
    """A one-rank world on GPU 0 (nccl for CUDA tensors, gloo for host ones) and its groups."""
    from vcppo_megatron.parallel.groups import build_role_groups
    from vcppo_megatron.parallel.launch import GPU_BACKEND

    torch.cuda.set_device(0)
    dist.init_process_group(GPU_BACKEND, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield build_role_groups(1, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
        dist.destroy_process_group()


def _cuda_policy(role, hf, **kw) -> PolicyEngine:
    pgs, layout = role
    eng = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(lr=1e-3), logprob_chunk_size=8,
                       attention_backend="auto", **kw)
    eng.load_hf_state({k: v.cuda() for k, v in hf.state_dict().items()})
    return eng


def test_policy_on_cuda_matches_hf(cuda_role):
    hf = tiny_hf_model("qwen2_tied")
    batch = _batch()                                          # host tensors, as the trainer passes
    eng = _cuda_policy(cuda_role, hf, max_tokens_per_micro_batch=16)
    assert eng.core.device.type == "cuda"
    with eng.eval_mode():
        out = eng.forward_backward(batch, None, forward_only=True)
    assert out["num_micro_batches"] >= 3
    lp, ent = out["outputs"]["log_probs"], out["outputs"]["entropy"]
    assert lp.device.type == "cpu"
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


class _SleepyVLLM:
    """A rollout engine that sleeps and wakes (no GPU memory of its own here)."""

    def sleep(self, level: int = 1) -> bool:
        return True

    def wake_up(self, tags=None) -> bool:
        return True


def test_colocation_on_cuda_frees_what_the_timeline_says(cuda_role):
    from vcppo_megatron.engines import ValueEngine
    from vcppo_megatron.parallel.memory_timeline import ENGINE_PARTS, ROLES, Timeline
    from vcppo_megatron.trainer.colocation import Colocation

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)                          # ~9M parameters: ~100 MB of optimizer state to move
    hf = Qwen2ForCausalLM(Qwen2Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      architectures=["Qwen2ForCausalLM"])).float().eval()
    pgs, layout = cuda_role
    critic = ValueEngine(hf.config, pgs, layout, optim=OptimConfig(lr=1e-3), params_dtype=torch.bfloat16)
    critic.load_hf_state({k: v.cuda() for k, v in hf.state_dict().items()}, init_from="policy")
    engines = {"actor": _cuda_policy(cuda_role, hf, params_dtype=torch.bfloat16), "critic": critic}
    for eng in engines.values():                  # one step: Adam's moments exist
        eng.zero_grad()
        with eng.train_mode():
            eng.forward_backward(_batch(), lambda o, mb: (sum(v.float().sum() for v in o.values()) * 0.0, {}))
        eng.step()
    sizes = {f"{r}.{p}": b for r in ROLES for p, b in part_bytes(engines[r]).items()}
    timeline = Timeline(sleep_level=2, offload=True, optimizer_to_host=(True, True))
    col = Colocation(timeline, engines)

    def held() -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    base = held() - sum(sizes.values())           # everything resident at load
    seen = {}

    def check(phase: str) -> None:
        want = base + sum(sizes[p] for p in timeline.resident(phase) if p in sizes)
        seen[phase] = held()
        assert abs(seen[phase] - want) <= 0.005 * sum(sizes.values()) + (64 << 10), (phase, seen[phase], want)

    col.start_rollout(_SleepyVLLM)
    check("startup")
    col.sync(lambda: check("startup") or 0.0)
    check("rollout")
    col.after_rollout(weights_change=True)
    check("experience")
    for role in ROLES:
        col.updating(role)
        check(f"{role}_update")
    col.sync(lambda: check("sync") or 0.0)
    check("rollout")
    released = sum(sizes[f"{r}.{p}"] for r in ROLES for p in ENGINE_PARTS if p != "weights")
    print(f"colocation on CUDA: {released / 2**20:.2f} MiB of gradients and optimizer state released "
          f"outside the updates; held per phase (MiB): "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in seen.items()))
