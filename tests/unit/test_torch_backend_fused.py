"""The torch backend's fused logprob path (``learner.fused_kernels``, the GPU default) against its plain one.

Same weights, same packed micro-batches (with sampling temperatures): per-token logprobs, and an optimizer
step with the entropy as a metric and with an entropy bonus, give the same numbers. On CPU the compiled chunk
functions run through Inductor's CPU backend: the same graphs the GPU compiles into Triton kernels.
"""

from __future__ import annotations

import copy

import numpy as np
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
