"""The continuous-batching scheduler with a fake model runner (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agentrl.engine.kv_cache import KVCache
from agentrl.engine.request import Request, RequestOptions
from agentrl.engine.runner import Prefill
from agentrl.engine.scheduler import Scheduler

VOCAB = 16


class FakeRunner:
    """Greedy next token = (position + 1) % VOCAB; records batch shapes and table rows."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.scratch = 1000
        self.device = torch.device("cpu")
        self.prefill_batches: list[list[int]] = []
        self.decode_rows: list[int] = []
        self.rows: dict[int, list[int]] = {}

    def _peaks(self, positions: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(positions), VOCAB)
        for i, p in enumerate(positions):
            logits[i, (p + 1) % VOCAB] = 10.0
        return logits

    def set_rows(self, rows: Sequence[int], indices: Sequence[Any]) -> None:
        for row, idx in zip(rows, indices, strict=True):
            self.rows[row] = np.asarray(idx).tolist()

    def prefill(self, rows, chunks, starts, *, score=None) -> Prefill:  # type: ignore[no-untyped-def]
        self.prefill_batches.append([len(c) for c in chunks])
        return Prefill(self._peaks([s + len(c) - 1 for s, c in zip(starts, chunks, strict=True)]), {})

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        self.decode_rows.append(int((positions != self.scratch).sum()))
        return self._peaks(positions.tolist())


class Chars:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)


def make(n_prompt: int, max_new: int = 3, first: int = 0) -> Request:
    return Request(rid=f"r{n_prompt}-{max_new}-{first}", input_ids=list(range(first, first + n_prompt)),
                   options=RequestOptions(temperature=0.0, max_new_tokens=max_new, ignore_eos=True))


def scheduler_for(runner: FakeRunner, *, pool: int = 1000, prefix_cache: bool = False, **kw: Any) -> Scheduler:
    kw.setdefault("max_running", runner.num_rows)
    return Scheduler(runner, Chars(), [], KVCache(pool, enabled=prefix_cache), max_queued=10, **kw)


async def run_all(scheduler: Scheduler, reqs: list[Request], *, stop: bool = True, start: bool = True) -> None:
    if start:
        scheduler.start()
    try:
        for r in reqs:
            scheduler.submit(r)
        for r in reqs:
            while not await asyncio.wait_for(r.updates.get(), 5):
                pass
    finally:
        if stop:
            await scheduler.stop()


async def test_running_batch_is_capped_and_the_queue_drains() -> None:
    runner = FakeRunner(num_rows=2)
    scheduler = scheduler_for(runner)
    reqs = [make(4 + i) for i in range(5)]
    await run_all(scheduler, reqs)
    assert max(runner.decode_rows) == 2
    for r in reqs:
        n = len(r.input_ids)
        assert r.output_ids == [(n + k) % VOCAB for k in range(3)] and r.finish_reason == {"type": "length", "length": 3}
    assert scheduler.cache.allocator.available == 1000  # every reserved position came back


async def test_prefill_token_budget_splits_admission() -> None:
    runner = FakeRunner(num_rows=4)
    scheduler = scheduler_for(runner, max_prefill_tokens=10)
    await run_all(scheduler, [make(6, 1), make(6, 1), make(3, 1)])
    assert runner.prefill_batches[0] == [6]
    assert sum(len(b) for b in runner.prefill_batches) == 3


async def test_kv_memory_limits_admission_until_requests_finish() -> None:
    runner = FakeRunner(num_rows=4)
    scheduler = scheduler_for(runner, pool=20)  # each request reserves 8 + 4 = 12 positions
    reqs = [make(8, 4, first=10 * i) for i in range(3)]
    await run_all(scheduler, reqs)
    assert all(len(b) == 1 for b in runner.prefill_batches) and max(runner.decode_rows) == 1
    assert all(len(r.output_ids) == 4 for r in reqs)


async def test_prefix_cache_hits_a_finished_turn_and_table_rows_share_positions() -> None:
    runner = FakeRunner(num_rows=2)
    scheduler = scheduler_for(runner, prefix_cache=True)
    first = make(6, 3)
    await run_all(scheduler, [first], stop=False)
    second = Request(rid="turn2", input_ids=[*first.input_ids, *first.output_ids, 9, 9],
                     options=RequestOptions(temperature=0.0, max_new_tokens=2, ignore_eos=True))
    await run_all(scheduler, [second], start=False)
    assert second.cached_tokens == 6 + 2  # prompt + outputs except the last (never fed back)
    assert runner.prefill_batches[-1] == [len(second.input_ids) - 8]
    assert scheduler.stats.cached_tokens == 8


