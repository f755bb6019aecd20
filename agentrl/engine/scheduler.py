"""Continuous batching: requests join and leave the running batch between decode steps.

One asyncio task owns all request state. Each iteration it (1) applies a pending weight update, (2) drops
aborted requests, (3) admits waiting requests up to ``max_running`` and prefills them, (4) runs one decode
step for every running request, then appends tokens, checks stops and wakes the HTTP handlers. Model work
runs on one worker thread so the event loop keeps serving HTTP; nothing touches the model concurrently, so
weights change only between steps and every token records the version that produced it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from agentrl.engine.request import Request, Tokenizer
from agentrl.engine.runner import Prefill
from agentrl.engine.sampling import SamplingBatch, sample
from agentrl.engine.slots import SlotPool

__all__ = ["QueueFull", "Runner", "Scheduler", "SchedulerStats"]

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (answered with HTTP 429)."""


class Runner(Protocol):
    """What the scheduler needs from the model runner (see :class:`agentrl.engine.runner.ModelRunner`)."""

    num_slots: int
    scratch: int
    device: torch.device

    def prefill(
        self, slots: list[int], chunks: list[list[int]], starts: list[int], *, score: dict[int, float] | None = None
    ) -> Prefill: ...

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor: ...


@dataclass
class SchedulerStats:
    """Counters for ``/get_server_info``."""

    steps: int = 0  # forward passes (prefill or decode)
    decode_steps: int = 0
    decode_time_s: float = 0.0  # wall time of decode steps on the model thread (forward + sampling)
    prefill_time_s: float = 0.0
    generated_tokens: int = 0
    prefilled_tokens: int = 0
    cached_tokens: int = 0
    finished: int = 0


