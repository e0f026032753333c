"""The trainer's checkpoint pair (trainer/checkpointing.py) on one gloo rank with tiny engines.

- save writes the actor (with its HF files) and the critic, and retention keeps the newest
  `keep_last_checkpoints` plus the end of value pretraining;
- resume loads the newest pair and returns its training state;
- `trainer.value_checkpoint` (load_value) puts the chosen checkpoint's weights into the critic
  and into its optimizer's fp32 main copy: a bf16 critic's next step starts from the loaded
  weights, not from the ones the load replaced;
- without a critic (GRPO) the actor's checkpoints carry the state.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_utils import one_gloo_rank
from model_fixtures import tiny_hf_model
from vcppo_megatron.checkpoint.dist import step_dir_name
from vcppo_megatron.config import load_config
from vcppo_megatron.config.schema import OptimConfig
from vcppo_megatron.engines import PolicyEngine, ValueEngine
from vcppo_megatron.trainer.checkpointing import RunCheckpoints
from vcppo_megatron.trainer.setup import read_hf_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(actor fp32, critic bf16, process groups, HF model dir) on a 1-rank gloo world."""
    from vcppo_megatron.parallel.groups import build_role_groups

    with one_gloo_rank():
        pgs, layout = build_role_groups(1, 1)
        hf = tiny_hf_model("qwen2_untied")
        model_dir = tmp_path_factory.mktemp("hf")
        hf.save_pretrained(model_dir)
        config = read_hf_config(model_dir)             # as the trainer builds its engines
        actor = PolicyEngine(config, pgs, layout, optim=OptimConfig(lr=1e-3), attention_backend="sdpa")
        actor.load_hf_state(hf.state_dict())
        critic = ValueEngine(config, pgs, layout, optim=OptimConfig(lr=1e-3, weight_decay=0.0),
                             attention_backend="sdpa", params_dtype=torch.bfloat16)
        critic.load_hf_state(hf.state_dict(), init_from="policy")
        yield actor, critic, pgs, model_dir, config


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 50, (3, 8), generator=g), "attention_mask": torch.ones(3, 8, dtype=torch.long)}


def _critic_step(critic, scale: float, seed: int) -> None:
    """One optimizer step on the values (scale 0: zero gradients, Adam leaves the weights alone)."""
    critic.zero_grad()
    with critic.train_mode():
        critic.forward_backward(_batch(seed), lambda o, mb: ((o["values"] * scale).square().mean() + 0 * o["values"].sum(), {}))
    critic.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in engine.core.raw_model.named_parameters()}


def _state(phase: str, step: int, actor_step: int) -> dict:
    return {"phase": phase, "phase_step": step, "actor_step": actor_step, "ev_best": None, "ev_since": 0, "data": {},
            "summary": {}, "global_step": step}


def test_save_prune_resume_and_value_checkpoint(engines, tmp_path):
    actor, critic, pgs, model_dir, config = engines
    cfg = load_config(ROOT / "examples" / "tiny_cpu.yaml",
                      ["trainer.keep_last_checkpoints=2", "trainer.value_pretrain_steps=1"])
    said: list[str] = []
    with one_gloo_rank():
        ck = RunCheckpoints(cfg, tmp_path, actor=actor, actor_pgs=pgs, actor_hf_config=config,
                            model_dir=model_dir, critic=critic, critic_pgs=pgs, say=said.append)
        snapshots = {}
        for step in (1, 2, 3, 4):
            _critic_step(critic, 1.0, seed=step)
            snapshots[step] = _weights(critic)
            ck.save(step, _state("value_pretrain" if step == 1 else "rl", step, 4 if step == 4 else 1),
                    actor=step in (1, 4))
        assert any("checkpoint step 4 (rl step 4) saved" in s for s in said)
        # newest 2 critics and the end of value pretraining; the actors the kept critics name
        assert sorted(p.name for p in (tmp_path / "critic").glob("step_*")) == \
            [step_dir_name(s) for s in (1, 3, 4)]
        assert sorted(p.name for p in (tmp_path / "actor").glob("step_*")) == [step_dir_name(s) for s in (1, 4)]
        assert (tmp_path / "actor" / step_dir_name(4) / "hf" / "config.json").is_file()

        # trainer.value_checkpoint: the weights of step 1 into the critic and its fp32 main copy
        # (the critic holds other weights first, in its model and in its optimizer's main params)
        critic.load_hf_state(tiny_hf_model("qwen2_untied", seed=7).state_dict(), init_from="policy")
        other = _weights(critic)
        assert max(float((other[k] - v).abs().max()) for k, v in snapshots[1].items()) > 0.05
        ck.load_value(str(tmp_path / "critic" / step_dir_name(1)))
        loaded = _weights(critic)
        for k, v in snapshots[1].items():
            assert torch.equal(loaded[k], v), k
        _critic_step(critic, 0.0, seed=9)    # zero gradients: Adam's momentum moves each weight by ~lr
        after = _weights(critic)
        worst = max(float((after[k] - v).abs().max()) for k, v in snapshots[1].items())
        assert worst < 0.01, f"the step went back to the weights the load replaced (max change {worst:.3f})"
        assert any("critic from the value checkpoint" in s for s in said)

        # resume: the newest pair (critic step 4 and the actor step it names) and its training state
        found = ck.resume()
        assert found is not None
        state, critic_dir, actor_dir = found
        assert critic_dir.name == actor_dir.name == step_dir_name(4)
        assert state["phase"] == "rl" and state["phase_step"] == 4
        for k, v in snapshots[4].items():
            assert torch.equal(_weights(critic)[k], v), k


def test_without_a_critic_the_actor_holds_the_state(engines, tmp_path):
    actor, _, pgs, model_dir, config = engines
    cfg = load_config(ROOT / "examples" / "tiny_cpu.yaml", ["trainer.keep_last_checkpoints=1"])
    with one_gloo_rank():
        ck = RunCheckpoints(cfg, tmp_path, actor=actor, actor_pgs=pgs, actor_hf_config=config,
                            model_dir=model_dir, critic=None, critic_pgs=pgs, say=lambda s: None)
        for step in (1, 2):
            ck.save(step, _state("rl", step, step), actor=True)
        assert not (tmp_path / "critic").exists()
        assert [p.name for p in (tmp_path / "actor").glob("step_*")] == [step_dir_name(2)]
        state, critic_dir, actor_dir = ck.resume()
        assert critic_dir is None and actor_dir.name == step_dir_name(2) and state["phase_step"] == 2
