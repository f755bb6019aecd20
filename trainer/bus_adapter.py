"""Binds the learner's Protocols to the real bus (thin: every method is one bus call)."""

from __future__ import annotations

from agentrl.bus import Bus, Consumer, Delivery
from agentrl.bus.subjects import ControlKind
from agentrl.config.learner import LearnerConfig
from agentrl.messages import Event, Message, Trajectory

__all__ = ["BusLink", "TrajectoryConsumer", "open_trajectory_consumer"]


class BusLink:
    """:class:`trainer.learner.LearnerBus` over a connected :class:`~agentrl.bus.Bus`."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def get_version(self) -> int:
        return await self.bus.get_version()

    async def cas_version(self, expected: int, new: int) -> None:
        await self.bus.cas_version(expected, new)

    async def publish_event(self, event: Event) -> None:
        await self.bus.publish_event(event)

    async def publish_control(self, kind: ControlKind, msg: Message, msg_id: str) -> None:
        """Durably on ``<run>.control.<kind>``: the controller's accounting must survive its restarts."""
        await self.bus.publish(self.bus.subjects.control(kind), msg, msg_id=msg_id)


class TrajectoryConsumer:
    """:class:`trainer.learner.TrajectorySource` over the durable ``learner`` consumer.

    nats-py's multi-message pull can raise a bare ``asyncio.TimeoutError`` when nothing arrives (not the
    ``nats.errors.TimeoutError`` that :meth:`Consumer.fetch` maps to ``[]``); that is a timeout here too.
    """

    def __init__(self, consumer: Consumer[Trajectory]) -> None:
        self.consumer = consumer

    async def fetch(self, batch: int = 64, timeout: float = 1.0) -> list[Delivery[Trajectory]]:
        try:
            return await self.consumer.fetch(batch, timeout=timeout)
        except TimeoutError:
            return []


async def open_trajectory_consumer(bus: Bus, cfg: LearnerConfig) -> TrajectoryConsumer:
    """The durable pull consumer ``learner`` on the run's trajectory subject."""
    consumer = await bus.consumer(bus.subjects.traj, durable="learner", typ=Trajectory, ack_wait=cfg.batch.ack_wait_s)
    return TrajectoryConsumer(consumer)
