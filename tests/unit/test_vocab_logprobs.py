"""Vocab-parallel (and fused) logprobs/entropy against the plain full-vocabulary reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from trainer import vocab_logprobs as logprobs
from trainer.packing import token_logprobs
from trainer.vocab_logprobs import VocabSlice, packed_logprobs, vocab_parallel_logprobs


def _reference(logits: torch.Tensor, targets: torch.Tensor, temp: torch.Tensor | None):
    x = logits.double() if temp is None else logits.double() / temp.double()[:, None]
    logp_all = torch.log_softmax(x, -1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("with_temp", [False, True])
def test_values_and_gradients_match_full_softmax(with_temp: bool) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(37, 50, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    temp = torch.rand(37) + 0.5 if with_temp else None
    lp, ent = vocab_parallel_logprobs(logits, targets, VocabSlice(0, 50), temp)
    ref_lp, ref_ent = _reference(logits, targets, temp)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    w1, w2 = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    (grad,) = torch.autograd.grad((lp.double() * w1 + ent.double() * w2).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_lp * w1 + ref_ent * w2).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_padded_columns_are_excluded() -> None:
    torch.manual_seed(1)
    logits = torch.randn(9, 40)
    padded = torch.cat([logits, torch.full((9, 3), 50.0)], dim=1).requires_grad_()  # huge padding logits
    targets = torch.randint(0, 40, (9,))
    lp, ent = vocab_parallel_logprobs(padded, targets, VocabSlice(0, 40))
    ref_lp, ref_ent = _reference(logits, targets, None)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    lp.sum().backward()
    assert padded.grad is not None and torch.all(padded.grad[:, 40:] == 0)


def test_packed_matches_token_logprobs_with_temperature() -> None:
    torch.manual_seed(2)
    logits = torch.randn(12, 30)
    ids = torch.randint(0, 30, (12,))
    starts = torch.zeros(12, dtype=torch.bool)
    starts[[0, 5]] = True
    temp = torch.full((12,), 0.7)
    lp, ent = packed_logprobs(logits, ids, starts, VocabSlice(0, 30), temp)
    ref_lp, ref_ent = token_logprobs(logits, ids, starts, with_entropy=True, temperature=temp)
    assert ref_ent is not None
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert lp[0] == 0 and lp[5] == 0


def test_compiled_chunk_kernels_match_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """``VocabSlice.fused`` (torch.compile of the chunk math, the GPU default) gives the eager values and gradients,
    across chunk sizes (the last chunk is shorter: dynamic shapes) and with the entropy unused."""
    monkeypatch.setattr(logprobs, "_CHUNK", 16)
    torch.manual_seed(3)
    logits = (torch.randn(45, 64) * 3).requires_grad_()
    targets = torch.randint(0, 60, (45,))
    temp = torch.rand(45) + 0.5
    results = []
    for fused in (False, True):
        lp, ent = vocab_parallel_logprobs(logits, targets, VocabSlice(0, 60, fused=fused), temp)
        (g_both,) = torch.autograd.grad((lp * 2 + ent).sum(), logits)
        lp2, _ = vocab_parallel_logprobs(logits, targets, VocabSlice(0, 60, fused=fused))
        (g_lp,) = torch.autograd.grad(lp2.sum(), logits)
        results.append((lp, ent, g_both, lp2, g_lp))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch.all(results[1][4][:, 60:] == 0)
