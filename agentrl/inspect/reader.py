"""Reading trajectories from a run's stream, in order, without acking or slowing anyone.

The reader uses an *ordered consumer*: ephemeral, in-memory on the server, ``AckPolicy.NONE``,
flow-controlled, with idle heartbeats. The server pushes no further than the reader has taken (flow
control answers only after the application read the message), a gap (a dropped message, a server
restart) recreates the consumer from the last sequence seen, and when the reader goes away the
server forgets it. The learner's durable consumer and its acks are never touched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from agentrl.errors import BusError, DecodeError
from agentrl.inspect.position import Start
from agentrl.inspect.source import RunSource
from agentrl.inspect.summary import Record, version_span
from agentrl.messages import Trajectory, decode

__all__ = ["TrajectoryReader", "fetch_record"]

log = logging.getLogger(__name__)

_HEARTBEAT_S = 2.0
_PENDING_BYTES = 64 * 1024 * 1024  # what the client buffers before the server must wait for flow control


def _record(msg: Msg, meta: Msg.Metadata) -> Record | None:
    try:
        traj: Trajectory = decode(msg.data, Trajectory)
    except DecodeError as exc:
        log.warning("stream sequence %s is not a trajectory, skipped: %s", meta.sequence.stream, exc)
        return None
    return Record(int(meta.sequence.stream), meta.timestamp.timestamp(), traj)


async def fetch_record(source: RunSource, seq: int, *, next_after: bool = False) -> Record | None:
    """The trajectory stored at ``seq`` (or, with ``next_after``, the first one at or after it); ``None`` if gone."""
    try:
        raw = await source.bus.js.get_msg(source.stream, seq=seq, subject=source.subjects.traj if next_after else None,
                                          next=next_after)
    except nats.js.errors.NotFoundError:
        return None
    if raw.data is None or raw.seq is None:
        return None
    try:
        traj: Trajectory = decode(raw.data, Trajectory)
    except DecodeError:
        return None
    when = raw.time.timestamp() if raw.time is not None else traj.created_at
    return Record(int(raw.seq), when, traj)


class TrajectoryReader:
    """Reads :class:`Record` from ``start``; stops at the end of the stream unless ``follow``.

    Without ``follow`` it stops at the last trajectory that was stored when reading began.
    ``skipped`` counts stored messages that did not decode as trajectories. Iterate
    ``async with contextlib.aclosing(reader.records()) as records: async for r in records: ...``
    so that leaving the loop early removes the consumer at once.
    """

    def __init__(self, source: RunSource, start: Start = Start(), *, follow: bool = False) -> None:
        self.source = source
        self.start = start
        self.follow = follow
        self.skipped = 0
        self.last_seq = 0

    def records(self) -> AsyncGenerator[Record, None]:
        return self._iterate()

    async def _stream_bounds(self) -> tuple[int, int]:
        try:
            info = await self.source.bus.js.stream_info(self.source.stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read stream {self.source.stream}: {exc!r}") from exc
        return int(info.state.first_seq), int(info.state.last_seq)

    async def _iterate(self) -> AsyncGenerator[Record, None]:
        first, last = await self._stream_bounds()
        config = await self._consumer_config(first, last)
        if config is None:
            return
        js = self.source.bus.js
        sub = await js.subscribe(self.source.subjects.traj, stream=self.source.stream, ordered_consumer=True,
                                 config=config, idle_heartbeat=_HEARTBEAT_S, pending_bytes_limit=_PENDING_BYTES)
        try:
            async for record in self._pump(sub, last):
                yield record
        finally:
            await sub.unsubscribe()

    async def _pump(self, sub: nats.js.JetStreamContext.PushSubscription, end: int) -> AsyncIterator[Record]:
        while True:
            try:
                msg = await sub.next_msg(timeout=_HEARTBEAT_S)
            except (nats.errors.TimeoutError, TimeoutError):
                if not self.follow and await self._at_end(sub, end):
                    return
                continue
            meta = msg.metadata  # parsed from the reply subject on every access: once
            record = _record(msg, meta)
            self.last_seq = int(meta.sequence.stream)
            if record is None:
                self.skipped += 1
            else:
                yield record
            if not self.follow and (self.last_seq >= end or meta.num_pending == 0):
                return

    async def _at_end(self, sub: nats.js.JetStreamContext.PushSubscription, end: int) -> bool:
        """Nothing left to deliver up to ``end``: the consumer has nothing pending, or we are past ``end``."""
        if self.last_seq >= end:
            return True
        try:
            info = await sub.consumer_info()
        except (nats.errors.Error, TimeoutError):
            return False  # being recreated after a gap: ask again on the next timeout
        return not info.num_pending  # and nothing arrived for a heartbeat interval: all was delivered

    async def _consumer_config(self, first: int, last: int) -> ConsumerConfig | None:
        """The ordered consumer's start; ``None`` when nothing would be delivered (empty, or past the end)."""
        kind, value = self.start.kind, self.start.value
        if kind == "new":
            return None if not self.follow else ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        if last == 0 and not self.follow:
            return None
        if kind == "time":
            when = dt.datetime.fromtimestamp(value, dt.UTC)
            return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=when)
        seq = {"all": first, "seq": int(value), "last": last - int(value) + 1}.get(kind)
        if seq is None:
            seq = await self._first_at_version(int(value), first, last)
        seq = max(seq, first, 1)
        if seq > last and not self.follow:
            return None
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq)

    async def _first_at_version(self, version: int, first: int, last: int) -> int:
        """Bisection for the first sequence whose trajectory reached ``version`` (versions grow along the stream)."""
        lo, hi = first, last + 1
        while lo < hi:
            mid = (lo + hi) // 2
            record = await fetch_record(self.source, mid, next_after=True)
            if record is None or version_span(record.traj)[1] >= version:
                hi = mid
            else:
                lo = record.seq + 1
            await asyncio.sleep(0)
        return lo
