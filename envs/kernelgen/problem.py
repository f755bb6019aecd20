"""Kernel problems in KernelBench's layout, read from a directory without running them.

A problem is one Python module that defines ``class Model(nn.Module)``, ``get_inputs()`` (the forward
arguments, fresh random tensors each call) and ``get_init_inputs()`` (the constructor arguments). A
solution is a module that defines ``class ModelNew(nn.Module)`` with the same constructor and forward
signature, whose forward launches Triton kernels.

A problem may set a module-level ``KERNELGEN = {...}`` literal to override evaluation settings:
``atol`` / ``rtol`` (correctness tolerances) and ``forbid`` (torch op names its solutions may not call
in ``forward``; absent = the ops the reference's forward calls, found at evaluation time; ``[]`` = none).

Problems are parsed with :mod:`ast` here, never imported: the reference code runs only inside the
evaluation sandbox.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrl.errors import ConfigError

__all__ = ["Problem", "load_problem", "load_problems", "parse_problem"]

_REQUIRED = {"Model": ast.ClassDef, "get_inputs": ast.FunctionDef, "get_init_inputs": ast.FunctionDef}
_SETTINGS = {"atol": float, "rtol": float, "forbid": list}


@dataclass(frozen=True, slots=True)
class Problem:
    """One reference module and the evaluation settings it asks for."""

    name: str
    source: str
    group: str = ""  # e.g. the directory it came from ("level1")
    settings: dict[str, Any] = field(default_factory=dict)  # atol, rtol, forbid (see module docstring)

    def env_args(self) -> dict[str, Any]:
        """What a task carries to the environment: the reference source and its settings."""
        return {"problem": self.name, "reference": self.source, **self.settings}


def parse_problem(name: str, source: str, *, group: str = "") -> Problem:
    """Validate ``source`` as a KernelBench-style problem; raises ``ConfigError`` naming what is missing."""
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as exc:
        raise ConfigError(f"problem {name}: not valid Python: {exc.msg} (line {exc.lineno})") from exc
    found = {node.name: type(node) for node in tree.body if isinstance(node, ast.ClassDef | ast.FunctionDef)}
    missing = [f"{'class' if kind is ast.ClassDef else 'def'} {n}" for n, kind in _REQUIRED.items() if found.get(n) is not kind]
    if missing:
        raise ConfigError(f"problem {name}: missing {', '.join(missing)} (KernelBench layout: class Model, "
                          "get_inputs(), get_init_inputs())")
    return Problem(name=name, source=source, group=group, settings=_settings(name, tree))


def _settings(name: str, tree: ast.Module) -> dict[str, Any]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "KERNELGEN" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError as exc:
                raise ConfigError(f"problem {name}: KERNELGEN must be a literal dict: {exc}") from exc
            return _check_settings(name, value)
    return {}


def _check_settings(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"problem {name}: KERNELGEN must be a dict, got {type(value).__name__}")
    for key, v in value.items():
        kind = _SETTINGS.get(key)
        if kind is None:
            raise ConfigError(f"problem {name}: KERNELGEN key {key!r} unknown (known: {sorted(_SETTINGS)})")
        if kind is float and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
            raise ConfigError(f"problem {name}: KERNELGEN[{key!r}] = {v!r}; expected a number >= 0")
        if kind is list and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            raise ConfigError(f"problem {name}: KERNELGEN[{key!r}] = {v!r}; expected a list of op names")
    return {k: float(v) if _SETTINGS[k] is float else list(v) for k, v in value.items()}


def load_problem(path: str | Path) -> Problem:
    """One problem file; its name is the file's stem, its group the directory's name."""
    path = Path(path)
    try:
        source = path.read_text()
    except OSError as exc:
        raise ConfigError(f"problem {str(path)!r}: cannot read: {exc}") from exc
    return parse_problem(path.stem, source, group=path.parent.name)


def load_problems(directory: str | Path) -> list[Problem]:
    """Every ``*.py`` problem directly in ``directory`` (``__init__.py`` and ``_*`` files skipped), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"problem directory {str(directory)!r} does not exist or is not a directory")
    files = sorted(p for p in directory.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise ConfigError(f"problem directory {str(directory)!r} has no *.py problems")
    return [load_problem(p) for p in files]
