"""The Megatron backend on CPU (gloo) against the torch backend: same weights, same packed batches.

One rank: logprobs, two optimizer steps, checkpoint/resume and the HF export agree with the torch backend in
float32. Two ranks (TP = 2, or DP = 2): logprobs match one rank's and the gathered HF export is
the input checkpoint bit for bit; a CPU training step with two ranks is refused on every rank with a clear error.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from agentrl.config.learner import LearnerConfig
from agentrl.errors import BackendError
from trainer.backend.torch_backend import build_torch_backend
from trainer.losses import ppo_loss
from trainer.packing import MicroBatch, Sample, pack

pytest.importorskip("megatron.core")

from trainer.backend.megatron.launch import open_megatron_backend


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    return out


def _config(model: Path, **megatron: object) -> LearnerConfig:
    return msgspec.convert({"model": str(model), "device": "cpu", "dtype": "float32", "backend": "megatron",
                            "megatron": {"timeout_s": 120, **megatron}, "optim": {"lr": 1e-3}, "torch_threads": 1}, LearnerConfig)


def _samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for n, adv in ((9, 1.0), (14, -0.5), (6, 0.7), (11, -1.0)):
        mask = np.r_[0, 0, np.ones(n - 2)].astype(np.float32)
        out.append(Sample(tokens=rng.integers(0, 101, n), mask=mask, advantage=adv,
                          behaviour_logprobs=np.where(mask > 0, -4.0, 0.0).astype(np.float32),
                          temperature=np.full(n, 0.8, np.float32)))
    return out


def _batches() -> tuple[MicroBatch, list[MicroBatch]]:
    s = _samples()
    return pack(s), [pack(s, [0, 2]), pack(s, [1, 3])]


def test_one_rank_matches_torch_backend_through_training_resume_and_export(model_dir: Path, tmp_path: Path) -> None:
    lc = _config(model_dir)
    ref = build_torch_backend(lc)
    whole, mbs = _batches()
    with open_megatron_backend(lc) as meg:
        torch.testing.assert_close(meg.logprobs(whole), ref.logprobs(whole), atol=2e-6, rtol=0)
        for _ in range(2):
            got, want = meg.train_step(mbs, ppo_loss, lc.loss), ref.train_step(mbs, ppo_loss, lc.loss)
            assert got.tokens == want.tokens and got.lr == want.lr
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-4)
            assert got.metrics["loss/total"] == pytest.approx(want.metrics["loss/total"], rel=1e-4, abs=1e-7)
        torch.testing.assert_close(meg.logprobs(whole), ref.logprobs(whole), atol=2e-5, rtol=0)
        (tmp_path / "ckpt").mkdir()
        meg.save_state(tmp_path / "ckpt")
        meg.train_step(mbs, ppo_loss, lc.loss)
        after_resume_ref = meg.logprobs(whole)
        (tmp_path / "hf").mkdir()
        meg.export_hf(tmp_path / "hf")
    exported = build_torch_backend(_config(tmp_path / "hf"))
    torch.testing.assert_close(exported.logprobs(whole), after_resume_ref, atol=2e-6, rtol=0)
    with open_megatron_backend(lc) as meg:  # a fresh learner resumes from the checkpoint
        meg.load_state(tmp_path / "ckpt")
        meg.train_step(mbs, ppo_loss, lc.loss)
        torch.testing.assert_close(meg.logprobs(whole), after_resume_ref, atol=1e-6, rtol=0)


def test_kl_to_the_reference_matches_torch_backend(model_dir: Path) -> None:
    lc = msgspec.convert({**msgspec.to_builtins(_config(model_dir)), "loss": {"kl_coef": 0.5}}, LearnerConfig)
    ref = build_torch_backend(lc)
    _, mbs = _batches()
    with open_megatron_backend(lc) as meg:
        for _ in range(2):  # the second step's policy has moved away from the reference
            got, want = meg.train_step(mbs, ppo_loss, lc.loss), ref.train_step(mbs, ppo_loss, lc.loss)
            assert got.metrics["loss/kl"] == pytest.approx(want.metrics["loss/kl"], rel=1e-4, abs=1e-9)
    assert got.metrics["loss/kl"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tensor_parallel": 2}, {"data_parallel": 2}], ids=["tp2", "dp2"])
def test_two_ranks_score_and_export_like_one(model_dir: Path, tmp_path: Path, layout: dict[str, int]) -> None:
    whole, mbs = _batches()
    want = build_torch_backend(_config(model_dir)).logprobs(whole)
    lc = _config(model_dir, **layout)  # (sequence parallel: megatron-core scatters on CUDA only)
    with open_megatron_backend(lc) as meg:
        torch.testing.assert_close(meg.logprobs(whole), want, atol=2e-6, rtol=0)
        meg.export_hf(tmp_path)
        with pytest.raises(BackendError, match=r"rank 0 train_step failed.*rank 1 train_step failed.*one rank only"):
            meg.train_step(mbs, ppo_loss, lc.loss)
    original, exported = load_file(str(model_dir / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
