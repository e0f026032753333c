"""The critic starts from the policy (VC-PPO §3.2) without an HF directory: streamed from the actor's
weight-sync buckets on 4 gloo ranks (TP = 2 x PP = 2), each rank keeping only its stage's tensors.

Bit-exact against the former path (every rank cloned the whole HF state dict, then loaded it), and
the most held at once is one parameter's sources (this stage's largest: a layer's q / k / v or
gate / up), not the model; the bucket stream itself holds one bucket."""
from __future__ import annotations

import torch

from dist_utils import run_gloo
from model_fixtures import tiny_hf_model

BUCKET = 40_000                       # bytes: several buckets, the largest tensor (32 KiB) fits


def _worker(rank: int, world: int) -> None:
    from vcppo_megatron.checkpoint import hf_sources
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine, ValueEngine
    from vcppo_megatron.parallel.groups import build_role_groups
    from vcppo_megatron.platform import setup_device
    from vcppo_megatron.rollout.sync import SyncStats, hf_weight_buckets, iter_bucket_tensors

    setup_device()
    hf = tiny_hf_model("qwen2_untied")
    pgs, layout = build_role_groups(2, 2)
    actor = PolicyEngine(hf.config, pgs, layout, optim=OptimConfig(), attention_backend="sdpa")
    actor.load_hf_state(hf.state_dict())
    with torch.no_grad():                                    # an SFT-changed policy, not the HF one
        for p in actor.core.raw_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def stream(stats: SyncStats):
        return iter_bucket_tensors(hf_weight_buckets([actor.core.model], hf.config, bucket_bytes=BUCKET,
                                                     tp_group=pgs.tp, pp_group=pgs.pp, stats=stats))

    critics = []
    for _ in range(2):
        critic_pgs, _ = build_role_groups(2, 2)
        critics.append(ValueEngine(hf.config, critic_pgs, layout, optim=OptimConfig(), attention_backend="sdpa"))
    before, streamed = critics
    whole = {name: t.clone() for name, t in stream(SyncStats())}           # the former path
    before.load_hf_state(whole, init_from="policy")
    stats = SyncStats()
    info = streamed.load_hf_stream(stream(stats))
    a, b = before.core.raw_model.state_dict(), streamed.core.raw_model.state_dict()
    bad = [k for k in a if not k.endswith("_extra_state") and not torch.equal(a[k], b[k])]
    assert not bad, bad
    assert torch.equal(b["decoder.layers.0.mlp.linear_fc1.weight"],
                       actor.core.raw_model.state_dict()["decoder.layers.0.mlp.linear_fc1.weight"])
    # peak: one parameter's sources of this stage, far below the model
    layer = 1 if layout.pp_rank == 1 else 0
    per_param = [sum(whole[s].numel() * whole[s].element_size() for s in hf_sources(n, tie_word_embeddings=False))
                 for n in (f"decoder.layers.{layer}.self_attention.linear_qkv.weight",
                           f"decoder.layers.{layer}.mlp.linear_fc1.weight", "embedding.word_embeddings.weight")]
    model_bytes = sum(t.numel() * t.element_size() for t in whole.values())
    assert 0 < info["max_held_bytes"] <= max(per_param) < model_bytes / 4, (info, per_param, model_bytes)
    assert stats.num_buckets > 3 and stats.max_bucket_bytes <= BUCKET, stats
    if rank == 0:
        print(f"critic from policy, streamed: {info['params']} parameters on rank 0, at most "
              f"{info['max_held_bytes']} bytes held (model {model_bytes} bytes, {stats.num_buckets} buckets)")


def test_critic_streams_from_policy_buckets_bit_exact_at_tp2_pp2():
    run_gloo(_worker, 4)
