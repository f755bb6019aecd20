"""Losses against plain float64 references written token by token, on random ragged masked data.

The references loop over sequences and tokens with 0-d tensors, so autograd gives reference gradients too.
"""

from __future__ import annotations

import math
from dataclasses import replace

import msgspec
import numpy as np
import pytest
import torch

from agentrl.config.learner import LossConfig
from trainer.losses import LossInputs, kl_penalty, ppo_loss, sft_loss

D = torch.float64


def make_inputs(seed: int, *, proximal: bool = True) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 12, (7,), generator=g)]
    seq_index = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    t = len(seq_index)
    mask = (torch.rand(t, generator=g) < 0.7).to(D)
    mask[seq_index == 2] = 0.0  # one sequence with nothing to train on
    behaviour = -torch.rand(t, generator=g, dtype=D) * 3
    logprobs = (behaviour + 0.3 * torch.randn(t, generator=g, dtype=D)).requires_grad_(True)
    adv = torch.randn(len(lengths), generator=g, dtype=D)[seq_index]
    return LossInputs(
        logprobs=logprobs,
        behaviour_logprobs=behaviour,
        advantages=adv,
        mask=mask,
        seq_index=seq_index,
        num_seqs=len(lengths),
        proximal_logprobs=(behaviour + 0.4 * torch.randn(t, generator=g, dtype=D)) if proximal else None,
        ref_logprobs=behaviour + 0.2 * torch.randn(t, generator=g, dtype=D),
        entropy=torch.rand(t, generator=g, dtype=D) * 2,
    )


def _seqs(inp: LossInputs) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(inp.num_seqs)]
    for i, s in enumerate(inp.seq_index.tolist()):
        out[s].append(i)
    return out


def ref_aggregate(values: dict[int, torch.Tensor], inp: LossInputs, mode: str) -> torch.Tensor:
    """values: token index -> 0-d tensor, only for trained tokens."""
    seqs = [[i for i in s if inp.mask[i] > 0] for s in _seqs(inp)]
    seqs = [s for s in seqs if s]
    n_tok = sum(len(s) for s in seqs)
    total = torch.zeros((), dtype=D)
    for s in seqs:
        seq_sum = sum((values[i] for i in s), torch.zeros((), dtype=D))
        if mode == "token-mean":
            total = total + seq_sum / n_tok
        elif mode == "seq-mean-token-sum":
            total = total + seq_sum / len(seqs)
        else:
            total = total + seq_sum / len(s) / len(seqs)
    return total


def ref_ppo(inp: LossInputs, cfg: LossConfig) -> torch.Tensor:
    trained = [i for i in range(len(inp.mask)) if inp.mask[i] > 0]
    use_prox = cfg.proximal and inp.proximal_logprobs is not None
    old = inp.proximal_logprobs if use_prox else inp.behaviour_logprobs
    seq_of = inp.seq_index.tolist()
    seq_lr: dict[int, torch.Tensor] = {}
    for s, members in enumerate(_seqs(inp)):
        tr = [i for i in members if inp.mask[i] > 0]
        if tr:
            seq_lr[s] = sum((inp.logprobs[i] - old[i] for i in tr), torch.zeros((), dtype=D)) / len(tr)
    pg: dict[int, torch.Tensor] = {}
    kl: dict[int, torch.Tensor] = {}
    ent: dict[int, torch.Tensor] = {}
    for i in trained:
        lr = seq_lr[seq_of[i]] if cfg.ratio_level == "sequence" else inp.logprobs[i] - old[i]
        r = torch.exp(lr)
        a = inp.advantages[i]
        clipped_r = min(max(r, torch.tensor(1 - cfg.clip_low, dtype=D)), torch.tensor(1 + cfg.clip_high, dtype=D))
        term = max(-a * r, -a * clipped_r)
        if cfg.dual_clip is not None and a < 0:
            term = min(term, -a * cfg.dual_clip)
        w = 1.0
        if use_prox and cfg.behaviour_correction != "off":
            w = math.exp(float(inp.proximal_logprobs[i] - inp.behaviour_logprobs[i]))
            if cfg.behaviour_correction == "truncate":
                w = min(w, cfg.is_cap)
            elif cfg.behaviour_correction == "mask" and w > cfg.is_cap:
                w = 0.0
        pg[i] = term * w
        d = inp.logprobs[i] - inp.ref_logprobs[i]
        kl[i] = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[cfg.kl_estimator]
        ent[i] = inp.entropy[i]
    total = ref_aggregate(pg, inp, cfg.aggregation)
    if cfg.kl_coef > 0:
        total = total + cfg.kl_coef * ref_aggregate(kl, inp, cfg.aggregation)
    return total - cfg.entropy_coef * ref_aggregate(ent, inp, cfg.aggregation)


