"""``agentrl engine``: serve a Hugging Face model over SGLang's HTTP API (the embedded engine)."""

from __future__ import annotations

import argparse
import asyncio

import msgspec

from agentrl.commands import Command, add_common_arguments, load_run_config, setup_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--model", help="Hugging Face model directory (engine.model)")
    p.add_argument("--host", help="bind address (engine.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (engine.port, default 30000)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="engine.dtype")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (engine.device)")
    p.add_argument("--max-running", "--max-running-requests", type=int, help="requests decoded together (engine.max_running)")
    p.add_argument("--context-length", type=int, help="max prompt + output tokens (engine.context_length)")
    p.add_argument("--max-total-tokens", type=int, help="KV pool positions (engine.max_total_tokens)")
    p.add_argument("--max-prefill-tokens", "--chunked-prefill-size", type=int,
                   help="new tokens per prefill pass; longer prompts are prefilled in pieces (engine.max_prefill_tokens)")
    p.add_argument("--disable-radix-cache", action="store_const", const="false", help="engine.prefix_cache=false")
    p.add_argument("--disable-overlap-schedule", action="store_const", const="false",
                   help="engine.overlap_schedule=false")
    p.add_argument("--enable-custom-logit-processor", action="store_const", const="true",
                   help="run client-sent logit processors (engine.enable_custom_logit_processor)")
    p.add_argument("--weight-update", choices=["swap", "drain"],
                   help="swap: load new weights between decode steps; drain: wait for running requests first, as "
                        "SGLang does (engine.weight_update)")
    p.add_argument("--api-key", help="key for every endpoint but /health* (default: $AGENTRL_ENGINE_API_KEY)")
    p.add_argument("--admin-api-key", help="key for admin endpoints (default: $AGENTRL_ENGINE_ADMIN_KEY)")


_FLAGS = {
    "model": "engine.model", "host": "engine.host", "port": "engine.port", "dtype": "engine.dtype",
    "device": "engine.device", "max_running": "engine.max_running", "context_length": "engine.context_length",
    "max_total_tokens": "engine.max_total_tokens", "max_prefill_tokens": "engine.max_prefill_tokens",
    "disable_radix_cache": "engine.prefix_cache",
    "disable_overlap_schedule": "engine.overlap_schedule",
    "enable_custom_logit_processor": "engine.enable_custom_logit_processor", "weight_update": "engine.weight_update",
}


def run(args: argparse.Namespace) -> int:
    from agentrl.engine.build import build_server
    from agentrl.engine.server import serve

    setup_logging()
    run_cfg = load_run_config(args, _FLAGS)
    cfg = run_cfg.engine
    keys = {k: v for k, v in (("api_key", args.api_key), ("admin_api_key", args.admin_api_key)) if v is not None}
    cfg = msgspec.structs.replace(cfg, **keys)  # strings as given (not parsed as YAML values)
    server = build_server(cfg, nats_url=args.nats or run_cfg.nats.url)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(server, cfg.host, cfg.port))
    return 0


COMMAND = Command(name="engine", help="serve a model over SGLang's HTTP API (embedded engine)", add_arguments=add_arguments, run=run)
