"""Pure parts of the Megatron backend: DP scheduling, THD packing, RoPE, step reports, the driver's errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from agentrl.errors import BackendError
from trainer.backend.megatron.attention import _sdpa_per_sequence, apply_rope, fused_rope_qk, rope_qk
from trainer.backend.megatron.driver import MegatronBackend
from trainer.backend.megatron.engine import StepTotals, idle_micro_batch, merge_step_reports
from trainer.backend.megatron.schedule import assign_micro_batches
from trainer.backend.megatron.thd import rope_tables, to_thd
from trainer.packing import Sample, pack


def test_assign_balances_tokens_and_covers_every_micro_batch() -> None:
    counts = [100, 90, 80, 30, 20, 10]
    plan = assign_micro_batches(counts, 2)
    assert sorted(i for ids in plan for i in ids) == list(range(6))
    loads = [sum(counts[i] for i in ids) for ids in plan]
    assert loads == [160, 170] and all(ids == sorted(ids) for ids in plan)
    assert assign_micro_batches([5], 3) == [[0], [], []]
    assert assign_micro_batches(counts, 1) == [list(range(6))]
    with pytest.raises(ValueError, match="dp"):
        assign_micro_batches(counts, 0)


def _mb(lens: list[int]):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    return pack([Sample(tokens=rng.integers(0, 50, n), mask=np.r_[0, np.ones(n - 1)], behaviour_logprobs=np.zeros(n))
                 for n in lens])


def test_to_thd_cu_seqlens_padding_and_positions() -> None:
    ids, packed = to_thd(_mb([3, 6]), head_dim=4, theta=10000.0, pad_to=4)
    assert ids.shape == (1, 12) and ids[0, 9:].tolist() == [0, 0, 0]
    assert packed.cu_seqlens_q.tolist() == [0, 3, 9, 12] and packed.max_seqlen_q == 6
    assert packed.seq_lens == (3, 6, 3) and packed.num_tokens == 9 and packed.qkv_format == "thd"
    cos, _ = rope_tables(torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2]), 4, 10000.0)
    assert torch.equal(packed.rope_cos, cos)
    _, unpadded = to_thd(_mb([3, 5]), head_dim=4, theta=10000.0, pad_to=4)
    assert unpadded.seq_lens == (3, 5)


def test_rope_matches_hugging_face() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    pos = torch.arange(7)
    cos, sin = rope_tables(pos, 16, 1e6)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[:, 0][None],
                                        sin[:, 0][None])
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k[0].transpose(0, 1))


def test_compiled_rope_matches_eager_in_values_and_gradients() -> None:
    """The GPU default (``learner.megatron.fused_kernels``) compiles RoPE; shapes vary per micro-batch."""
    torch.manual_seed(1)
    for tokens in (7, 12):
        q, k = torch.randn(tokens, 4, 16, requires_grad=True), torch.randn(tokens, 2, 16, requires_grad=True)
        cos, sin = rope_tables(torch.arange(tokens), 16, 1e6)
        w_q, w_k = torch.randn(tokens, 4, 16), torch.randn(tokens, 2, 16)
        grads = []
        for fn in (rope_qk, fused_rope_qk()):
            out_q, out_k = fn(q, k, cos, sin)
            grads.append((out_q, out_k, *torch.autograd.grad((out_q * w_q).sum() + (out_k * w_k).sum(), (q, k))))
        for eager, compiled in zip(*grads, strict=True):
            torch.testing.assert_close(compiled, eager)


def test_compiled_rope_scores_like_it_trains_in_bf16() -> None:
    """Under ``no_grad`` (the learner scoring its own policy) the compiled RoPE gives the training graph's bits:
    Inductor's inference graph alone rounds differently in bf16, and the importance ratio of a step against
    the learner's own scores would not be 1."""
    torch.manual_seed(0)
    q, k = torch.randn(300, 14, 64, dtype=torch.bfloat16), torch.randn(300, 2, 64, dtype=torch.bfloat16)
    cos, sin = rope_tables(torch.arange(300), 64, 1e6)
    rope = fused_rope_qk()
    with torch.no_grad():
        scored = rope(q, k, cos, sin)
    trained = rope(q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin)
    for a, b in zip(scored, trained, strict=True):
        assert not a.requires_grad and torch.equal(a, b.detach())


