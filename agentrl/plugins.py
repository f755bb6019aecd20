"""Resolve extension points named in config by dotted path (``"agents.tool_agent:run_episode"``).

A factory in config (an environment, for instance) is either a dotted path or a table with arguments::

    envs:
      calculator: envs.calculator:CalculatorEnv                  # called with no arguments
      shop: {factory: my_envs.shop:ShopEnv, args: {items: 12}}   # called as ShopEnv(items=12)

A dataset row's ``env_args`` reach the environment per episode as ``task.env_args`` (in ``reset``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from agentrl.config.factory import FactorySpec
from agentrl.errors import ConfigError

__all__ = ["FactorySpec", "load_factory", "load_object"]


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


def load_factory(spec: str | FactorySpec, *, what: str) -> Callable[[], Any]:
    """A zero-argument factory from a dotted path or a :class:`FactorySpec`; bad arguments are a ConfigError
    raised here (by a trial of the signature), not at the first episode."""
    if isinstance(spec, str):
        spec = FactorySpec(factory=spec)
    obj = load_object(spec.factory, what=what)
    if not callable(obj):
        raise ConfigError(f"{what} {spec.factory!r}: not callable")
    try:
        inspect.signature(obj).bind(**spec.args)
    except TypeError as exc:
        raise ConfigError(f"{what} {spec.factory!r}: args {spec.args!r} do not fit its signature: {exc}") from exc
    except ValueError:  # builtins without a signature: checked at the first call
        pass
    return functools.partial(obj, **spec.args)
