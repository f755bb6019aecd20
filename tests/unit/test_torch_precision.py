"""The torch backend's precisions (``learner.precision``): bf16 parameters with float32 master weights against
bf16 autocast over float32 parameters, on CPU (bf16 matmuls run there too).

What the master-weight mode must keep: scores within bf16 noise of autocast's, training that learns, gradients
summed over micro-batches in float32 (shown against what bf16 accumulation loses), exact resume from a
checkpoint (also across the two modes), bf16 export, and the config's resolution of ``auto``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from agentrl.config.learner import LearnerConfig, LossConfig, OptimConfig
from agentrl.errors import ConfigError
from trainer.backend.master import MasterWeights
from trainer.backend.torch_backend import TorchBackend, resolve_precision
from trainer.losses import ppo_loss, sft_loss
from trainer.packing import MicroBatch, Sample, pack

VOCAB = 97


def _model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def _samples(n: int, seed: int = 0, length: int | None = None) -> list[Sample]:
    """``n`` sequences (ragged, or all ``length`` long with 8 trained tokens each), mixed-sign advantages."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = length or int(rng.integers(6, 16))
        mask = np.r_[np.zeros(size - 8), np.ones(8)].astype(np.float32) if length else \
            np.r_[0, 0, np.ones(size - 2)].astype(np.float32)
        out.append(Sample(tokens=rng.integers(0, VOCAB, size), mask=mask, advantage=float(rng.standard_normal()),
                          behaviour_logprobs=np.where(mask > 0, -4.6, 0.0).astype(np.float32)))
    return out


def _master(model: Qwen2ForCausalLM, lr: float = 1e-2, grad_clip: float | None = 1.0) -> TorchBackend:
    return TorchBackend(model, OptimConfig(lr=lr, grad_clip=grad_clip), bf16=True, master_weights=True)


