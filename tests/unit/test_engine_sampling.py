"""Batched sampling: logprob contract, truncation, reproducibility independent of the batch."""

from __future__ import annotations

import torch

from agentrl.engine.sampling import SamplingBatch, hash_uniform, sample


def batch(n: int, **kw: list) -> SamplingBatch:  # type: ignore[type-arg]
    base = {"temperature": [1.0] * n, "top_p": [1.0] * n, "top_k": [-1] * n, "min_p": [0.0] * n,
            "seed": list(range(n)), "step": [0] * n, "ban": [[] for _ in range(n)]}
    base.update(kw)
    return SamplingBatch.build(**base)


def test_logprob_is_log_softmax_over_temperature_before_truncation() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    temps = [0.5, 1.0, 2.0, 0.0]
    tokens, lps, *_ = sample(logits.clone(), batch(4, temperature=temps, top_k=[3, 3, -1, -1], top_p=[1.0, 0.5, 0.9, 1.0]))
    for i, t in enumerate(temps):
        ref = torch.log_softmax(logits[i] / (t or 1.0), -1)[tokens[i]]
        assert abs(float(ref) - float(lps[i])) < 1e-6
    assert int(tokens[3]) == int(logits[3].argmax())  # temperature 0 is greedy


def test_top_k_and_top_p_never_sample_outside_their_set() -> None:
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1)).repeat(200, 1)
    top5 = set(logits[0].topk(5).indices.tolist())
    tokens, _, *_ = sample(logits.clone(), batch(200, top_k=[5] * 200, seed=list(range(200))))
    assert set(tokens.tolist()) <= top5 and len(set(tokens.tolist())) > 1
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    tokens, _, *_ = sample(logits.clone(), batch(200, top_p=[0.5] * 200, seed=list(range(200))))
    assert set(tokens.tolist()) <= nucleus


def test_same_seed_and_step_give_the_same_token_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    row = torch.randn(1, 64, generator=gen)
    alone, _, *_ = sample(row.clone(), batch(1, seed=[42], step=[3]))
    others = torch.randn(7, 64, generator=gen)
    mixed, _, *_ = sample(torch.cat([others, row]), batch(8, seed=[*range(7), 42], step=[0] * 7 + [3]))
    assert int(mixed[-1]) == int(alone[0])


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    tokens, _, *_ = sample(logits, batch(4000, seed=list(range(4000))))
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_hash_uniform_is_in_open_unit_interval_deterministic_and_uniform() -> None:
    seeds, steps = torch.arange(20000), torch.zeros(20000, dtype=torch.long)
    u = hash_uniform(seeds, steps)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert torch.equal(u, hash_uniform(seeds, steps))
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / 20000
    assert (hist - 0.1).abs().max() < 0.01
    along_steps = hash_uniform(torch.full((20000,), 7), torch.arange(20000))
    assert abs(float(along_steps.mean()) - 0.5) < 0.01


def test_banned_tokens_are_never_sampled() -> None:
    logits = torch.zeros(50, 4)
    logits[:, 2] = 10.0
    tokens, _, *_ = sample(logits, batch(50, ban=[[2]] * 50, seed=list(range(50))))
    assert 2 not in tokens.tolist()


def test_top_logprobs_and_chosen_ids_come_from_the_sampled_distribution() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    params = SamplingBatch.build([0.0, 0.7, 1.0], [1.0] * 3, [-1] * 3, [0.0] * 3, [1, 2, 3], [0] * 3, [[], [], []],
                                 top_logprobs=[2, 0, 4], token_ids=[None, [3, 7], None])
    out = sample(logits.clone(), params)
    assert out.top_values is not None and out.top_ids is not None and out.ids_logprobs is not None
    logp = torch.log_softmax(logits / torch.tensor([1.0, 0.7, 1.0]).view(-1, 1), -1)
    assert torch.equal(out.top_ids[0, :2], logp[0].topk(2).indices) and int(out.tokens[0]) == int(out.top_ids[0, 0])
    assert float(out.top_values[0, 0]) == float(out.logprobs[0])  # greedy: the top entry is the chosen token
    assert torch.allclose(torch.tensor(out.ids_logprobs[1]), logp[1, [3, 7]]) and out.ids_logprobs[0] is None


def test_logits_processing_bias_penalties_custom_grammar_and_ban() -> None:
    from agentrl.engine.logits import CustomCall, RowLogits, apply_logits

    class Allow:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

        def allowed_mask(self, vocab_size: int) -> torch.Tensor:
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[self.ids] = True
            return mask

    def force(logits: torch.Tensor, params: list[dict]) -> torch.Tensor:  # type: ignore[type-arg]
        for i, p in enumerate(params):
            logits[i] = -float("inf")
            logits[i, p["token"]] = 0.0
        return logits

    base = torch.zeros(5, 6)
    base[:, 0] = 2.0
    rows = [
        RowLogits(bias={1: 5.0}),
        RowLogits(output_ids=[0, 0, 2], frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=2.0),
        RowLogits(custom=CustomCall("k", force, {"token": 4})),
        RowLogits(grammar=Allow([2, 3]), ban=[3]),
        RowLogits(grammar=Allow([3]), ban=[3]),  # the grammar only allows an end token: it wins over the ban
    ]
    out = apply_logits(base, rows)
    assert torch.equal(base[:, 0], torch.full((5,), 2.0))  # the input is never written
    assert out[0].argmax() == 1 and out[0, 1] == 5.0
    assert out[1, 0] == 2.0 / 2.0 - 2 * 1.0 - 0.5 and out[1, 2] == 0.0 - 1.0 - 0.5 and out[1, 1] == 0.0
    assert out[2].argmax() == 4 and torch.isinf(out[2, 0])
    assert torch.isfinite(out[3]).nonzero().view(-1).tolist() == [2]
    assert torch.isfinite(out[4]).nonzero().view(-1).tolist() == [3]
    untouched = apply_logits(base, [RowLogits()] * 5)
    assert untouched is base
