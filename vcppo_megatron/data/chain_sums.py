"""`chain_sums`: the long chain-of-thought task (`data.task: chain_sums`), for the papers' ablations.

A problem lists MIN_TERMS to MAX_TERMS single digits, each tagged with a letter for its position:

    prompt    a7b3c9d2=
    response  <think>7+b3=10,10+c9=19,19+d2=21</think>\\boxed{21}<eos>

The response adds the terms one at a time with running totals: step i restates the total so far,
names term i by its letter, and writes the new total. A correct response is 100-180 tokens, so the
verifier's reward reaches the first tokens through 100+ steps of GAE (0.95^100 ≈ 0.006: VC-PPO
§3.3, VAPO §4.2). Mistakes happen mid-chain (a carry slip in a total, a term copied wrong or
skipped) and carry into the answer; the verifier checks the final answer only. A shortened chain
is wrong (a skipped term changes the total) and an answer without the chain is a guess among
~100 values. The number of terms, visible in the prompt (the last letter), sets the difficulty:
each step can fail, so longer problems are solved less often.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

MIN_TERMS = 12
MAX_TERMS = 16
LETTERS = string.ascii_lowercase[:MAX_TERMS]
CHARACTERS = list("0123456789+-=},") + list(LETTERS)
STEP_SEPARATOR = ","


@dataclass(frozen=True)
class ChainProblem:
    """A sum of tagged single digits; `prompt`, `answer` and `solution()` as every synthetic task."""

    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        """`a7b3c9d2=`: each term after its position letter."""
        return "".join(f"{LETTERS[i]}{t}" for i, t in enumerate(self.terms)) + "="

    @property
    def answer(self) -> str:
        """The sum."""
        return str(sum(self.terms))

    def steps(self) -> list[str]:
        """The chain's steps `total+<letter><term>=new total`, one per term after the first."""
        out, total = [], self.terms[0]
        for i, t in enumerate(self.terms[1:], start=1):
            out.append(f"{total}+{LETTERS[i]}{t}={total + t}")
            total += t
        return out

    def solution(self) -> str:
        """A correct response (without the end-of-sequence token)."""
        return f"<think>{STEP_SEPARATOR.join(self.steps())}</think>\\boxed{{{self.answer}}}"


def make_problems(count: int, seed: int) -> list[ChainProblem]:
    """`count` problems of MIN_TERMS..MAX_TERMS digits (uniform), reproducible from `seed`."""
    rng = random.Random(seed)
    return [ChainProblem(tuple(rng.randrange(10) for _ in range(rng.randint(MIN_TERMS, MAX_TERMS))))
            for _ in range(count)]


def prompt_tokens() -> int:
    """Tokens of the longest prompt (a letter and a digit per term, then `=`)."""
    return 2 * MAX_TERMS + 1


def response_tokens() -> int:
    """Tokens of the longest correct response, end-of-sequence token included (totals <= 3 digits)."""
    longest_step = 3 + 1 + 2 + 1 + 3                  # total + letter digit = total
    return 1 + (MAX_TERMS - 1) * longest_step + (MAX_TERMS - 2) + 1 + 1 + 3 + 1 + 1
