"""`chain_sums`: the long chain-of-thought task (`data.task: chain_sums`), for the papers' ablations.

A problem lists MIN_TERMS to MAX_TERMS single digits, each tagged with a letter for its position:

    prompt    a7b3c9d2=
    response  <think>7+b3=10,10+c9=19,19+d2=21</think>\\boxed{21}<eos>

The response adds the terms one at a time with running totals: step i restates the total so far,
names term i by its letter (the model finds the term after that letter in the prompt) and writes
the new total. A correct response is 103-168 tokens (mean 134; 20,000 problems, end-of-sequence
token included; `response_tokens()` is the bound, 172), so the verifier's reward reaches the first
tokens through 100+ steps of GAE (0.95^100 ≈ 0.006: VC-PPO §3.3, VAPO §4.2). The verifier checks
the final answer only. A shortened chain is wrong (a skipped term changes the total) and an answer
without the chain is a guess among ~100 values.

Errors happen mid-chain. The cold-start demonstrations (`make_demonstrations`, the SFT data) slip
at `SLIP_RATES` per step, as a hurried solver does: a carry dropped or added in a total, or a term
skipped; the chain goes on correctly from the wrong total. The SFT policy learns these slips with
the rest, so its sampled chains (temperature 1) fail at a per-step rate (plus its own misreadings
of terms); longer problems, whose prompts show more letters, pass more steps and are solved less
often. RL can remove the slips (they are low-probability tokens at known places), and a policy
pushed to shorten its responses has one way to do it: skip terms.

Validated on the SFT policy of examples/tiny_cot_cpu.yaml (1200 SFT steps; `python
tools/chain_task_report.py --model <run>/checkpoints/actor --problems 1024 --samples 4`, 2026-12-01):

| terms                                     | 13   | 14   | 15   | 16   | 17   | 18   | all   |
|-------------------------------------------|------|------|------|------|------|------|-------|
| sampled accuracy (temperature 1, top-p 1) | 0.52 | 0.45 | 0.46 | 0.40 | 0.36 | 0.32 | 0.418 |
| greedy accuracy                           | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 0.99 | 0.999 |

- Full chains: sampled responses 131 tokens on average (72-181), correct ones 131 (shortest 100);
  none truncated at 200. The trainer's own held-out evaluation (128 problems x 4) gave avg@4 0.428,
  pass@4 0.891.
- Where sampled chains first go wrong: a total miscalculated 62 % (the carry slips), a term
  skipped or repeated 32 % (the skip slips), the chain stopped early 4 %, other 2 %.
- A shortened chain is wrong: forced to answer (greedy) after half of the correct chain 0.0 %,
  with no chain (`<think></think>` given) 0.0 % right.
- Greedy decoding takes the likely token at every slip, so it is nearly always right: RL's room
  is in the sampled accuracy (avg@k); greedy accuracy can only show a policy getting worse.
- With 600 SFT steps instead of 1200 the policy is still unsure of the format: sampled 0.100,
  greedy 0.492 (128 x 4); the recipe keeps 1200.
- The critic (from the SFT policy, value pretraining 30 steps, λ = 1) learns the mean return and
  little more: explained variance stays at 0.00 ± 0.01 and the value loss at ~0.50 (the return's
  variance / 2). The number of terms moves the success rate by only 0.2 across the range; the
  rest of the spread is whether a slip is sampled, which the prompt cannot show.

`chain_sums_graded` (examples/tiny_cot_cpu.yaml with `data.task=chain_sums_graded
rollout.max_prompt_tokens=38`) is the same task with what a critic can learn: a pace tag opens each prompt (`xa7b3...=`: x careful, y plain,
z hurried; PACES) and scales the demonstrations' slip rates by 0.2, 1 or 3, so the prompt shows a
success rate: the demonstrations are right 88 %, 49 % and 10 % of the time (3000 problems). A
critic that knew each pace's and length's rate would explain ~0.4 of the return's variance at the
first token, against ~0.02 for `chain_sums` (`terms_value_ceiling`). Validated on SFT policies of
seed 1234 (`tools/chain_task_report.py --graded`, 256 held-out problems x 4 samples at temperature 1):

| SFT steps | greedy | sampled | sampled by pace x / y / z | value ceiling (measured) |
|---|---|---|---|---|
| 1200 (the recipe's) | 0.270 | 0.116 | 0.180 / 0.125 / 0.047 | 0.053 |
| 2400 | 0.992 | 0.475 | 0.805 / 0.438 / 0.198 | 0.233 |

After 1200 steps the policy has not learned to copy the terms (185 of its 187 greedy failures first go
wrong by a term copied wrong; the noisier demonstrations are slower to learn than chain_sums's).
After 2400 it writes full chains (correct ones 104+ tokens; forced to answer after half of a correct
chain it is never right) and the pace moves its success rate from 0.80 to 0.20: a critic that knew
the pace and the number of terms would explain 0.23 of the return's variance, against 0.02 on
`chain_sums`. So tools/reproduce.py's `--task chain_sums_graded` runs the SFT cold start for 2400 steps.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

MIN_TERMS = 13
MAX_TERMS = 18
LETTERS = string.ascii_lowercase[:MAX_TERMS]
CHARACTERS = list("0123456789+-=},") + list(LETTERS)
STEP_SEPARATOR = ","
SLIP_RATES = {"carry": 0.03, "skip": 0.02}
"""Per step, the chance that a cold-start demonstration slips: a carry dropped (or a spurious one
added) in the new total, or the term skipped. The chain then goes on correctly from the wrong
total, so the final answer is wrong."""


PACES = {"x": 0.2, "y": 1.0, "z": 3.0}
"""`chain_sums_graded`: a pace tag opens the prompt and scales the demonstrations' SLIP_RATES by
its factor (careful x, plain y, hurried z), so the success rate a problem's prompt shows ranges
from ~0.85 to ~0.1 for the demonstrations; the chain itself is the same as `chain_sums`'s."""
GRADED_CHARACTERS = CHARACTERS + list(PACES)


