"""``agentrl envd``: serve environments to agent workers over NATS request/reply."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from agentrl.commands import Command, add_common_arguments, load_run_config, setup_logging
from agentrl.config.run import RunConfig
from agentrl.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--env", action="append", default=[], metavar="NAME=PATH",
                   help="serve an environment, e.g. --env calculator=envs.calculator:CalculatorEnv (repeatable; "
                        "adds to envd.envs)")


def _env_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for item in args.env:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--env {item!r}: expected NAME=package.module:Class")
        out.append(f"envd.envs.{name}={path}")
    return out


async def serve(cfg: RunConfig, url: str | None) -> None:
    from agentrl.bus.local import open_bus
    from agentrl.env.server import EnvServer
    from agentrl.plugins import load_factory

    ec = cfg.envd
    if not ec.envs:
        raise ConfigError("envd.envs: no environments to serve (set envd.envs.<name> or pass --env NAME=PATH)")
    factories = {name: load_factory(spec, what=f"envd.envs.{name}") for name, spec in ec.envs.items()}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with open_bus(cfg, url) as bus:
        server = EnvServer(bus.nc, bus.subjects, factories, max_sessions=ec.max_sessions,
                           max_concurrency=ec.max_concurrency, call_timeout_s=ec.call_timeout_s,
                           session_idle_s=ec.session_idle_s)
        async with server:
            print(f"envd {server.server_id} ready: {', '.join(sorted(factories))}", flush=True)
            await stop.wait()


def run(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = load_run_config(args, extra=_env_overrides(args))
    asyncio.run(serve(cfg, args.nats))
    return 0


COMMAND = Command(name="envd", help="serve environments (tools, sandboxes) to agent workers over NATS",
                  add_arguments=add_arguments, run=run)
