"""Build a validated `Config` from a YAML recipe plus dotted command-line overrides.

A recipe may name `defaults:`, one file or a list of files (relative to the recipe), that it is
merged over: the list in order, each later file over the earlier ones, the recipe last. A defaults
file may not name its own. Overrides look like `algo.lam_actor=0.99` and are parsed as YAML
(`data.eval_path=[a.jsonl,b.jsonl]` is a list). Unknown keys, wrong types and out-of-range values
raise `ConfigError` naming the key, the value, what was expected and, for unknown keys, the
closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from vcppo_megatron.config.schema import Config


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


def load_config(recipe: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a recipe (or the defaults when None), apply overrides, validate, return the Config."""
    tree: dict[str, Any] = read_recipe(Path(recipe)) if recipe is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    return build(Config, tree)


def read_recipe(path: Path) -> dict[str, Any]:
    """Read a YAML recipe and merge it over its `defaults:` file(s) (one level, a list in order)."""
    tree = _read_yaml(path)
    base_names = tree.pop("defaults", None)
    if base_names is None:
        return tree
    if isinstance(base_names, str):
        base_names = [base_names]
    if not isinstance(base_names, list) or not base_names or not all(isinstance(n, str) for n in base_names):
        raise ConfigError(f"{path}: 'defaults' = {base_names!r}: expected a file name or a list of file "
                          f"names (strings)")
    merged: dict[str, Any] = {}
    for name in base_names:
        base_path = (path.parent / name).resolve()
        base = _read_yaml(base_path)
        if "defaults" in base:
            raise ConfigError(f"{base_path}: a defaults file may not name its own 'defaults' "
                              f"(one level only; it is a defaults file of {path})")
        merged = deep_merge(merged, base)
    return deep_merge(merged, tree)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, "
                          f"got {type(tree).__name__}")
    return tree


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `top` merged over it, recursing into mappings."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """Split `section.key=value` and parse the value as a YAML scalar."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, "
                          f"e.g. algo.lam_actor=0.99")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for the key `a.b.c`, creating mappings on the way."""
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}={value!r}: '{'.'.join(parents[:i + 1])}' "
                              f"is a value, not a section")
        node = child
    node[leaf] = value


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key (sections and leaves) of a config dataclass."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, key + "."))
    return keys


def build(cls: type, tree: Any, prefix: str = "", base: Any = None) -> Any:
    """Construct dataclass `cls` from a mapping over `base` (default: `cls()`), checking it."""
    if not isinstance(tree, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' = {tree!r}: "
                          f"expected a section (mapping) of {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in tree:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), tree[key]))
    base = cls() if base is None else base
    kwargs = {}
    for name, value in tree.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value, key + ".", getattr(base, name))
        else:
            kwargs[name] = _check_value(key, value, hint)
            _check_bounds(key, kwargs[name], fields[name].metadata.get("bounds", {}))
    return dataclasses.replace(base, **kwargs)


def _unknown_key_message(key: str, value: Any) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else \
        f"; valid sections: {', '.join(f.name for f in dataclasses.fields(Config))}"
    return f"unknown config key '{key}' (value {value!r}){hint} See docs/CONFIG.md."


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a)
                           for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", bool: "true or false",
            str: "a string"}.get(hint, str(hint))


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Return `value` converted to `hint` (int -> float only) or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(hint):
            return value
    elif origin is tuple:                     # tuple[X, ...]: a YAML list of X
        if isinstance(value, (list, tuple)):
            return tuple(_check_value(f"{key}[{i}]", v, typing.get_args(hint)[0]) for i, v in enumerate(value))
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"'{key}' = {value!r}: expected {_describe(hint)}")


def _check_bounds(key: str, value: Any, bounds: dict[str, float]) -> None:
    if value is None or not bounds:
        return
    if isinstance(value, tuple):              # bounds apply to each element of a list
        for i, v in enumerate(value):
            _check_bounds(f"{key}[{i}]", v, bounds)
        return
    failed = (("ge" in bounds and value < bounds["ge"]) or ("gt" in bounds and value <= bounds["gt"])
              or ("le" in bounds and value > bounds["le"]) or ("lt" in bounds and value >= bounds["lt"]))
    if failed:
        raise ConfigError(f"'{key}' = {value!r}: expected a value {describe_bounds(bounds)}")


def describe_bounds(bounds: dict[str, float]) -> str:
    """Human text for a bounds dict, e.g. 'in [0, 1]' or '> 0'."""
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    fmt = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
    if lo and hi:
        return f"in {lo[0]}{fmt(lo[1])}, {fmt(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {fmt(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {fmt(hi[1])}"
    return ""
