"""The continuous-batching scheduler with a fake model runner (no model, no HTTP)."""

from __future__ import annotations

import asyncio

import torch

from agentrl.engine.request import Request, RequestOptions
from agentrl.engine.runner import Prefill
from agentrl.engine.scheduler import Scheduler

VOCAB = 16


class FakeRunner:
    """Greedy next token = (position + 1) % VOCAB; records batch shapes."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.scratch = 1000
        self.device = torch.device("cpu")
        self.prefill_batches: list[list[int]] = []
        self.decode_rows: list[int] = []

    def _peaks(self, positions: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(positions), VOCAB)
        for i, p in enumerate(positions):
            logits[i, (p + 1) % VOCAB] = 10.0
        return logits

    def prefill(self, slots, chunks, starts, *, score=None) -> Prefill:  # type: ignore[no-untyped-def]
        self.prefill_batches.append([len(c) for c in chunks])
        return Prefill(self._peaks([s + len(c) - 1 for s, c in zip(starts, chunks, strict=True)]), {})

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        self.decode_rows.append(int((positions != self.scratch).sum()))
        return self._peaks(positions.tolist())


class Chars:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)


def make(n_prompt: int, max_new: int = 3) -> Request:
    return Request(rid=f"r{n_prompt}-{max_new}", input_ids=list(range(n_prompt)),
                   options=RequestOptions(temperature=0.0, max_new_tokens=max_new, ignore_eos=True))


async def run_all(scheduler: Scheduler, reqs: list[Request]) -> None:
    scheduler.start()
    try:
        for r in reqs:
            scheduler.submit(r)
        for r in reqs:
            while not await asyncio.wait_for(r.updates.get(), 5):
                pass
    finally:
        await scheduler.stop()


async def test_running_batch_is_capped_and_the_queue_drains() -> None:
    runner = FakeRunner(num_slots=2)
    scheduler = Scheduler(runner, Chars(), [], max_running=2, max_queued=10, prefix_cache_slots=0)
    reqs = [make(4 + i) for i in range(5)]
    await run_all(scheduler, reqs)
    assert max(runner.decode_rows) == 2
    for r in reqs:
        n = len(r.input_ids)
        assert r.output_ids == [(n + k) % VOCAB for k in range(3)] and r.finish_reason == {"type": "length", "length": 3}


async def test_prefill_token_budget_splits_admission() -> None:
    runner = FakeRunner(num_slots=4)
    scheduler = Scheduler(runner, Chars(), [], max_running=4, max_queued=10, prefix_cache_slots=0, max_prefill_tokens=10)
    await run_all(scheduler, [make(6, 1), make(6, 1), make(3, 1)])
    assert runner.prefill_batches[0] == [6]
    assert sum(len(b) for b in runner.prefill_batches) == 3


async def test_weight_update_applies_between_steps_and_versions_tokens() -> None:
    runner = FakeRunner(num_slots=1)
    scheduler = Scheduler(runner, Chars(), [], max_running=1, max_queued=10, prefix_cache_slots=0)
    req = make(2, max_new=200)
    req.stream = True  # an update per step
    scheduler.start()
    try:
        scheduler.submit(req)
        for _ in range(3):
            await asyncio.wait_for(req.updates.get(), 5)
        applied: list[int] = []
        await scheduler.update_weights(lambda: applied.append(len(req.output_ids)), version=4)
        while not await asyncio.wait_for(req.updates.get(), 5):
            pass
    finally:
        await scheduler.stop()
    switch = req.versions.index(4)
    assert applied == [switch] and set(req.versions[:switch]) == {0} and set(req.versions[switch:]) == {4}
