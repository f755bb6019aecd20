"""Serving the viewer: read the run's stream into the bounded index while aiohttp serves the page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from agentrl.inspect.advantages import load_group_advantages
from agentrl.inspect.index import TrajectoryIndex
from agentrl.inspect.live import LiveHub
from agentrl.inspect.location import RunLocation
from agentrl.inspect.position import Start
from agentrl.inspect.reader import TrajectoryReader
from agentrl.inspect.source import open_run
from agentrl.inspect.tokens import load_token_text
from agentrl.inspect.web import ViewerState, build_app

__all__ = ["ViewerOptions", "run_viewer"]

log = logging.getLogger(__name__)
_YIELD_EVERY = 64  # records between two yields to the event loop, so pages stay served while catching up


@dataclass(frozen=True)
class ViewerOptions:
    host: str = "127.0.0.1"
    port: int = 8765  # 0 = any free port
    start: Start | None = None  # None = the last max_rows trajectories
    follow: bool | None = None  # None = follow when the run is live
    max_rows: int = 20_000
    text_chars: int = 4_000
    tokenizer: str | None = None


async def _read_into(state: ViewerState, start: Start, follow: bool) -> None:
    reader = TrajectoryReader(state.source, start, follow=follow)
    n = 0
    try:
        async with contextlib.aclosing(reader.records()) as records:
            async for record in records:
                state.index.add(record)
                n += 1
                if n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
    finally:
        state.reading = False
    log.info("viewer: read %d trajectories (end of the stream)", n)


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("viewer: reading the stream failed (the page keeps what it has): %r", task.exception())


@contextlib.asynccontextmanager
async def run_viewer(loc: RunLocation, opts: ViewerOptions) -> AsyncIterator[str]:
    """Serve the viewer of ``loc`` until the context exits; yields its URL (``http://host:port``)."""
    async with open_run(loc) as source:
        index = TrajectoryIndex(opts.max_rows, opts.text_chars)
        adv_path = loc.config.learner.advantage if loc.config is not None else None
        tokens = await asyncio.to_thread(load_token_text, loc, opts.tokenizer)
        state = ViewerState(source, index, LiveHub(index), load_group_advantages(adv_path), tokens)
        runner = web.AppRunner(build_app(state), shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, opts.host, opts.port)
        await site.start()
        port = runner.addresses[0][1]
        start = opts.start or Start("last", opts.max_rows)
        follow = source.live if opts.follow is None else opts.follow
        reading = asyncio.create_task(_read_into(state, start, follow))
        reading.add_done_callback(_report_failure)
        try:
            yield f"http://{opts.host}:{port}"
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            await runner.cleanup()