async def test_weight_update_applies_between_steps_and_versions_tokens() -> None:
    runner = FakeRunner(num_rows=1)
    scheduler = scheduler_for(runner)
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


async def test_drain_mode_waits_for_running_requests_and_admits_none_meanwhile() -> None:
    """engine.weight_update=drain (SGLang's behaviour): the update waits for the batch to finish; a request that
    arrives meanwhile starts only under the new weights; abort_all (APRIL) cuts the wait short."""
    runner = FakeRunner(num_rows=2)
    scheduler = scheduler_for(runner, drain_for_weights=True)
    long, late = make(2, max_new=40), make(3, max_new=5)
    long.stream = True
    scheduler.start()
    try:
        scheduler.submit(long)
        for _ in range(3):
            await asyncio.wait_for(long.updates.get(), 5)
        applied: list[int] = []
        update = asyncio.create_task(scheduler.update_weights(lambda: applied.append(len(long.output_ids)), 4))
        await asyncio.sleep(0.05)
        scheduler.submit(late)
        while not await asyncio.wait_for(long.updates.get(), 5):
            pass
        await asyncio.wait_for(update, 5)
        while not await asyncio.wait_for(late.updates.get(), 5):
            pass
        # with abort_all the update does not wait: the running request ends at once, cut short
        cut = make(2, max_new=400)
        scheduler.submit(cut)
        await asyncio.sleep(0.05)
        scheduler.abort(None)
        await asyncio.wait_for(scheduler.update_weights(lambda: None, 5), 5)
    finally:
        await scheduler.stop()
    assert applied == [40] and set(long.versions) == {0}  # every token under the old weights, then the update
    assert set(late.versions) == {4}  # admitted only after the update
    assert len(cut.output_ids) < 400 and (cut.finish_reason or {}).get("type") == "abort"


async def test_retract_sends_running_requests_back_and_they_resume_where_they_were() -> None:
    runner = FakeRunner(num_rows=1)
    scheduler = scheduler_for(runner, prefix_cache=True)
    req = make(3, max_new=60)
    req.stream = True
    scheduler.start()
    try:
        scheduler.submit(req)
        for _ in range(5):
            await asyncio.wait_for(req.updates.get(), 5)
        await asyncio.wait_for(scheduler.pause("retract"), 5)
        assert scheduler.running == [] and list(scheduler.waiting) == [req] and not req.finished
        produced = len(req.output_ids)
        scheduler.resume()
        while not await asyncio.wait_for(req.updates.get(), 5):
            pass
    finally:
        await scheduler.stop()
    assert req.output_ids == [(3 + k) % VOCAB for k in range(60)]  # as if never interrupted
    assert req.cached_tokens == 3 + produced - 1  # resumed from its cached keys/values


async def test_waiting_timeout_finishes_with_an_error_status() -> None:
    runner = FakeRunner(num_rows=1)
    scheduler = scheduler_for(runner, waiting_timeout_s=0.05)
    await scheduler.pause("in_place")
    req = make(3)
    scheduler.start()
    try:
        scheduler.submit(req)
        await asyncio.wait_for(req.updates.get(), 5)
    finally:
        await scheduler.stop()
    assert req.error_status == 503 and "waiting timeout" in req.finish_reason["message"]  # type: ignore[index]


async def test_a_prompt_over_the_prefill_budget_is_prefilled_in_pieces() -> None:
    runner = FakeRunner(num_rows=2)
    scheduler = scheduler_for(runner, max_prefill_tokens=10)
    long, short = make(25, 2), make(4, 2, first=3)
    await run_all(scheduler, [long, short])
    assert runner.prefill_batches[:3] == [[10], [10], [5]]  # no overlap: nothing asked for prompt logprobs
    assert long.output_ids == [25 % VOCAB, 26 % VOCAB] and short.output_ids == [4 % VOCAB, 5 % VOCAB]
    assert max(sum(b) for b in runner.prefill_batches) <= 10


async def test_active_time_counts_the_iterations_that_ran_a_step_and_not_idle_time() -> None:
    class SlowRunner(FakeRunner):
        def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
            time.sleep(0.005)
            return super().decode(tokens, positions, kv_len)

    scheduler = scheduler_for(SlowRunner(num_rows=2))
    start = time.perf_counter()
    await run_all(scheduler, [make(4, 10)], stop=False)
    await asyncio.sleep(0.05)  # the overlapped step in flight when the request finished completes
    elapsed = time.perf_counter() - start
    active = scheduler.stats.active_time_s
    assert scheduler.stats.decode_time_s <= active <= elapsed and active >= 9 * 0.005
    await asyncio.sleep(0.1)  # idle: nothing runs, nothing counts
    assert scheduler.stats.active_time_s == active
    await scheduler.stop()


