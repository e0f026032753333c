"""Reward-model training on the tiny task (trainer/reward_model.py, the command
`python -m vcppo_megatron.train_reward_model`): a briefly SFT-ed tiny policy is sampled with vLLM
and verified; the trained one-label classifier ranks correct held-out responses, sampled afresh,
above wrong ones (AUC recomputed here pair by pair); the written HF directory loads into the
critic (`critic.init_from=reward_model`) with values equal to HF's per-token scores."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import one_gloo_rank

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "tiny_cpu.yaml"
AUC_MIN = 0.7


def _sft_policy(out: Path, steps: int = 100) -> Path:
    """The demo's tiny random model, SFT-ed with HF on the `sums` task: right on short sums only."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vcppo_megatron.config import load_config
    from vcppo_megatron.data.synthetic import synthetic_task

    cfg = load_config(RECIPE)
    task = synthetic_task(cfg.data)
    tokenizer = task.build_tokenizer()
    t = cfg.tiny_model
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_query_groups,
        intermediate_size=t.ffn_hidden_size, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows = []
        for p in task.make_problems(32, seed=1000 + step):
            prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
            rows.append((prompt, tokenizer(p.solution(), add_special_tokens=False)["input_ids"]
                         + [tokenizer.eos_token_id]))
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for i, (a, b) in enumerate(rows):
            ids[i, :len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _pairwise_auc(scores: list[float], positive: list[bool]) -> float:
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_reward_model_ranks_held_out_responses_and_loads_into_the_critic(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from vcppo_megatron.config import load_config
    from vcppo_megatron.config.schema import OptimConfig
    from vcppo_megatron.engines import ValueEngine
    from vcppo_megatron.parallel.groups import build_role_groups
    from vcppo_megatron.trainer.reward_model import auc, train_reward_model

    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75     # the textbook example
    assert auc([1.0, 1.0, 0.0], [True, False, False]) == _pairwise_auc([1.0, 1.0, 0.0], [True, False, False])
    policy = _sft_policy(tmp_path / "policy")
    out = tmp_path / "rm"
    cfg = load_config(RECIPE, [f"actor.model_path={policy}", f"reward_model.output_dir={out}",
                               "reward_model.train_prompts=128", "reward_model.eval_prompts=64",
                               "reward_model.samples_per_prompt=4", "reward_model.epochs=3",
                               "reward_model.batch_size=32", "reward_model.lr=1.0e-3"])
    with one_gloo_rank(drop_vllm_groups=True):
        result = train_reward_model(cfg)
    m = result.metrics
    print(json.dumps(m, indent=1))
    labels = [r > 0 for r in result.eval_rewards]
    assert 0.15 < m["eval_accuracy"] < 0.9, "the policy must be right on some held-out problems, not all"
    assert m["eval_auc"] == pytest.approx(_pairwise_auc(result.eval_scores, labels), abs=1e-12)
    assert m["eval_auc"] > AUC_MIN, m
    assert m["last_loss"] < m["first_loss"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForSequenceClassification"] and len(saved["id2label"]) == 1
    assert json.loads((out / "metrics.json").read_text()) == m
    # the critic of baseline PPO: values equal HF's per-token scores of the written model
    hf = AutoModelForSequenceClassification.from_pretrained(out).float().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, saved["vocab_size"], (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids = torch.where(mask.bool(), ids, saved["pad_token_id"])
    with one_gloo_rank(megatron_state=True):
        pgs, layout = build_role_groups(1, 1)
        critic = ValueEngine(saved, pgs, layout, optim=OptimConfig(lr=1e-3), attention_backend="sdpa",
                             max_tokens_per_micro_batch=64)
        critic.load_hf_dir(out, init_from="reward_model")
        with critic.eval_mode():
            values = critic.forward_backward({"input_ids": ids, "attention_mask": mask}, None,
                                             forward_only=True)["outputs"]["values"]
    with torch.no_grad():
        ref = hf.score(hf.model(input_ids=ids, attention_mask=mask).last_hidden_state)[..., 0]
        seq = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    valid = mask.bool()
    assert float((values - ref)[valid].abs().max()) < 1e-5 and float(ref.abs().max()) > 1e-2
    last = valid.sum(-1) - 1
    assert float((values.gather(1, last[:, None])[:, 0] - seq).abs().max()) < 1e-5


def test_command_rejects_a_missing_policy(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vcppo_megatron.train_reward_model", "--config", str(RECIPE),
                          f"reward_model.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 2
    assert "actor.model_path = null" in out.stderr
