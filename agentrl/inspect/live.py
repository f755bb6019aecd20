"""Live updates for the viewer's open pages: each page's filter is applied on the server.

A :class:`LiveClient` is one open page (one SSE connection) with its filter. The hub hears every row
the index adds or evicts, keeps each client's matching count exact, and queues at most ``keep``
of the newest matching rows per client between two sends, so a slow page costs bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agentrl.inspect.filters import TrajectoryFilter
from agentrl.inspect.index import Entry, TrajectoryIndex
from agentrl.inspect.summary import Summary

__all__ = ["LiveClient", "LiveHub"]


@dataclass(eq=False)  # hashed by identity: one per open page
class LiveClient:
    """One open page: its filter, how many indexed rows match it, and the rows not yet sent."""

    filt: TrajectoryFilter
    total: int
    keep: int = 100
    added: int = 0
    pending: list[Summary] = field(default_factory=list)

    def take(self) -> tuple[int, list[Summary]]:
        """``(rows added since the last take, the newest of them, newest first)``."""
        added, rows = self.added, self.pending[::-1]
        self.added, self.pending = 0, []
        return added, rows


class LiveHub:
    """Fans index changes out to the open pages."""

    def __init__(self, index: TrajectoryIndex) -> None:
        self.index = index
        self.clients: set[LiveClient] = set()
        index.on_add.append(self._added)
        index.on_evict.append(self._evicted)

    def connect(self, filt: TrajectoryFilter, keep: int = 100) -> LiveClient:
        total, _ = self.index.query(filt, limit=0)
        client = LiveClient(filt, total, keep)
        self.clients.add(client)
        return client

    def disconnect(self, client: LiveClient) -> None:
        self.clients.discard(client)

    def _added(self, entry: Entry) -> None:
        for client in self.clients:
            if client.filt.matches(entry.summary, entry.text):
                client.total += 1
                client.added += 1
                client.pending.append(entry.summary)
                if len(client.pending) > client.keep:
                    del client.pending[: len(client.pending) - client.keep]

    def _evicted(self, entry: Entry) -> None:
        for client in self.clients:
            if client.filt.matches(entry.summary, entry.text):
                client.total -= 1
