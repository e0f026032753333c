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


# ---- the trainer's held-out sets, scored in shares by the rollout replicas ----------------------
def replica_order(num_problems: int, replicas: int) -> list[int]:
    """Problem indices in gathered order: replica r scores problems r, r + R, r + 2R, ... in turn."""
    return [i for r in range(replicas) for i in range(r, num_problems, replicas)]


def split_by_set(gathered: Sequence[Any], sizes: Sequence[int], replicas: int) -> list[list[Any]]:
    """Per-problem values gathered replica by replica -> one list per held-out set, in problem order."""
    total = sum(sizes)
    if len(gathered) != total:
        raise ValueError(f"{len(gathered)} gathered values for {total} held-out problems: expected one each")
    by_problem: list[Any] = [None] * total
    for i, value in zip(replica_order(total, replicas), gathered):
        by_problem[i] = value
    out, start = [], 0
    for size in sizes:
        out.append(by_problem[start:start + size])
        start += size
    return out


def held_out_metrics(dataset: str, problems: Sequence[tuple[int, int, int, int]],
                     samples: int) -> dict[str, float]:
    """`<dataset>/...` metrics from per-problem (correct, samples drawn, tokens, truncated samples).

    A problem with no samples (its prompt skipped as too long) counts as unsolved.
    """
    counts = [p[0] for p in problems]
    drawn = sum(p[1] for p in problems)
    out = {f"{dataset}/avg@{samples}": avg_at_k(counts, samples),
           f"{dataset}/response_length/mean": sum(p[2] for p in problems) / max(drawn, 1),
           f"{dataset}/truncated_frac": sum(p[3] for p in problems) / max(drawn, 1)}
    out.update({f"{dataset}/pass@{k}": mean_pass_at_k(counts, samples, k) for k in default_ks(samples)})
    return out


def per_problem(prompt_index: Sequence[int], rewards: Sequence[float], response_lengths: Sequence[int],
                truncated: Sequence[bool], num_prompts: int) -> list[tuple[int, int, int, int]]:
    """(correct, samples drawn, response tokens, truncated samples) for each of `num_prompts` prompts."""
    out = [[0, 0, 0, 0] for _ in range(num_prompts)]
    for j, reward, length, cut in zip(prompt_index, rewards, response_lengths, truncated, strict=True):
        row = out[j]
        row[0] += int(reward > 0)
        row[1] += 1
        row[2] += int(length)
        row[3] += int(cut)
    return [(a, b, c, d) for a, b, c, d in out]
