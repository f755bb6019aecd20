"""Continuous batching: requests join and leave the running batch between decode steps.

One asyncio task owns all request state. Each iteration it (1) applies a pending weight update, (2) drops
aborted and timed-out requests, (3) admits waiting requests while rows, KV memory and the prefill token budget
allow, reusing cached prefixes (:mod:`agentrl.engine.kv_cache`), and prefills them, (4) runs one decode step
for every running request, then appends tokens, checks stops and wakes the HTTP handlers. Model work runs on
one worker thread so the event loop keeps serving HTTP; nothing touches the model concurrently, so weights
change only between steps and every token records the version that produced it.

A finished request's computed tokens stay in the prefix cache; a running request's prompt is shared as soon as
it is prefilled, so the ``n`` samples of a prompt (or a GRPO group) arriving after it reuse its keys/values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from agentrl.engine.chunked import prefill_in_pieces
from agentrl.engine.kv_cache import KVCache
from agentrl.engine.logits import RowLogits, apply_logits
from agentrl.engine.request import Request, Tokenizer
from agentrl.engine.runner import Prefill, ScoreSpec
from agentrl.engine.sampling import HostCopy, Sampled, SamplingBatch, sample, sample_on_device
from agentrl.engine.step_inputs import (
    DecodeRows,
    DecodeSampling,
    SteadyDecode,
    pipelinable,
    record_prompt_scores,
    record_sampled,
    row_logits,
    sampling_batch,
    score_specs,
    steady,
    to_device,
)
from agentrl.errors import AgentRLError

__all__ = ["QueueFull", "Runner", "Scheduler", "SchedulerStats"]

log = logging.getLogger(__name__)


class QueueFull(AgentRLError):
    """More requests are waiting than the engine accepts (answered with HTTP 429)."""


class Runner(Protocol):
    """What the scheduler needs from the model runner (see :class:`agentrl.engine.runner.ModelRunner`)."""

    num_rows: int
    scratch: int
    device: torch.device

    def set_rows(self, rows: Sequence[int], indices: Sequence[Any]) -> None: ...

    def prefill(
        self, rows: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int], *,
        score: dict[int, ScoreSpec] | None = None,
    ) -> Prefill: ...

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor: ...


@dataclass(eq=False)
class _InFlight:
    """A decode step handed to the model thread whose tokens are not committed yet (overlap scheduling)."""

    reqs: list[Request]
    launched: asyncio.Future[tuple[HostCopy, float]] | None = None
    tokens: torch.Tensor | None = None  # its sampled tokens on the device, set on the model thread when it ran


@dataclass
class SchedulerStats:
    """Counters for ``/get_server_info``."""

    steps: int = 0  # forward passes (prefill or decode)
    decode_steps: int = 0
    decode_time_s: float = 0.0  # wall time of decode steps on the model thread (forward + sampling)
    overlapped_steps: int = 0  # decode steps launched before the previous step's tokens were committed
    steady_steps: int = 0  # overlapped steps whose inputs advanced the previous step's (an unchanged batch)
    prefill_time_s: float = 0.0
    active_time_s: float = 0.0  # wall time of scheduler iterations that ran a forward step (the engine's busy time)
    generated_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests (what prefill would cost without the cache)
    prefilled_tokens: int = 0  # prompt tokens actually computed
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    finished: int = 0
    timed_out: int = 0
    retracted: int = 0  # running requests sent back to the queue by a retract pause (they continue later)
    prefill_pieces: int = 0  # pieces of long prompts run between decode steps (chunked prefill)


class Scheduler:
    """Owns the waiting queue, the running batch, the rows of the runner and the KV cache of one engine."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        eos_ids: Iterable[int],
        cache: KVCache,
        *,
        max_running: int,
        drain_for_weights: bool = False,
        max_queued: int,
        max_prefill_tokens: int = 16384,
        weight_version: int = 0,
        waiting_timeout_s: float | None = None,
        running_timeout_s: float | None = None,
        timeout_status: int = 503,
        overlap: bool = True,
        fused_sampling: bool | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.cache = cache
        self.max_running = min(max_running, runner.num_rows)
        self.drain_for_weights = drain_for_weights  # a weight update waits for the running requests (SGLang)
        self.max_queued = max_queued
        self.max_prefill_tokens = max_prefill_tokens  # new prompt tokens per prefill forward pass (bounds its memory)
        self.weight_version = weight_version
        self.waiting_timeout_s = waiting_timeout_s
        self.running_timeout_s = running_timeout_s
        self.timeout_status = timeout_status
        self.overlap = overlap  # launch decode step N+1 before committing step N's tokens
        self.fused_sampling = fused_sampling  # None: the Triton sampler where it runs (CUDA)
        self._sampling = DecodeSampling(runner.device)  # decode steps' per-request sampling columns, reused
        self._steady = SteadyDecode()  # the next decode step's inputs while the batch is unchanged
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_rows = list(range(runner.num_rows))
        self.paused = False
        self.released: set[str] = set()  # memory handed back (release_memory_occupation): nothing is admitted
        self.stats = SchedulerStats()
        self._retract_pending = False
        self._settle_waiters: list[asyncio.Future[None]] = []  # pause() calls waiting for the batch to empty
        self._dirty: dict[int, Request] = {}  # rows whose table entries must be rewritten before the next step
        self._wake = asyncio.Event()
        self._pending_weights: list[tuple[Callable[[], None], int, asyncio.Future[None]]] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="agentrl-engine-model")
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="agentrl-engine-wait")  # waits for device copies
        self._inflight: _InFlight | None = None
        self._chunked: Request | None = None  # a long prompt prefilled a piece per iteration, between decode steps
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
        self._waiter.shutdown(wait=True)

    # --- requests --------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a validated request; raises :class:`QueueFull` beyond ``max_queued`` waiting requests."""
        if len(self.waiting) >= self.max_queued:
            raise QueueFull(f"{len(self.waiting)} requests already waiting (max_queued)")
        self.waiting.append(req)
        self._wake.set()

    def abort(self, rid: str | None) -> int:
        """Abort one request by rid (or all with ``None``); returns how many were found.

        Waiting requests finish at once with what they have; running ones finish at the next step boundary
        with what they have produced, ``finish_reason.type == "abort"``.
        """
        found = 0
        for req in list(self.waiting):
            if rid is None or req.rid == rid:
                self.waiting.remove(req)
                req.finish({"type": "abort", "message": "Abort in waiting queue"})
                found += 1
        for req in self.running:
            if rid is None or req.rid == rid:
                req.abort_requested = True
                found += 1
        self._wake.set()
        return found

    async def pause(self, mode: str = "in_place") -> None:
        """Stop generating. ``abort``: abort everything; ``retract``: running requests go back to the queue
        (their keys/values are recomputed when they resume, under the weights of that time); ``in_place``: they
        stay where they are. Returns once no request runs any more (at once for ``in_place``)."""
        if mode == "abort":
            self.abort(None)
        elif mode == "retract":
            self._retract_pending = True
        self.paused = True
        if mode != "in_place" and self.running:
            settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settle_waiters.append(settled)
            self._wake.set()
            await settled

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    def wake(self) -> None:
        """Look at the queue again (after memory came back)."""
        self._wake.set()

    def flush_cache(self) -> int:
        """Drop every cached prefix no running request uses; returns how many tokens were dropped."""
        return self.cache.flush()

    async def update_weights(self, apply: Callable[[], None], version: int) -> None:
        """Run ``apply`` (copies new weights into the model) between two steps; then report ``version``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_weights.append((apply, version, fut))
        self._wake.set()
        await fut

    async def run_on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread, serialized with forward passes."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def tokens_in_use(self) -> int:
        """KV positions held by running requests and the cache."""
        return self.cache.capacity - self.cache.allocator.available

    # --- the loop --------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self._has_work():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._idle_timeout())
                self._expire()
                continue
            try:
                await self._counted_iteration()
            except Exception as exc:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                await self._abandon()
                for req in self.running:
                    req.finish({"type": "abort", "message": f"engine step failed: {exc}"})
                self._release_finished(failed=True)
            await asyncio.sleep(0)

    async def _abandon(self) -> None:
        """After a failure: wait until the model thread is done with the step in flight, and forget it."""
        step, self._inflight = self._inflight, None
        if step is not None and step.launched is not None:
            with contextlib.suppress(Exception):
                await step.launched

    def _settle(self) -> None:
        if not self.running:
            for waiter in self._settle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._settle_waiters.clear()

    def _idle_timeout(self) -> float | None:
        """While requests wait with a waiting timeout, wake up to expire them."""
        return 0.05 if self.waiting and self.waiting_timeout_s is not None else None

    def _has_work(self) -> bool:
        if self._inflight is not None or self._pending_weights or self._retract_pending or self._settle_waiters or any(
            r.abort_requested and not r.finished for r in self.running
        ):
            return True  # weight updates, retractions and aborts are served while paused too
        return not self.paused and not self.released and bool(self.waiting or self.running)

    async def _counted_iteration(self) -> None:
        """An iteration; its wall time counts as active when it ran a forward step (with overlapped decode the model
        thread's time is only the host's share of a step, so the busy fraction comes from here)."""
        steps, start = self.stats.steps, time.perf_counter()
        await self._iteration()
        if self.stats.steps != steps:
            self.stats.active_time_s += time.perf_counter() - start

    async def _iteration(self) -> None:
        if self._inflight is not None and self._must_drain():
            await self._drain()
        if self._retract_pending:
            self._retract_pending = False
            self._retract_all()
        await self._apply_weights()
        for req in self.running:
            if req.abort_requested:
                req.finish({"type": "abort", "message": "aborted by request"})
        self._expire()
        self._release_finished()
        if self.paused or self.released:
            self._settle()
            return
        admitted = self._admit() if self._chunked is None else []
        if self._in_pieces(admitted):
            self._chunked, admitted = admitted[0], []
        if self._chunked is not None:
            admitted = await self._prefill_piece()
        if admitted:
            await self._prefill(admitted)
            self._release_finished()
        if self._decodable():
            await self._decode()
            self._release_finished()
        elif self._inflight is not None:
            await self._drain()

    def _decodable(self) -> list[Request]:
        """The running requests a decode step feeds: all but a long prompt still being prefilled."""
        return self.running if self._chunked is None else [r for r in self.running if r is not self._chunked]

    async def _apply_weights(self) -> None:
        if self.drain_for_weights and any(not r.finished for r in self.running):
            return  # drain: the update waits until the running requests finish (nothing new is admitted meanwhile)
        while self._pending_weights:
            apply, version, fut = self._pending_weights.pop(0)
            try:
                await self.run_on_model_thread(apply)
            except Exception as exc:
                fut.set_exception(exc)
                continue
            self.weight_version = version
            self.cache.set_version(version)
            fut.set_result(None)

    def _expire(self) -> None:
        """Finish requests past their waiting or running timeout with an error (HTTP ``timeout_status``)."""
        now = time.monotonic()
        if self.waiting_timeout_s is not None:
            for req in [r for r in self.waiting if now - r.created > self.waiting_timeout_s]:
                self.waiting.remove(req)
                self._time_out(req, "Request waiting timeout reached.")
        if self.running_timeout_s is not None:
            for req in self.running:
                if req.admitted is not None and now - req.admitted > self.running_timeout_s:
                    self._time_out(req, "Request running timeout reached.")

    def _time_out(self, req: Request, message: str) -> None:
        self.stats.timed_out += 1
        req.finish({"type": "abort", "message": message, "status_code": self.timeout_status})

    # --- admission and KV memory ---------------------------------------------------------------------
    def _admit(self) -> list[Request]:
        """Move waiting requests into the batch while rows, KV memory and the prefill budget allow (at least one)."""
        admitted: list[Request] = []
        if self.drain_for_weights and self._pending_weights:
            return admitted  # draining for a weight update
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            if not self._reserve(req):
                break  # memory is short: wait for running requests to finish (first come, first served)
            assert req.kv is not None
            new = len(req.input_ids) + len(req.output_ids) - req.kv.cached
            if admitted and new > budget:
                self.cache.release(req.kv, None)
                req.kv = None
                break
            self.waiting.popleft()
            budget -= new
            req.row = self.free_rows.pop(self.free_rows.index(min(self.free_rows)))
            req.cached_tokens = req.computed = req.kv.cached
            req.kv_version, req.admitted = self.weight_version, time.monotonic()
            self._dirty[req.row] = req
            self.stats.cached_tokens += req.kv.cached
            self.stats.prompt_tokens += len(req.input_ids) + len(req.output_ids)
            self.running.append(req)
            admitted.append(req)
        return admitted

    def _in_pieces(self, admitted: list[Request]) -> bool:
        """Whether the admission is one prompt over the prefill budget to feed a piece per iteration, so that the
        running requests keep decoding in between (SGLang's chunked prefill)."""
        return len(admitted) == 1 and self._next_piece(admitted[0]) > 0

    def _next_piece(self, req: Request) -> int:
        """Tokens the next piece of ``req``'s prompt feeds; 0: prefill (and sample) the rest now. Pieces stop where
        scored prompt positions begin: those are scored by :meth:`_prefill` (its pieces, if it still needs them,
        run back to back, :func:`~agentrl.engine.chunked.prefill_in_pieces`)."""
        n = self.max_prefill_tokens
        if len(req.input_ids) + len(req.output_ids) - req.computed <= n:
            return 0
        start = req.logprob_start if not req.output_ids else None
        return max(min(n, start - 1 - req.computed), 0) if start is not None else n

    def _reserve(self, req: Request) -> bool:
        seq = req.input_ids + req.output_ids  # a retracted request resumes from what it had
        # the last token is always fed again, and scored prompt tokens need the logits before them
        limit = len(seq) - 1
        if req.logprob_start is not None and not req.output_ids:
            limit = min(limit, max(req.logprob_start - 1, 0))
        total = len(req.input_ids) + req.options.max_new_tokens
        req.kv = self.cache.admit(np.asarray(seq, dtype=np.int64), total, limit)
        return req.kv is not None

    def _retract_all(self) -> None:
        """Send running requests back to the front of the queue, keeping what they computed in the cache."""
        for req in reversed(self.running):
            if req.abort_requested:
                req.finish({"type": "abort", "message": "aborted by request"})
            if req.finished:
                continue
            self._free(req, failed=False)
            self.waiting.appendleft(req)
            self.stats.retracted += 1
        self.running = [r for r in self.running if r.finished]

    def _free(self, req: Request, *, failed: bool) -> None:
        if req.row is not None:
            self.free_rows.append(req.row)
            self._dirty.pop(req.row, None)
            req.row = None
        if req.kv is not None:
            seq = req.input_ids + req.output_ids
            done = req.computed if req is self._chunked else len(req.input_ids) + max(len(req.output_ids) - 1, 0)
            self.cache.release(req.kv, None if failed else np.asarray(seq[:done]))
            req.kv = None
        if req is self._chunked:
            self._chunked = None

    def _release_finished(self, *, failed: bool = False) -> None:
        keep = []
        for req in self.running:
            if not req.finished:
                keep.append(req)
                continue
            self.stats.finished += 1
            self._free(req, failed=failed)
        self.running = keep

    def _flush_rows(self) -> None:
        """Model thread: write the table rows of newly admitted or re-pointed requests."""
        dirty, self._dirty = self._dirty, {}
        rows = [row for row, req in dirty.items() if req.kv is not None]
        self.runner.set_rows(rows, [dirty[row].kv.indices for row in rows])  # type: ignore[union-attr]

    # --- forward steps ------------------------------------------------------------------------------------
    async def _prefill(self, reqs: list[Request]) -> None:
        seqs = [r.input_ids + r.output_ids for r in reqs]
        rows = [r.row for r in reqs if r.row is not None]
        chunks = [seq[r.computed :] for seq, r in zip(seqs, reqs, strict=True)]
        starts = [r.computed for r in reqs]
        score = score_specs(reqs)
        params, processing = sampling_batch(reqs), row_logits(reqs, self.eos_ids)
        self.stats.prefilled_tokens += sum(len(c) for c in chunks)

        def step() -> tuple[Sampled, Prefill]:
            self._flush_rows()
            out = prefill_in_pieces(self.runner.prefill, rows, chunks, starts, score, self.max_prefill_tokens)
            return sample(apply_logits(out.logits, processing), params, fused=self.fused_sampling), out

        sampled, out = await self._timed(step, decode=False)
        for b, scores in out.prompt_logprobs.items():
            record_prompt_scores(reqs[b], scores)
        for req in reqs:  # later requests with this prompt reuse it while this one still runs
            if req.kv is not None and req.row is not None and self.cache.share(req.kv, np.asarray(req.input_ids)):
                self._dirty[req.row] = req
        self._commit(reqs, sampled, prefill=True)

    async def _prefill_piece(self) -> list[Request]:
        """The next piece of the long prompt being prefilled (no sampling); once no piece is left (:meth:`_next_piece`),
        that request, for :meth:`_prefill` to finish, score and sample in this iteration."""
        req = self._chunked
        assert req is not None and req.row is not None
        seq, start, row, n = req.input_ids + req.output_ids, req.computed, req.row, self._next_piece(req)
        if n == 0:
            self._chunked = None
            return [req]
        piece = seq[start : start + n]

        def step() -> None:
            self._flush_rows()
            self.runner.prefill([row], [piece], [start])

        await self._timed(step, decode=False)
        req.computed = start + len(piece)  # what a retraction or an abort keeps in the prefix cache
        self.stats.steps += 1
        self.stats.prefill_pieces += 1
        self.stats.prefilled_tokens += len(piece)
        return []

    async def _decode(self) -> None:
        if self._inflight is not None or (self.overlap and all(pipelinable(r) for r in self._decodable())):
            await self._decode_overlapped()
            return
        reqs, device = self._decodable(), self.runner.device
        rows = DecodeRows.of(reqs, [0] * len(reqs), self.runner.scratch)
        feed = rows.feed(reqs, {}, device, lambda: None)
        params, processing = self._sampling.batch(reqs), row_logits(reqs, self.eos_ids)

        def step() -> Sampled:
            self._flush_rows()
            logits = self.runner.decode(feed(), to_device(rows.positions, device), rows.kv_len)
            return sample(apply_logits(rows.in_order(logits), processing), params, fused=self.fused_sampling)

        out = await self._timed(step, decode=True)
        self._commit(list(reqs), out, prefill=False)

    async def _decode_overlapped(self) -> None:
        """Hand the next decode step to the model thread, then commit the one before it while the new one runs.

        The new step's input tokens are the previous step's sampled tokens, still on the device (the model thread
        runs steps in order); a request the commit finishes has one wasted token computed in the new step,
        dropped when that step commits. The model thread always has the next step queued behind the running one.
        """
        prev, device = self._inflight, self.runner.device
        this = _InFlight(list(self._decodable()))
        rows, feed, params, processing = self._overlapped_inputs(prev, this)

        def step() -> HostCopy:
            self._flush_rows()
            logits = self.runner.decode(feed(), to_device(rows.positions, device), rows.kv_len)
            out = sample_on_device(apply_logits(rows.in_order(logits), processing), params, fused=self.fused_sampling)
            this.tokens = out.tokens
            return HostCopy(out, params.token_ids)

        this.launched = self._submit(step)
        self._inflight = this
        if prev is not None:
            self.stats.overlapped_steps += 1
            await self._retire(prev)

    def _overlapped_inputs(self, prev: _InFlight | None, this: _InFlight) -> tuple[
            DecodeRows, Callable[[], torch.Tensor], SamplingBatch, list[RowLogits]]:
        """Step ``this``'s rows, input tokens, sampling parameters and logits processing, after ``prev``."""
        reqs = this.reqs
        advanced = self._steady.advance(prev, reqs)
        if advanced is not None:  # the batch as it was: each row its own sampled token, one position on
            assert prev is not None
            rows, params = advanced
            self.stats.steady_steps += 1
            self._steady.keep(this, rows, params)
            return rows, rows.own_tokens(lambda: prev.tokens), params, []
        carried = {id(r): b for b, r in enumerate(prev.reqs)} if prev is not None else {}
        lags = [int(id(r) in carried) for r in reqs]  # 0: admitted since (its last token is on the host)
        rows = DecodeRows.of(reqs, lags, self.runner.scratch)
        feed = rows.feed(reqs, carried, self.runner.device, lambda: prev.tokens if prev is not None else None)
        params, processing = self._sampling.batch(reqs, lags), row_logits(reqs, self.eos_ids, lags)
        if steady(reqs, prev.reqs if prev is not None else None, rows, lags, processing):
            self._steady.keep(this, rows, params)
        else:
            self._steady.forget()
        return rows, feed, params, processing

    async def _retire(self, step: _InFlight) -> None:
        """Wait for a step handed to the model thread, commit its tokens and release what finished."""
        assert step.launched is not None
        copy: HostCopy = await self._finished(step.launched, decode=True)
        if copy.event is not None:
            await asyncio.get_running_loop().run_in_executor(self._waiter, copy.wait)
        self._commit(step.reqs, copy.result(), prefill=False)
        self._release_finished()  # a step still in flight writes nothing they keep; rows are reused after it

    async def _drain(self) -> None:
        """Commit the decode step in flight."""
        step, self._inflight = self._inflight, None
        if step is not None:
            await self._retire(step)

    def _must_drain(self) -> bool:
        """Whether this iteration changes what the step in flight assumed (weights, rows, pausing), or a running
        request's logits need its last token (admissions do not drain: the prefill queues behind the step)."""
        return bool(
            self._retract_pending or self._pending_weights or self._settle_waiters or self.paused or self.released
            or not all(pipelinable(r) for r in self._decodable())
        )

    def _submit(self, step: Callable[[], Any]) -> asyncio.Future[tuple[Any, float]]:
        """Start ``step`` on the model thread now; the future gives its result and its time there."""

        def timed() -> tuple[Any, float]:
            start = time.perf_counter()
            return step(), time.perf_counter() - start

        return asyncio.get_running_loop().run_in_executor(self._executor, timed)

    async def _timed(self, step: Callable[[], Any], *, decode: bool) -> Any:
        return await self._finished(self._submit(step), decode=decode)

    async def _finished(self, submitted: asyncio.Future[tuple[Any, float]], *, decode: bool) -> Any:
        """The result of a step handed to the model thread, its time there counted."""
        out, elapsed = await submitted
        if decode:
            self.stats.decode_steps += 1
            self.stats.decode_time_s += elapsed
        else:
            self.stats.prefill_time_s += elapsed
        return out

    def _commit(self, reqs: list[Request], out: Sampled, *, prefill: bool) -> None:
        """Append each request's sampled token and finish the requests it stops. Runs once per step for every
        running request, on the event loop (whose time per step the device waits for when it exceeds a step's):
        plain Python values, no per-token counters, the logprob extras only where asked."""
        self.stats.steps += 1
        version, eos_ids, tokenizer, generated = self.weight_version, self.eos_ids, self.tokenizer, 0
        for b, (req, token, lp) in enumerate(zip(reqs, out.tokens.tolist(), out.logprobs.tolist(), strict=True)):
            if req.finish_reason is not None:
                continue
            if prefill and req.options.max_new_tokens == 0:
                req.finish({"type": "length", "length": 0})  # prompt scoring only
                continue
            if req.grammar is not None and not req.grammar.accept(token):
                req.finish({"type": "abort", "message": f"sampled token {token} is not allowed by the grammar"})
                continue
            req.append(token, lp, version)
            if req.return_logprob:
                record_sampled(req, b, out)
            generated += 1
            reason = req.check_stop(eos_ids, tokenizer)
            if reason is not None:
                req.finish(reason)
            elif req.stream:
                req.updates.put_nowait(False)
        self.stats.generated_tokens += generated

