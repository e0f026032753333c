"""Issue 14, item 6 on one GPU: a pipeline stage after the first lives and computes on the GPU.

The last of two stages (layer 1 of 2, the final norm and the output layer: no embedding) is built
for the policy and for the critic exactly as the trainer builds it (real DDP, distributed
optimizer, scheduler and P2P communicator; no stubs: tests/unit/test_engine_device.py does this
on CPU with a stand-in device and stubs). Every parameter, buffer, DDP buffer and optimizer
tensor (after an optimizer step) must be on cuda:0, the device the engine sends micro-batches to.
One rank cannot run a 2-stage schedule, so the stage is given what stage 0 would send it: HF's
hidden state after layer 0, on the device; its log-probs / entropy (policy) and values (critic,
head from a reward model's score) must equal HF's within 1e-5 (TF32 off).
"""
from __future__ import annotations

import pytest
import torch

from cuda_utils import cuda_role, cuda_tensors_of  # noqa: F401  (fixture)
from model_fixtures import tiny_hf_model
from test_engines import _batch, _hf_per_token

pytestmark = pytest.mark.gpu
TOL = 1e-5


def check_last_stage(role, device: torch.device) -> dict[str, float]:
    """Build the last of 2 pipeline stages of both roles on this rank and check where they live and
    what they compute against HF; return the largest differences."""
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import PolicyEngine, ValueEngine
    from vcppo_megatron.parallel.groups import RoleLayout

    pgs, _ = role
    stage = RoleLayout(tp=1, pp=2, dp=1, tp_rank=0, pp_rank=1, dp_rank=0)
    hf = tiny_hf_model("qwen2_untied")
    batch = _batch()
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    score = torch.randn(1, hf.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    assert len(hidden) == hf.config.num_hidden_layers + 1          # embeddings, layer 0, final norm(layer 1)
    ref_lp, ref_ent = _hf_per_token(hf, batch)
    ref_values = (hidden[-1] @ score.t())[..., 0]
    policy = PolicyEngine(hf.config, pgs, stage, optim=OptimConfig(lr=1e-3), attention_backend="sdpa",
                          logprob_chunk_size=5)
    policy.load_hf_state(hf.state_dict())
    critic = ValueEngine(hf.config, pgs, stage, optim=OptimConfig(lr=1e-3), attention_backend="sdpa")
    critic.load_hf_state({**hf.state_dict(), "score.weight": score}, init_from="reward_model")
    # what stage 0 sends: [s, b, h] on the device; the micro-batch there too
    x = hidden[1].transpose(0, 1).contiguous().to(device)
    mb = {"input_ids": ids.to(device)}
    pos = torch.arange(ids.shape[1], device=device)[None].expand_as(mb["input_ids"])
    outs = {}
    for eng in (policy, critic):
        names = {n for n, _ in eng.core.raw_model.named_parameters()}
        assert not any(n.startswith("embedding.") for n in names), "a stage after the first has no embedding"
        assert {"decoder.final_layernorm.weight", "output_layer.weight"} <= names, sorted(names)
        assert eng.core.device == device
        with eng.eval_mode():
            eng.core.raw_model.set_input_tensor(x)
            outs.update(eng._head(eng.core.raw_model(mb["input_ids"], pos, None), mb))
        assert all(v.device == device for v in outs.values())
        eng.zero_grad()
        assert eng.step()["stepped"]                                  # the optimizer's state exists now
        stray = {k: d for k, d in cuda_tensors_of(eng).items() if d != device}
        assert not stray, stray
        assert any(k.startswith("optimizer") and "state" in k for k in cuda_tensors_of(eng))
    diffs = {name: float((outs[name].cpu() - ref)[valid].abs().max())
             for name, ref in (("log_probs", ref_lp), ("entropy", ref_ent), ("values", ref_values))}
    return diffs


def test_last_pipeline_stage_lives_and_computes_on_the_gpu(cuda_role):
    diffs = check_last_stage(cuda_role, torch.device("cuda", 0))
    print("last of 2 stages on CUDA, |x - HF|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