def _cast_parameters_bf16(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    for p in model.parameters():  # buffers (RoPE frequencies) stay float32, as in the master mode
        p.data = p.data.to(torch.bfloat16)
    return model


def _stepped_grads(backend: TorchBackend, mbs: list[MicroBatch]) -> torch.Tensor:
    """The gradient the optimizer steps on (float64, flattened) after one train_step over ``mbs``."""
    seen: list[torch.Tensor] = []

    def grab(opt: torch.optim.Optimizer, *_: object) -> None:
        seen.append(torch.cat([p.grad.double().flatten() for g in opt.param_groups for p in g["params"]]))

    backend.optimizer.register_step_pre_hook(grab)
    backend.train_step(mbs, ppo_loss, LossConfig())
    return seen[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_parameters_are_bf16_and_the_optimizer_steps_float32_masters() -> None:
    model = _model()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _model()
    backend = TorchBackend(model, OptimConfig(lr=1e-2), bf16=True, master_weights=True, ref_model=ref)
    for m in (model, ref):
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
        assert all(b.dtype == torch.float32 for b in m.buffers())  # RoPE frequencies not rounded
    assert backend.master is not None
    stepped = [p for g in backend.optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in stepped] == [id(m) for m in backend.master.masters]
    for name, master in zip(backend.trainable_names, backend.master.masters, strict=True):
        assert master.dtype == torch.float32
        assert torch.equal(master, fp32[name])  # seeded from the float32 weights, not their bf16 rounding
    autocast: list[bool] = []
    model.register_forward_pre_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    backend.train_step([pack(_samples(3))], ppo_loss, LossConfig())
    assert autocast == [False]  # the weights already are bf16: no casts on every use
    states = [v for st in backend.optimizer.state.values() for k, v in st.items() if k != "step"]
    assert states and all(v.dtype == torch.float32 for v in states)
    for param, master in zip(backend.master.params, backend.master.masters, strict=True):
        assert torch.equal(param, master.to(torch.bfloat16))  # published after the step
        assert param.grad is None and master.grad is None


def test_first_scores_and_step_match_autocast_within_bf16_noise() -> None:
    model = _model()
    mb = pack(_samples(4))
    fp32 = TorchBackend(copy.deepcopy(model), OptimConfig(lr=1e-3))
    autocast = TorchBackend(copy.deepcopy(model), OptimConfig(lr=1e-3), bf16=True)
    master = _master(copy.deepcopy(model), lr=1e-3)
    ref, lp_auto, lp_master = (b.logprobs(mb) for b in (fp32, autocast, master))
    trained = mb.mask > 0
    auto_gap = (lp_auto - ref).abs()[trained]
    master_gap = (lp_master - ref).abs()[trained]
    assert float(auto_gap.max()) > 0  # bf16 really computed in both
    assert float(master_gap.max()) < 0.05 and float(master_gap.mean()) < 3 * float(auto_gap.mean()) + 1e-3
    assert float((lp_master - lp_auto).abs()[trained].max()) < 0.05
    mb.behaviour_logprobs = ref.clone()
    steps = [b.train_step([mb], ppo_loss, LossConfig()) for b in (autocast, master)]
    assert abs(steps[1].grad_norm - steps[0].grad_norm) < 0.05 * steps[0].grad_norm
    assert abs(steps[1].metrics["policy/ratio_mean"] - 1.0) < 1e-6  # proximal = its own pre-update scores
    assert steps[1].lr == steps[0].lr


@pytest.mark.parametrize("mode", ["autocast", "bf16_master"])
def test_a_few_steps_reduce_the_loss(mode: str) -> None:
    model = _model()
    backend = _master(model) if mode == "bf16_master" else TorchBackend(model, OptimConfig(lr=1e-2), bf16=True)
    mbs = [pack(_samples(6, seed=1), [0, 1, 2]), pack(_samples(6, seed=1), [3, 4, 5])]
    losses = [backend.train_step(mbs, sft_loss, LossConfig()).metrics["loss/total"] for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradients_accumulate_over_micro_batches_in_float32() -> None:
    """k micro-batches of equal token counts (k a power of two): each one's gradient, scored alone, is exactly k
    times its share of the accumulated step (the loss divides by the step's tokens). Their exact sum is what
    the masters must hold; bf16 accumulation rounds the running sum k times and misses it by ~1e-3."""
    k, model = 16, _model()
    samples = _samples(k, seed=2, length=10)
    split = [pack(samples, [i]) for i in range(k)]
    alone = [_stepped_grads(_master(copy.deepcopy(model), grad_clip=None), [mb]) for mb in split]
    exact = torch.stack(alone).sum(0) / k
    accumulated = _stepped_grads(_master(copy.deepcopy(model), grad_clip=None), split)
    assert _rel(accumulated, exact) < 1e-5
    bf16_sum = _stepped_grads(TorchBackend(_cast_parameters_bf16(copy.deepcopy(model)), OptimConfig()), split)
    assert _rel(bf16_sum, exact) > 1e-3  # what the masters' float32 accumulation avoids
    concatenated = _stepped_grads(_master(copy.deepcopy(model), grad_clip=None), [pack(samples)])
    assert _rel(accumulated, concatenated) < 0.02  # one bf16 backward over all of it: bf16 noise only


def _params(backend: TorchBackend) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    if backend.master is not None:
        out.update({f"master/{n}": m.detach().clone()
                    for n, m in zip(backend.trainable_names, backend.master.masters, strict=True)})
    return out


def test_resuming_from_a_checkpoint_gives_bitwise_the_same_next_step(tmp_path: Path) -> None:
    model = _model()
    batches = [[pack(_samples(4, seed=s))] for s in range(3)]
    first = _master(copy.deepcopy(model), lr=1e-2)
    first.scheduler = torch.optim.lr_scheduler.LambdaLR(first.optimizer, lambda step: 1.0 / (step + 1))
    for mbs in batches[:2]:
        first.train_step(mbs, ppo_loss, LossConfig())
    first.save_state(tmp_path)
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "master.safetensors")).values())
    first.train_step(batches[2], ppo_loss, LossConfig())
    resumed = _master(copy.deepcopy(model), lr=1e-2)
    resumed.scheduler = torch.optim.lr_scheduler.LambdaLR(resumed.optimizer, lambda step: 1.0 / (step + 1))
    resumed.load_state(tmp_path)
    resumed.train_step(batches[2], ppo_loss, LossConfig())
    expected, got = _params(first), _params(resumed)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_checkpoints_move_between_precisions_without_loss(tmp_path: Path) -> None:
    autocast = TorchBackend(_model(), OptimConfig(lr=1e-2), bf16=True)
    autocast.train_step([pack(_samples(3))], ppo_loss, LossConfig())
    (tmp_path / "a").mkdir()
    autocast.save_state(tmp_path / "a")
    master = _master(_model(seed=5))
    master.load_state(tmp_path / "a")
    assert master.master is not None
    trained = dict(autocast.model.named_parameters())
    for name, value in zip(master.trainable_names, master.master.masters, strict=True):
        assert torch.equal(value, trained[name])  # the float32 checkpoint, not its bf16 rounding
    master.train_step([pack(_samples(3, seed=1))], ppo_loss, LossConfig())
    (tmp_path / "m").mkdir()
    master.save_state(tmp_path / "m")
    back = TorchBackend(_model(seed=6), OptimConfig(lr=1e-2), bf16=True)
    back.load_state(tmp_path / "m")
    params = dict(back.model.named_parameters())
    for name, value in zip(master.trainable_names, master.master.masters, strict=True):
        assert torch.equal(params[name], value)


