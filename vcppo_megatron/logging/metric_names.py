"""The documented metric names, parsed once from docs/METRICS.md.

A table row's first cell names a metric in backticks; further backticked `/suffix` entries in the
same cell name siblings (`critic/values/mean`, `/std` → `critic/values/std`). A segment written
`<...>` is a placeholder for one path segment (`eval/<dataset>/pass@<k>`).
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

DEFAULT_METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
PHASES = ("sft", "value_pretrain", "rl", "eval")


class UndocumentedMetricError(ValueError):
    """A metric name that docs/METRICS.md does not define."""


def _names_of_cell(cell: str) -> list[str]:
    found = re.findall(r"`([^`]+)`", cell)
    if not found:
        return []
    base = found[0]
    stem = base.rsplit("/", 1)[0]
    # "`a/b/mean`, `/std`": a leading slash replaces the last segment; "`x/lr`, `y/lr`": two names
    return [base] + [f"{stem}/{s.strip('/')}" if s.startswith("/") else s for s in found[1:]]


def _pattern(name: str) -> re.Pattern[str]:
    parts = re.split(r"(<[^<>/]+>)", name)
    return re.compile("".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts) + r"\Z")


@lru_cache(maxsize=8)
def documented_names(doc: Path = DEFAULT_METRICS_DOC) -> tuple[frozenset[str], tuple[re.Pattern[str], ...]]:
    """(exact names, placeholder patterns) documented in `doc` (read once per path)."""
    if not doc.is_file():
        raise FileNotFoundError(f"metrics documentation {str(doc)!r} not found: expected the "
                                f"project's docs/METRICS.md (pass metrics_doc=...)")
    exact, patterns = set(), []
    for row in doc.read_text(encoding="utf-8").splitlines():
        if not row.startswith("| `"):
            continue
        for name in _names_of_cell(row.split("|")[1]):
            if "<" in name:
                patterns.append(_pattern(name))
            else:
                exact.add(name)
    return frozenset(exact), tuple(patterns)


def check_tag(tag: str, doc: Path = DEFAULT_METRICS_DOC) -> None:
    """Raise `UndocumentedMetricError` unless `tag` is `<phase>/<documented name>`."""
    phase, _, name = tag.partition("/")
    if phase not in PHASES or not name:
        raise UndocumentedMetricError(f"metric tag {tag!r}: expected '<phase>/<name>' with phase "
                                      f"in {PHASES}")
    exact, patterns = documented_names(doc)
    if name not in exact and not any(p.match(name) for p in patterns):
        raise UndocumentedMetricError(f"metric tag {tag!r}: name {name!r} is not documented in "
                                      f"{doc}: add a row for it there")
