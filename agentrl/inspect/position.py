"""Where reading starts (``--from``): parsed here without I/O, resolved against the stream by the reader.

=====================  ===============================================================
``start`` (default)    the first trajectory still in the stream
``end``                only trajectories published after the reader starts
``seq:N`` or ``N``     stream sequence N
``last:N``             the last N trajectories in the stream
``time:ISO`` or ISO    the first stored at or after that time (ISO 8601; local time unless it has an offset)
``-10m`` / ``2h``      that long ago (units s, m, h, d)
``version:N``, ``vN``  the first produced at policy version N or later (bisection over the stream)
=====================  ===============================================================
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from typing import Literal

from agentrl.errors import ConfigError

__all__ = ["Start", "parse_start"]

StartKind = Literal["all", "new", "seq", "last", "time", "version"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)([smhd])$")
_PREFIXED = re.compile(r"^(seq|last|time|version|v):?(.+)$")


@dataclass(frozen=True)
class Start:
    """A start position: ``kind`` and its value (a sequence, a count, unix seconds or a policy version)."""

    kind: StartKind = "all"
    value: float = 0.0


def parse_start(text: str, now: float | None = None) -> Start:
    """Parse a ``--from`` value (see the module docstring); ConfigError names the value and the forms accepted."""
    spec = text.strip()
    if spec.lower() in ("", "start", "all", "begin"):
        return Start("all")
    if spec.lower() in ("end", "new", "now"):
        return Start("new")
    if spec.isdigit():
        return _positive("seq", spec, text)
    rel = _RELATIVE.match(spec)
    if rel:
        return Start("time", (time.time() if now is None else now) - float(rel.group(1)) * _UNITS[rel.group(2)])
    prefixed = _PREFIXED.match(spec)
    if prefixed and (prefixed.group(1) != "v" or prefixed.group(2).isdigit()):
        kind, value = prefixed.group(1), prefixed.group(2)
        if kind == "time":
            return Start("time", _iso_time(value, text))
        return _positive("version" if kind in ("v", "version") else kind, value, text)
    return Start("time", _iso_time(spec, text))


def _positive(kind: str, value: str, text: str) -> Start:
    if not value.isdigit() or (kind != "version" and int(value) < 1):
        raise ConfigError(f"--from {text!r}: {kind} needs a whole number{'' if kind == 'version' else ' >= 1'}")
    return Start(kind, float(value))  # type: ignore[arg-type]


def _iso_time(value: str, text: str) -> float:
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(
            f"--from {text!r}: expected start, end, N, seq:N, last:N, version:N, an ISO time "
            "(2025-01-31T12:00) or a duration ago (10m, 2h)"
        ) from exc
    return when.timestamp()
