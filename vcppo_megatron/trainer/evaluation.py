"""Held-out evaluation on a RolloutEngine: n samples per problem, the verifier, avg@n and pass@k.

Sampling follows VAPO's evaluation (top-p 0.7, temperature 1.0 by default). A problem whose
prompt the engine skips as too long (`rollout.on_long_prompt = "skip"`) counts as unsolved and is
reported in `num_skipped_prompts`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from vcppo_megatron.algorithms.pass_at_k import avg_at_k, default_ks, mean_pass_at_k
from vcppo_megatron.data.chat_template import Template, encode_prompt
from vcppo_megatron.data.prompts import MathProblem
from vcppo_megatron.rewards import batch_math_reward
from vcppo_megatron.rollout import RolloutEngine


@dataclass(frozen=True)
class EvalResult:
    """Scores of one held-out set."""

    dataset: str
    num_problems: int
    samples_per_problem: int
    correct_counts: list[int]
    avg_at_n: float
    pass_at_k: dict[int, float]
    response_length_mean: float
    truncated_frac: float
    num_skipped_prompts: int
    num_truncated_prompts: int

    def metrics(self) -> dict[str, float]:
        """`<dataset>/...` metric names of docs/METRICS.md (logged under phase `eval`)."""
        out = {f"{self.dataset}/avg@{self.samples_per_problem}": self.avg_at_n,
               f"{self.dataset}/response_length/mean": self.response_length_mean,
               f"{self.dataset}/truncated_frac": self.truncated_frac}
        out.update({f"{self.dataset}/pass@{k}": v for k, v in self.pass_at_k.items()})
        return out


@contextlib.contextmanager
def sampling(engine: RolloutEngine, temperature: float, top_p: float) -> Iterator[None]:
    """Run `generate` with these sampling settings (the engine reads them at every call)."""
    saved = engine.config
    engine.config = dataclasses.replace(saved, temperature=temperature, top_p=top_p)
    try:
        yield
    finally:
        engine.config = saved


def evaluate_problems(engine: RolloutEngine, problems: Sequence[MathProblem], tokenizer: Any, *,
                      dataset: str, samples: int, ks: Sequence[int] | None = None,
                      temperature: float = 1.0, top_p: float = 0.7, max_tokens: int | None = None,
                      template: Template = "auto", prompts_per_batch: int = 64,
                      timeout_s: float = 5.0, num_workers: int = 2,
                      progress: bool = True) -> EvalResult:
    """Sample `samples` responses per problem, verify them, and score avg@samples and pass@k."""
    if not problems:
        raise ValueError(f"dataset {dataset!r}: no problems to evaluate")
    ks = default_ks(samples) if ks is None else sorted(set(ks))
    if any(not 1 <= k <= samples for k in ks):
        raise ValueError(f"ks = {list(ks)}: expected each k in [1, samples = {samples}]")
    if prompts_per_batch < 1:
        raise ValueError(f"prompts_per_batch = {prompts_per_batch}: expected >= 1")
    drop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    correct = [0] * len(problems)
    lengths, truncated, skipped, cut = [], 0, 0, 0
    bar = tqdm(total=len(problems), desc=f"eval {dataset}", unit="problem", disable=not progress,
               dynamic_ncols=True)
    with sampling(engine, temperature, top_p):
        for start in range(0, len(problems), prompts_per_batch):
            chunk = problems[start:start + prompts_per_batch]
            prompts = [encode_prompt(p.problem, tokenizer, template) for p in chunk]
            batch = engine.generate(prompts, samples, stop_token_ids=stop, max_tokens=max_tokens)
            skipped += batch.num_skipped_prompts
            cut += batch.num_truncated_prompts
            texts = [tokenizer.decode([t for t in ids if t not in drop])
                     for ids in batch.response_token_ids]
            index = batch.prompt_index.tolist()
            rewards = batch_math_reward(texts, [chunk[i].answer for i in index], correct_reward=1.0,
                                        wrong_reward=0.0, timeout_s=timeout_s,
                                        num_workers=num_workers)
            for i, r in zip(index, rewards):
                correct[start + i] += int(r > 0)
            lengths += batch.response_lengths.tolist()
            truncated += sum(reason == "length" for reason in batch.finish_reasons)
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{sum(correct) / (samples * (start + len(chunk))):.3f}")
    bar.close()
    return EvalResult(
        dataset=dataset, num_problems=len(problems), samples_per_problem=samples,
        correct_counts=correct, avg_at_n=avg_at_k(correct, samples),
        pass_at_k={k: mean_pass_at_k(correct, samples, k) for k in ks},
        response_length_mean=sum(lengths) / len(lengths) if lengths else 0.0,
        truncated_frac=truncated / len(lengths) if lengths else 0.0,
        num_skipped_prompts=skipped, num_truncated_prompts=cut)
