"""Finding the run's bus: an explicit ``--nats URL``, the run's embedded server, or a new one.

A run directory that has an embedded server records its URL in ``<run_dir>/nats/url``;
actors of the same run started by hand without ``--nats`` find and share it,
and the first one starts it (and stops it when it exits), holding the run directory's lock
meanwhile: it never starts a second server on the store of a run that ``agentrl run`` supervises.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

from agentrl.bus.client import Bus
from agentrl.bus.server import EmbeddedNats
from agentrl.config.run import RunConfig
from agentrl.launch.heartbeat import beating
from agentrl.launch.lock import run_lock

__all__ = ["open_bus", "running_server_url"]


def running_server_url(run_dir: Path) -> str | None:
    """The URL recorded by the run's embedded server, if that server still accepts connections."""
    record = run_dir / "nats" / "url"
    if not record.is_file():
        return None
    url = record.read_text().strip()
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=0.5):
            return url
    except OSError:
        return None


@contextlib.asynccontextmanager
async def open_bus(cfg: RunConfig, url: str | None = None) -> AsyncIterator[Bus]:
    """Connect to ``url`` (or ``cfg.nats.url``); without one, share or start the run's embedded server.

    While the bus is open the actor beats for its supervisor (:mod:`agentrl.launch.heartbeat`), so an actor
    whose event loop hangs, or whose process is stopped, is found and restarted.
    """
    url = url or cfg.nats.url or running_server_url(cfg.run_dir)
    if url:
        async with beating(), await Bus.connect(url, cfg.name, cfg.nats) as bus:
            yield bus
        return
    server = EmbeddedNats(cfg.run_dir / "nats", max_payload_mb=cfg.nats.max_payload_mb)
    with run_lock(cfg.run_dir):  # never a second server on the store of a live run (RunDirInUse)
        async with server:
            (cfg.run_dir / "nats" / "url").write_text(server.url)
            async with beating(), await Bus.connect(server.url, cfg.name, cfg.nats) as bus:
                yield bus
