"""``agentrl run``: one local run with every actor as its own process, under one supervisor.

The resolved config (engine ports and URLs filled in) is written to ``<run_dir>/config.yaml`` and handed to
every actor; actor logs go to ``<run_dir>/logs/``. The embedded nats-server (unless ``nats.url`` is set) is
an actor like the others: supervised, restarted on the same port and store (``<run_dir>/nats``, so the
trajectories stay replayable after the run), with per-actor credentials (:mod:`agentrl.launch.prepare`).
The run directory is locked for as long as the supervisor or any actor it started lives
(:mod:`agentrl.launch.lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TextIO

import aiohttp
import msgspec
from nats.aio.msg import Msg

from agentrl.bus import Bus, free_port
from agentrl.config import dump_config
from agentrl.config.run import RunConfig
from agentrl.errors import BusConnectError, BusError, DecodeError
from agentrl.launch.lock import run_lock
from agentrl.launch.plan import LaunchContext, engine_urls, plan_actors
from agentrl.launch.plots import plot_run
from agentrl.launch.prepare import prepare
from agentrl.launch.progress import Progress
from agentrl.launch.summary import summary_lines
from agentrl.launch.supervisor import ReadyCheck, Supervisor
from agentrl.messages import Event, decode

__all__ = ["Supervising", "check_external_bus", "follow_progress", "http_health", "report_run", "resolve",
           "resolve_engines", "run_local", "watch_run"]


def resolve(cfg: RunConfig) -> tuple[RunConfig, list[int]]:
    """Pick engine ports and fill in every URL the actors need."""
    ports = [free_port(cfg.engine.host) for _ in range(cfg.launch.engines)]
    return resolve_engines(cfg, ports), ports


def resolve_engines(cfg: RunConfig, ports: list[int], hosts: list[str] | None = None) -> RunConfig:
    """``cfg`` with the URLs of its engines (on ``ports``, at ``hosts``) where clients and the controller read them."""
    urls = engine_urls(cfg, ports, hosts)
    client = msgspec.structs.replace(cfg.engine.client, urls=urls)
    engine = msgspec.structs.replace(cfg.engine, client=client)
    controller = msgspec.structs.replace(cfg.controller, engines=urls)
    return msgspec.structs.replace(cfg, engine=engine, controller=controller)


def http_health(url: str) -> ReadyCheck:
    """A probe that ``GET url`` answers 200 within 5 s."""
    async def check() -> bool:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as r:
            return r.status == 200

    return check


async def _feed(ctx: LaunchContext, cfg: RunConfig, progress: Progress) -> None:
    """Feed ``metrics`` events into ``progress``, (re)connecting as the run's inspector until cancelled."""
    creds = ctx.credentials.get("inspector")
    nats_cfg = msgspec.structs.replace(cfg.nats, credentials=str(creds) if creds else cfg.nats.credentials,
                                       connect_attempts=1)

    async def on_metrics(msg: Msg) -> None:
        with contextlib.suppress(DecodeError):
            event: Event = decode(msg.data, Event)
            progress.update(event.data)

    while True:
        try:
            async with await Bus.connect(ctx.nats_url, cfg.name, nats_cfg, ensure=False) as bus:
                await bus.nc.subscribe(bus.subjects.events("metrics"), cb=on_metrics)
                await asyncio.Event().wait()  # until cancelled; the client reconnects by itself
        except BusError:
            await asyncio.sleep(1.0)  # the server is not up yet (steps run first)


async def check_external_bus(ctx: LaunchContext, timeout_s: float = 60.0) -> None:
    """An external bus (``nats.url``) must answer, and the run's streams exist, before any actor starts: checked
    as the launcher (the admin user when ``agentrl nats --secure`` made the run's users), which creates them."""
    if ctx.nats_argv is not None or ctx.nats_check is None:
        return
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await ctx.nats_check()
            return
        except BusError as exc:
            if isinstance(exc, BusConnectError) and "refused" in str(exc):
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise BusConnectError(f"the run's bus {ctx.nats_url} did not answer in {timeout_s:.0f}s: {exc}") from exc
        await asyncio.sleep(1.0)


async def follow_progress(ctx: LaunchContext, cfg: RunConfig, progress: Progress, step: Callable[[], str | None],
                          out: TextIO, every_s: float) -> None:
    """Print the progress line every ``every_s`` seconds while metrics feed it (``step``: the step running)."""
    feeder = asyncio.create_task(_feed(ctx, cfg, progress))
    try:
        while True:
            await asyncio.sleep(every_s)
            print(progress.line(preparing=step()), file=out, flush=True)
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(feeder, 5.0)


class Supervising(Protocol):
    """What :func:`watch_run` needs of a supervisor (local processes, or Ray actors)."""

    current_step: str | None

    async def run(self) -> bool: ...

    def request_stop(self) -> None: ...


async def _supervise(cfg: RunConfig, ports: list[int], lock_fd: int, out: TextIO, every_s: float) -> bool:
    config_path = dump_config(cfg, cfg.run_dir / "config.yaml").resolve()
    ctx = prepare(cfg, config_path, ports, http_health)
    sup = Supervisor(plan_actors(cfg, ctx), cfg.run_dir / "logs", grace_s=cfg.launch.grace_s, keep_fds=[lock_fd])
    return await watch_run(sup, ctx, cfg, out, every_s)


async def watch_run(sup: Supervising, ctx: LaunchContext, cfg: RunConfig, out: TextIO, every_s: float) -> bool:
    """Run ``sup`` with the progress display, Ctrl-C and SIGTERM stopping it; whether the run completed."""
    progress = Progress(cfg.training.max_steps or 0)
    await check_external_bus(ctx)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sup.request_stop)
    follower = asyncio.create_task(follow_progress(ctx, cfg, progress, lambda: sup.current_step, out, every_s))
    try:
        secrets = f", credentials in {cfg.run_dir / 'secrets'}" if ctx.credentials else ""
        print(f"run {cfg.name}: logs in {cfg.run_dir / 'logs'}, bus {ctx.nats_url}{secrets}", file=out, flush=True)
        completed = await sup.run()
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print(progress.line(), file=out)
    return completed


async def run_local(
    cfg: RunConfig, *, out: TextIO = sys.stderr, progress_every_s: float = 5.0
) -> tuple[bool, Path]:
    """Run every actor of ``cfg`` until learner and controller finish (or a stop signal).

    Returns whether the run completed, and the run directory.
    """
    cfg, ports = resolve(cfg)
    run_dir = cfg.run_dir
    with run_lock(run_dir) as lock_fd:
        completed = await _supervise(cfg, ports, lock_fd, out, progress_every_s)
    await report_run(cfg, completed, out)
    return completed, run_dir


async def report_run(cfg: RunConfig, completed: bool, out: TextIO) -> None:
    """After the run: its plots, the summary, and whether it stopped before completing."""
    run_dir = cfg.run_dir
    plots = await asyncio.to_thread(lambda: plot_run(run_dir, sorted(Path(run_dir).glob("*metrics*.jsonl"))))
    print(f"plots: {', '.join(str(p) for p in plots) or 'none (no metrics)'}", file=out)
    for line in summary_lines(cfg, completed=completed):
        print(line, file=out)
    if not completed:
        print(f"run {cfg.name} stopped before it completed", file=out)
