"""What one forward step needs from its requests: sampling params, logits processing, prompt scoring; and
recording what the step produced back into the requests.

Built on the event loop thread from request state, consumed on the model thread (the loop awaits the step, so
nothing mutates the requests meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from agentrl.engine.custom_processor import RequestView
from agentrl.engine.logits import CustomCall, RowLogits
from agentrl.engine.request import Request
from agentrl.engine.runner import PromptScores, ScoreSpec
from agentrl.engine.sampling import Sampled, SamplingBatch

__all__ = [
    "DecodeRows", "DecodeSampling", "SteadyDecode", "pipelinable", "record_prompt_scores", "record_sampled",
    "row_logits", "same", "sampling_batch", "score_specs", "steady", "to_device",
]


def sampling_batch(reqs: Sequence[Request], lags: Sequence[int] | None = None) -> SamplingBatch:
    """``lags[b]``: tokens sampled for request ``b`` but not yet appended (a step still in flight)."""
    lags = lags or [0] * len(reqs)
    return SamplingBatch.build(
        [r.options.temperature for r in reqs],
        [r.options.top_p for r in reqs],
        [r.options.top_k for r in reqs],
        [r.options.min_p for r in reqs],
        [r.options.seed for r in reqs],
        [len(r.output_ids) + lag for r, lag in zip(reqs, lags, strict=True)],
        [[] for _ in reqs],  # the min_new_tokens ban is applied with the other logits changes (row_logits)
        [r.logprobs_spec.top_k if r.return_logprob else 0 for r in reqs],
        [r.logprobs_spec.token_ids if r.return_logprob else None for r in reqs],
    )


class DecodeSampling:
    """Decode steps' sampling parameters. The per-request columns (temperature, top-p/k, min-p, seed, logprob
    requests) are built once for a running set, moved to the device once, and reused while the set is unchanged
    (the same request objects in the same order); each step only sends its rows' step indices."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reqs: tuple[Request, ...] = ()  # held, so no new request can take a cached one's place by id
        self._columns: SamplingBatch | None = None

    def batch(self, reqs: Sequence[Request], lags: Sequence[int] | None = None) -> SamplingBatch:
        lags = lags or [0] * len(reqs)
        step = [len(r.output_ids) + lag for r, lag in zip(reqs, lags, strict=True)]
        if self._columns is None or not same(reqs, self._reqs):
            b, dev = sampling_batch(reqs, lags), self.device
            self._reqs = tuple(reqs)
            self._columns = replace(b, temperature=to_device(b.temperature, dev), top_p=to_device(b.top_p, dev),
                                    top_k=to_device(b.top_k, dev), min_p=to_device(b.min_p, dev),
                                    seed=to_device(b.seed, dev))
        return replace(self._columns, step=to_device(torch.tensor(step, dtype=torch.long), self.device))


def row_logits(reqs: Sequence[Request], eos_ids: frozenset[int], lags: Sequence[int] | None = None) -> list[RowLogits]:
    """Per row, what to do to its logits; ``[]`` (nothing to do) when no request changes them this step."""
    lags = lags or [0] * len(reqs)
    if not any(_changes_logits(r, lag) for r, lag in zip(reqs, lags, strict=True)):
        return []
    return [_row(r, eos_ids, lag) for r, lag in zip(reqs, lags, strict=True)]


def _changes_logits(r: Request, lag: int) -> bool:
    opts = r.options
    return bool(
        opts.logit_bias or r.custom is not None or r.grammar is not None or opts.repetition_penalty != 1.0
        or opts.frequency_penalty or opts.presence_penalty or len(r.output_ids) + lag < opts.min_new_tokens
    )


def pipelinable(r: Request) -> bool:
    """Whether the request's next logits can be processed before its last sampled token is known.

    True unless it uses penalties, a custom processor or a grammar (they read the tokens generated so far);
    the ``min_new_tokens`` ban and ``logit_bias`` depend only on the token count and the request.
    """
    opts = r.options
    penalties = opts.repetition_penalty != 1.0 or opts.frequency_penalty or opts.presence_penalty
    return r.grammar is None and r.custom is None and not penalties