def test_per_sequence_attention_does_not_cross_sequences() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    out = _sdpa_per_sequence(q, k, v, (4, 5), 8 ** -0.5)
    alone = _sdpa_per_sequence(q[4:], k[4:], v[4:], (5,), 8 ** -0.5)
    torch.testing.assert_close(out[4:], alone)
    k2 = k.clone()
    k2[:4] += 10  # changing the first sequence's keys leaves the second's output alone
    torch.testing.assert_close(_sdpa_per_sequence(q, k2, v, (4, 5), 8 ** -0.5)[4:], alone)


def test_merge_step_reports_sums_over_reporting_ranks() -> None:
    a = {"metrics": {"loss/total": 0.5}, "diff_sum": 2.0, "diff_max": 0.3, "tokens": 10, "grad_norm": 1.5, "lr": 1e-3}
    b = {"metrics": {"loss/total": 0.25}, "diff_sum": 1.0, "diff_max": 0.7, "tokens": 6, "grad_norm": 1.5, "lr": 1e-3}
    r = merge_step_reports([a, None, b, None], StepTotals(tokens=12.0, seqs=3.0))
    assert r.metrics == {"loss/total": 0.75} and r.tokens == 16 and r.grad_norm == 1.5 and r.lr == 1e-3
    assert r.logprob_diff_mean == 0.25 and r.logprob_diff_max == 0.7


def test_idle_micro_batch_trains_nothing() -> None:
    mb = idle_micro_batch()
    assert mb.num_tokens == 2 and float(mb.mask.sum()) == 0


class _FailingEngine:
    rank = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))

    def gather(self, obj: object) -> list[object]:
        return [obj]

    def export_hf(self, path: object) -> None:
        raise OSError("disk full")


def test_driver_names_the_rank_and_error() -> None:
    backend = MegatronBackend(_FailingEngine())  # type: ignore[arg-type]
    with pytest.raises(BackendError, match=r"rank 0 export_hf failed: OSError: disk full \(at .*test_megatron_parts.py:\d+\)"):
        backend.export_hf("/nowhere")  # type: ignore[arg-type]


def test_megatron_config_section() -> None:
    import msgspec

    from agentrl.config.learner import LearnerConfig

    lc = msgspec.convert({"backend": "megatron", "megatron": {"tensor_parallel": 2, "data_parallel": 3}},
                         LearnerConfig)
    assert lc.megatron.world_size == 6 and lc.megatron.distributed_optimizer
    with pytest.raises(msgspec.ValidationError, match="tensor_paralel"):
        msgspec.convert({"megatron": {"tensor_paralel": 2}}, LearnerConfig)
    with pytest.raises(msgspec.ValidationError, match="pipeline_parallel"):
        msgspec.convert({"megatron": {"pipeline_parallel": 0}}, LearnerConfig)


@pytest.mark.filterwarnings("ignore::UserWarning")  # megatron-core warns on its own defaults; dynamo on .grad reads
def test_fused_swiglu_is_megatron_cores_swiglu_fusion_and_computes_silu_times_up() -> None:
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
    from transformers import Qwen2Config

    from trainer.backend.megatron.model import ModelOptions, transformer_config
    from trainer.backend.megatron.shape import shape_from_hf

    shape = shape_from_hf(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    assert not transformer_config(shape, ModelOptions()).bias_activation_fusion
    assert transformer_config(shape, ModelOptions(fused_swiglu=True)).bias_activation_fusion  # a valid config
    x = torch.randn(5, 2 * 96, requires_grad=True)
    out = bias_swiglu_impl(x, None)  # what megatron-core's MLP calls with the fusion on (no bias)
    gate, up = x.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    assert torch.allclose(out, ref, atol=1e-6)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-5)
