"""Connecting to a run's trajectory stream without changing anything the run owns.

Three cases, in this order:

1. a NATS URL (``--nats`` or the run config's ``nats.url``): connect to it (possibly remote);
2. the run's embedded server is running (``<run_dir>/nats/url`` answers): connect to it;
3. the run is stopped: copy its trajectory stream out of ``<run_dir>/nats`` into a temporary store
   and start a private nats-server on the copy. The run's own store is never opened by a second
   server (nats-server takes no lock, and two servers on one store corrupt it), and a stream past
   its ``max_age`` expires in the copy only.

Nothing here creates, updates or acks anything on the run's bus: the connection is made without
``ensure`` and readers use ephemeral, in-memory, no-ack consumers (:mod:`agentrl.inspect.reader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nats.js.errors

from agentrl.bus.client import Bus
from agentrl.bus.local import running_server_url
from agentrl.bus.server import EmbeddedNats
from agentrl.bus.subjects import Subjects
from agentrl.config.run import NatsConfig
from agentrl.errors import BusError
from agentrl.inspect.location import RunLocation

__all__ = ["RunSource", "copy_stream_store", "open_run"]


@dataclass
class RunSource:
    """A connected, read-only view of one run's trajectory stream."""

    bus: Bus
    location: RunLocation
    live: bool  # connected to the run's own server (new trajectories may arrive)

    @property
    def subjects(self) -> Subjects:
        return self.bus.subjects

    @property
    def stream(self) -> str:
        return self.bus.subjects.traj_stream


def copy_stream_store(store_dir: Path, stream: str, dest: Path) -> Path:
    """Copy ``stream``'s directory (messages, not consumers) from a JetStream store into ``dest``.

    The copy keeps the store's layout (``jetstream/jetstream/<account>/streams/<stream>`` for a store
    written by :class:`~agentrl.bus.EmbeddedNats`), so a server started on ``dest`` finds it; returns the
    copied stream directory. Raises BusError when the store has no such stream.
    """
    found = sorted(store_dir.glob(f"jetstream/jetstream/*/streams/{stream}"))
    if not found:
        raise BusError(f"{store_dir}: no stored stream {stream} (is this the run's store, and did it publish?)")
    target = dest / found[0].relative_to(store_dir)
    shutil.copytree(found[0], target, ignore=shutil.ignore_patterns("obs"))
    return target


@contextlib.asynccontextmanager
async def _stored_server(loc: RunLocation, nats_cfg: NatsConfig) -> AsyncIterator[str]:
    store = loc.store_dir
    if store is None or not (store / "jetstream").is_dir():  # EmbeddedNats(store) keeps JetStream there
        raise BusError(f"run {loc.name}: no server is running and no store under {store} to replay; pass --nats URL")
    stream = Subjects(loc.name).traj_stream
    with tempfile.TemporaryDirectory(prefix="agentrl-inspect-") as tmp:
        await asyncio.to_thread(copy_stream_store, store, stream, Path(tmp))
        async with EmbeddedNats(tmp, max_payload_mb=nats_cfg.max_payload_mb) as server:
            yield server.url


async def _check_stream(bus: Bus) -> None:
    try:
        await bus.js.stream_info(bus.subjects.traj_stream)
    except nats.js.errors.NotFoundError as exc:
        raise BusError(f"run {bus.subjects.run}: the server has no stream {bus.subjects.traj_stream}") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError(f"run {bus.subjects.run}: cannot read stream {bus.subjects.traj_stream}: {exc!r}") from exc


@contextlib.asynccontextmanager
async def open_run(loc: RunLocation) -> AsyncIterator[RunSource]:
    """Connect read-only to ``loc``'s trajectory stream (see the module docstring for where)."""
    nats_cfg = loc.config.nats if loc.config is not None else NatsConfig()
    nats_cfg = NatsConfig(connect_attempts=3, max_payload_mb=nats_cfg.max_payload_mb)
    url = loc.url or (running_server_url(loc.run_dir) if loc.run_dir is not None else None)
    async with contextlib.AsyncExitStack() as stack:
        live = url is not None
        if url is None:
            url = await stack.enter_async_context(_stored_server(loc, nats_cfg))
        bus = await stack.enter_async_context(await Bus.connect(url, loc.name, nats_cfg, ensure=False))
        await _check_stream(bus)
        yield RunSource(bus, loc, live)
