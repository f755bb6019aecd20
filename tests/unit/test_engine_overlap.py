"""Overlap scheduling: a decode step launched before the previous step's tokens are committed produces exactly
what the step-by-step schedule produces (tokens, logprobs, versions, finish reasons), on a real tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from agentrl.engine.kv_cache import KVCache
from agentrl.engine.request import LogprobSpec, Request, RequestOptions
from agentrl.engine.runner import ModelRunner
from agentrl.engine.scheduler import Scheduler

torch.set_num_threads(1)
EOS = 7


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


class Chars:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def requests() -> list[Request]:
    """Requests that finish at different steps, with the options whose handling depends on the token count."""
    reqs = []
    for i in range(10):
        opts = RequestOptions(temperature=[1.0, 0.7, 0.0][i % 3], max_new_tokens=4 + 3 * i, seed=100 + i,
                              top_k=[-1, 20][i % 2], ignore_eos=i % 4 == 0, min_new_tokens=[0, 6][i % 2])
        if i == 3:
            opts.stop = ["e"]  # a stop string: finishes at a step only the host can tell
        if i == 5:
            opts.logit_bias = {EOS: 3.0}  # makes EOS likely, with min_new_tokens holding it back for 6 tokens
        spec = LogprobSpec(top_k=3 if i % 2 else 0, token_ids=[1, 2, EOS] if i % 3 == 0 else None)
        reqs.append(Request(rid=f"r{i}", input_ids=[(5 * i + k) % 500 + 1 for k in range(3 + i)], options=opts,
                            return_logprob=True, logprobs_spec=spec))
    return reqs


def outcome(reqs: list[Request]) -> list[tuple[Any, ...]]:
    """What must be equal: tokens, versions, finish reasons, and which top-k ids were reported."""
    return [(r.output_ids, r.versions, r.finish_reason, [[t for _, t in top] if top else top for top in r.output_scores.top])
            for r in reqs]


def scores(reqs: list[Request]) -> torch.Tensor:
    """Every reported logprob, flat (batches of other sizes may change the last float bits)."""
    values = [x for r in reqs for x in r.logprobs]
    values += [v for r in reqs for top in r.output_scores.top if top for v, _ in top]
    values += [v for r in reqs for ids in r.output_scores.ids if ids for v in ids]
    return torch.tensor(values)


async def serve(model, reqs: list[Request], *, overlap: bool, rows: int, graphs: bool = False) -> Scheduler:  # type: ignore[no-untyped-def]
    runner = ModelRunner(model, num_rows=rows, context_length=64, pool_tokens=2000)
    if graphs:
        runner.capture_cuda_graphs([1, 2, 4, 8])
    scheduler = Scheduler(runner, Chars(), [EOS], KVCache(2000), max_running=rows, max_queued=100, overlap=overlap)
    scheduler.start()
    try:
        for r in reqs:
            scheduler.submit(r)
        for r in reqs:
            while not await asyncio.wait_for(r.updates.get(), 60):
                pass
    finally:
        await scheduler.stop()
    return scheduler


@pytest.mark.parametrize("rows", [4, 10])  # 4: admissions while others run (the step in flight is committed first)
async def test_overlapped_decoding_equals_step_by_step_decoding(model, rows: int) -> None:  # type: ignore[no-untyped-def]
    sync_reqs, overlap_reqs = requests(), requests()
    sync = await serve(model, sync_reqs, overlap=False, rows=rows)
    overlapped = await serve(model, overlap_reqs, overlap=True, rows=rows)
    assert outcome(overlap_reqs) == outcome(sync_reqs)
    assert torch.allclose(scores(overlap_reqs), scores(sync_reqs), atol=1e-4, rtol=0)
    assert sync.stats.overlapped_steps == 0 and overlapped.stats.overlapped_steps > 10
    # admissions do not stop the overlap: the prefill queues behind the step in flight (only the first step of
    # a batch, and one after the batch ran empty, start without a step before them)
    assert overlapped.stats.overlapped_steps >= overlapped.stats.decode_steps - 2
    assert {r.finish_reason["type"] for r in sync_reqs if r.finish_reason} == {"stop", "length"}
    assert overlapped.cache.allocator.available + overlapped.cache.cached_tokens == 2000  # nothing leaked


async def test_an_unchanged_batch_advances_its_inputs_and_decodes_the_same(model) -> None:  # type: ignore[no-untyped-def]
    """While no request joins or leaves, each step's inputs are the last step's advanced by one position and one
    sampling step (no pass over the requests); tokens, logprobs and versions equal step-by-step decoding."""

    def plain() -> list[Request]:  # no logits processing; finishing at different steps changes the batch
        return [Request(rid=f"p{i}", input_ids=[(7 * i + k) % 500 + 1 for k in range(4 + i)], return_logprob=True,
                        options=RequestOptions(temperature=[1.0, 0.7, 0.0][i % 3], max_new_tokens=[12, 20][i % 2],
                                               seed=i, top_k=[-1, 20][i % 2], ignore_eos=True),
                        logprobs_spec=LogprobSpec(top_k=2 if i % 2 else 0))
                for i in range(6)]

    sync_reqs, overlap_reqs = plain(), plain()
    sync = await serve(model, sync_reqs, overlap=False, rows=6)
    overlapped = await serve(model, overlap_reqs, overlap=True, rows=6)
    assert outcome(overlap_reqs) == outcome(sync_reqs)
    assert torch.allclose(scores(overlap_reqs), scores(sync_reqs), atol=1e-4, rtol=0)
    assert sync.stats.steady_steps == 0
    # the steps while all six run (but the first two); the three 20-token requests left after that sit in rows
    # 1, 3, 5, not 0..2, so their steps rebuild the inputs
    assert overlapped.stats.steady_steps >= 8, overlapped.stats


async def test_a_request_with_penalties_runs_step_by_step(model) -> None:  # type: ignore[no-untyped-def]
    reqs = requests()[:3]
    reqs[1].options.repetition_penalty = 1.3  # its logits depend on the token still in flight
    reqs[1].options.max_new_tokens, reqs[1].options.ignore_eos = 40, True  # it runs until the others are done
    scheduler = await serve(model, reqs, overlap=True, rows=4)
    assert scheduler.stats.overlapped_steps == 0
    assert all(r.finished and r.output_ids for r in reqs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_overlapped_decoding_on_the_gpu_with_cuda_graphs(model) -> None:  # type: ignore[no-untyped-def]
    """Tokens come back through pinned copies behind an event; the next step reads the previous graph's tokens."""
    model.to("cuda")
    try:
        sync_reqs, overlap_reqs = requests(), requests()
        await serve(model, sync_reqs, overlap=False, rows=4, graphs=True)
        overlapped = await serve(model, overlap_reqs, overlap=True, rows=4, graphs=True)
    finally:
        model.to("cpu")
    assert outcome(overlap_reqs) == outcome(sync_reqs)
    assert torch.allclose(scores(overlap_reqs), scores(sync_reqs), atol=1e-4, rtol=0)
    assert overlapped.stats.overlapped_steps > 10