@dataclass(frozen=True)
class ChainProblem:
    """A sum of tagged single digits; `prompt`, `answer` and `solution()` as every synthetic task."""

    terms: tuple[int, ...]
    slips: tuple[tuple[int, str], ...] = ()
    """(step, kind) slips of this problem's demonstration (`demonstration()`); step i adds term i."""
    pace: str = ""
    """`chain_sums_graded` only: the pace tag (a key of PACES) that opens the prompt."""

    @property
    def prompt(self) -> str:
        """`a7b3c9d2=`: each term after its position letter (after the pace tag, if any)."""
        return self.pace + "".join(f"{LETTERS[i]}{t}" for i, t in enumerate(self.terms)) + "="

    @property
    def answer(self) -> str:
        """The sum."""
        return str(sum(self.terms))

    def steps(self, slips: tuple[tuple[int, str], ...] = ()) -> list[str]:
        """The chain's steps `total+<letter><term>=new total`, one per term after the first,
        with `slips` applied (a skipped step is left out; later steps continue from its total)."""
        kinds = dict(slips)
        out, total = [], self.terms[0]
        for i, t in enumerate(self.terms[1:], start=1):
            if kinds.get(i) == "skip":
                continue
            new = total + t
            if kinds.get(i) == "carry":                   # drop the carry, or add one that is not there
                new += -10 if total % 10 + t >= 10 else 10
            out.append(f"{total}+{LETTERS[i]}{t}={new}")
            total = new
        return out

    def _response(self, steps: list[str]) -> str:
        last = int(steps[-1].rsplit("=", 1)[1]) if steps else self.terms[0]
        return f"<think>{STEP_SEPARATOR.join(steps)}</think>\\boxed{{{last}}}"

    def solution(self) -> str:
        """A correct response (without the end-of-sequence token)."""
        return self._response(self.steps())

    def demonstration(self) -> str:
        """The cold-start (SFT) response: the solution with this problem's slips, answer included."""
        return self._response(self.steps(self.slips))


def make_problems(count: int, seed: int) -> list[ChainProblem]:
    """`count` problems of MIN_TERMS..MAX_TERMS digits (uniform), reproducible from `seed`."""
    rng = random.Random(seed)
    return [ChainProblem(tuple(rng.randrange(10) for _ in range(rng.randint(MIN_TERMS, MAX_TERMS))))
            for _ in range(count)]


