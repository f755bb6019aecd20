"""Decode steps' sampling parameters: per-request columns reused while the running set is unchanged."""

from __future__ import annotations

import torch

from agentrl.engine.request import Request, RequestOptions
from agentrl.engine.step_inputs import DecodeSampling, sampling_batch


def _requests(n: int, start: int = 0) -> list[Request]:
    return [Request(rid=f"r{i}", input_ids=[1, 2, 3], options=RequestOptions(  # type: ignore[arg-type]
        temperature=0.5 + i / 10, top_p=1.0 if i % 2 else 0.9, seed=i), return_logprob=True)
        for i in range(start, start + n)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a, b)


def test_columns_are_reused_for_the_same_requests_and_rebuilt_for_others() -> None:
    reqs, cache = _requests(4), DecodeSampling(torch.device("cpu"))
    first = cache.batch(reqs)
    for r in reqs:
        r.output_ids.append(7)
    lags = [1, 0, 1, 0]
    second = cache.batch(reqs, lags)
    assert second.temperature is first.temperature and second.seed is first.seed  # not built again
    expected = sampling_batch(reqs, lags)
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "step"):
        assert _same(getattr(second, name), getattr(expected, name)), name
    assert second.step.tolist() == [2, 1, 2, 1] and second.truncate == expected.truncate
    # one request replaced by a new one with another temperature, at the same position: rebuilt
    reqs[2] = _requests(1, start=9)[0]
    third = cache.batch(reqs)
    assert third.temperature is not first.temperature
    assert _same(third.temperature, sampling_batch(reqs).temperature)
    # a shorter running set (a request finished): rebuilt
    assert _same(cache.batch(reqs[:3]).seed, torch.tensor([0, 1, 9]))
