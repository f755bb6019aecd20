"""Packing: packed (padding-free) and padded forward passes agree on logprobs and gradients; token budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import trainer.backend.varlen  # noqa: F401  (registers sdpa_varlen)
from trainer.packing import Sample, pack, plan_micro_batches, token_logprobs

torch.set_num_threads(1)


def tiny_qwen2(attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, attn_implementation=attn,
    )
    return Qwen2ForCausalLM(cfg).float()


def ragged_samples(seed: int, lengths: list[int]) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = (rng.random(n) < 0.8).astype(np.float32)
        mask[0] = 0
        out.append(Sample(tokens=rng.integers(0, 97, n), mask=mask, behaviour_logprobs=np.zeros(n, np.float32)))
    return out


def padded_logprobs(model: Qwen2ForCausalLM, samples: list[Sample]) -> list[torch.Tensor]:
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    attn = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.as_tensor(s.tokens)
        attn[i, : len(s)] = 1
    impl = model.config._attn_implementation
    if impl == "sdpa_varlen":  # it only serves packed rows; the padded reference uses plain sdpa
        model.set_attn_implementation("sdpa")
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    model.set_attn_implementation(impl)
    starts = torch.zeros(width, dtype=torch.bool)
    starts[0] = True
    return [token_logprobs(logits[i], ids[i], starts)[0][: len(s)] for i, s in enumerate(samples)]


def packed_logprobs(model: Qwen2ForCausalLM, samples: list[Sample], lens_kwarg: bool = True) -> list[torch.Tensor]:
    mb = pack(samples)
    extra = {"packed_seq_lens": mb.seq_lens} if lens_kwarg and model.config._attn_implementation == "sdpa_varlen" else {}
    logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, **extra).logits[0]
    lp, _ = token_logprobs(logits, mb.input_ids[0], mb.position_ids[0] == 0)
    return list(torch.split(lp, mb.seq_lens))


def _grads(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa", "eager"])
def test_packed_and_padded_agree_on_logprobs_and_gradients(attn: str) -> None:
    model = tiny_qwen2(attn)
    samples = ragged_samples(0, [5, 17, 1, 9, 30, 2])
    weights = [torch.randn(len(s), generator=torch.Generator().manual_seed(i)) for i, s in enumerate(samples)]

    results = []
    for fn in (packed_logprobs, padded_logprobs):
        model.zero_grad(set_to_none=True)
        lps = fn(model, samples)
        sum(((lp * w * torch.as_tensor(s.mask)).sum() for lp, w, s in zip(lps, weights, samples, strict=True))).backward()
        results.append(([lp.detach() for lp in lps], _grads(model)))
    (packed_lp, packed_g), (padded_lp, padded_g) = results
    for a, b in zip(packed_lp, padded_lp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert packed_g.keys() == padded_g.keys() and packed_g
    for name in packed_g:
        torch.testing.assert_close(packed_g[name], padded_g[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa"])
def test_packed_sequences_do_not_attend_across_boundaries(attn: str) -> None:
    model = tiny_qwen2(attn)
    a, b = ragged_samples(1, [12, 8])
    other = Sample(tokens=(np.asarray(a.tokens) + 1) % 97, mask=a.mask, behaviour_logprobs=a.behaviour_logprobs)
    with torch.no_grad():
        first = packed_logprobs(model, [a, b], lens_kwarg=False)[1]  # varlen: lengths from the position ids
        second = packed_logprobs(model, [other, b], lens_kwarg=False)[1]
        alone = packed_logprobs(model, [b])[0]
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    torch.testing.assert_close(first, alone, rtol=1e-5, atol=1e-5)


def test_pack_layout() -> None:
    samples = ragged_samples(2, [3, 1, 4])
    mb = pack(samples, [2, 0])
    assert mb.seq_lens == [4, 3] and mb.sample_ids == [2, 0]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert mb.seq_index.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert mb.input_ids[0].tolist() == [*samples[2].tokens.tolist(), *samples[0].tokens.tolist()]


def test_first_token_cannot_be_trained() -> None:
    with pytest.raises(ValueError, match="first token"):
        Sample(tokens=np.array([1, 2]), mask=np.array([1, 1], np.float32), behaviour_logprobs=np.zeros(2, np.float32))


@pytest.mark.parametrize("seed", range(5))
def test_plan_respects_budget_and_covers_everything(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 120, size=40)]
    budget = 256
    lengths = [*lengths, 400]
    plan = plan_micro_batches(lengths, budget)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(len(lengths)))
    for b in plan:
        assert sum(lengths[i] for i in b) <= budget or b == [len(lengths) - 1]
    assert sum(lengths[:-1]) / budget <= len(plan) - 1 <= sum(lengths[:-1]) / budget * 1.25 + 1  # bins are well filled
    assert plan == plan_micro_batches(lengths, budget)


def test_token_logprobs_and_entropy_match_a_plain_reference() -> None:
    g = torch.Generator().manual_seed(0)
    t, v = 4200, 11  # more rows than one entropy chunk
    logits = torch.randn(t, v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (t,), generator=g)
    starts = torch.zeros(t, dtype=torch.bool)
    starts[[0, 7, 4100]] = True
    lp, ent = token_logprobs(logits.float(), ids, starts, with_entropy=True)
    assert ent is not None
    for i in (0, 1, 7, 8, 4099, 4100, 4101, t - 1):
        if starts[i]:
            assert lp[i].item() == 0.0 and ent[i].item() == 0.0
            continue
        row = logits[i - 1]
        p = torch.softmax(row, -1)
        assert lp[i].item() == pytest.approx(float(row[ids[i]] - torch.logsumexp(row, -1)), abs=1e-5)
        assert ent[i].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)


def test_token_logprobs_score_each_token_at_its_sampling_temperature() -> None:
    torch.manual_seed(1)
    logits, ids = torch.randn(6, 11), torch.randint(0, 11, (6,))
    starts = torch.tensor([True, False, False, True, False, False])
    temps = torch.tensor([1.0, 0.7, 0.7, 1.0, 1.0, 0.5])
    lp, _ = token_logprobs(logits, ids, starts, temperature=temps)
    for t in (1, 2, 4, 5):
        ref = torch.log_softmax(logits[t - 1] / temps[t], -1)[ids[t]]
        assert float(lp[t]) == pytest.approx(float(ref), abs=1e-6)
    assert float(lp[0]) == float(lp[3]) == 0.0


def test_pack_carries_temperatures_and_omits_them_when_all_one() -> None:
    a = Sample(tokens=np.arange(3), mask=np.array([0, 1, 1.0]), behaviour_logprobs=np.zeros(3),
               temperature=np.array([1.0, 0.7, 0.7]))
    b = Sample(tokens=np.arange(2), mask=np.array([0, 1.0]), behaviour_logprobs=np.zeros(2))
    mb = pack([a, b])
    assert mb.temperature is not None and mb.temperature.tolist() == pytest.approx([1, 0.7, 0.7, 1, 1])
    assert pack([b, b]).temperature is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_flash_varlen_matches_per_sequence_sdpa_on_gpu(dtype: torch.dtype) -> None:
    """On a GPU in half precision (float32 here runs under bf16 autocast, as the torch backend's autocast
    precision does) sdpa_varlen runs the flash varlen kernel over the packed row: outputs and the gradients of
    q, k, v match per-sequence causal SDPA (GQA, a sequence of length 1 included)."""
    import contextlib

    from agentrl.engine import ragged
    from trainer.backend import varlen

    half = torch.bfloat16 if dtype == torch.float32 else dtype
    autocast = torch.autocast("cuda", torch.bfloat16) if dtype == torch.float32 else contextlib.nullcontext()

    assert ragged.varlen_available(), "this PyTorch has no torch.nn.attention.varlen"
    lens = [37, 1, 300, 64, 5, 129]
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = {"q": 14, "k": 2, "v": 2}  # Qwen2.5-0.5B's heads: 14 query, 2 key/value
    leaves = {n: torch.randn(1, h, sum(lens), 64, device="cuda", dtype=dtype, generator=gen).requires_grad_()
              for n, h in shape.items()}
    grad_out = torch.randn(1, sum(lens), 14, 64, device="cuda", dtype=dtype, generator=gen)
    results = []
    for use_flash in (True, False):
        for t in leaves.values():
            t.grad = None
        q, k, v = leaves.values()
        with autocast:
            if use_flash:
                assert varlen._flash_dtype(q, 0.0) == half  # not the per-sequence fallback
                out, _ = varlen.sdpa_varlen_attention(torch.nn.Module(), q, k, v, None, packed_seq_lens=lens)
            else:
                out = varlen._per_sequence(q, k, v, lens, 0.0, None)
        out.float().backward(grad_out.float())
        results.append((out.detach(), [t.grad.clone() for t in leaves.values()]))  # type: ignore[union-attr]
    (flash, flash_g), (ref, ref_g) = results
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(flash, ref, **tol)
    for a, b, name in zip(flash_g, ref_g, shape, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=f"grad of {name}")
