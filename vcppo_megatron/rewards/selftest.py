"""Accuracy self-test of the VC-PPO §4.1 verifier on the benchmark answers in datasets/.

For every problem the golden answer is written into synthetic responses: several natural
formats that must score +1 ("correct" variants) and perturbations that must score -1 ("wrong"
variants). Shared by tests/unit/test_rewards.py (subset) and tools/verifier_accuracy.py (full).

A variant that does not apply to a gold (e.g. thousands separators for 42, negating 0) is left
out for that gold, so each variant reports its own denominator. No gold is ever dropped for being
hard to verify: a gold math-verify cannot round-trip counts as a failure of every correct variant.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATASET_FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500.jsonl",
                 "aime24": "aime24.jsonl", "aime25": "aime25.jsonl"}

_INTEGER_RE = re.compile(r"-?\d+")
# Golds that are one scalar expression (no tuple, set, interval, equation, matrix, text or
# base subscript), for which "+1", "x2" and negation are well-defined different values.
_NON_SCALAR_RE = re.compile(r"[,=\[\]()_]|\\begin|\\text|\\mbox|\\pm|\\cup|\\\{|\\in\b")
_ZERO_RE = re.compile(r"-?0*\.?0*")
_THINK = ("<think>\nLet me work through this carefully. First, set up the equations. "
          "A first guess would be \\boxed{{{decoy}}}, but that ignores a case, so recheck.\n"
          "</think>\n\n")


@dataclass(frozen=True)
class Case:
    """One synthetic response, the gold it is scored against and the expected reward."""

    dataset: str
    variant: str
    kind: str  # "correct" or "wrong"
    response: str
    gold: str
    expected: float


def load_dataset(path: str | Path) -> list[dict]:
    """Rows of a jsonl benchmark file ({"id", "problem", "answer", ...} per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _with_thousands(gold: str) -> str | None:
    """1234 -> 1,234 for integers with at least four digits; None otherwise."""
    if not _INTEGER_RE.fullmatch(gold) or abs(int(gold)) < 1000:
        return None
    return f"{int(gold):,}"


def _alt_fraction(gold: str) -> str | None:
    r"""\frac{a}{b} / \dfrac{a}{b} -> a/b (same value, plain-text form); None otherwise."""
    m = re.fullmatch(r"(-?)\\d?frac\{?(\d+)\}?\{?(\d+)\}?", gold.replace(" ", ""))
    return f"{m[1]}{m[2]}/{m[3]}" if m else None


def _first_digit_changed(gold: str) -> str:
    """The gold with its first digit changed (9 -> 8, d -> d+1): a different number."""
    m = re.search(r"\d", gold)
    if m is None:
        if "\\text{" in gold:
            return "\\text{none of these}"
        return f"{gold} + 1"
    digit = int(m[0])
    new = 8 if digit == 9 else digit + 1
    return gold[:m.start()] + str(new) + gold[m.end():]


def _is_scalar(gold: str) -> bool:
    return not _NON_SCALAR_RE.search(gold)


def _is_zero(gold: str) -> bool:
    return bool(_ZERO_RE.fullmatch(gold.strip())) and any(c == "0" for c in gold)


def _plus_one(gold: str) -> str | None:
    if _INTEGER_RE.fullmatch(gold):
        return str(int(gold) + 1)
    return f"{gold} + 1" if _is_scalar(gold) else None


def _times_two(gold: str) -> str | None:
    if _is_zero(gold):
        return None
    if _INTEGER_RE.fullmatch(gold):
        return str(2 * int(gold))
    return f"2\\left({gold}\\right)" if _is_scalar(gold) else None


def _negated(gold: str) -> str | None:
    if _is_zero(gold):
        return None
    if _INTEGER_RE.fullmatch(gold):
        return str(-int(gold))
    return f"-\\left({gold}\\right)" if _is_scalar(gold) else None


def correct_responses(gold: str) -> dict[str, str]:
    """Responses stating `gold` in natural formats (variant -> response); all must score +1."""
    wrong = _first_digit_changed(gold)
    think = _THINK.format(decoy=wrong)
    out = {
        "boxed": f"{think}Putting it together, the answer is $\\boxed{{{gold}}}$.",
        "boxed_no_open_tag": f"Some reasoning.\n</think>\n**Final answer:** \\boxed{{{gold}}}",
        "boxed_dollar": f"{think}So we get \\boxed{{${gold}$}}.",
        "fbox": f"{think}Hence \\fbox{{{gold}}}.",
        "answer_is": f"{think}Checking again, so the final answer is {gold}.",
        "answer_is_dollar": f"{think}The answer is ${gold}$.",
        "answer_colon": f"{think}Summing up the cases.\n\n**Answer:** {gold}",
        "hash": f"{think}Adding the parts gives the total.\n#### {gold}",
    }
    thousands = _with_thousands(gold)
    if thousands is not None:
        out["hash_thousands"] = f"{think}The total is\n#### {thousands}"
        out["boxed_thousands"] = f"{think}The total is \\boxed{{{thousands}}}."
    fraction = _alt_fraction(gold)
    if fraction is not None:
        out["plain_fraction"] = f"{think}The answer is {fraction}."
    if _INTEGER_RE.fullmatch(gold):
        out["with_units"] = f"{think}The answer is {gold} dollars."
    return out


def wrong_responses(gold: str) -> dict[str, str]:
    """Responses whose final answer differs from `gold` (variant -> response); all must score -1."""
    changed = _first_digit_changed(gold)
    think = _THINK.format(decoy=changed)
    out = {"digit_changed": f"{think}The answer is \\boxed{{{changed}}}."}
    for name, make in (("plus_one", _plus_one), ("times_two", _times_two),
                       ("negated", _negated)):
        value = make(gold)
        if value is not None:
            out[name] = f"{think}The answer is \\boxed{{{value}}}."
    out["gold_only_in_think"] = (f"<think>\nMaybe \\boxed{{{gold}}}? The answer is {gold}.\n"
                                 f"</think>\nThe answer is \\boxed{{{changed}}}.")
    out["unterminated_think"] = (f"<think>\nWorking... so the answer is \\boxed{{{gold}}}.\n"
                                 f"#### {gold}")
    return out


def build_cases(dataset: str, golds: Sequence[str], correct_reward: float = 1.0,
                wrong_reward: float = -1.0) -> list[Case]:
    """All correct and wrong cases for the given golds of one dataset."""
    cases = []
    for gold in golds:
        gold = str(gold)
        for variant, response in correct_responses(gold).items():
            cases.append(Case(dataset, variant, "correct", response, gold, correct_reward))
        for variant, response in wrong_responses(gold).items():
            cases.append(Case(dataset, variant, "wrong", response, gold, wrong_reward))
    return cases


def tabulate(cases: Sequence[Case], rewards: Sequence[float]
             ) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(dataset, kind, variant) -> (#cases scored as expected, #cases)."""
    table: dict[tuple[str, str, str], tuple[int, int]] = {}
    for case, reward in zip(cases, rewards, strict=True):
        key = (case.dataset, case.kind, case.variant)
        ok, total = table.get(key, (0, 0))
        table[key] = (ok + (reward == case.expected), total + 1)
    return table


def failures(cases: Sequence[Case], rewards: Sequence[float]) -> list[Case]:
    """The cases whose reward differs from the expected one."""
    return [c for c, r in zip(cases, rewards) if r != c.expected]


def summarize(table: dict[tuple[str, str, str], tuple[int, int]]
              ) -> dict[tuple[str, str], tuple[int, int]]:
    """(dataset, kind) -> (#ok, #cases) summed over variants."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for (dataset, kind, _), (ok, total) in table.items():
        a, b = out.get((dataset, kind), (0, 0))
        out[(dataset, kind)] = (a + ok, b + total)
    return out


def format_table(table: dict[tuple[str, str, str], tuple[int, int]]) -> str:
    """Markdown table: per dataset, the correct then the wrong variants, each with a total."""
    lines = ["| dataset | kind | variant | scored as expected | accuracy |",
             "|---|---|---|---|---|"]
    totals = summarize(table)
    for dataset in dict.fromkeys(key[0] for key in table):
        for kind in ("correct", "wrong"):
            for (d, k, variant), (ok, total) in table.items():
                if (d, k) == (dataset, kind):
                    lines.append(f"| {d} | {k} | {variant} | {ok}/{total} | {ok / total:.2%} |")
            if (dataset, kind) in totals:
                ok, total = totals[(dataset, kind)]
                lines.append(f"| {dataset} | {kind} | **all** | **{ok}/{total}** | "
                             f"**{ok / total:.2%}** |")
    return "\n".join(lines)
