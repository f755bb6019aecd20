"""Agent workers (``agentrl worker``): run agent episodes from the task queue and publish trajectories."""

from agentrl.worker.worker import AgentWorker, WorkerStats

__all__ = ["AgentWorker", "WorkerStats"]