class Scheduler:
    """Owns the waiting queue, the running batch and the KV slots of one engine."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        eos_ids: Iterable[int],
        *,
        max_running: int,
        max_queued: int,
        prefix_cache_slots: int,
        max_prefill_tokens: int = 16384,
        weight_version: int = 0,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_prefill_tokens = max_prefill_tokens  # new prompt tokens per prefill step (bounds its memory)
        self.slots = SlotPool(runner.num_slots)
        self.prefix_cache = prefix_cache_slots > 0
        self.weight_version = weight_version
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.paused = False
        self.stats = SchedulerStats()
        self._wake = asyncio.Event()
        self._pending_weights: list[tuple[Callable[[], None], int, asyncio.Future[None]]] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="agentrl-engine-model")
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="agentrl-engine-scheduler")

    def finish_all(self, message: str) -> None:
        """Finish every waiting and running request now with what it has (finish ``abort``)."""
        self.abort(None)
        for req in self.running:
            req.finish({"type": "abort", "message": message})

    async def stop(self) -> None:
        """Abort everything, stop the loop and the model thread."""
        self.finish_all("engine shutting down")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    # --- requests --------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a validated request; raises :class:`QueueFull` beyond ``max_queued`` waiting requests."""
        if len(self.waiting) >= self.max_queued:
            raise QueueFull(f"{len(self.waiting)} requests already waiting (max_queued)")
        self.waiting.append(req)
        self._wake.set()

    def abort(self, rid: str | None) -> int:
        """Abort one request by rid (or all with ``None``); returns how many were found.

        Waiting requests finish at once with no output; running ones finish at the next step boundary with
        what they have produced, ``finish_reason.type == "abort"``.
        """
        found = 0
        for req in list(self.waiting):
            if rid is None or req.rid == rid:
                self.waiting.remove(req)
                req.finish({"type": "abort", "message": "aborted before prefill"})
                found += 1
        for req in self.running:
            if rid is None or req.rid == rid:
                req.abort_requested = True
                found += 1
        self._wake.set()
        return found

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    def flush_cache(self) -> int:
        return self.slots.flush()

    async def update_weights(self, apply: Callable[[], None], version: int) -> None:
        """Run ``apply`` (copies new weights into the model) between two steps; then report ``version``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_weights.append((apply, version, fut))
        self._wake.set()
        await fut

    async def run_on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread, serialized with forward passes."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # --- the loop --------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self._has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._iteration()
            except Exception as exc:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                for req in self.running:
                    req.finish({"type": "abort", "message": f"engine step failed: {exc}"})
                self._release_finished()
            await asyncio.sleep(0)

    def _has_work(self) -> bool:
        if self._pending_weights or any(r.abort_requested and not r.finished for r in self.running):
            return True  # weight updates and aborts are served while paused too
        return not self.paused and bool(self.waiting or self.running)

    async def _iteration(self) -> None:
        await self._apply_weights()
        for req in self.running:
            if req.abort_requested:
                req.finish({"type": "abort", "message": "aborted by request"})
        self._release_finished()
        if self.paused:
            return
        admitted = self._admit()
        if admitted:
            await self._prefill(admitted)
            self._release_finished()
        if self.running:
            await self._decode()
            self._release_finished()

    async def _apply_weights(self) -> None:
        while self._pending_weights:
            apply, version, fut = self._pending_weights.pop(0)
            try:
                await self.run_on_model_thread(apply)
            except Exception as exc:
                fut.set_exception(exc)
                continue
            self.weight_version = version
            self.slots.flush()
            fut.set_result(None)

    def _admit(self) -> list[Request]:
        """Move waiting requests into the batch, up to ``max_running`` and ``max_prefill_tokens`` (at least one)."""
        admitted: list[Request] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_running:
            if admitted and len(self.waiting[0].input_ids) > budget:
                break
            req = self.waiting.popleft()
            # prompt logprobs need the logits before their first scored token: reuse no further than that
            limit = None if req.logprob_start is None else max(req.logprob_start - 1, 0)
            req.slot, req.cached_tokens = self.slots.acquire(req.input_ids, max_reuse=limit)
            req.kv_version = self.weight_version
            self.stats.cached_tokens += req.cached_tokens
            budget -= len(req.input_ids) - req.cached_tokens
            self.running.append(req)
            admitted.append(req)
        return admitted

    async def _prefill(self, reqs: list[Request]) -> None:
        slots = [r.slot for r in reqs if r.slot is not None]
        chunks = [r.input_ids[r.cached_tokens :] for r in reqs]
        starts = [r.cached_tokens for r in reqs]
        params = self._sampling(reqs)
        self.stats.prefilled_tokens += sum(len(c) for c in chunks)

        score = {b: r.options.temperature or 1.0 for b, r in enumerate(reqs) if r.logprob_start is not None}

        def step() -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
            out = self.runner.prefill(slots, chunks, starts, score=score)
            return (*sample(out.logits, params), out.prompt_logprobs)

        tokens, logprobs, prompt_logprobs = await self._timed(step, decode=False)
        for b, values in prompt_logprobs.items():
            reqs[b].set_prompt_logprobs(values.tolist())
        self._commit(reqs, tokens, logprobs)

    async def _decode(self) -> None:
        reqs = self.running
        order = [r.slot for r in reqs if r.slot is not None]
        rows = max(order) + 1
        token_list, position_list = [0] * rows, [self.runner.scratch] * rows
        for r, slot in zip(reqs, order, strict=True):
            token_list[slot] = r.output_ids[-1]
            position_list[slot] = len(r.input_ids) + len(r.output_ids) - 1
        kv_len = max(position_list[slot] for slot in order) + 1
        tokens, positions = torch.tensor(token_list), torch.tensor(position_list)
        params = self._sampling(reqs)
        device = self.runner.device

        dense = order == list(range(rows))  # rows already in request order: no gather needed

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.runner.decode(tokens.to(device), positions.to(device), kv_len)
            return sample(logits if dense else logits[torch.tensor(order, device=device)], params)

        out_tokens, logprobs = await self._timed(step, decode=True)
        self._commit(list(reqs), out_tokens, logprobs)

    async def _timed(self, step: Callable[[], Any], *, decode: bool) -> Any:
        start = time.perf_counter()
        out = await self.run_on_model_thread(step)
        elapsed = time.perf_counter() - start
        if decode:
            self.stats.decode_steps += 1
            self.stats.decode_time_s += elapsed
        else:
            self.stats.prefill_time_s += elapsed
        return out

    def _sampling(self, reqs: list[Request]) -> SamplingBatch:
        banned = [
            sorted(set(r.options.stop_token_ids) | (set() if r.options.ignore_eos else self.eos_ids))
            if len(r.output_ids) < r.options.min_new_tokens
            else []
            for r in reqs
        ]
        return SamplingBatch.build(
            [r.options.temperature for r in reqs],
            [r.options.top_p for r in reqs],
            [r.options.top_k for r in reqs],
            [r.options.min_p for r in reqs],
            [r.options.seed for r in reqs],
            [len(r.output_ids) for r in reqs],
            banned,
        )

    def _commit(self, reqs: list[Request], tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.stats.steps += 1
        for req, token, lp in zip(reqs, tokens.tolist(), logprobs.tolist(), strict=True):
            if req.finished:
                continue
            req.append(int(token), float(lp), self.weight_version)
            self.stats.generated_tokens += 1
            reason = req.check_stop(self.eos_ids, self.tokenizer)
            if reason is not None:
                req.finish(reason)
            elif req.stream:
                req.updates.put_nowait(False)

    def _release_finished(self) -> None:
        keep = []
        for req in self.running:
            if not req.finished:
                keep.append(req)
                continue
            self.stats.finished += 1
            if req.slot is not None:
                # keys/values computed under older weights must not be reused
                fresh = self.prefix_cache and req.kv_version == self.weight_version
                held = (req.input_ids + req.output_ids)[:-1] if fresh else None
                self.slots.release(req.slot, held)
                req.slot = None
        self.running = keep
