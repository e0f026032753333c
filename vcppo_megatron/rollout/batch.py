"""What a rollout returns (`RolloutBatch`) and how over-long prompts are fitted; no vLLM here."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class FittedPrompts:
    """Prompts cut to the length limit: the kept ones, their original indices and the counts."""

    prompts: list[list[int]]
    indices: list[int]
    num_truncated: int
    num_skipped: int


def fit_prompts(prompt_token_ids: Sequence[Sequence[int]], max_prompt_tokens: int,
                on_long_prompt: Literal["truncate", "skip"]) -> FittedPrompts:
    """Apply `rollout.on_long_prompt`: `truncate` keeps the LAST `max_prompt_tokens` tokens, `skip` drops."""
    if on_long_prompt not in ("truncate", "skip"):
        raise ValueError(f"rollout.on_long_prompt = {on_long_prompt!r}: expected 'truncate' or 'skip'")
    prompts, indices, truncated, skipped = [], [], 0, 0
    for i, ids in enumerate(prompt_token_ids):
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompt_token_ids[{i}] is empty: expected at least one token")
        if len(ids) > max_prompt_tokens:
            if on_long_prompt == "skip":
                skipped += 1
                continue
            ids = ids[-max_prompt_tokens:]
            truncated += 1
        prompts.append(ids)
        indices.append(i)
    return FittedPrompts(prompts, indices, truncated, skipped)


@dataclass(frozen=True)
class RolloutBatch:
    """Sampled responses, one row per sample, padded to the longest response R of the batch.

    `rollout_logprobs[i, t]` (when asked for) is log π_rollout(response t | prompt, response <t) of
    the sampled token under the distribution it was sampled from (temperature and top-p applied;
    greedy: the plain softmax), 0 where `response_mask` is False.
    """

    prompt_index: torch.Tensor
    """[N] int64: index of the sample's prompt in the list handed to `generate`."""
    prompt_token_ids: list[list[int]]
    """N prompts as sent to the engine (after truncation)."""
    response_token_ids: list[list[int]]
    """N unpadded responses (a stop / end-of-sequence token that ended one is included)."""
    responses: torch.Tensor
    """[N, R] int64 response tokens, `pad_token_id` after each response's end."""
    response_mask: torch.Tensor
    """[N, R] bool: True on response tokens."""
    rollout_logprobs: torch.Tensor | None
    """[N, R] float32 log-probs of the sampled tokens (see the class docstring); None unless asked for."""
    response_lengths: torch.Tensor
    """[N] int64 tokens per response."""
    finish_reasons: list[FinishReason]
    """N reasons: `stop` (end-of-sequence or a stop token) or `length` (max tokens reached)."""
    num_truncated_prompts: int
    """Prompts longer than `max_prompt_tokens` that were cut to their last tokens."""
    num_skipped_prompts: int
    """Prompts longer than `max_prompt_tokens` that were dropped (no samples)."""

    @property
    def num_samples(self) -> int:
        """N, the number of sampled responses."""
        return len(self.response_token_ids)


def pad_responses(prompt_index: list[int], prompts: list[list[int]], responses: list[list[int]],
                  logprobs: list[list[float]] | None, finish_reasons: list[FinishReason],
                  num_truncated: int, num_skipped: int, pad_token_id: int = 0) -> RolloutBatch:
    """Build a `RolloutBatch` from per-sample lists, padding responses to the longest one
    (`logprobs` None: no `rollout_logprobs`)."""
    n = len(responses)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.int64)
    width = int(lengths.max()) if n else 0
    mask = torch.arange(width)[None, :] < lengths[:, None]
    flat = torch.tensor([t for r in responses for t in r], dtype=torch.int64)
    tokens = torch.full((n, width), pad_token_id, dtype=torch.int64).masked_scatter_(mask, flat)
    lps = None
    if logprobs is not None:
        if len(logprobs) != n:
            raise ValueError(f"{n} responses but {len(logprobs)} log-prob lists; expected equal")
        for i, (resp, lp) in enumerate(zip(responses, logprobs)):
            if len(resp) != len(lp):
                raise ValueError(f"sample {i}: {len(resp)} tokens but {len(lp)} log-probs; expected equal")
        lps = torch.zeros((n, width), dtype=torch.float32).masked_scatter_(
            mask, torch.tensor([x for lp in logprobs for x in lp], dtype=torch.float32))
    return RolloutBatch(
        prompt_index=torch.tensor(prompt_index, dtype=torch.int64),
        prompt_token_ids=prompts, response_token_ids=responses, responses=tokens,
        response_mask=mask, rollout_logprobs=lps, response_lengths=lengths,
        finish_reasons=finish_reasons, num_truncated_prompts=num_truncated,
        num_skipped_prompts=num_skipped)
