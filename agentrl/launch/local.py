"""``agentrl run``: one local run with every actor as its own process, under one supervisor.

The resolved config (engine ports and URLs filled in) is written to
``<run_dir>/config.yaml`` and handed to every actor; actor logs go to
``<run_dir>/logs/``; the embedded nats-server (unless ``nats.url`` is set) keeps its
store in ``<run_dir>/nats``, so the trajectories stay replayable after the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TextIO

import aiohttp
import msgspec
from nats.aio.msg import Msg

from agentrl.bus import Bus, EmbeddedNats, free_port
from agentrl.config import dump_config
from agentrl.config.run import RunConfig, check_agreement
from agentrl.errors import DecodeError
from agentrl.launch.plan import engine_urls, plan_actors
from agentrl.launch.plots import plot_run
from agentrl.launch.progress import Progress
from agentrl.launch.summary import summary_lines
from agentrl.launch.supervisor import ReadyCheck, Supervisor
from agentrl.messages import Event, decode

__all__ = ["resolve", "run_local"]


def resolve(cfg: RunConfig) -> tuple[RunConfig, list[int]]:
    """Check the config for a run of every actor, pick engine ports and fill in every URL the actors need."""
    check_agreement(cfg)
    ports = [free_port(cfg.engine.host) for _ in range(cfg.launch.engines)]
    urls = engine_urls(cfg, ports)
    client = msgspec.structs.replace(cfg.engine.client, urls=urls)
    engine = msgspec.structs.replace(cfg.engine, client=client)
    controller = msgspec.structs.replace(cfg.controller, engines=urls)
    return msgspec.structs.replace(cfg, engine=engine, controller=controller), ports


def http_health(url: str) -> ReadyCheck:
    async def check() -> bool:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(f"{url}/health") as r:
            return r.status == 200

    return check


@contextlib.asynccontextmanager
async def _nats(cfg: RunConfig) -> AsyncIterator[str]:
    if cfg.nats.url:
        yield cfg.nats.url
        return
    async with EmbeddedNats(cfg.run_dir / "nats", max_payload_mb=cfg.nats.max_payload_mb) as server:
        (cfg.run_dir / "nats" / "url").write_text(server.url)
        yield server.url


async def _follow(
    url: str, cfg: RunConfig, progress: Progress, sup: Supervisor, out: TextIO, every_s: float
) -> None:
    """Feed ``metrics`` events into ``progress`` and print its line every ``every_s`` seconds."""
    async with await Bus.connect(url, cfg.name, cfg.nats, ensure=False) as bus:

        async def on_metrics(msg: Msg) -> None:
            with contextlib.suppress(DecodeError):
                event: Event = decode(msg.data, Event)
                progress.update(event.data)

        await bus.nc.subscribe(bus.subjects.events("metrics"), cb=on_metrics)
        while True:
            await asyncio.sleep(every_s)
            print(progress.line(preparing=sup.current_step), file=out, flush=True)


async def run_local(
    cfg: RunConfig, *, out: TextIO = sys.stderr, progress_every_s: float = 5.0
) -> tuple[bool, Progress]:
    """Run every actor of ``cfg`` until learner and controller finish (or a stop signal).

    Returns whether the run completed, and its final progress.
    """
    cfg, ports = resolve(cfg)
    run_dir = cfg.run_dir
    config_path = dump_config(cfg, run_dir / "config.yaml").resolve()
    progress = Progress(cfg.learner.max_steps)
    async with _nats(cfg) as url:
        sup = Supervisor(plan_actors(cfg, config_path, url, ports, http_health), run_dir / "logs",
                         grace_s=cfg.launch.grace_s)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sup.request_stop)
        follower = asyncio.create_task(_follow(url, cfg, progress, sup, out, progress_every_s))
        try:
            print(f"run {cfg.name}: logs in {run_dir / 'logs'}, bus {url}", file=out, flush=True)
            completed = await sup.run()
        finally:
            follower.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    plots = await asyncio.to_thread(lambda: plot_run(run_dir, sorted(Path(run_dir).glob("*metrics*.jsonl"))))
    print(progress.line(), file=out)
    print(f"plots: {', '.join(str(p) for p in plots) or 'none (no metrics)'}", file=out)
    for line in summary_lines(cfg, completed=completed):
        print(line, file=out)
    if not completed:
        print(f"run {cfg.name} stopped before it completed", file=out)
    return completed, progress