def _with_slips(problems: list[ChainProblem], seed: int) -> list[ChainProblem]:
    """Each problem with slips drawn per step at SLIP_RATES (times its pace's factor, if tagged)."""
    rng = random.Random(seed * 7 + 1)
    out = []
    for q in problems:
        scale = PACES[q.pace] if q.pace else 1.0
        carry, skip = SLIP_RATES["carry"] * scale, SLIP_RATES["skip"] * scale
        slips = []
        for i in range(1, len(q.terms)):
            u = rng.random()
            if u < carry:
                slips.append((i, "carry"))
            elif u < carry + skip:
                slips.append((i, "skip"))
        out.append(ChainProblem(q.terms, tuple(slips), q.pace))
    return out


def make_demonstrations(count: int, seed: int) -> list[ChainProblem]:
    """The problems of `make_problems(count, seed)`, each step slipping at `SLIP_RATES`."""
    return _with_slips(make_problems(count, seed), seed)


def make_graded_problems(count: int, seed: int) -> list[ChainProblem]:
    """`chain_sums_graded`: the problems of `make_problems(count, seed)`, each with a pace tag
    (uniform over PACES, from its own stream)."""
    rng = random.Random(seed * 13 + 5)
    return [ChainProblem(q.terms, pace=rng.choice(sorted(PACES))) for q in make_problems(count, seed)]


def make_graded_demonstrations(count: int, seed: int) -> list[ChainProblem]:
    """The problems of `make_graded_problems(count, seed)`, slipping at SLIP_RATES x their pace's factor."""
    return _with_slips(make_graded_problems(count, seed), seed)


def demonstration_success(pace: str | None, terms: int) -> float:
    """Probability that a demonstration of `terms` terms (at `pace`; None: untagged) is right: no
    slip in its terms - 1 steps (ignoring the rare lucky ones: a skipped 0, slips that cancel)."""
    rate = (SLIP_RATES["carry"] + SLIP_RATES["skip"]) * (PACES[pace] if pace else 1.0)
    return (1.0 - rate) ** (terms - 1)


SFT_SAMPLED_ACCURACY = {13: 0.52, 14: 0.45, 15: 0.46, 16: 0.40, 17: 0.36, 18: 0.32}
"""Sampled accuracy of the validated SFT policy by number of terms (the table above)."""
GRADED_SFT_SAMPLED_BY_PACE = {"x": 0.8049, "y": 0.4375, "z": 0.1977}
GRADED_SFT_VALUE_CEILING = 0.233
"""`chain_sums_graded`'s validated SFT policy (2400 steps, seed 1234; the table above): sampled
accuracy by pace and the measured value ceiling (pace and number of terms known)."""


def terms_value_ceiling(accuracy: dict | None = None, counts: dict | None = None) -> float:
    """Explained variance of the best critic that knows a problem's number of terms (the keys of
    `accuracy`: terms, or (pace, terms) for chain_sums_graded) and nothing else, at the start of
    the response: Var over problems of P(correct | key) / Var of the outcome (keys equally likely;
    either reward scale: EV is invariant to it). About 0.02 for chain_sums's SFT policy: the prompt
    shows little of what decides the outcome, the slips sampled later do. With `counts` (samples
    behind each measured accuracy) the binomial noise of the estimates, which would inflate the
    spread between keys, is subtracted."""
    acc = SFT_SAMPLED_ACCURACY if accuracy is None else accuracy
    ps = list(acc.values())
    mean = sum(ps) / len(ps)
    between = sum((p - mean) ** 2 for p in ps) / len(ps)
    if counts is not None:
        noise = [acc[k] * (1 - acc[k]) / (counts[k] - 1) for k in acc if counts[k] > 1]
        between = max(between - sum(noise) / len(ps), 0.0)
    total = mean * (1 - mean)
    return between / total if total > 0 else 0.0


def prompt_tokens(graded: bool = False) -> int:
    """Tokens of the longest prompt (the pace tag if `graded`, a letter and a digit per term, then `=`)."""
    return 2 * MAX_TERMS + 1 + graded


def response_tokens() -> int:
    """Tokens of the longest correct response, end-of-sequence token included: that of MAX_TERMS
    nines, whose running totals are the longest (each special token counts one)."""
    text = ChainProblem((9,) * MAX_TERMS).solution()
    specials = ("<think>", "</think>", "\\boxed{")
    return len(text) - sum(len(t) - 1 for t in specials) + 1
