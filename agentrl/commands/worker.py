"""``agentrl worker``: run agent episodes from the task queue against the engines and publish trajectories."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

import msgspec

from agentrl.commands import Command, add_common_arguments, load_run_config, setup_logging
from agentrl.config.run import RunConfig
from agentrl.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--agent", help="agent function, e.g. agents.tool_agent:run_episode (worker.agent)")
    p.add_argument("--concurrency", type=int, help="episodes in flight (worker.concurrency)")
    p.add_argument("--engine-url", action="append", default=[], metavar="URL",
                   help="engine URL (repeatable; engine.client.urls)")


_FLAGS = {"agent": "worker.agent", "concurrency": "worker.concurrency", "engine_url": "engine.client.urls"}


def _tokenizer(path: str | None) -> Any:
    if not path:
        raise ConfigError("worker.tokenizer: not set and engine.model is empty; the worker needs the model's tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def serve(cfg: RunConfig, url: str | None) -> None:
    from agentrl.agent.chat import ChatRenderer
    from agentrl.bus.local import open_bus
    from agentrl.client import EngineClient, Router
    from agentrl.env.local import ChainedEnvs, LocalEnvs
    from agentrl.env.remote import RemoteEnvs
    from agentrl.plugins import load_factory, load_object
    from agentrl.proxy import OpenAIProxy
    from agentrl.worker import AgentWorker
    from agentrl.worker.context_limit import episode_budget, model_context_length

    wc, ec = cfg.worker, cfg.engine
    agent = load_object(wc.agent, what="worker.agent")
    reward = load_object(wc.reward, what="worker.reward") if wc.reward else None
    local = LocalEnvs({n: load_factory(p, what=f"worker.envs.{n}") for n, p in wc.envs.items()})
    chat = ChatRenderer(_tokenizer(wc.tokenizer or ec.model))
    urls = ec.client.urls or [f"http://{ec.host}:{ec.port}"]
    worker_id = f"{socket.gethostname()}-{os.getpid()}"
    clients = [EngineClient(u, ec.client) for u in urls]
    async with open_bus(cfg, url) as bus, Router(clients, health_interval_s=ec.client.health_interval_s) as router:
        limit = await model_context_length(clients, wc.tokenizer or ec.model)
        wc = msgspec.structs.replace(wc, max_context_tokens=episode_budget(wc.max_context_tokens, limit))
        envs = ChainedEnvs(local, RemoteEnvs(bus.nc, bus.subjects, wc.remote_envs, call_timeout_s=wc.env_call_timeout_s))
        async with contextlib.AsyncExitStack() as stack:
            if wc.openai_proxy:
                proxy = await stack.enter_async_context(OpenAIProxy(model=wc.openai_model))
                agent = proxy.wrap(agent)
            worker = AgentWorker(bus, agent=agent, generator=router, chat=chat, config=wc, envs=envs, reward=reward,
                                 worker_id=worker_id)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, worker.stop)
            budget = f"{wc.max_context_tokens} tokens" if wc.max_context_tokens else "unlimited (model limit unknown)"
            print(f"worker {worker_id} ready: agent {wc.agent}, {len(urls)} engine(s), episode context {budget}",
                  flush=True)
            stats = await worker.run()
        logging.getLogger(__name__).info("worker %s stopped: %s", worker_id, stats)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = load_run_config(args, _FLAGS)
    if cfg.worker.uvloop:
        import uvloop

        uvloop.run(serve(cfg, args.nats))
    else:
        asyncio.run(serve(cfg, args.nats))
    return 0


COMMAND = Command(name="worker", help="run agent episodes from the task queue and publish trajectories",
                  add_arguments=add_arguments, run=run)
