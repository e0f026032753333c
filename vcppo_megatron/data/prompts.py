"""Math problems from jsonl or parquet files, and a resumable, deterministic prompt order.

A row needs a problem and an answer field (`data.problem_key` / `data.answer_key`: a name, or a
list of names of which a file uses the first it has, so GSM8K's `question` and MATH's `solution`
load with the defaults; a dotted name such as `reward_model.ground_truth` reaches into nested
objects / parquet struct columns). The problem must be a non-empty string. The answer field is read in
`data.answer_format` (data/answers.py): as is (a non-empty string or an integer, kept as its
decimal text), GSM8K's `#### N` solutions, MATH's `\\boxed{}` solutions, or `auto` (chosen per file,
reported). jsonl files and parquet files (as written by HF `datasets`' `Dataset.to_parquet` or
pyarrow) load the same way. A malformed row (bad JSON, not an object, a missing, empty or mistyped
field, no answer in the expected format) is reported as `file:line N` (jsonl) or `file:row N`
(parquet), both 1-based, with the field and what was expected, then skipped (`on_bad_row="skip"`:
counted, the first few logged) or fatal (`on_bad_row="fail"`: `BadRowError` naming the location).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vcppo_megatron.data.answers import DESCRIPTION, FORMATS, AnswerFormat, detect_format, extract_answer

log = logging.getLogger(__name__)
SHOWN_BAD_ROWS = 5
_MISSING = object()
Keys = str | Sequence[str]


class BadRowError(ValueError):
    """A malformed data row under `on_bad_row="fail"` (the message names file, row and field)."""


@dataclass(frozen=True)
class MathProblem:
    """One problem, its ground-truth answer and where it came from (`file:line N`)."""

    problem: str
    answer: str
    location: str


@dataclass(frozen=True)
class LoadReport:
    """What loading a file did: rows read, loaded, skipped, the skipped rows' reasons, the answer format."""

    path: str
    num_rows: int
    num_loaded: int
    num_skipped: int
    bad_rows: list[str] = field(default_factory=list)
    answer_format: str = "field"
    """The format the answers were read in (`auto` resolved to the one it chose)."""
    format_note: str = ""
    """How the format was chosen: the configured value, or `auto` and the row it was read from."""
    problem_key: str = "problem"
    """The field the problems were read from (the first of `data.problem_key`'s names the file has)."""
    answer_key: str = "answer"
    """The field the answers were read from."""

    def summary(self) -> str:
        """One line: loaded / skipped counts of the file, and which fields were read how."""
        return (f"{self.path}: loaded {self.num_loaded} of {self.num_rows} rows ({self.num_skipped} malformed "
                f"rows skipped); problem: field {self.problem_key!r}; answer: {DESCRIPTION[self.answer_format]} "
                f"of field {self.answer_key!r} ({self.format_note})")


def get_field(row: dict[str, Any], key: str) -> Any:
    """row[key], or for a dotted key the nested value (`a.b` -> row['a']['b']); _MISSING if absent."""
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _fields_hint(row: dict[str, Any], key: str) -> str:
    """The fields present where the lookup of `key` stopped (nested keys: inside the deepest object found)."""
    node, where = row, ""
    for part in key.split(".")[:-1]:
        if not isinstance(node.get(part), dict):
            break
        node, where = node[part], f"{where}.{part}" if where else part
    return f"fields{f' of {where!r}' if where else ''}: {sorted(node)[:10]}"


def _check_row(row: Any, problem_key: str, answer_key: str, fmt: str) -> tuple[str, str] | str:
    """(problem, answer) of a valid row, else the reason it is malformed."""
    if not isinstance(row, dict):
        return f"expected a JSON object with {problem_key!r} and {answer_key!r}, got {type(row).__name__}"
    problem, answer = get_field(row, problem_key), get_field(row, answer_key)
    if problem is _MISSING:
        return f"missing field {problem_key!r} ({_fields_hint(row, problem_key)})"
    if not isinstance(problem, str) or not problem.strip():
        return f"field {problem_key!r} = {problem!r:.60}: expected a non-empty string"
    if answer is _MISSING:
        return f"missing field {answer_key!r} ({_fields_hint(row, answer_key)})"
    try:
        return problem, extract_answer(answer, fmt, answer_key)
    except ValueError as err:
        return str(err)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed row or a JSONDecodeError) per non-blank line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{path}:line {lineno}", err


def _candidates(keys: Keys) -> list[str]:
    """The field names a key setting tries, in order."""
    return [keys] if isinstance(keys, str) else list(keys)


