"""Generate docs/CONFIG.md from the config dataclasses: `python -m vcppo_megatron.config.docs`."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

from vcppo_megatron.config import schema
from vcppo_megatron.config.loader import _describe, describe_bounds


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to its attribute docstring ('' when missing)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {f.name: "" for f in dataclasses.fields(cls)}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _section(cls: type, prefix: str, base: object, out: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested.append((hint, prefix + f.name, getattr(base, f.name), docs[f.name]))
            continue
        allowed = _describe(hint)
        bounds = describe_bounds(f.metadata.get("bounds", {}))
        if bounds:
            allowed += f", {bounds}"
        rows.append(f"| `{prefix}{f.name}` | `{_default_text(getattr(base, f.name))}` "
                    f"| {allowed} | {docs[f.name]} |")
    if rows:
        out += ["| key | default | allowed | meaning |", "|---|---|---|---|", *rows, ""]
    for hint, key, value, doc in nested:
        out += [f"## `{key}`", "", f"{doc} {inspect.getdoc(hint) or ''}".strip(), ""]
        _section(hint, key + ".", value, out)


def render() -> str:
    """The text of docs/CONFIG.md."""
    out = ["# Configuration reference", "",
           "Generated from `vcppo_megatron/config/schema.py` by "
           "`python -m vcppo_megatron.config.docs > docs/CONFIG.md`; do not edit by hand "
           "(a test keeps it current).", "",
           "A recipe is a YAML file of these sections; it may name `defaults:`, one file or a "
           "list of files (relative to itself, merged in order), that it is merged over. Any key "
           "can be overridden on the "
           "command line as `section.key=value` (e.g. `algo.lam_actor=0.99`, "
           "`algo.length_adaptive_alpha=null`). Unknown keys, wrong types and out-of-range "
           "values stop the run before anything starts.", ""]
    _section(schema.Config, "", schema.Config(), out)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    """Print docs/CONFIG.md, or write it with `--write`."""
    text = render()
    if "--write" in sys.argv[1:]:
        Path(__file__).resolve().parents[2].joinpath("docs", "CONFIG.md").write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
