"""The built-in synthetic arithmetic chain-of-thought task and its character-level tokenizer.

Problems are `a+b=` with single digits; a correct response is `<think>a+b</think>\\boxed{c}`
followed by the end-of-sequence token. The tokenizer is a real HF fast tokenizer built locally
(no download), so every engine (transformers, vLLM) can load it from a model directory.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

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


def make_problems(count: int, seed: int) -> list[Problem]:
    """`count` random single-digit addition problems, reproducible from `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append(Problem(f"{a}+{b}=", str(a + b)))
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer for the synthetic task (specials matched whole)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        eos_token="<eos>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[2:]})
    return tokenizer
