"""Resolve extension points named in config by dotted path (``"agents.tool_agent:run_episode"``)."""

from __future__ import annotations

import importlib
from typing import Any

from agentrl.errors import ConfigError

__all__ = ["load_object"]


def load_object(path: str, *, what: str = "object") -> Any:
    """Import ``"pkg.module:attr"`` or ``"pkg.module.attr"``; raises ConfigError naming the path on failure."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{what} {path!r}: expected a dotted path like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {path!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
