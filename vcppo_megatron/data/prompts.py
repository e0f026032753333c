"""Math problems from jsonl or parquet files, and a resumable, deterministic prompt order.

A row needs a problem and an answer field (names configurable, `data.problem_key` /
`data.answer_key`). The problem must be a non-empty string; the answer a non-empty string or an
integer (kept as its decimal text). A malformed row (bad JSON, not an object, a missing, empty or
mistyped field) is reported as `file:line N` (jsonl) or `file:row N` (parquet), both 1-based, with
what was expected, then skipped (`on_bad_row="skip"`: counted, the first few logged) or fatal
(`on_bad_row="fail"`: `BadRowError` naming the location).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)
SHOWN_BAD_ROWS = 5


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
    """What loading a file did: rows read, loaded, skipped, and the skipped rows' reasons."""

    path: str
    num_rows: int
    num_loaded: int
    num_skipped: int
    bad_rows: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: loaded / skipped counts of the file."""
        return (f"{self.path}: loaded {self.num_loaded} of {self.num_rows} rows"
                f" ({self.num_skipped} malformed rows skipped)")


def _check_row(row: Any, problem_key: str, answer_key: str) -> tuple[str, str] | str:
    """(problem, answer) of a valid row, else the reason it is malformed."""
    if not isinstance(row, dict):
        return f"expected a JSON object with {problem_key!r} and {answer_key!r}, got {type(row).__name__}"
    problem, answer = row.get(problem_key), row.get(answer_key)
    if problem_key not in row:
        return f"missing field {problem_key!r} (fields: {sorted(row)[:10]})"
    if not isinstance(problem, str) or not problem.strip():
        return f"field {problem_key!r} = {problem!r:.60}: expected a non-empty string"
    if answer_key not in row:
        return f"missing field {answer_key!r} (fields: {sorted(row)[:10]})"
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        return f"field {answer_key!r} = {answer!r:.60}: expected a non-empty string or an integer"
    return problem, answer


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


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[tuple[str, Any]]:
    """(location, row dict) per parquet row; only the needed columns are read."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise BadRowError(f"{path}: columns {missing} not found: expected them among {names} "
                          f"(set data.problem_key / data.answer_key)")
    row_no = 0
    for batch in parquet.iter_batches(columns=columns):
        for row in batch.to_pylist():
            row_no += 1
            yield f"{path}:row {row_no}", row


def load_problems(path: str | Path, *, problem_key: str = "problem", answer_key: str = "answer",
                  on_bad_row: Literal["skip", "fail"] = "fail"
                  ) -> tuple[list[MathProblem], LoadReport]:
    """Read problems from a `.jsonl` or `.parquet` file; malformed rows are skipped or fatal."""
    path = Path(path)
    if on_bad_row not in ("skip", "fail"):
        raise ValueError(f"data.on_bad_row = {on_bad_row!r}: expected 'skip' or 'fail'")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path, [problem_key, answer_key])
    else:
        raise ValueError(f"data file {str(path)!r}: suffix {suffix!r}, expected .jsonl or .parquet")
    problems, bad, num_rows = [], [], 0
    for location, row in rows:
        num_rows += 1
        checked = (f"bad JSON ({row.msg} at column {row.colno})"
                   if isinstance(row, json.JSONDecodeError) else _check_row(row, problem_key, answer_key))
        if isinstance(checked, str):
            message = f"{location}: {checked}"
            if on_bad_row == "fail":
                raise BadRowError(f"{message} (data.on_bad_row = 'fail'; 'skip' skips such rows)")
            bad.append(message)
            continue
        problems.append(MathProblem(checked[0], checked[1], location))
    report = LoadReport(str(path), num_rows, len(problems), len(bad), bad)
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
