"""One RL step's experience: sampled responses as the training tensors of a data-parallel replica.

Layout. Every row is prompt + response, right-padded to S (the longest row); position t of a
per-token tensor belongs to token t. The policy engine scores token t at position t
(log p(token t | tokens < t)), so old log-probs, advantages and the loss mask sit on the response
tokens' own positions. The critic's value of response token t is V(s_t), the value head's output
at position t - 1 (the state from which token t is generated): `values_of_tokens` shifts it.
GAE runs on response-aligned [N, R] views (`to_response` / `to_full` convert).

Device. `build_experience` packs the rollout's lists on the host; `Experience.to(device)` moves the
rows to the engines' device once, and every view below is made on the device of the tensors it is
given, so values, log-probs, rewards, advantages and returns stay there from the forward passes to
the losses (tests/unit/test_device_residency.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vcppo_megatron.rewards import batch_math_reward
from vcppo_megatron.rollout import RolloutEngine


@dataclass
class Samples:
    """Sampled responses with their verifier rewards (plain lists: cheap to gather as objects)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: list[float]
    truncated: list[bool]
    prompt_index: list[int]
    """Index of each sample's prompt in the list handed to `sample_and_score`; one id per prompt
    (its samples form its GRPO group). After `gather_samples` still one id per prompt over the
    gathered ranks: each contributing rank's indices are offset past the previous rank's."""
    num_skipped_prompts: int = 0
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    """The rollout engine's log-prob of each response token (empty: not recorded)."""

    def __len__(self) -> int:
        return len(self.response_ids)


def sample_and_score(engine: RolloutEngine, prompts: Sequence[Sequence[int]], answers: Sequence[str],
                     tokenizer: Any, *, samples_per_prompt: int, seed: int, reward_cfg: Any,
                     greedy: bool = False, verify: bool = True, logprobs: bool = False) -> Samples:
    """Generate `samples_per_prompt` responses per prompt and score each with the verifier.

    `logprobs`: also record vLLM's log-prob of each sampled token (`Samples.rollout_logprobs`).

    `verify=False` (a rank of a rollout tensor-parallel group other than its leader: the group
    samples the same responses and only the leader's are used) skips the verifier: `rewards` is
    then empty.
    """
    batch = engine.generate(prompts, samples_per_prompt, greedy=greedy, seed=seed,
                            stop_token_ids=[tokenizer.eos_token_id], logprobs=logprobs)
    index = batch.prompt_index.tolist()
    rewards: list[float] = []
    if verify:
        drop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
        texts = tokenizer.batch_decode([[t for t in ids if t not in drop] for ids in batch.response_token_ids])
        rewards = batch_math_reward(texts, [answers[i] for i in index], correct_reward=reward_cfg.correct_reward,
                                    wrong_reward=reward_cfg.wrong_reward, timeout_s=reward_cfg.timeout_s,
                                    num_workers=reward_cfg.num_workers)
    return Samples(prompt_ids=[list(p) for p in batch.prompt_token_ids],
                   response_ids=[list(r) for r in batch.response_token_ids],
                   rewards=[float(r) for r in rewards],
                   truncated=[reason == "length" for reason in batch.finish_reasons], prompt_index=index,
                   num_skipped_prompts=batch.num_skipped_prompts,
                   rollout_logprobs=[] if batch.rollout_logprobs is None else
                   [batch.rollout_logprobs[i, :len(r)].tolist() for i, r in enumerate(batch.response_token_ids)])


def gather_samples(local: Samples, group: dist.ProcessGroup | None, contributes: bool) -> Samples:
    """Concatenate, in rank order, the samples of the ranks of `group` that contribute.

    The ranks of one model-parallel group (tensor x pipeline) form one data-parallel replica of the
    trainer and must train on the same rows; each may have sampled its own share of the prompts.
    Ranks of one rollout tensor-parallel group hold identical samples: only one contributes.
    """
    if group is None or dist.get_world_size(group) == 1:
        return local
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local if contributes else None, group=group)
    out = Samples([], [], [], [], [], 0)
    offset = 0
    for part in parts:
        if part is None:
            continue
        out.prompt_ids += part.prompt_ids
        out.response_ids += part.response_ids
        out.rewards += part.rewards
        out.truncated += part.truncated
        out.prompt_index += [offset + i for i in part.prompt_index]     # ranks' prompts stay apart
        offset += max(part.prompt_index, default=-1) + 1
        out.num_skipped_prompts += part.num_skipped_prompts
        out.rollout_logprobs += part.rollout_logprobs
    return out


