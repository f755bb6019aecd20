"""Advantage estimators against plain float64 references (loops over groups), on ragged groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.advantages import EPS, dr_grpo, grpo, reinforce_pp_baseline, rloo


def _ragged(seed: int) -> tuple[list[float], list[int]]:
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(1, 7, size=6)] + [1, 4]
    rewards, groups = [], []
    for g, n in enumerate(sizes):
        for _ in range(n):
            rewards.append(float(rng.choice([0.0, 1.0, rng.normal()])))
            groups.append(g)
    return rewards, groups


def _members(rewards: list[float], groups: list[int], i: int) -> list[float]:
    return [r for r, g in zip(rewards, groups, strict=True) if g == groups[i]]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ref_grpo(rewards: list[float], groups: list[int]) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        g = _members(rewards, groups, i)
        out.append(0.0 if len(g) == 1 else (r - _mean(g)) / (_std(g) + EPS))
    return out


def ref_dr_grpo(rewards: list[float], groups: list[int]) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        g = _members(rewards, groups, i)
        out.append(0.0 if len(g) == 1 else r - _mean(g))
    return out


def ref_rloo(rewards: list[float], groups: list[int]) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        g = _members(rewards, groups, i)
        out.append(0.0 if len(g) == 1 else r - (sum(g) - r) / (len(g) - 1))
    return out


def ref_reinforce_pp(rewards: list[float], groups: list[int]) -> list[float]:
    centred = ref_dr_grpo(rewards, groups)
    return [(c - _mean(centred)) / (_std(centred) + EPS) for c in centred]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    ("fn", "ref"),
    [(grpo, ref_grpo), (dr_grpo, ref_dr_grpo), (rloo, ref_rloo), (reinforce_pp_baseline, ref_reinforce_pp)],
)
def test_advantage_matches_reference(fn, ref, seed: int) -> None:
    rewards, groups = _ragged(seed)
    got = fn(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups))
    np.testing.assert_allclose(got.numpy(), ref(rewards, groups), rtol=1e-9, atol=1e-9)


def test_float32_input_keeps_dtype_and_is_close() -> None:
    rewards, groups = _ragged(11)
    got = grpo(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_grpo(rewards, groups), rtol=1e-5, atol=1e-5)


def test_zero_variance_group_gets_zero_advantage() -> None:
    got = grpo(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 1, 1]))
    assert got[:3].abs().max().item() == 0.0
    assert got[3].item() < 0 < got[4].item()


@pytest.mark.parametrize(
    "path",
    ["trainer.advantages.grpo", "trainer.advantages.dr_grpo", "trainer.advantages.rloo",
     "trainer.advantages.reinforce_pp_baseline"],
)
def test_advantage_contract(path: str) -> None:
    """What the learner relies on from any AdvantageFn named in config: [N] in, finite [N] out, same dtype."""
    from agentrl.plugins import load_object

    fn = load_object(path, what="learner.advantage")
    rewards, groups = _ragged(3)
    out = fn(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups))
    assert out.shape == (len(rewards),) and out.dtype == torch.float32 and torch.isfinite(out).all()
