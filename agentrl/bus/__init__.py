"""The NATS JetStream bus that every actor talks through (see docs/architecture.md §2)."""

from agentrl.bus.client import Bus
from agentrl.bus.consumer import Consumer, Delivery
from agentrl.bus.server import EmbeddedNats, find_nats_server, free_port
from agentrl.bus.subjects import TASK_PRIORITIES, Subjects, TaskPriority

__all__ = [
    "TASK_PRIORITIES",
    "Bus",
    "Consumer",
    "Delivery",
    "EmbeddedNats",
    "Subjects",
    "TaskPriority",
    "find_nats_server",
    "free_port",
]
