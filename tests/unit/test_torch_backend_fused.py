"""The torch backend's fused logprob path (``learner.fused_kernels``, the GPU default) against its plain one.

Same weights, same packed micro-batches (with sampling temperatures): per-token logprobs, and an optimizer
step with the entropy as a metric and with an entropy bonus, give the same numbers. On CPU the compiled chunk
functions run through Inductor's CPU backend: the same graphs the GPU compiles into Triton kernels.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from agentrl.config.learner import LossConfig, OptimConfig
from trainer.backend.torch_backend import TorchBackend
from trainer.losses import ppo_loss
from trainer.packing import MicroBatch, Sample, pack


def _batch() -> list[MicroBatch]:
    rng = np.random.default_rng(0)
    samples = []
    for n, adv in ((9, 1.0), (14, -0.5), (6, 0.7)):
        mask = np.r_[0, 0, np.ones(n - 2)].astype(np.float32)
        samples.append(Sample(tokens=rng.integers(0, 97, n), mask=mask, advantage=adv,
                              behaviour_logprobs=np.where(mask > 0, -4.0, 0.0).astype(np.float32),
                              temperature=np.full(n, 0.8, np.float32)))
    return [pack(samples, [0, 2]), pack(samples, [1])]


def test_fused_logprobs_match_the_plain_path_in_scores_and_steps() -> None:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg)
    backends = [TorchBackend(copy.deepcopy(model), OptimConfig(lr=1e-2), fused_logprobs=fused) for fused in (False, True)]
    mbs = _batch()
    torch.testing.assert_close(backends[1].logprobs(mbs[0]), backends[0].logprobs(mbs[0]), atol=1e-5, rtol=1e-5)
    for loss in (LossConfig(), LossConfig(entropy_coef=0.05)):
        plain, fused = (b.train_step(mbs, ppo_loss, loss) for b in backends)
        assert abs(fused.grad_norm - plain.grad_norm) < 1e-4 * max(1.0, plain.grad_norm)
        for key in ("loss/total", "policy/entropy"):
            assert abs(fused.metrics[key] - plain.metrics[key]) < 1e-5, key
    torch.testing.assert_close(backends[1].logprobs(mbs[1]), backends[0].logprobs(mbs[1]), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # dynamo inspecting inputs
def test_compiled_norms_and_swiglu_match_the_hf_modules_in_scores_and_steps() -> None:
    from trainer.backend.compiled_layers import _mlp_forward, compile_layers

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg)
    for name, p in model.named_parameters():  # norms away from 1, so a misplaced weight product shows
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    assert compile_layers(copy.deepcopy(model)) == {"rms_norm": 5, "swiglu": 2}
    backends = [TorchBackend(copy.deepcopy(model), OptimConfig(lr=1e-2), compiled_layers=c) for c in (False, True)]
    mbs = _batch()
    torch.testing.assert_close(backends[1].logprobs(mbs[0]), backends[0].logprobs(mbs[0]), atol=1e-5, rtol=1e-5)
    plain, compiled = (b.train_step(mbs, ppo_loss, LossConfig()) for b in backends)
    assert abs(compiled.grad_norm - plain.grad_norm) < 1e-4 * max(1.0, plain.grad_norm)
    torch.testing.assert_close(backends[1].logprobs(mbs[1]), backends[0].logprobs(mbs[1]), atol=1e-5, rtol=1e-5)
    assert backends[1].model.state_dict().keys() == backends[0].model.state_dict().keys()
    plain_mlp, fused_mlp = (b.model.model.layers[0].mlp for b in backends)  # the backend did re-point them
    assert fused_mlp.forward.__func__ is _mlp_forward and plain_mlp.forward.__func__ is not _mlp_forward