@dataclass
class Experience:
    """Training tensors of one replica's rows (see the module docstring for the layout)."""

    input_ids: Tensor       # [N, S] int64
    attention_mask: Tensor  # [N, S] int64, 1 on prompt and response tokens
    loss_mask: Tensor       # [N, S] float32, 1 on response tokens
    prompt_lens: Tensor     # [N] int64
    response_lens: Tensor   # [N] int64
    rewards: Tensor         # [N] float32
    truncated: Tensor       # [N] bool
    max_response_len: int   # R, the longest response (known on the host: no device read)
    rollout_log_probs: Tensor | None = None   # [N, S] float32 on response tokens: the rollout engine's
    actor_log_probs: Tensor | None = None     # [N, S]: the actor's old log-probs, once computed

    def to(self, device: torch.device | str) -> "Experience":
        """The same rows on `device` (no copy when already there)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})

    def _positions(self) -> tuple[Tensor, Tensor]:
        """[N, R] sequence positions of response tokens (clamped) and the [N, R] response mask."""
        r = torch.arange(self.max_response_len, device=self.input_ids.device)[None, :]
        pos = (self.prompt_lens[:, None] + r).clamp(max=self.input_ids.shape[1] - 1)
        return pos, (r < self.response_lens[:, None])

    def response_mask(self) -> Tensor:
        """[N, R] float32: 1 on response tokens."""
        return self._positions()[1].float()

    def to_response(self, full: Tensor) -> Tensor:
        """[N, S] per-token tensor -> [N, R] over response tokens (0 beyond each response)."""
        pos, mask = self._positions()
        return torch.gather(full, 1, pos) * mask.to(full.dtype)

    def to_full(self, resp: Tensor) -> Tensor:
        """[N, R] response-aligned tensor -> [N, S] (0 on prompt and padding positions)."""
        pos, mask = self._positions()
        out = torch.zeros(self.input_ids.shape, dtype=resp.dtype, device=resp.device)
        out.scatter_(1, torch.where(mask, pos, 0), resp * mask.to(resp.dtype))
        return out * self.loss_mask.to(resp.dtype)

    def token_rewards(self) -> Tensor:
        """[N, R] sparse rewards: the verifier's score on each response's last token."""
        r = torch.arange(self.max_response_len, device=self.rewards.device)[None, :]
        last = r == (self.response_lens[:, None] - 1)
        return last.float() * self.rewards[:, None]


def values_of_tokens(values: Tensor) -> Tensor:
    """Value-head outputs [N, S] (position t: state after token t) -> V(s_t) of token t at t."""
    return torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], 1)


def build_experience(samples: Samples, pad_token_id: int) -> Experience:
    """Pack prompt + response rows, right-padded; raise on an empty batch or empty response."""
    if len(samples) == 0:
        raise ValueError("no samples to train on: every prompt was skipped (raise "
                         "rollout.max_prompt_tokens or shorten the prompts)")
    rows = [p + r for p, r in zip(samples.prompt_ids, samples.response_ids, strict=True)]
    if any(len(r) == 0 for r in samples.response_ids):
        raise ValueError("a sampled response has no tokens: expected >= 1 (rollout.max_response_tokens >= 1)")
    if any(len(p) == 0 for p in samples.prompt_ids):
        raise ValueError("a prompt has no tokens: expected >= 1 (the first response token is scored "
                         "given the prompt)")
    prompt_lens = torch.tensor([len(p) for p in samples.prompt_ids])
    response_lens = torch.tensor([len(r) for r in samples.response_ids])
    row_lens = prompt_lens + response_lens
    col = torch.arange(int(row_lens.max()))[None, :]
    filled = col < row_lens[:, None]
    ids = torch.full(filled.shape, pad_token_id, dtype=torch.long).masked_scatter_(
        filled, torch.tensor([t for row in rows for t in row], dtype=torch.long))
    return Experience(input_ids=ids, attention_mask=filled.long(),
                      loss_mask=(filled & (col >= prompt_lens[:, None])).float(),
                      prompt_lens=prompt_lens, response_lens=response_lens,
                      rewards=torch.tensor(samples.rewards, dtype=torch.float32),
                      truncated=torch.tensor(samples.truncated, dtype=torch.bool),
                      max_response_len=int(response_lens.max()),
                      rollout_log_probs=_rollout_log_probs(samples, ids.shape))


def _rollout_log_probs(samples: Samples, shape: torch.Size) -> Tensor | None:
    """[N, S] rollout log-probs on the response tokens' own positions; None when not recorded."""
    if len(samples.rollout_logprobs) != len(samples):
        return None
    out = torch.zeros(shape)
    for i, (p, lp) in enumerate(zip(samples.prompt_ids, samples.rollout_logprobs)):
        out[i, len(p):len(p) + len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out


def logprob_abs_diff(exp: Experience) -> Tensor | None:
    """[N, R] |actor old log-prob - rollout log-prob| per response token; None unless both are known."""
    if exp.rollout_log_probs is None or exp.actor_log_probs is None:
        return None
    return exp.to_response((exp.actor_log_probs.float() - exp.rollout_log_probs.to(exp.actor_log_probs.device)).abs())
