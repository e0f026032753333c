"""Answer extraction for the rule-based verifier (VC-PPO §4.1, "Reward Modeling").

The verifier "ignores the thinking part enclosed by the <think> tokens and extracts only the
answer part for evaluation". This module holds that text-only step: dropping the thinking part,
locating the final answer and normalising its surface form. It never calls sympy, runs in time
linear in the response length and never raises.

Extraction order (the first rule that finds something wins, and within a rule the LAST
occurrence in the answer part wins):

1. ``\\boxed{...}`` / ``\\fbox{...}`` with balanced (nested) braces;
2. an answer phrase: "the (final) answer is X", "Answer: X", "answer = X";
3. a GSM8K-style ``#### X`` line.

There is deliberately no "last number in the text" fallback: a response that never commits to an
answer is scored as wrong, so the policy cannot collect reward by ending on a lucky number.
"""
from __future__ import annotations

import re
from collections import deque

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Longest answer span handed to the parser; longer spans are treated as "no answer" (real
# answers, matrices included, are far shorter, and sympy time grows with the span).
MAX_ANSWER_CHARS = 1000
# How many of the last occurrences of a pattern are tried before giving up (bounds the work
# on adversarial inputs with thousands of unbalanced "\boxed{").
_MAX_TRIES = 32

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PHRASE_RE = re.compile(r"(?<![A-Za-z])answer(?:\*\*)?\s*(?:is\b\s*:?|:|=)", re.IGNORECASE)
_HASH_RE = re.compile(r"####")
# First sentence end: a period followed by whitespace or the end of the text (not "3.5").
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
# Math environments an answer may be written in: (opening, regex for the closing delimiter);
# "\$" is an escaped dollar sign (currency), never a delimiter.
_MATH_DELIMS = (("$$", re.compile(r"(?<!\\)\$\$")), ("\\[", re.compile(r"\\\]")),
                ("\\(", re.compile(r"\\\)")), ("$", re.compile(r"(?<!\\)\$")))
_TRAILING_JUNK = " \t\r\n.,;:!*"

# "18 dollars", "1,234 apples", "30 \text{ degrees}": a number followed by plain words only.
_NUMBER_WITH_WORDS_RE = re.compile(
    r"(?P<num>-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s*(?:\\(?:text|mbox|mathrm)\s*\{\s*)?"
    r"(?P<words>[A-Za-z]{2,}(?:\s+[A-Za-z]{2,})*)\s*\}?\s*\.?")
# Words that carry mathematical meaning and must not be dropped as "units".
_MATH_WORDS = frozenset({"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln",
                         "exp", "mod", "infty", "infinity", "and", "or", "times", "cdot", "frac"})


def strip_thinking(response: str) -> str | None:
    """Return the answer part of a response (text after the last </think>), or None if unclosed."""
    close = response.rfind(THINK_CLOSE)
    if response.rfind(THINK_OPEN) > close:
        return None  # a <think> was opened and never closed: the response has no answer part
    return response[close + len(THINK_CLOSE):] if close >= 0 else response


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == "{", or None if it never closes."""
    depth = 0
    i, end = start, min(len(text), start + MAX_ANSWER_CHARS + 2)
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} in text."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    starts = deque((m.end() - 1 for m in _BOXED_RE.finditer(text)), maxlen=_MAX_TRIES)
    for brace in reversed(starts):
        content = _balanced_group(text, brace)
        if content is not None and content.strip():
            return content
    return None


def _span_after(text: str, pos: int) -> str:
    """The answer written right after an anchor at text[pos:]: a math environment or a sentence."""
    rest = text[pos:pos + 4 * MAX_ANSWER_CHARS].lstrip(" \t*:")
    for left, right in _MATH_DELIMS:
        if rest.startswith(left):
            close = right.search(rest, len(left))
            if close is not None:
                return rest[len(left):close.start()]
            break
    rest = rest.split("\n", 1)[0]
    end = _SENTENCE_END_RE.search(rest)
    if end is not None:
        rest = rest[:end.start()]
    return rest.rstrip(_TRAILING_JUNK)


def _last_anchored(text: str, pattern: re.Pattern[str]) -> str | None:
    """The span after the last occurrence of pattern that is followed by a non-empty answer."""
    ends = deque((m.end() for m in pattern.finditer(text)), maxlen=_MAX_TRIES)
    for pos in reversed(ends):
        span = _span_after(text, pos)
        if span:
            return span
    return None


def extract_answer(response: str) -> str | None:
    """Return the final-answer string of a response (thinking part ignored), or None if absent."""
    if not isinstance(response, str):
        return None
    part = strip_thinking(response)
    if not part:
        return None
    answer = _last_boxed(part)
    if answer is None:
        answer = _last_anchored(part, _PHRASE_RE)
    if answer is None:
        answer = _last_anchored(part, _HASH_RE)
    if answer is None:
        return None
    answer = answer.strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def normalize_answer(answer: str) -> str:
    """Return answer in a form math-verify parses: no $ delimiters, no trailing unit words."""
    text = answer.replace("\x00", "").strip()
    text = text.replace("\\$", "").replace("$", "").strip()
    text = text.rstrip(" \t\r\n.,;:").lstrip(" \t\r\n:")
    unit = _NUMBER_WITH_WORDS_RE.fullmatch(text)
    if unit is not None and not (set(unit["words"].lower().split()) & _MATH_WORDS):
        text = unit["num"]
    return text