def _row(r: Request, eos_ids: frozenset[int], lag: int) -> RowLogits:
    opts = r.options
    ban: list[int] = []
    if len(r.output_ids) + lag < opts.min_new_tokens:
        ban = sorted(set(opts.stop_token_ids) | (set() if opts.ignore_eos else eos_ids))
    custom = None
    if r.custom is not None:
        params = {**r.custom.params, "__req__": RequestView(r.rid, r.input_ids, r.output_ids)}
        custom = CustomCall(r.custom.key, r.custom.processor, params)
    return RowLogits(
        bias=opts.logit_bias,
        output_ids=r.output_ids,
        repetition_penalty=opts.repetition_penalty,
        frequency_penalty=opts.frequency_penalty,
        presence_penalty=opts.presence_penalty,
        custom=custom,
        grammar=r.grammar,
        ban=ban,
    )


def score_specs(reqs: Sequence[Request]) -> dict[int, ScoreSpec]:
    """Prompt scoring for requests prefilled for the first time that asked for prompt logprobs."""
    return {
        b: ScoreSpec(r.options.temperature or 1.0, r.logprobs_spec.top_k, tuple(r.logprobs_spec.token_ids or ()))
        for b, r in enumerate(reqs)
        if r.logprob_start is not None and not r.output_ids
    }


def record_prompt_scores(req: Request, scores: PromptScores) -> None:
    top = None
    if scores.top_values is not None and scores.top_ids is not None:
        top = [list(zip(v, i, strict=True)) for v, i in zip(scores.top_values.tolist(), scores.top_ids.tolist(), strict=True)]
    ids = scores.ids_logprobs.tolist() if scores.ids_logprobs is not None else None
    req.set_prompt_scores(scores.logprobs.tolist(), top, ids)


def record_sampled(req: Request, b: int, out: Sampled) -> None:
    """Keep the top-k and chosen-id logprobs row ``b`` asked for (its token is appended by the scheduler)."""
    if not req.return_logprob:
        return
    k = req.logprobs_spec.top_k
    if k and out.top_values is not None and out.top_ids is not None:
        pairs = zip(out.top_values[b, :k].tolist(), out.top_ids[b, :k].tolist(), strict=True)
        req.output_scores.top.append(list(pairs))
    if req.logprobs_spec.token_ids is not None and out.ids_logprobs is not None:
        req.output_scores.ids.append(out.ids_logprobs[b])


