"""Typed configuration: one Section per component, loaded from YAML with ``--set`` overrides."""

from agentrl.config.loader import Section, apply_overrides, convert, dump_config, load_config, parse_override
from agentrl.config.run import NatsConfig, RunConfig

__all__ = ["NatsConfig", "RunConfig", "Section", "apply_overrides", "convert", "dump_config", "load_config", "parse_override"]
