"""Which trajectories to show: the filters of ``agentrl tail`` and of the viewer (pure; no I/O).

Both build a :class:`TrajectoryFilter` from the same parameter names with :func:`parse_filter`, so
``agentrl tail --reward 0.5: --status completed`` and the viewer's ``?reward=0.5:&status=completed``
mean the same thing. Bad values raise :class:`~agentrl.errors.ConfigError` naming the parameter.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agentrl.errors import ConfigError
from agentrl.inspect.summary import Summary

__all__ = ["FILTER_PARAMS", "STATUSES", "TrajectoryFilter", "parse_filter", "parse_range"]

STATUSES = ("completed", "truncated", "aborted", "failed")

# parameter -> help text (the CLI flag is --<name>, the viewer's query parameter is <name>)
FILTER_PARAMS: dict[str, str] = {
    "reward": "reward range LO:HI (either side may be empty; one number = exactly that reward)",
    "status": f"statuses, comma separated ({', '.join(STATUSES)})",
    "env": "environment names, comma separated",
    "versions": "policy version range LO:HI: keep trajectories with a sampled token in it",
    "worker": "worker id (shell pattern, e.g. 'worker-*')",
    "grep": "regular expression (case-insensitive) searched in the turns' text, tool names and metadata",
    "group": "group id (or a prefix of it)",
    "task": "task id (or a prefix of it): every attempt of one task",
    "aborted": "only aborted attempts",
    "resumed": "only resumed episodes (a later attempt, or with an abort marker)",
    "eval": "only eval trajectories ('1') or only training ones ('0')",
}


@dataclass(frozen=True)
class TrajectoryFilter:
    """A conjunction of conditions on a trajectory's :class:`Summary` and text; empty = keep everything."""

    reward: tuple[float | None, float | None] = (None, None)
    status: frozenset[str] = frozenset()
    env: frozenset[str] = frozenset()
    versions: tuple[float | None, float | None] = (None, None)
    worker: str = ""
    grep: re.Pattern[str] | None = None
    group: str = ""
    task: str = ""
    aborted: bool = False
    resumed: bool = False
    eval: bool | None = None

    @property
    def needs_text(self) -> bool:
        return self.grep is not None

    def matches(self, row: Summary, text: Callable[[], str] | None = None) -> bool:
        """Whether ``row`` passes; ``text`` is called (lazily, last) only when a text match is asked for."""
        if not self._matches_row(row):
            return False
        if self.grep is None:
            return True
        return text is not None and self.grep.search(text()) is not None

    def _matches_row(self, row: Summary) -> bool:
        checks = (
            _in_range(row.reward, self.reward),
            not self.status or row.status in self.status,
            not self.env or row.env in self.env,
            self.versions == (None, None) or _overlaps(row.version_min, row.version_max, self.versions),
            not self.worker or fnmatch.fnmatchcase(row.worker, self.worker),
            row.group_id.startswith(self.group),
            row.task_id.startswith(self.task) or row.id.startswith(self.task),
            not self.aborted or row.status == "aborted",
            not self.resumed or row.resumed,
            self.eval is None or row.is_eval == self.eval,
        )
        return all(checks)


def _in_range(value: float, bounds: tuple[float | None, float | None]) -> bool:
    lo, hi = bounds
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _overlaps(vmin: int, vmax: int, bounds: tuple[float | None, float | None]) -> bool:
    if vmin < 0:  # nothing sampled: no version to match
        return False
    lo, hi = bounds
    return (lo is None or vmax >= lo) and (hi is None or vmin <= hi)


def parse_range(text: str, name: str) -> tuple[float | None, float | None]:
    """``"LO:HI"``, ``"LO:"``, ``":HI"`` or ``"X"`` (exactly X) as ``(lo, hi)``; ConfigError if malformed."""
    lo_text, sep, hi_text = text.partition(":")
    if not sep:
        hi_text = lo_text
    try:
        lo = float(lo_text) if lo_text.strip() else None
        hi = float(hi_text) if hi_text.strip() else None
    except ValueError as exc:
        raise ConfigError(f"--{name} {text!r}: expected a range LO:HI of numbers (e.g. 0.5:1, :0, 3)") from exc
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"--{name} {text!r}: the low end {lo:g} is above the high end {hi:g}")
    return lo, hi


def _names(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def _flag(value: Any, name: str) -> bool | None:
    if value is None or value is False or value == "":
        return None
    if value is True or str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--{name} {value!r}: expected 1 or 0")


def _statuses(text: str) -> frozenset[str]:
    found = _names(text)
    unknown = sorted(found - set(STATUSES))
    if unknown:
        raise ConfigError(f"--status {text!r}: unknown status {', '.join(unknown)}; expected {', '.join(STATUSES)}")
    return found


def _pattern(text: str) -> re.Pattern[str] | None:
    if not text:
        return None
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"--grep {text!r}: not a valid regular expression: {exc}") from exc


def parse_filter(params: Mapping[str, Any]) -> TrajectoryFilter:
    """A filter from parameters named as in :data:`FILTER_PARAMS` (missing, ``None`` or ``""`` = no condition)."""
    unknown = sorted(k for k, v in params.items() if k not in FILTER_PARAMS and v not in (None, ""))
    if unknown:
        raise ConfigError(f"unknown filter {', '.join(unknown)}; expected one of {', '.join(FILTER_PARAMS)}")

    def get(name: str) -> str:
        value = params.get(name)
        return "" if value is None else str(value)

    return TrajectoryFilter(
        reward=parse_range(get("reward"), "reward") if get("reward") else (None, None),
        status=_statuses(get("status")),
        env=_names(get("env")),
        versions=parse_range(get("versions"), "versions") if get("versions") else (None, None),
        worker=get("worker"),
        grep=_pattern(get("grep")),
        group=get("group"),
        task=get("task"),
        aborted=bool(_flag(params.get("aborted"), "aborted")),
        resumed=bool(_flag(params.get("resumed"), "resumed")),
        eval=_flag(params.get("eval"), "eval"),
    )