def _parquet_rows(path: Path, keys: list[list[str]]) -> tuple[list[str], Iterator[tuple[str, Any]]]:
    """(the key chosen from each candidate list, (location, row dict) per row); only those columns are read."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    column = lambda k: k if k in names else k.split(".")[0]  # noqa: E731 - a dotted key reads its top column
    chosen = [next((k for k in cands if column(k) in names), None) for cands in keys]
    missing = [cands if len(cands) > 1 else cands[0] for cands, k in zip(keys, chosen) if k is None]
    if missing:
        raise BadRowError(f"{path}: columns {missing} not found: expected them among {names} "
                          f"(set data.problem_key / data.answer_key)")

    def rows() -> Iterator[tuple[str, Any]]:
        row_no = 0
        for batch in parquet.iter_batches(columns=list(dict.fromkeys(column(k) for k in chosen))):
            for row in batch.to_pylist():
                row_no += 1
                yield f"{path}:row {row_no}", row
    return [str(k) for k in chosen], rows()


class _Reading:
    """One file's resolved settings: the problem / answer fields and the answer format (auto: chosen once)."""

    def __init__(self, problem_keys: list[str], answer_keys: list[str], answer_format: str) -> None:
        self.problem_keys, self.answer_keys = problem_keys, answer_keys
        self.fixed = [len(problem_keys) == 1, len(answer_keys) == 1]
        self.asked, self.fmt = answer_format, answer_format
        self.note = f"data.answer_format = {answer_format}"

    @property
    def problem_key(self) -> str:
        return self.problem_keys[0]

    @property
    def answer_key(self) -> str:
        return self.answer_keys[0]

    def settle(self, row: Any, location: str) -> None:
        """Choose the fields (first candidate present) and the `auto` format from the first rows that show them."""
        if not isinstance(row, dict):
            return
        for i, keys in enumerate((self.problem_keys, self.answer_keys)):
            if not self.fixed[i]:
                present = [k for k in keys if get_field(row, k) is not _MISSING]
                if present:
                    keys[:] = [present[0]]
                    self.fixed[i] = True
        if self.fmt == "auto" and self.fixed[1] and get_field(row, self.answer_key) is not _MISSING:
            self.fmt = detect_format(get_field(row, self.answer_key))
            self.note = f"data.answer_format = auto, chose {self.fmt!r} from {location}"

    def check(self, row: Any) -> tuple[str, str] | str:
        """(problem, answer) of a valid row, else the reason it is malformed."""
        if isinstance(row, json.JSONDecodeError):
            return f"bad JSON ({row.msg} at column {row.colno})"
        if isinstance(row, dict) and not all(self.fixed):
            keys = self.problem_keys if not self.fixed[0] else self.answer_keys
            return f"none of the fields {keys} ({_fields_hint(row, keys[0])})"
        checked = _check_row(row, self.problem_key, self.answer_key, "field" if self.fmt == "auto" else self.fmt)
        if isinstance(checked, str) or self.asked != "auto":
            return checked
        written = detect_format(get_field(row, self.answer_key))
        return checked if written == self.fmt else \
            f"field {self.answer_key!r} is written as {written!r} (format {self.fmt!r} expected)"


def load_problems(path: str | Path, *, problem_key: Keys = ("problem", "question"),
                  answer_key: Keys = ("answer", "solution"), answer_format: AnswerFormat = "auto",
                  on_bad_row: Literal["skip", "fail"] = "fail") -> tuple[list[MathProblem], LoadReport]:
    """Read problems from a `.jsonl` or `.parquet` file; malformed rows are skipped or fatal.

    `problem_key` / `answer_key` name a field or a list of fields: the first one the file has is used
    for all its rows (parquet: from the columns; jsonl: from the first row that has one).
    """
    path = Path(path)
    if on_bad_row not in ("skip", "fail"):
        raise ValueError(f"data.on_bad_row = {on_bad_row!r}: expected 'skip' or 'fail'")
    if answer_format not in FORMATS:
        raise ValueError(f"data.answer_format = {answer_format!r}: expected one of {FORMATS}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    keys = [_candidates(problem_key), _candidates(answer_key)]
    if not all(keys):
        raise ValueError(f"data.problem_key = {problem_key!r}, data.answer_key = {answer_key!r}: expected a field "
                         f"name or a non-empty list of them")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".parquet":
        chosen, rows = _parquet_rows(path, keys)
        keys = [[k] for k in chosen]
    else:
        raise ValueError(f"data file {str(path)!r}: suffix {suffix!r}, expected .jsonl or .parquet")
    reading = _Reading(*keys, answer_format)
    problems, bad, num_rows = [], [], 0
    for location, row in rows:
        num_rows += 1
        reading.settle(row, location)
        checked = reading.check(row)
        if isinstance(checked, str):
            message = f"{location}: {checked}"
            if answer_format == "auto" and "(format " in checked:
                message += f" [{reading.note}; set data.answer_format to read this file otherwise]"
            if on_bad_row == "fail":
                raise BadRowError(f"{message} (data.on_bad_row = 'fail'; 'skip' skips such rows)")
            bad.append(message)
            continue
        problems.append(MathProblem(checked[0], checked[1], location))
    report = LoadReport(str(path), num_rows, len(problems), len(bad), bad,
                        answer_format="field" if reading.fmt == "auto" else reading.fmt,
                        format_note=reading.note, problem_key=reading.problem_key, answer_key=reading.answer_key)
    if bad:
        shown = "\n  ".join(bad[:SHOWN_BAD_ROWS])
        log.warning("%s; first %d:\n  %s", report.summary(), min(len(bad), SHOWN_BAD_ROWS), shown)
    if not problems:
        raise ValueError(f"{report.summary()}: expected at least one valid problem")
    return problems, report


class PromptOrder:
    """Deterministic epoch-wise shuffled order over `num_items`, resumable from `state_dict`.

    Epoch e visits a permutation drawn from (seed, e); a batch that runs past an epoch's end
    continues in the next epoch, so every batch is full.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True) -> None:
        if num_items < 1:
            raise ValueError(f"num_items = {num_items}: expected >= 1")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_indices(self, batch_size: int) -> list[int]:
        """The next `batch_size` item indices (crossing into the next epoch when needed)."""
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: expected >= 1")
        out: list[int] = []
        while len(out) < batch_size:
            take = min(batch_size - len(out), self.num_items - self.position)
            out.extend(self._perm[self.position:self.position + take].tolist())
            self.position += take
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return out

    def state_dict(self) -> dict[str, int | bool]:
        """The data position for a checkpoint."""
        return {"num_items": self.num_items, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Resume at a checkpointed position; the dataset size, seed and shuffle must match."""
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data state {key} = {state[key]!r}: expected {getattr(self, key)!r}"
                                 f" (the run resumes with a different dataset or seed)")
        if not 0 <= int(state["position"]) < self.num_items:
            raise ValueError(f"data state position = {state['position']}: expected in "
                             f"[0, {self.num_items})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
