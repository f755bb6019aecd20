"""A callable named in config, with the keyword arguments it is called with (see :mod:`agentrl.plugins`)."""

from __future__ import annotations

from typing import Any

from agentrl.config.loader import Section

__all__ = ["FactorySpec"]


class FactorySpec(Section):
    """``{factory: "pkg.mod:Cls", args: {...}}``: called as ``Cls(**args)``."""

    factory: str
    """dotted path of the callable, e.g. envs.calculator:CalculatorEnv"""
    args: dict[str, Any] = {}
    """keyword arguments it is called with"""
