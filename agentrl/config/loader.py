"""Load typed configs from YAML with ``--set a.b.c=value`` overrides.

Every config section is a :class:`Section` (a msgspec Struct that forbids unknown
fields). Errors are :class:`~agentrl.errors.ConfigError` naming the key, the value
found and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from agentrl.errors import ConfigError

__all__ = ["Section", "apply_overrides", "dump_config", "load_config", "parse_override"]

T = TypeVar("T")


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every config section: unknown keys are errors."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a","b","c"], value)``.

    The value is parsed as YAML (``1`` is an int, ``[1, 2]`` a list); text that is not valid YAML is a string.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. learner.optim.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. "{run_dir}/sft"): take it as a plain string; the type check still applies
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string
    return key.split("."), value


def _looks_like_float(value: str) -> bool:
    return re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value) is not None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw (YAML-loaded) dict, creating intermediate tables."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[: i + 1])} is a value, not a table")
            node = child
        node[keys[-1]] = value
    return raw


def load_config(typ: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML, optional), apply ``overrides`` and validate the result as ``typ``."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    apply_overrides(raw, overrides or [])
    return convert(typ, raw)


def convert(typ: type[T], raw: dict[str, Any]) -> T:
    """Validate a raw dict as ``typ``; translate msgspec's error into one naming key, value and expectation."""
    try:
        return msgspec.convert(raw, typ)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), raw)) from exc


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _explain(message: str, raw: dict[str, Any]) -> str:
    m = _AT.match(message)
    what, path = (m.group("what"), m.group("path") or "") if m else (message, "")
    parts = [p for p in re.split(r"\.|\[(\d+)\]", path) if p]
    unknown = re.match(r"Object contains unknown field `([^`]+)`", what)
    if unknown:
        key = ".".join([*parts, unknown.group(1)])
        return f"config key {key}: unknown key (not a field of this section)"
    if not parts:  # a check across fields (__post_init__): its message names the keys itself
        return f"config: {what}"
    key = ".".join(parts)
    value = _lookup(raw, parts)
    return f"config key {key}: got {value!r}; {what[0].lower() + what[1:]}"


def _lookup(raw: Any, parts: list[str]) -> Any:
    node = raw
    for p in parts:
        if isinstance(node, dict):
            node = node.get(p, "<missing>")
        elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        else:
            return "<missing>"
    return node


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what the run actually used)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(msgspec.to_builtins(cfg), sort_keys=False))
    return out
