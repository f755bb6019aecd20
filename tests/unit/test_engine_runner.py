"""The paged-KV runner computes exactly what the Hugging Face model computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agentrl.engine.runner import ModelRunner, ScoreSpec
from agentrl.errors import EngineError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def hf_last_logits(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def positions(*ranges: tuple[int, int]) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges]).astype(np.int64)


def test_batched_prefill_decode_and_prefix_reuse_match_hf(model) -> None:  # type: ignore[no-untyped-def]
    runner = ModelRunner(model, num_rows=4, context_length=64, pool_tokens=200)
    a, b = [5, 17, 33, 99, 100, 7], [8, 9, 10]
    runner.set_rows([0, 2], [positions((100, 120)), positions((20, 30))])  # scattered pool positions
    logits = runner.prefill([0, 2], [a, b], [0, 0]).logits
    assert (logits[0] - hf_last_logits(model, a)).abs().max() < 1e-4
    assert (logits[1] - hf_last_logits(model, b)).abs().max() < 1e-4
    # rows 0..2 decode together; row 1 is idle (scratch position)
    step = runner.decode(torch.tensor([11, 0, 12]), torch.tensor([len(a), runner.scratch, len(b)]), kv_len=8)
    assert (step[0] - hf_last_logits(model, [*a, 11])).abs().max() < 1e-4
    assert (step[2] - hf_last_logits(model, [*b, 12])).abs().max() < 1e-4
    more = runner.prefill([0], [[3, 4]], [len(a) + 1]).logits  # continue row 0 from its cached keys/values
    assert (more[0] - hf_last_logits(model, [*a, 11, 3, 4])).abs().max() < 1e-4
    # row 3 shares row 0's first 7 positions (a prefix hit) and continues elsewhere in the pool
    runner.set_rows([3], [np.concatenate([positions((100, 107)), positions((150, 160))])])
    shared = runner.prefill([3], [[42, 43]], [7]).logits
    assert (shared[0] - hf_last_logits(model, [*a, 11, 42, 43])).abs().max() < 1e-4


def test_unsupported_architecture_is_a_clear_error(model) -> None:  # type: ignore[no-untyped-def]
    model.config.model_type = "gpt2"
    try:
        with pytest.raises(EngineError, match="gpt2"):
            ModelRunner(model, 1, 8, 16)
    finally:
        model.config.model_type = "qwen2"


def test_prompt_logprobs_match_hf(model) -> None:  # type: ignore[no-untyped-def]
    runner = ModelRunner(model, num_rows=2, context_length=64, pool_tokens=64)
    ids = [5, 17, 33, 99, 100, 7, 8]
    runner.set_rows([1], [positions((0, 10))])
    out = runner.prefill([1], [ids], [0], score={0: ScoreSpec(0.5, top_k=3, token_ids=(4, 9))})
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits / 0.5, -1)
    ref = logp.gather(-1, torch.tensor(ids[1:]).view(-1, 1)).view(-1)
    scores = out.prompt_logprobs[0]
    assert (scores.logprobs - ref).abs().max() < 1e-4
    assert scores.top_ids is not None and scores.top_values is not None and scores.ids_logprobs is not None
    assert torch.equal(scores.top_ids, logp.topk(3).indices)
    assert (scores.top_values - logp.topk(3).values).abs().max() < 1e-4
    assert (scores.ids_logprobs - logp[:, [4, 9]]).abs().max() < 1e-4


@pytest.mark.parametrize("ragged", [True, False])
def test_prefill_in_pieces_matches_one_pass(model, ragged: bool) -> None:  # type: ignore[no-untyped-def]
    """Chunked prefill: a 13-token prompt fed 4 tokens at a time gives one pass's logits and prompt scores, and
    no forward pass sees more than 4 new tokens."""
    from agentrl.engine.chunked import prefill_in_pieces

    runner = ModelRunner(model, num_rows=3, context_length=64, pool_tokens=64, ragged_prefill=ragged)
    ids, other = [5, 17, 33, 99, 100, 7, 8, 40, 41, 2, 9, 11, 60], [3, 4, 5]
    runner.set_rows([0, 1, 2], [positions((0, 20)), positions((20, 40)), positions((40, 60))])
    spec = ScoreSpec(0.7, top_k=2, token_ids=(4, 9))
    whole = runner.prefill([0, 2], [ids, other], [0, 0], score={0: spec})
    widths: list[int] = []

    def spy(rows, chunks, starts, *, score=None):  # type: ignore[no-untyped-def]
        widths.append(sum(len(c) for c in chunks))
        return runner.prefill(rows, chunks, starts, score=score)

    pieces = prefill_in_pieces(spy, [1, 2], [ids, other], [0, 0], {0: spec}, limit=4)
    assert max(widths) <= 4 and len(widths) > 4
    assert (pieces.logits - whole.logits).abs().max() < 1e-4
    got, ref = pieces.prompt_logprobs[0], whole.prompt_logprobs[0]
    assert got.logprobs.shape == (len(ids) - 1,)
    for a, b in zip(got, ref, strict=True):
        assert a is not None and b is not None and (a.float() - b.float()).abs().max() < 1e-4
