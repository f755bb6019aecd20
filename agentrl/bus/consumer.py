"""Durable pull consumers that hand out decoded messages with explicit ack / nak / term.

A message that does not decode as the consumer's type, or that has been delivered
more than ``max_deliver`` times (a poison message that keeps crashing its
consumer), is copied to the run's dead-letter stream with the reason and then
terminated: never redelivered forever, never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Generic, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from agentrl.errors import DecodeError
from agentrl.messages import Message, decode

if TYPE_CHECKING:
    from agentrl.bus.client import Bus

__all__ = ["Consumer", "Delivery"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

_ACK_ATTEMPTS = 6  # 10 s each plus backoff: an ack outlives a nats-server restart
UNREACHABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError)


class Delivery(Generic[M]):
    """One delivered message: the decoded ``msg`` plus the ack operations of its raw NATS message."""

    __slots__ = ("_raw", "_reconnects", "msg", "num_delivered", "seq")

    def __init__(self, raw: Msg, msg: M) -> None:
        self._raw = raw
        self.msg = msg
        meta = raw.metadata
        self.seq = int(meta.sequence.stream)
        self.num_delivered = int(meta.num_delivered)
        self._reconnects = _reconnects(raw)

    async def ack(self) -> None:
        """Acknowledge and wait for the server to confirm (so an ack is never lost in a crash).

        While the server does not answer (it may be restarting: its supervisor brings it back on the same
        store) the ack is retried with backoff for about a minute before the error is raised. Once the client
        has reconnected since this delivery, the ack goes out unconfirmed: a server restarted after a kill may
        have lost the delivery from its consumer state and never answers an ack of it (it redelivers the
        message instead, which every consumer here recognises as done: an at-least-once redelivery).
        """
        delay = 0.5
        for attempt in range(_ACK_ATTEMPTS):
            client = self._raw._client
            if _reconnects(self._raw) != self._reconnects and client.is_connected:
                await self._raw.ack()
                return
            try:
                await self._raw.ack_sync(timeout=10.0)
                return
            except UNREACHABLE:
                if attempt == _ACK_ATTEMPTS - 1:
                    raise
                log.warning("ack of %s seq %d not confirmed; retrying in %.1fs", self._raw.subject, self.seq, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def nak(self, delay: float | None = None) -> None:
        """Ask for redelivery, after ``delay`` seconds if given."""
        await self._raw.nak(delay=delay)

    async def term(self) -> None:
        """Never deliver this message again."""
        await self._raw.term()

    async def in_progress(self) -> None:
        """Reset the ack timer: still working on it."""
        await self._raw.in_progress()


def _reconnects(raw: Msg) -> int:
    return int(raw._client.stats["reconnects"])


class Consumer(Generic[M]):
    """Fetches batches from a durable pull consumer and decodes them as ``typ``."""

    def __init__(
        self, bus: Bus, sub: JetStreamContext.PullSubscription, typ: type[M], *, stream: str, max_deliver: int
    ) -> None:
        self._bus = bus
        self._sub = sub
        self._typ = typ
        self.stream = stream
        self.max_deliver = max_deliver
        self.dead_lettered = 0
        self._closed = False

    async def outstanding(self) -> int:
        """Messages nobody has acked yet: still to be delivered, or delivered and unacked — also to a client that
        died holding them, which get redelivered only after ``ack_wait``, behind later ones."""
        info = await self._sub.consumer_info()
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def fetch(self, batch: int = 64, timeout: float = 1.0) -> list[Delivery[M]]:
        """Up to ``batch`` deliveries, waiting at most ``timeout`` seconds; ``[]`` if none arrived.

        Also ``[]`` (after waiting ``timeout``) while the consumer cannot be reached: its leader's node died and
        the cluster is electing another (503), or the client is reconnecting. What such a pull had been handed
        is redelivered after ``ack_wait``."""
        try:
            raws = await self._sub.fetch(batch, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either on an empty pull
            return []
        except (nats.js.errors.ServiceUnavailableError, *UNREACHABLE) as exc:
            log.warning("pull from %s failed (%s); retrying", self.stream, type(exc).__name__)
            await asyncio.sleep(timeout)
            return []
        out = []
        for raw in raws:
            delivery = await self._accept(raw)
            if delivery is not None:
                out.append(delivery)
        return out

    async def _accept(self, raw: Msg) -> Delivery[M] | None:
        meta = raw.metadata
        if meta.num_delivered > self.max_deliver:
            await self._dead_letter(raw, f"delivered {meta.num_delivered} times (max_deliver={self.max_deliver})")
            return None
        try:
            msg: M = decode(raw.data, self._typ)
        except DecodeError as exc:
            await self._dead_letter(raw, str(exc))
            return None
        return Delivery(raw, msg)

    async def _dead_letter(self, raw: Msg, reason: str) -> None:
        meta = raw.metadata
        origin = {"Subject": raw.subject, "Stream": self.stream, "Seq": str(meta.sequence.stream)}
        await self._bus.dead_letter(self.stream, raw.data, reason=reason, origin=origin)
        await raw.term()
        self.dead_lettered += 1
        log.warning("dead-lettered %s seq %s: %s", raw.subject, meta.sequence.stream, reason)

    def __aiter__(self) -> AsyncIterator[Delivery[M]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delivery[M]]:
        while True:
            for delivery in await self.fetch(batch=16, timeout=1.0):
                yield delivery
            await asyncio.sleep(0)

    async def unsubscribe(self) -> None:
        """Stop pulling (idempotent); the durable consumer and its unacked messages stay on the server."""
        if self._closed:
            return
        self._closed = True
        self._bus._consumers.discard(self)
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()