@dataclass
class DecodeRows:
    """Where a decode step's requests sit among the runner's rows ``0..n_rows-1``, and each row's position.

    ``lags[b]``: tokens request ``b`` has sampled in a step still in flight (not yet appended); idle rows use
    the ``scratch`` position.
    """

    order: list[int]  # the row of each request
    n_rows: int
    positions: torch.Tensor  # [n_rows], host
    kv_len: int  # keys the longest row reads

    @classmethod
    def of(cls, reqs: Sequence[Request], lags: Sequence[int], scratch: int) -> DecodeRows:
        order = [r.row for r in reqs if r.row is not None]
        n_rows = max(order) + 1
        positions = [scratch] * n_rows
        for r, row, lag in zip(reqs, order, lags, strict=True):
            positions[row] = len(r.input_ids) + len(r.output_ids) - 1 + lag
        return cls(order, n_rows, torch.tensor(positions), max(positions[row] for row in order) + 1)

    def feed(self, reqs: Sequence[Request], carried: dict[int, int], device: torch.device,
             carried_tokens: Callable[[], torch.Tensor | None]) -> Callable[[], torch.Tensor]:
        """Model thread: each row's input token. Requests in ``carried`` (``id(request)`` -> its index in the step
        in flight) take that step's sampled token (``carried_tokens()``, on the device once that step ran); the
        others their last token, known on the host."""
        moved = [(carried[id(r)], row) for r, row in zip(reqs, self.order, strict=True) if id(r) in carried]
        if len(moved) == self.n_rows and all(src == row for src, row in moved):
            return self.own_tokens(carried_tokens)
        last = [0] * self.n_rows
        for r, row in zip(reqs, self.order, strict=True):
            if id(r) not in carried:
                last[row] = r.output_ids[-1]
        host = torch.tensor(last, dtype=torch.long)
        if not moved:
            return lambda: to_device(host, device)
        src, rows = torch.tensor([m[0] for m in moved]), torch.tensor([m[1] for m in moved])

        def gather() -> torch.Tensor:
            previous = _sampled(carried_tokens())
            tokens = to_device(host, device)
            tokens[to_device(rows, device)] = previous[to_device(src, device)]
            return tokens

        return gather

    def own_tokens(self, carried_tokens: Callable[[], torch.Tensor | None]) -> Callable[[], torch.Tensor]:
        """Model thread: every row takes the token its own index sampled in the step in flight (no gather)."""
        return lambda: _sampled(carried_tokens())[: self.n_rows]

    def in_order(self, logits: torch.Tensor) -> torch.Tensor:
        """Model thread: the logits rows in request order."""
        if self.order == list(range(self.n_rows)):
            return logits
        return logits[to_device(torch.tensor(self.order), logits.device)]


class SteadyDecode:
    """The next overlapped decode step's inputs without walking the requests, while the batch stays as it was.

    A step built for requests sitting in rows ``0..n-1`` in the order of the step before it, each taking the
    token it sampled there (no gather) and none changing its logits, is *steady*: the next step over the same
    requests in the same order differs from it only by one position and one sampling step per row (the commit
    in between appended one token to each; a request that finished left the batch). :meth:`advance` gives those
    inputs, or None when the batch changed (admitted, finished, retracted requests; a drained pipeline), and the
    scheduler builds them from the requests again. Saves six passes over the running requests per step, which
    the event loop makes while the device waits for the host at large batches.
    """

    def __init__(self) -> None:
        self._step: Any = None  # the step in flight the kept inputs belong to
        self._rows: DecodeRows | None = None
        self._params: SamplingBatch | None = None

    def keep(self, step: object, rows: DecodeRows, params: SamplingBatch) -> None:
        """Remember ``step``'s inputs (call only for a steady step: :func:`steady` or :meth:`advance`)."""
        self._step, self._rows, self._params = step, rows, params

    def forget(self) -> None:
        self._step = self._rows = self._params = None

    def advance(self, prev: Any, reqs: Sequence[Request]) -> tuple[DecodeRows, SamplingBatch] | None:
        """The inputs of the step after ``prev`` (the step in flight, with ``.reqs``) over ``reqs``, if steady."""
        rows, params = self._rows, self._params
        if prev is None or prev is not self._step or rows is None or params is None or not same(reqs, prev.reqs):
            return None
        return (DecodeRows(rows.order, rows.n_rows, rows.positions + 1, rows.kv_len + 1),
                replace(params, step=params.step + 1))


def same(a: Sequence[Request], b: Sequence[Request]) -> bool:
    """The same request objects in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def steady(reqs: Sequence[Request], prev_reqs: Sequence[Request] | None, rows: DecodeRows, lags: Sequence[int],
           processing: Sequence[RowLogits]) -> bool:
    """Whether a step built from the requests is steady (see :class:`SteadyDecode`)."""
    return (not processing and prev_reqs is not None and rows.n_rows == len(reqs) and all(lags)
            and rows.order == list(range(len(reqs))) and same(reqs, prev_reqs))


def _sampled(tokens: torch.Tensor | None) -> torch.Tensor:
    assert tokens is not None, "the step in flight did not run"
    return tokens.long()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without waiting for the device (pinned staging on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