class LoggingRunner(FakeRunner):
    """Records every forward step in order: ``P<new tokens>`` for a prefill, ``D<rows>`` for a decode step;
    ``on_prefill`` runs on the model thread after each prefill."""

    def __init__(self, num_rows: int) -> None:
        super().__init__(num_rows)
        self.log: list[str] = []
        self.on_prefill = lambda: None

    def prefill(self, rows, chunks, starts, *, score=None) -> Prefill:  # type: ignore[no-untyped-def]
        self.log.append(f"P{sum(len(c) for c in chunks)}")
        out = super().prefill(rows, chunks, starts, score=score)
        self.on_prefill()
        return out

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        self.log.append(f"D{int((positions != self.scratch).sum())}")
        time.sleep(0.001)
        return super().decode(tokens, positions, kv_len)


async def test_decode_steps_run_between_the_pieces_of_a_long_prompt() -> None:
    runner = LoggingRunner(num_rows=2)
    scheduler = scheduler_for(runner, max_prefill_tokens=10)
    short, long = make(4, 40, first=3), make(35, 2)
    short.stream = True
    scheduler.start()
    try:
        scheduler.submit(short)
        await asyncio.wait_for(short.updates.get(), 5)  # decoding
        await run_all(scheduler, [long], start=False, stop=False)
        while not await asyncio.wait_for(short.updates.get(), 5):
            pass
    finally:
        await scheduler.stop()
    pieces = [i for i, e in enumerate(runner.log) if e.startswith("P") and i > 0]
    assert [runner.log[i] for i in pieces] == ["P10", "P10", "P10", "P5"]
    assert all(runner.log[i + 1] == "D1" for i in pieces[:-1])  # the short one decoded between pieces
    assert long.output_ids == [35 % VOCAB, 36 % VOCAB]
    assert short.output_ids == [(4 + k) % VOCAB for k in range(40)]
    assert scheduler.stats.prefill_pieces == 3 and scheduler.stats.prefilled_tokens == 4 + 35


async def test_a_long_prompt_aborted_between_pieces_leaves_only_its_computed_pieces_cached() -> None:
    runner = LoggingRunner(num_rows=2)
    scheduler = scheduler_for(runner, max_prefill_tokens=10, prefix_cache=True)
    long = make(35, 2)
    runner.on_prefill = lambda: scheduler.abort(long.rid) if runner.log.count("P10") == 2 else None
    await run_all(scheduler, [long], stop=False)
    assert long.finish_reason["type"] == "abort" and long.output_ids == []  # type: ignore[index]
    runner.on_prefill = lambda: None
    again = make(35, 2)
    again.rid = "again"
    await run_all(scheduler, [again], start=False)
    assert again.cached_tokens == 20  # the two pieces computed, not the 15 tokens never fed
    assert again.output_ids == [35 % VOCAB, 36 % VOCAB]
    assert scheduler.cache.allocator.available == 1000 - scheduler.cache.cached_tokens


async def test_a_long_prompt_retracted_between_pieces_resumes_from_its_computed_pieces() -> None:
    runner, piece, loop = LoggingRunner(num_rows=2), asyncio.Event(), asyncio.get_running_loop()
    runner.on_prefill = lambda: (time.sleep(0.02), loop.call_soon_threadsafe(piece.set))
    scheduler = scheduler_for(runner, max_prefill_tokens=10, prefix_cache=True)
    long = make(35, 2)
    scheduler.start()
    try:
        scheduler.submit(long)
        await asyncio.wait_for(piece.wait(), 5)
        await scheduler.pause("retract")  # the release of memory (colocated turns) retracts the same way
        assert scheduler.stats.retracted == 1 and not scheduler.running and long.kv is None
        scheduler.resume()
        while not await asyncio.wait_for(long.updates.get(), 5):
            pass
    finally:
        await scheduler.stop()
    assert long.output_ids == [35 % VOCAB, 36 % VOCAB]
    assert long.cached_tokens in (10, 20, 30)  # resumed from the pieces it had computed, whole pieces only
    assert sum(int(e[1:]) for e in runner.log if e[0] == "P") == 35  # no prompt token prefilled twice