def _grad(loss: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    (g,) = torch.autograd.grad(loss, x)
    return g.numpy()


CONFIGS = [
    LossConfig(),
    LossConfig(clip_low=0.2, clip_high=0.28, aggregation="seq-mean-token-sum"),
    LossConfig(dual_clip=1.5, clip_low=0.1, clip_high=0.1, aggregation="seq-mean-token-mean"),
    LossConfig(proximal=True, behaviour_correction="none", kl_coef=0.1, kl_estimator="k1"),
    LossConfig(behaviour_correction="mask", is_cap=1.3, kl_coef=0.5, kl_estimator="k2", entropy_coef=0.01),
    LossConfig(proximal=False, kl_coef=0.3, kl_estimator="k3", entropy_coef=0.1, aggregation="seq-mean-token-sum"),
    LossConfig(behaviour_correction="off", dual_clip=3.0),
    LossConfig(ratio_level="sequence", clip_low=3e-2, clip_high=4e-2, aggregation="seq-mean-token-mean"),
    LossConfig(ratio_level="sequence", proximal=False, aggregation="token-mean"),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(msgspec.structs.asdict(c)))
def test_ppo_loss_matches_reference(cfg: LossConfig, seed: int) -> None:
    inp = make_inputs(seed)
    got = ppo_loss(inp, cfg).loss
    want = ref_ppo(inp, cfg)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(_grad(got, inp.logprobs), _grad(want, inp.logprobs), rtol=1e-9, atol=1e-12)


def test_without_proximal_ratio_uses_behaviour() -> None:
    inp = make_inputs(4, proximal=False)
    cfg = LossConfig(proximal=True)
    want = ref_ppo(inp, msgspec.structs.replace(cfg, proximal=False))
    assert ppo_loss(inp, cfg).loss.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_sft_loss_matches_reference(agg: str) -> None:
    inp = make_inputs(7)
    cfg = LossConfig(aggregation=agg)  # type: ignore[arg-type]
    got = sft_loss(inp, cfg).loss
    nll = {i: -inp.logprobs[i] for i in range(len(inp.mask)) if inp.mask[i] > 0}
    want = ref_aggregate(nll, inp, agg)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(_grad(got, inp.logprobs), _grad(want, inp.logprobs), rtol=1e-10)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_micro_batch_split_sums_to_whole(agg: str) -> None:
    """Two halves (whole sequences each) with the step's normalisers add up to the loss of the whole."""
    inp = make_inputs(9)
    cfg = LossConfig(aggregation=agg, kl_coef=0.2, entropy_coef=0.05, dual_clip=2.0)  # type: ignore[arg-type]
    whole = ppo_loss(inp, cfg)
    cut = int((inp.seq_index < 3).sum())
    n_tok = float(inp.mask.sum())
    n_seq = float(sum(1 for s in range(inp.num_seqs) if inp.mask[inp.seq_index == s].sum() > 0))
    parts = []
    for sl, offset in ((slice(0, cut), 0), (slice(cut, None), 3)):
        part = LossInputs(
            logprobs=inp.logprobs[sl], behaviour_logprobs=inp.behaviour_logprobs[sl], advantages=inp.advantages[sl],
            mask=inp.mask[sl], seq_index=inp.seq_index[sl] - offset, num_seqs=3 if offset == 0 else inp.num_seqs - 3,
            proximal_logprobs=inp.proximal_logprobs[sl], ref_logprobs=inp.ref_logprobs[sl], entropy=inp.entropy[sl],
            total_tokens=n_tok, total_seqs=n_seq,
        )
        parts.append(ppo_loss(part, cfg))
    assert sum(p.loss.item() for p in parts) == pytest.approx(whole.loss.item(), rel=1e-12)
    for key in ("policy/clip_frac", "policy/approx_kl", "loss/kl"):
        assert sum(p.metrics[key].item() for p in parts) == pytest.approx(whole.metrics[key].item(), rel=1e-12)


def test_masked_positions_never_leak_nan() -> None:
    inp = make_inputs(3)
    lp = inp.logprobs.detach().clone()
    lp[inp.mask == 0] = float("nan")
    lp.requires_grad_(True)
    bad = replace(inp, logprobs=lp)
    out = ppo_loss(bad, LossConfig(kl_coef=0.1))
    assert math.isfinite(out.loss.item())
    assert np.isfinite(_grad(out.loss, lp)).all()


def test_on_policy_ratio_is_one_and_kl_zero() -> None:
    inp = make_inputs(5)
    same = replace(inp, proximal_logprobs=inp.logprobs.detach(), behaviour_logprobs=inp.logprobs.detach())
    m = ppo_loss(same, LossConfig()).metrics
    assert m["policy/approx_kl"].item() == 0.0
    assert m["policy/clip_frac"].item() == 0.0
    assert m["policy/ratio_mean"].item() == pytest.approx(1.0, abs=0)


def test_kl_estimators_reference() -> None:
    a = torch.tensor([-1.0, -0.5, -2.0], dtype=D)
    b = torch.tensor([-1.2, -0.1, -2.0], dtype=D)
    for est, f in {
        "k1": lambda x, y: x - y,
        "k2": lambda x, y: 0.5 * (x - y) ** 2,
        "k3": lambda x, y: math.exp(y - x) - (y - x) - 1,
    }.items():
        want = [f(float(x), float(y)) for x, y in zip(a, b, strict=True)]
        np.testing.assert_allclose(kl_penalty(a, b, est).numpy(), want, rtol=1e-12)
    assert (kl_penalty(a, b, "k3") >= 0).all()


@pytest.mark.parametrize("path", ["trainer.losses.ppo_loss", "trainer.losses.sft_loss"])
def test_loss_contract(path: str) -> None:
    """Any LossFn named in config: a scalar loss with a gradient, and a 'loss/total' metric equal to it."""
    from agentrl.plugins import load_object

    fn = load_object(path, what="learner.loss.fn")
    inp = make_inputs(1)
    out = fn(inp, LossConfig(kl_coef=0.1))
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.metrics["loss/total"].item() == pytest.approx(out.loss.item())
    assert all(v.ndim == 0 and not v.requires_grad for v in out.metrics.values())
