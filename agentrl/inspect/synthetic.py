"""Trajectories shaped like a tool-calling run's, built without an engine: for tests and benchmarks of inspection.

Each has a prompt turn, model turns (sampled tokens with logprobs, versions and a temperature), tool
turns (masked), and a reward. A *resumed* task also yields its aborted first attempt (``status="aborted"``,
id ``"{task_id}-0"``), and the resumed trajectory holds every token of both attempts with a zero-token
``abort`` turn where the cut fell. Token ids come from ``encode`` (a real tokenizer's) or from the text's bytes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agentrl.messages import Trajectory, Turn, new_id

__all__ = ["Encode", "synthetic_group"]

Encode = Callable[[str], list[int]]


def _byte_ids(text: str) -> list[int]:
    return list(text.encode())


class _Builder:
    def __init__(self, encode: Encode) -> None:
        self.encode = encode
        self.tokens: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.turns: list[Turn] = []

    def masked(self, kind: str, text: str, **fields: object) -> None:
        ids = self.encode(text)
        start = len(self.tokens)
        self.tokens += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)
        self.turns.append(Turn(kind=kind, start=start, end=len(self.tokens), text=text, **fields))  # type: ignore[arg-type]

    def model(self, text: str, version: int, rng: random.Random, temperature: float) -> None:
        ids = self.encode(text)
        start = len(self.tokens)
        self.tokens += ids
        self.mask += [1] * len(ids)
        self.logprobs += [-rng.expovariate(2.0) for _ in ids]
        self.versions += [version] * len(ids)
        extra: dict[str, Any] = {"temperature": temperature} if "temperature" in Turn.__struct_fields__ else {}
        self.turns.append(Turn(kind="model", start=start, end=len(self.tokens), text=text, finish_reason="stop",
                               seconds=round(rng.uniform(0.05, 0.5), 3), **extra))

    def abort(self, attempt: int) -> None:
        n = len(self.tokens)
        self.turns.append(Turn(kind="abort", start=n, end=n, info={"attempt": attempt}))

    def build(self, prompt_len: int, **fields: object) -> Trajectory:
        return Trajectory(tokens=np.array(self.tokens, np.int32), loss_mask=np.array(self.mask, np.uint8),
                          logprobs=np.array(self.logprobs, np.float32), versions=np.array(self.versions, np.int32),
                          prompt_len=prompt_len, turns=list(self.turns), **fields)  # type: ignore[arg-type]


def _call(a: int, c: int) -> str:
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a}*{c}"}}}}</tool_call>'


def _episode(b: _Builder, rng: random.Random, version: int, a: int, c: int, cut: bool) -> float:
    """Tool call, tool output, answer; with ``cut`` the first model turn is split by an abort. Returns the reward."""
    call = _call(a, c)
    if cut:
        half = len(call) // 2
        b.model(call[:half], version, rng, 1.0)
        b.abort(0)
        b.model(call[half:], version + 1, rng, 1.0)
        version += 1
    else:
        b.model(call, version, rng, 1.0)
    b.masked("tool", f"<tool_response>{a * c}</tool_response>", tool="calculator", reward=0.0)
    right = rng.random() < 0.6
    b.model(f"The answer is {a * c if right else a * c + 1}.", version, rng, 1.0)
    return 1.0 if right else 0.0


def synthetic_group(
    rng: random.Random, *, group_size: int = 4, version: int = 0, env: str = "calculator", worker: str = "worker-0",
    resumed: int = 0, encode: Encode | None = None, created_at: float | None = None,
) -> list[Trajectory]:
    """One group of ``group_size`` tasks; the first ``resumed`` of them were aborted once and resumed.

    Returns the trajectories in publishing order: aborted first attempts, then every final trajectory.
    """
    encode = encode or _byte_ids
    group_id, a, c = new_id(), rng.randint(2, 99), rng.randint(2, 99)
    prompt = f"<|im_start|>user\nWhat is {a}*{c}?<|im_end|>\n<|im_start|>assistant\n"
    out: list[Trajectory] = []
    finals: list[Trajectory] = []
    now = time.time() if created_at is None else created_at
    for index in range(group_size):
        task_id, cut = new_id(), index < resumed
        common = dict(task_id=task_id, group_id=group_id, group_size=group_size, env=env, worker_id=worker,
                      engine_id="engine-0", created_at=now, metadata={"problem": f"{a}*{c}", "answer": a * c})
        b = _Builder(encode)
        b.masked("prompt", prompt)
        prompt_len = len(b.tokens)
        if cut:
            first = _Builder(encode)
            first.masked("prompt", prompt)
            first.model(_call(a, c)[: len(_call(a, c)) // 2], version, rng, 1.0)
            first.abort(0)
            out.append(first.build(prompt_len, id=f"{task_id}-0", status="aborted", attempt=0, **common))
        reward = _episode(b, rng, version, a, c, cut)
        finals.append(b.build(prompt_len, id=task_id if not cut else f"{task_id}-1", status="completed",
                              reward=reward, attempt=1 if cut else 0, turn_rewards=[0.0], **common))
    return out + finals
