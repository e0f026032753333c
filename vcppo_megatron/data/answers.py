"""The ground-truth answer of a data row, in the formats users bring (`data.answer_format`).

- `field`: the answer field holds the answer itself (`"72"`, `"\\frac{14}{3}"`, or an integer).
- `gsm8k`: GSM8K's own rows (openai/grade-school-math): the worked solution, whose last line is
  `#### 72`; the answer is the text after the last `####` (thousands separators removed).
- `boxed`: MATH's rows (Hendrycks et al.): a worked solution with the answer in its last
  `\\boxed{...}` (or `\\fbox{...}`), nested braces allowed.
- `auto`: one of the three, chosen per file from the first row that has an answer field (an integer
  or text without `####` / `\\boxed`: `field`) and then required of every row of that file; the
  choice and the row it came from are reported with the file's load summary.
"""
from __future__ import annotations

import re
from typing import Literal

AnswerFormat = Literal["auto", "field", "gsm8k", "boxed"]
FORMATS = ("auto", "field", "gsm8k", "boxed")

_GSM8K_MARK = "####"
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{| )")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")
DESCRIPTION = {"field": "the value", "gsm8k": "the text after the last '####'", "boxed": "the last \\boxed{...}"}


def detect_format(answer: str | int) -> str:
    """The format an answer field's value is written in: `gsm8k`, `boxed` or `field`."""
    if not isinstance(answer, str):
        return "field"
    if _GSM8K_MARK in answer:
        return "gsm8k"
    if _BOXED_RE.search(answer):
        return "boxed"
    return "field"


def _brace_group(text: str, start: int) -> str | None:
    """Content of the `{...}` group opening at text[start], or None when it never closes."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2                     # \{ and \} are literal braces
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty `\\boxed{...}` / `\\fbox{...}` (or `\\boxed X`)."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        if match.group(1) == "{":
            content = _brace_group(text, match.end() - 1)
        else:                          # MATH's rare "\boxed 5": up to the next "$" or line end
            content = re.split(r"[$\n]", text[match.end():], maxsplit=1)[0]
        if content is not None and content.strip():
            return content.strip()
    return None


def gsm8k_final(text: str) -> str | None:
    """The answer after the last `####` of a GSM8K solution, without thousands separators."""
    at = text.rfind(_GSM8K_MARK)
    if at < 0:
        return None
    answer = text[at + len(_GSM8K_MARK):].strip()
    if _THOUSANDS_RE.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer or None


def extract_answer(value: str | int, fmt: str, key: str) -> str:
    """The answer held by field `key`'s `value` in format `fmt`; ValueError says what was expected."""
    if isinstance(value, int) and not isinstance(value, bool):
        if fmt != "field":
            raise ValueError(f"field {key!r} = {value!r}: expected text with the answer "
                             f"{DESCRIPTION[fmt]} (format {fmt!r}), got an integer")
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} = {value!r:.60}: expected a non-empty string or an integer")
    if fmt == "field":
        return value
    answer = gsm8k_final(value) if fmt == "gsm8k" else last_boxed(value)
    if answer is None:
        what = "a solution whose last line is '#### <answer>'" if fmt == "gsm8k" else \
            "a solution with the answer in \\boxed{...}"
        raise ValueError(f"field {key!r} = {value[-60:]!r} (its end): expected {what} (format {fmt!r})")
    return answer
