"""Step-0 consistency between the learner and the engine, and the weight hand-off learner → engine.

With the same weights, the learner's logprobs of engine-generated tokens equal the engine's (float32 CPU), the
first on-policy PPO update has ratio exactly 1 and approx-KL 0, and weights the learner publishes load into
the engine, after which both agree again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agentrl.client.engine import EngineClient
from agentrl.config.learner import LearnerConfig, LossConfig
from agentrl.messages import SamplingParams, Trajectory
from tests.fixtures.engine import start_engine
from trainer.advantages import grpo
from trainer.backend.torch_backend import TorchBackend, build_torch_backend
from trainer.batching import Batch, TrainItem
from trainer.learner import build_micro_batches
from trainer.losses import ppo_loss
from trainer.weights import DiskWeightSink

pytestmark = pytest.mark.slow
torch.set_num_threads(1)
TOL = 1e-4


async def rollouts(url: str, groups: int = 3, n: int = 2, seed: int = 0, temperature: float = 1.0) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    async with EngineClient(url) as client:
        for g in range(groups):
            prompt = rng.integers(1, 400, int(rng.integers(3, 12))).astype(np.int32)
            for i in range(n):
                sp = SamplingParams(temperature=temperature, max_new_tokens=int(rng.integers(4, 20)), ignore_eos=True)
                gen = await client.generate(prompt, sp)
                k = len(gen.output_ids)
                out.append(Trajectory(
                    id=f"{g}-{i}", task_id=f"{g}-{i}", group_id=str(g), group_size=n,
                    tokens=np.r_[prompt, gen.output_ids], prompt_len=len(prompt),
                    loss_mask=np.r_[np.zeros(len(prompt)), np.ones(k)], logprobs=np.r_[np.zeros(len(prompt)), gen.logprobs],
                    versions=np.r_[np.full(len(prompt), -1), gen.versions], reward=float(rng.integers(0, 2)),
                    temperature=temperature,
                ))
    return out


def batch_of(trajs: list[Trajectory]) -> Batch:
    groups: dict[str, list[TrainItem]] = {}
    for t in trajs:
        groups.setdefault(t.group_id, []).append(TrainItem(t, t.loss_mask.astype(np.float32)))
    return Batch(groups=list(groups.values()))


def max_gap(backend: TorchBackend, trajs: list[Trajectory]) -> float:
    gap = 0.0
    for mb in build_micro_batches(batch_of(trajs), grpo, 4096):
        diff = (backend.logprobs(mb) - mb.behaviour_logprobs).abs()[mb.mask > 0]
        gap = max(gap, float(diff.max()))
    return gap


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_step0_logprobs_match_and_first_update_is_on_policy(
    tiny_model_dir: Path, engine_url: str, temperature: float
) -> None:
    """The learner scores the distribution the engine sampled from (logits / T), so at step 0 they agree."""
    trajs = await rollouts(engine_url, temperature=temperature)
    assert all(int(t.versions[t.prompt_len:].max()) == 0 for t in trajs)
    backend = build_torch_backend(LearnerConfig(model=str(tiny_model_dir), device="cpu"))
    assert max_gap(backend, trajs) <= TOL

    mbs = build_micro_batches(batch_of(trajs), grpo, 4096)
    result = backend.train_step(mbs, ppo_loss, LossConfig(proximal=True, behaviour_correction="none"))
    assert result.metrics["policy/approx_kl"] == 0.0
    assert result.metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-12)
    assert result.metrics["policy/clip_frac"] == 0.0
    assert abs(result.metrics["policy/behaviour_weight"] - 1.0) <= TOL  # exp(proximal - behaviour)
    assert result.logprob_diff_max <= TOL


async def test_published_weights_load_into_the_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = LearnerConfig(model=str(tiny_model_dir), device="cpu")
    backend = build_torch_backend(cfg)
    sink = DiskWeightSink(tmp_path / "weights", base_model=tiny_model_dir)
    with start_engine(tiny_model_dir, "--max-running", "4") as url:
        trajs = await rollouts(url, seed=1)
        mbs = build_micro_batches(batch_of(trajs), grpo, 4096)
        backend.optimizer.param_groups[0]["lr"] = 1e-2
        backend.train_step(mbs, ppo_loss, LossConfig())
        assert max_gap(backend, trajs) > 1e-3  # the update moved the policy
        update = await sink.publish(1, backend.export_hf)
        async with EngineClient(url) as client:
            await client.update_weights_from_disk(update.uri.removeprefix("file://"), update.version)
            assert await client.get_weight_version() == 1
        fresh = await rollouts(url, seed=2)
    assert all(int(t.versions[t.prompt_len:].min()) == 1 for t in fresh)
    assert max_gap(backend, fresh) <= TOL
