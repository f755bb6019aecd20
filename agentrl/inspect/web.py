"""The viewer's HTTP API and page (aiohttp): a live, server-side-filtered table, trajectory pages, plots, config.

=========================  ==========================================================================
``GET /``                  the page (``static/index.html``; plain HTML/JS/CSS, no build step)
``GET /api/info``          run name, live or replay, index size and bound, tokenizer, advantage function
``GET /api/rows``          a newest-first page of the filtered index (``offset``, ``limit``, ``max_seq``)
``GET /api/events``        Server-Sent Events: each ``rows`` event has new matching rows and the new total
``GET /api/traj/{seq}``    one trajectory: turns, tokens (mask, version, logprob), attempts, group, advantages
``GET /api/metrics``       the metrics plots' series
``GET /api/config``        the run's config.yaml
=========================  ==========================================================================

Filter parameters are those of ``agentrl tail`` (:data:`agentrl.inspect.filters.FILTER_PARAMS`); a bad
one is answered 400 with the reason.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from agentrl.errors import ConfigError
from agentrl.inspect.advantages import GroupAdvantages
from agentrl.inspect.detail import trajectory_detail
from agentrl.inspect.filters import FILTER_PARAMS, TrajectoryFilter, parse_filter
from agentrl.inspect.index import TrajectoryIndex
from agentrl.inspect.live import LiveHub
from agentrl.inspect.metrics import metrics_series
from agentrl.inspect.reader import fetch_record
from agentrl.inspect.source import RunSource
from agentrl.inspect.tokens import TokenText

__all__ = ["STATIC_DIR", "ViewerState", "build_app"]

STATIC_DIR = Path(__file__).parent / "static"
_MAX_PAGE = 500
_STATE: web.AppKey[ViewerState] = web.AppKey("state")


@dataclass
class ViewerState:
    """What the handlers share: the source, the bounded index and its live hub, and how to render."""

    source: RunSource
    index: TrajectoryIndex
    hub: LiveHub
    advantages: GroupAdvantages
    tokens: TokenText | None
    push_interval_s: float = 0.25
    reading: bool = True  # the reader is still taking trajectories in


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _filter(query: Mapping[str, str]) -> TrajectoryFilter:
    try:
        return parse_filter({k: v for k, v in query.items() if k in FILTER_PARAMS})
    except ConfigError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc


def _int(query: Mapping[str, str], name: str, default: int | None, lo: int = 0, hi: int | None = None) -> int | None:
    raw = query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"{name}={raw!r}: expected a whole number") from exc
    if value < lo or (hi is not None and value > hi):
        raise web.HTTPBadRequest(text=f"{name}={value}: expected {lo}..{hi if hi is not None else ''}")
    return value


async def index_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def info(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    loc = st.source.location
    return _json({
        "run": loc.name, "run_dir": str(loc.run_dir) if loc.run_dir else None, "live": st.source.live,
        "reading": st.reading, "stream": st.source.stream, "rows": len(st.index), "max_rows": st.index.max_rows,
        "head_seq": st.index.head_seq, "newest_version": st.index.clock.current,
        "tokenizer": st.tokens.source if st.tokens else None, "advantage": st.advantages.source,
        "filters": FILTER_PARAMS,
    })


async def rows(request: web.Request) -> web.Response:
    st, q = request.app[_STATE], request.query
    filt = _filter(q)
    max_seq = _int(q, "max_seq", None)
    offset = _int(q, "offset", 0) or 0
    limit = _int(q, "limit", 100, 0, _MAX_PAGE) or 0
    total, page = st.index.query(filt, max_seq=max_seq, offset=offset, limit=limit)
    head = st.index.head_seq if max_seq is None else min(max_seq, st.index.head_seq)
    return _json({"total": total, "head_seq": head, "offset": offset, "rows": page})


async def events(request: web.Request) -> web.StreamResponse:
    """SSE: a ``rows`` event whenever rows matching the page's filter arrived (at most every push interval)."""
    st = request.app[_STATE]
    client = st.hub.connect(_filter(request.query))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        await resp.write(f"event: hello\ndata: {json.dumps({'total': client.total})}\n\n".encode())
        idle = 0.0
        while True:
            await asyncio.sleep(st.push_interval_s)
            added, fresh = client.take()
            if added:
                data = {"added": added, "total": client.total, "head_seq": st.index.head_seq, "rows": fresh}
                await resp.write(b"event: rows\ndata: " + msgspec.json.encode(data) + b"\n\n")
                idle = 0.0
            elif (idle := idle + st.push_interval_s) >= 15:
                await resp.write(b": keep-alive\n\n")
                idle = 0.0
    except ConnectionResetError:  # the page went away
        pass
    finally:
        st.hub.disconnect(client)
    return resp


async def trajectory(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    seq = _int(request.match_info, "seq", None, lo=1)
    assert seq is not None
    record = await fetch_record(st.source, seq)
    if record is None:
        raise web.HTTPNotFound(text=f"stream {st.source.stream} has no trajectory at sequence {seq}")
    detail = await asyncio.to_thread(trajectory_detail, record, st.index, st.advantages, st.tokens)
    return _json(detail)


async def metrics(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    plots = await asyncio.to_thread(metrics_series, st.source.location.run_dir)
    return _json({"plots": plots})


async def config(request: web.Request) -> web.Response:
    run_dir = request.app[_STATE].source.location.run_dir
    path = run_dir / "config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return web.Response(text="# no config.yaml in the run directory (remote run, or actors started by hand)\n")
    return web.Response(text=path.read_text(), content_type="text/plain")


def build_app(state: ViewerState) -> web.Application:
    """The viewer's aiohttp application over ``state``."""
    app = web.Application()
    app[_STATE] = state
    app.router.add_get("/", index_page)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/rows", rows)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/traj/{seq}", trajectory)
    app.router.add_get("/api/metrics", metrics)
    app.router.add_get("/api/config", config)
    app.router.add_static("/static/", STATIC_DIR)
    return app
