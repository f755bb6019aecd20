"""The fused sampling kernel draws what the unfused sampler draws, with the same logprobs.

On CPU the kernel runs under Triton's interpreter in one subprocess (``TRITON_INTERPRET`` must be set before
triton is imported; another test of this worker may have imported it already): this file run as a script
checks every case and prints one JSON object, which the tests read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from agentrl.engine.sampling import HostCopy, Sampled, SamplingBatch, sample_on_device


def _params(n: int, temps: list[float], seed0: int = 0, k: int = 3) -> SamplingBatch:
    return SamplingBatch.build(
        (temps * n)[:n], [1.0] * n, [-1] * n, [0.0] * n, list(range(seed0, seed0 + n)), [5] * n,
        [[] for _ in range(n)], [k] * n, [[1, 2, 7] if i % 2 else None for i in range(n)],
    )


def _both(logits: torch.Tensor, params: SamplingBatch) -> tuple[Sampled, Sampled]:
    plain = HostCopy(sample_on_device(logits, params, fused=False), params.token_ids).result()
    fused = HostCopy(sample_on_device(logits, params, fused=True), params.token_ids).result()
    return plain, fused


def _compare(logits: torch.Tensor, params: SamplingBatch) -> dict[str, Any]:
    plain, fused = _both(logits, params)
    ids_err = max((abs(x - y) for a, b in zip(plain.ids_logprobs or [], fused.ids_logprobs or [], strict=True)
                   if a and b for x, y in zip(a, b, strict=True)), default=0.0)
    assert plain.top_values is not None and fused.top_values is not None
    return {
        "same_tokens": float((plain.tokens == fused.tokens).float().mean()),
        # where the two drew different tokens (float32 CDF rounding at a large vocabulary) their logprobs differ
        "logprob_err": float((plain.logprobs - fused.logprobs)[plain.tokens == fused.tokens].abs().max()),
        "top_err": float((plain.top_values - fused.top_values).abs().max()),
        "top_ids_equal": bool(torch.equal(plain.top_ids, fused.top_ids)),
        "ids_err": ids_err,
    }


def _cases() -> dict[str, Any]:
    from agentrl.engine.sample_kernel import fused_sample

    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    for vocab in (100, 2048, 5001):  # below one block, exactly one, several with a ragged tail
        logits = torch.randn(24, vocab, generator=gen) * 3
        out[f"vocab{vocab}"] = _compare(logits, _params(24, [1.0, 0.7, 0.0, 1.5], seed0=vocab))
    ties = torch.zeros(4, 3000)
    ties[:, [17, 2500]] = 5.0  # greedy takes the first of equal maxima, across blocks
    out["greedy_ties"] = fused_sample(ties, torch.zeros(4), torch.full((4,), 0.5)).tokens.tolist()
    banned = torch.full((40, 4000), float("-inf"))
    allowed = [3, 2100, 3500]
    banned[:, allowed] = torch.tensor([0.0, 1.0, 2.0])
    drawn = fused_sample(banned, torch.ones(40), torch.rand(40, generator=gen)).tokens.tolist()
    out["banned_drawn"] = sorted(set(drawn))
    # a uniform at (or, by rounding, past) the top of the CDF: the running sum never reaches it
    out["top_of_cdf"] = fused_sample(banned[:2], torch.ones(2), torch.tensor([1.0, 1.001])).tokens.tolist()
    three = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(1500, 1)
    counts = torch.bincount(fused_sample(three, torch.ones(1500), torch.rand(1500, generator=gen)).tokens, minlength=3)
    out["frequencies"] = (counts.float() / 1500).tolist()
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("vocab", [100, 2048, 5001])
def test_fused_sampling_matches_the_unfused_sampler(results: dict[str, Any], vocab: int) -> None:
    r = results[f"vocab{vocab}"]
    assert r["same_tokens"] == 1.0  # 24 rows: greedy, three temperatures
    assert r["logprob_err"] < 1e-5 and r["top_err"] < 1e-5 and r["ids_err"] < 1e-5
    assert r["top_ids_equal"]


def test_greedy_takes_the_first_maximum_and_banned_tokens_are_never_drawn(results: dict[str, Any]) -> None:
    assert results["greedy_ties"] == [17] * 4
    assert results["banned_drawn"] == [3, 2100, 3500]
    assert results["top_of_cdf"] == [3500, 3500]  # the last token with probability, never a banned one


def test_fused_sampling_follows_the_distribution(results: dict[str, Any]) -> None:
    assert torch.allclose(torch.tensor(results["frequencies"]), torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_bad_logits_are_a_clear_error() -> None:
    from agentrl.engine.sample_kernel import fused_sample

    with pytest.raises(ValueError, match="float32"):
        fused_sample(torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="temperature"):
        fused_sample(torch.zeros(2, 8), torch.ones(3), torch.ones(2))


def _cdf_interval_gap(logits: torch.Tensor, params: SamplingBatch, tokens: torch.Tensor) -> torch.Tensor:
    """How far each row's uniform lies outside its token's interval of the exact (float64) CDF: 0 for an exact
    inverse-CDF draw; float32 sums over a large vocabulary may land a token on a neighbour within rounding."""
    from agentrl.engine.sampling import hash_uniform

    temp = params.temperature.to(logits.device).double().view(-1, 1)
    cdf = torch.softmax(logits.double() / temp, dim=-1).cumsum(-1)
    u = hash_uniform(params.seed.to(logits.device), params.step.to(logits.device)).double()
    hi = cdf.gather(-1, tokens.view(-1, 1)).view(-1)
    lo = torch.where(tokens > 0, cdf.gather(-1, (tokens - 1).clamp(min=0).view(-1, 1)).view(-1), torch.zeros_like(u))
    return torch.clamp(lo - u, min=0) + torch.clamp(u - hi, min=0)


def test_unfused_draws_sit_in_their_tokens_cdf_interval() -> None:
    """The check the GPU test applies to both samplers, on the unfused one here (and a neighbour is caught)."""
    logits = torch.randn(16, 151_936, generator=torch.Generator().manual_seed(0)) * 3
    params = _params(16, [1.0, 0.7, 1.5])
    plain = HostCopy(sample_on_device(logits, params, fused=False), params.token_ids).result()
    assert float(_cdf_interval_gap(logits, params, plain.tokens).max()) == 0.0  # CPU sums: exact here
    shifted = _cdf_interval_gap(logits, params, (plain.tokens + 1) % logits.shape[1])
    assert int((shifted > 0).sum()) >= 12  # a neighbour's interval excludes the uniform, but for float ties


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_sampling_on_the_gpu_at_qwen_vocab() -> None:
    logits = torch.randn(256, 151_936, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    params = _params(256, [1.0, 0.7, 0.0, 1.5])
    plain, fused = _both(logits, params)
    sampled = params.temperature > 0
    for drawn in (plain, fused):  # both are inverse-CDF draws of the row's uniform, up to float32 sums
        gap = _cdf_interval_gap(logits, params, drawn.tokens.cuda())[sampled.cuda()]
        assert float(gap.max()) < 1e-4 and float((gap > 0).float().mean()) < 0.05  # an off-by-one: most rows
    assert torch.equal(plain.tokens[~sampled], fused.tokens[~sampled])  # greedy: exactly the argmax
    assert float((plain.tokens == fused.tokens).float().mean()) > 0.9
    temp = torch.where(sampled, params.temperature, torch.ones_like(params.temperature)).cuda().double().view(-1, 1)
    exact = torch.log_softmax(logits.double() / temp, dim=-1)
    for drawn in (plain, fused):  # each logprob is its own token's, whichever token it drew
        own = exact.gather(-1, drawn.tokens.cuda().view(-1, 1)).view(-1).cpu()
        assert float((drawn.logprobs.double() - own).abs().max()) < 1e-4
    r = _compare(logits, params)
    assert r["logprob_err"] < 1e-4 and r["top_err"] < 1e-4 and r["top_ids_equal"]


def _compile_for_sm90() -> list[str]:
    """Both sampler kernels lowered to PTX for an H100/H200 (sm_90) at Qwen's vocabulary, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from agentrl.engine import sample_kernel as sk

    stats, pick = sk._build()
    pointers = {"logits": "*fp32", "temp_ptr": "*fp32", "first_ptr": "*i64", "second_ptr": "*i64", "parts": "*fp32",
                "tokens": "*i64", "out": "*fp32"}  # as the engine launches it: the uniform hashed in the kernel
    out = []
    for rows in (1, 64, 256, 512):
        splits = sk.split_sizes(rows, 151_936)[1]
        for fn, constants in ((stats, {"BLOCK": sk._BLOCK}),
                              (pick, {"BLOCK": sk._BLOCK, "SPLITS": max(triton.next_power_of_2(splits), 2),
                                      "HASH": True})):
            signature = {n: pointers.get(n) or ("constexpr" if n in constants else "i32") for n in fn.arg_names}
            kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32))
            out.append(f"{fn.__name__} rows={rows} splits={splits} ptx={len(kernel.asm['ptx'])}")
    return out


def test_split_sizes_fill_the_gpu_and_cover_the_vocabulary() -> None:
    from agentrl.engine.sample_kernel import _BLOCK, split_sizes

    for rows in (1, 7, 64, 256, 512, 4096):
        for vocab in (100, 2048, 5001, 151_936):
            chunk, splits = split_sizes(rows, vocab)
            assert chunk % _BLOCK == 0 and (splits - 1) * chunk < vocab <= splits * chunk  # no empty split
    assert split_sizes(64, 151_936)[1] >= 16 and split_sizes(512, 151_936)[1] <= 8  # small batches split more


def test_sampler_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "sm90"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])) == 8


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(_compile_for_sm90() if sys.argv[1:] == ["sm90"] else _cases()))
