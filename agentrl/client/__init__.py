"""Clients of inference engines over SGLang's HTTP API: one engine, or a router over many."""

from agentrl.client.engine import EngineClient
from agentrl.client.protocol import build_generate_request, parse_generate_response
from agentrl.client.router import Router

__all__ = ["EngineClient", "Router", "build_generate_request", "parse_generate_response"]
