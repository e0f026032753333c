"""Reward-model training: the model baseline PPO's critic starts from (VC-PPO §3.1-3.2; VAPO §5.1).

    python -m vcppo_megatron.train_reward_model --config RECIPE.yaml [section.key=value ...]

1. Sample `reward_model.samples_per_prompt` responses from the SFT policy (`actor.model_path`, an
   HF directory or a Megatron checkpoint, which is converted first) on `train_prompts` prompts of
   the training pool, and afresh on `eval_prompts` held-out prompts, with vLLM; score each with
   the verifier (`reward`).
2. Train a one-label HF sequence classifier initialised from the policy (its `score` head new) on
   the training samples: the score at each response's LAST token (HF's pooling: the last token
   that is not padding, the end-of-sequence token of a finished response) regresses the
   verifier's reward, 0.5·(score − reward)², mean over the batch. No other position is trained:
   this is the objective VC-PPO §3.2 blames for the critic's position bias when PPO starts its
   value model from a reward model.
3. Report the held-out AUC (correct responses scored above wrong ones) and write an HF directory
   (`reward_model.output_dir`) that `critic.init_from: reward_model` loads: config with
   `Qwen2ForSequenceClassification`-style architecture and num_labels 1, safetensors with
   `score.weight`, the tokenizer, and metrics.json.

Training runs in one process with HF transformers (the tiny task and small models; a 32B reward
model is trained elsewhere and given as `critic.model_path`).
"""
from __future__ import annotations

import gc
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vcppo_megatron.config import ConfigError
from vcppo_megatron.config.schema import Config
from vcppo_megatron.trainer import setup
from vcppo_megatron.trainer.experience import Samples, sample_and_score

POLICY_SUBDIR = "policy_hf"


@dataclass
class RewardModelResult:
    """What a run produced: the HF directory and its measurements (also in metrics.json)."""

    output_dir: Path
    metrics: dict[str, float]
    eval_scores: list[float]
    eval_rewards: list[float]


def auc(scores: list[float], positive: list[bool]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count ½."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        raise ValueError(f"AUC needs both classes: {len(pos)} positive, {len(neg)} negative samples")
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):                       # average ranks over ties (Mann-Whitney U)
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(label for _, label in ranked[i:j]) * (i + j + 1) / 2
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def policy_hf_dir(cfg: Config, out: Path) -> Path:
    """The SFT policy as an HF directory: `actor.model_path`, converted first if it is a Megatron checkpoint."""
    if cfg.actor.model_path is None:
        raise ConfigError("actor.model_path = null: the reward model is trained on the SFT policy's samples; "
                          "expected its HF directory or Megatron checkpoint (e.g. a run's checkpoints/actor)")
    path = Path(cfg.actor.model_path)
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise ConfigError(f"actor.model_path = {str(path)!r}: does not exist; expected an HF directory or a "
                          f"Megatron checkpoint")
    from vcppo_megatron.checkpoint import convert_megatron_to_hf

    target = out / POLICY_SUBDIR
    convert_megatron_to_hf(path, target, progress=False)
    return target


def _sample(cfg: Config, policy: Path, tokenizer: Any) -> tuple[Samples, Samples]:
    """(training samples, held-out samples) of the policy, verified; the engine is freed after."""
    from vcppo_megatron.rollout import RolloutEngine

    rm, seed = cfg.reward_model, cfg.trainer.seed
    train_set, eval_sets = setup.load_prompt_sets(cfg, tokenizer)
    eval_prompts = [p for held in eval_sets for p in held.prompt_ids]      # every held-out set, pooled
    eval_answers = [a for held in eval_sets for a in held.answers]
    rng = random.Random(seed)
    train_idx = rng.sample(range(len(train_set.prompt_ids)), min(rm.train_prompts, len(train_set.prompt_ids)))
    eval_idx = list(range(min(rm.eval_prompts, len(eval_prompts))))
    engine = RolloutEngine(policy, cfg.rollout, seed=seed, pad_token_id=tokenizer.pad_token_id)
    kw = dict(samples_per_prompt=rm.samples_per_prompt, reward_cfg=cfg.reward)
    train = sample_and_score(engine, [train_set.prompt_ids[i] for i in train_idx],
                             [train_set.answers[i] for i in train_idx], tokenizer, seed=seed * 31 + 1, **kw)
    held = sample_and_score(engine, [eval_prompts[i] for i in eval_idx],
                            [eval_answers[i] for i in eval_idx], tokenizer, seed=seed * 31 + 2, **kw)
    del engine
    gc.collect()
    return train, held


def _rows(samples: Samples, rows: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + response ids and attention mask of `rows`."""
    seqs = [samples.prompt_ids[i] + samples.response_ids[i] for i in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, :len(s)] = torch.tensor(s)
        mask[k, :len(s)] = 1
    return ids, mask


def last_token_scores(model: Any, samples: Samples, pad: int, batch_size: int) -> list[float]:
    """HF's sequence score (the score at the last non-padding token) of every sample."""
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            ids, mask = _rows(samples, list(range(start, min(start + batch_size, len(samples)))), pad)
            out += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return out


def train_reward_model(cfg: Config) -> RewardModelResult:
    """Sample, verify, train and write the reward model (see the module docstring)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm, optim = cfg.reward_model, cfg.critic.optim
    out = Path(rm.output_dir) if rm.output_dir is not None else Path(cfg.trainer.output_dir) / "reward_model"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    policy = policy_hf_dir(cfg, out)
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    pad = tokenizer.pad_token_id
    train, held = _sample(cfg, policy, tokenizer)
    t_sample = time.perf_counter() - t0
    if any(s != s for s in train.rewards):
        raise ValueError("a verifier reward is NaN")
    torch.manual_seed(cfg.trainer.seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1, torch_dtype=torch.float32)
    model.config.pad_token_id = pad                      # HF pools at the last token that is not padding
    opt = torch.optim.AdamW(model.parameters(), lr=rm.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                            eps=optim.adam_eps, weight_decay=optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.trainer.seed)
    target = torch.tensor(train.rewards, dtype=torch.float32)
    losses: list[float] = []
    model.train()
    for _ in range(rm.epochs):
        order = torch.randperm(len(train), generator=gen).tolist()
        for start in range(0, len(order), rm.batch_size):
            rows = order[start:start + rm.batch_size]
            ids, mask = _rows(train, rows, pad)
            score = model(input_ids=ids, attention_mask=mask).logits[:, 0]      # the last token's score
            loss = 0.5 * ((score - target[rows]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            losses.append(float(loss))
    model.eval()
    eval_scores = last_token_scores(model, held, pad, rm.batch_size)
    train_scores = last_token_scores(model, train, pad, rm.batch_size)
    metrics = {"train_samples": float(len(train)), "eval_samples": float(len(held)),
               "train_accuracy": sum(r > 0 for r in train.rewards) / len(train),
               "eval_accuracy": sum(r > 0 for r in held.rewards) / len(held),
               "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
               "train_auc": auc(train_scores, [r > 0 for r in train.rewards]),
               "eval_auc": auc(eval_scores, [r > 0 for r in held.rewards]),
               "sample_s": t_sample, "total_s": time.perf_counter() - t0}
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return RewardModelResult(out, metrics, eval_scores, list(held.rewards))
