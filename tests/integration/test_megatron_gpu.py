"""The Megatron backend on GPUs (NCCL): megatron-core's DDP, distributed optimizer, pipeline schedule, SP.

On one GPU: bf16 training with the distributed optimizer tracks the torch backend, and checkpoint/resume
reproduces the next step. On two or more GPUs (issue 19): TP = 2 (with and without sequence parallelism),
PP = 2 and DP = 2 score like one rank, train like one rank for two steps, and export the input checkpoint
bit for bit before training. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from agentrl.config.learner import LearnerConfig
from trainer.backend.torch_backend import build_torch_backend
from trainer.losses import ppo_loss
from trainer.packing import MicroBatch, Sample, pack

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from trainer.backend.megatron.launch import open_megatron_backend  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen2_gpu")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1001, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    return out


def _config(model: Path, dtype: str, **megatron: Any) -> LearnerConfig:
    return msgspec.convert({"model": str(model), "device": "cuda", "dtype": dtype, "backend": "megatron",
                            "megatron": {"timeout_s": 300, **megatron}, "optim": {"lr": 1e-4}}, LearnerConfig)


def _batches() -> tuple[MicroBatch, list[MicroBatch]]:
    rng = np.random.default_rng(0)
    samples = []
    for n in (57, 120, 33, 200, 91, 18):
        mask = np.r_[np.zeros(8), np.ones(n - 8)].astype(np.float32)
        samples.append(Sample(tokens=rng.integers(0, 1001, n), mask=mask, advantage=float(rng.standard_normal()),
                              behaviour_logprobs=np.where(mask > 0, -7.0, 0.0).astype(np.float32)))
    return pack(samples), [pack(samples, [0, 1, 2]), pack(samples, [3]), pack(samples, [4, 5])]


def test_one_gpu_bf16_tracks_torch_and_resumes(model_dir: Path, tmp_path: Path) -> None:
    lc = _config(model_dir, "bfloat16")
    ref = build_torch_backend(lc)
    whole, mbs = _batches()
    with open_megatron_backend(lc) as meg:
        gap = (meg.logprobs(whole) - ref.logprobs(whole)).abs()[whole.mask > 0]
        assert float(gap.mean()) < 0.02
        for _ in range(2):
            got, want = meg.train_step(mbs, ppo_loss, lc.loss), ref.train_step(mbs, ppo_loss, lc.loss)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=0.05)
        meg.save_state(tmp_path)
        meg.train_step(mbs, ppo_loss, lc.loss)
        expected = meg.logprobs(whole)
    with open_megatron_backend(lc) as meg:
        meg.load_state(tmp_path)
        meg.train_step(mbs, ppo_loss, lc.loss)
        torch.testing.assert_close(meg.logprobs(whole), expected, atol=1e-2, rtol=0)


LAYOUTS = [{"tensor_parallel": 2}, {"tensor_parallel": 2, "sequence_parallel": True}, {"pipeline_parallel": 2},
           {"data_parallel": 2}]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp2", "tp2-sp", "pp2", "dp2"])
def test_two_gpus_score_train_and_export_like_one(model_dir: Path, tmp_path: Path, layout: dict[str, Any]) -> None:
    whole, mbs = _batches()
    with open_megatron_backend(_config(model_dir, "float32")) as one:
        want_before = one.logprobs(whole)
        for _ in range(2):
            one.train_step(mbs, ppo_loss, one.engine.lc.loss)
        want_after = one.logprobs(whole)
    lc = _config(model_dir, "float32", **layout)
    with open_megatron_backend(lc) as two:
        torch.testing.assert_close(two.logprobs(whole), want_before, atol=1e-4, rtol=0)
        two.export_hf(tmp_path)
        for _ in range(2):
            two.train_step(mbs, ppo_loss, lc.loss)
        torch.testing.assert_close(two.logprobs(whole), want_after, atol=1e-3, rtol=0)
    original, exported = load_file(str(model_dir / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
