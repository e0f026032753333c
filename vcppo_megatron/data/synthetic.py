"""The built-in synthetic tasks (`data.task`) and their character-level tokenizer.

`sums` (this module; the quick demo): problems are sums of 1 to `max_operands` single-digit numbers (`a+b+c=`); a correct response is
`<think>a+b+c</think>\\boxed{s}` followed by the end-of-sequence token. More operands are harder
for a small model, and the prompt shows how many there are: the difficulty of each problem is
visible, so a critic can learn a value that varies across prompts (VC-PPO's value pretraining)
while the policy still has room to improve on the longer sums during RL. The tokenizer is a real
HF fast tokenizer built locally (no download), so every engine (transformers, vLLM) can load it
from a model directory. `chain_sums` (data/chain_sums.py) is the long chain-of-thought task, `chain_sums_graded` the same with a
pace tag in the prompt that shows how likely the chain is to slip.
`synthetic_task(data_config)` gives either as a `SyntheticTask`.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<think>", "</think>", "\\boxed{"]
CHARACTERS = list("0123456789+-=}")


@dataclass(frozen=True)
class Problem:
    """One task: the prompt text and its ground-truth answer."""

    prompt: str
    answer: str

    def solution(self) -> str:
        """A correct chain-of-thought response (without the end-of-sequence token)."""
        return f"<think>{self.prompt[:-1]}</think>\\boxed{{{self.answer}}}"

    def demonstration(self) -> str:
        """The cold-start (SFT) response: the solution."""
        return self.solution()


def prompt_tokens(max_operands: int) -> int:
    """Tokens of the longest prompt (`a+b+...=`)."""
    return 2 * max_operands


def response_tokens(max_operands: int) -> int:
    """Tokens of the longest correct response, end-of-sequence token included."""
    return 2 * max_operands + 6            # <think> digits and '+'s </think> \boxed{ 1-2 digits } <eos>


def make_problems(count: int, seed: int, *, max_operands: int) -> list[Problem]:
    """`count` random sums of 1 to `max_operands` single-digit numbers, reproducible from `seed`."""
    if max_operands < 1:
        raise ValueError(f"max_operands = {max_operands}: expected >= 1")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        terms = [rng.randrange(10) for _ in range(rng.randint(1, max_operands))]
        out.append(Problem("+".join(map(str, terms)) + "=", str(sum(terms))))
    return out


def build_tokenizer(characters: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer over the special tokens and `characters` (default: the
    `sums` task's) with the specials matched whole."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + (CHARACTERS if characters is None else characters))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        eos_token="<eos>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[2:]})
    return tokenizer


class TaskProblem(Protocol):
    """A problem of a synthetic task: prompt text, ground-truth answer, a correct response."""

    prompt: str
    answer: str

    def solution(self) -> str:
        """A correct chain-of-thought response (without the end-of-sequence token)."""

    def demonstration(self) -> str:
        """The response the SFT cold start imitates (the solution, or one with slips)."""


@dataclass(frozen=True)
class SyntheticTask:
    """A built-in task: seeded problems, its tokenizer and the token bounds of prompts and solutions."""

    name: str
    characters: list[str]
    max_prompt_tokens: int
    """Tokens of the longest prompt."""
    max_response_tokens: int
    """Tokens of the longest correct response, end-of-sequence token included."""
    make: Callable[[int, int], list[Any]]
    """(count, seed) -> problems."""
    make_demos: Callable[[int, int], list[Any]]
    """(count, seed) -> the SFT cold start's problems (their `demonstration()` is imitated)."""
    size_field: str
    """The config field that sets the task's size (named in errors)."""

    def make_problems(self, count: int, seed: int) -> list[TaskProblem]:
        """`count` problems, reproducible from `seed`."""
        return self.make(count, seed)

    def make_demonstrations(self, count: int, seed: int) -> list[TaskProblem]:
        """`count` cold-start examples, reproducible from `seed`."""
        return self.make_demos(count, seed)

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """The task's character-level HF tokenizer."""
        return build_tokenizer(self.characters)


def synthetic_task(data: Any) -> SyntheticTask:
    """The task `data.task` of a DataConfig (`sums` sized by `data.synthetic_max_operands`)."""
    if data.task == "sums":
        n = data.synthetic_max_operands
        make = lambda count, seed: make_problems(count, seed, max_operands=n)  # noqa: E731
        return SyntheticTask("sums", CHARACTERS, prompt_tokens(n), response_tokens(n), make, make,
                             f"data.synthetic_max_operands = {n}")
    if data.task == "chain_sums":
        from vcppo_megatron.data import chain_sums

        return SyntheticTask("chain_sums", chain_sums.CHARACTERS, chain_sums.prompt_tokens(),
                             chain_sums.response_tokens(), chain_sums.make_problems,
                             chain_sums.make_demonstrations, "data.task = 'chain_sums'")
    if data.task == "chain_sums_graded":
        from vcppo_megatron.data import chain_sums

        return SyntheticTask("chain_sums_graded", chain_sums.GRADED_CHARACTERS, chain_sums.prompt_tokens(graded=True),
                             chain_sums.response_tokens(), chain_sums.make_graded_problems,
                             chain_sums.make_graded_demonstrations, "data.task = 'chain_sums_graded'")
    raise ValueError(f"data.task = {data.task!r}: expected 'sums', 'chain_sums' or 'chain_sums_graded'")