def test_export_writes_the_bf16_weights_the_model_computes_with(tmp_path: Path) -> None:
    backend = _master(_model())
    backend.train_step([pack(_samples(3))], ppo_loss, LossConfig())
    backend.export_hf(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    exported = load_file(str(tmp_path / "model.safetensors"))
    params = dict(backend.model.named_parameters())
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    for name, value in exported.items():
        assert torch.equal(value, params[name]), name


def test_precision_resolution_and_bad_combinations() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision(LearnerConfig(), cuda, True) == "bf16_master"
    assert resolve_precision(LearnerConfig(), cpu, True) == "autocast"
    assert resolve_precision(LearnerConfig(precision="autocast"), cuda, True) == "autocast"
    assert resolve_precision(LearnerConfig(precision="bf16_master"), cpu, True) == "bf16_master"
    assert resolve_precision(LearnerConfig(precision="autocast"), cpu, False) == "float32"
    with pytest.raises(ConfigError, match=r"learner\.precision"):
        resolve_precision(LearnerConfig(precision="bf16_master"), cpu, False)
    with pytest.raises(ValueError, match="master_weights needs bf16"):
        TorchBackend(_model(), OptimConfig(), master_weights=True)
    with pytest.raises(ValueError, match="must be bfloat16"):
        MasterWeights(list(_model().parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloading_moves_the_masters_and_changes_no_step() -> None:
    model, mbs = _model(), [pack(_samples(4))]
    kept, moved = (TorchBackend(copy.deepcopy(model), OptimConfig(lr=1e-2), device="cuda", bf16=True,
                                master_weights=True, offloaded=off) for off in (False, True))
    for _ in range(2):
        for backend in (kept, moved):
            backend.train_step(mbs, ppo_loss, LossConfig())
        moved.offload()
        assert moved.master is not None
        states = [v for st in moved.optimizer.state.values() for v in st.values() if v.dim() > 0]
        assert all(t.device.type == "cpu" for t in [*moved.master.masters, *states, *moved.model.parameters()])
    moved.onload()
    for name, value in _params(kept).items():
        assert torch.equal(_params(moved)[name].cuda(), value), name
