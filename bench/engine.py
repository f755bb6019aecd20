"""Embedded engine throughput vs plain ``model.generate`` on the same model, in the same run.

For each concurrency C: the engine (a real ``agentrl engine`` process) gets C concurrent ``/generate``
requests (random prompts of ``--prompt-len`` tokens, ``--new-tokens`` each, ``ignore_eos``, temperature 1);
the baseline is one ``model.generate`` call on a batch of the same C prompts (sampling, ``min_new_tokens`` =
``max_new_tokens`` so every row makes the same number of tokens). Output tokens per second of each, and
their ratio, are printed side by side.

    python -m bench.engine                                   # CPU, small random model
    python -m bench.engine --shape qwen2.5-0.5b --device cuda --concurrency 256 --prompt-len 128 --new-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.bus import free_port
from agentrl.engine.tiny import TinyModelSpec, init_model

SHAPES = {
    "small": TinyModelSpec(vocab_size=2048, hidden_size=256, intermediate_size=768, layers=4, heads=8, kv_heads=2),
    "qwen2.5-0.5b": TinyModelSpec(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, layers=24, heads=14, kv_heads=2,
        max_positions=32768, rope_theta=1_000_000.0,
    ),
}


def launch_engine(model: Path, extra: list[str], log: Path, *, timeout: float = 900) -> tuple[subprocess.Popen[bytes], str]:
    """An ``agentrl engine`` process serving ``model`` on a free port with the flags ``extra``, its output in
    ``log``; returns once ``/health`` answers (the benches' one way to start an engine)."""
    port = free_port()
    cmd = [sys.executable, "-m", "agentrl.cli", "engine", "--model", str(model), "--port", str(port), *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"engine did not become healthy in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def start_engine(model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    extra = [
        "--device", args.device, "--dtype", args.dtype, "--max-running", str(max(args.concurrency)),
        "--context-length", str(max(args.prompt_len + args.new_tokens + 8, 128)),
        "--set", f"engine.prefix_cache={'true' if args.check else 'false'}",
    ]
    if args.no_cuda_graph:
        extra += ["--set", "engine.cuda_graph=false"]
    if args.no_overlap:
        extra += ["--disable-overlap-schedule"]
    if args.no_fused_ops:
        extra += ["--set", "engine.fused_ops=false"]
    if args.torch_sampling:
        extra += ["--set", "engine.sampling=torch"]
    if args.decode_attention != "triton":
        extra += ["--set", f"engine.decode_attention={args.decode_attention}"]
    return launch_engine(model, extra, log)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def client_session() -> aiohttp.ClientSession:
    """A session that keeps every request of a round in flight at once."""
    conn = aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=3600))


async def timed_round(s: aiohttp.ClientSession, url: str, batch: list[list[int]], new_tokens: int) -> float:
    """Send every prompt of ``batch`` to ``/generate`` at once (``new_tokens`` each, ``ignore_eos``); the round's
    seconds, from the first request sent to the last reply."""
    sampling = {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 1.0}

    async def one(ids: list[int]) -> int:
        async with s.post(url + "/generate", json={"input_ids": ids, "sampling_params": sampling}) as r:
            return len((await r.json())["output_ids"])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(ids) for ids in batch))
    took = time.perf_counter() - start
    assert all(c == new_tokens for c in counts), counts
    return took


async def engine_tokens_per_s(url: str, batch: list[list[int]], new_tokens: int) -> float:
    async with client_session() as s:
        await timed_round(s, url, batch, new_tokens)  # warm-up at the same concurrency
        runs = []
        for _ in range(2):  # keep the faster of two runs, as for the baseline
            before = await server_stats(s, url)
            took = await timed_round(s, url, batch, new_tokens)
            runs.append((took, before, await server_stats(s, url)))
    elapsed, before, after = min(runs, key=lambda r: r[0])
    steps = after["decode_steps"] - before["decode_steps"]
    model_ms = 1000 * (after["decode_time_s"] - before["decode_time_s"]) / max(steps, 1)
    print(f"  C={len(batch)}: {steps} decode steps, {model_ms:.2f} ms/step on the model thread, "
          f"{1000 * elapsed / max(steps, 1):.2f} ms/step wall, prefill {after['prefill_time_s'] - before['prefill_time_s']:.2f} s")
    return len(batch) * new_tokens / elapsed  # every reply had new_tokens (checked)


async def server_stats(s: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with s.get(url + "/get_server_info") as r:
        return dict((await r.json())["internal_states"][0])


async def logprob_sample(url: str, ids: list[int]) -> tuple[list[int], list[int], list[float]]:
    """One sampled continuation (temperature 1) with the engine's logprobs."""
    body = {"input_ids": ids, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 32, "ignore_eos": True, "temperature": 1.0}}
    async with aiohttp.ClientSession() as s, s.post(url + "/generate", json=body) as r:
        out = await r.json()
    return ids, out["output_ids"], [t[0] for t in out["meta_info"]["output_token_logprobs"]]


def _token_logprobs(model: Any, ids: list[int], start: int, device: torch.device) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= start, by one forward pass of ``model`` (on the host, float32)."""
    logits = model(torch.tensor([ids], device=device)).logits[0, start - 1 : -1].float()
    target = torch.tensor(ids[start:], device=device).view(-1, 1)
    return torch.log_softmax(logits, -1).gather(-1, target).view(-1).cpu()


def logprob_diff(model: object, ids: list[int], output: list[int], logprobs: list[float], device: torch.device) -> float:
    """Max |engine logprob - log_softmax(forward logits)| over the sampled tokens."""
    return float((_token_logprobs(model, ids + output, len(ids), device) - torch.tensor(logprobs)).abs().max())


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    async def call() -> Any:
        async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
            text = await r.text()
            return json.loads(text) if text else None

    return asyncio.run(call())


def _greedy(model: Any, ids: list[int], n: int, device: torch.device) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(model(torch.tensor([out], device=device)).logits[0, -1].argmax()))
    return out[len(ids) :]


def _within_noise(name: str, got: list[float], ids: list[int], start: int, model: Any, exact: Any,
                  device: torch.device) -> tuple[str, bool]:
    """The engine's logprobs of ``ids[start:]`` against a forward pass of ``model`` in its dtype. In float32,
    equal to 1e-3. In bf16/fp16 the engine's kernels round differently from HF's modules, so the bar is the
    forward pass's own rounding noise: the engine within twice the same-dtype forward's distance to ``exact``
    (a float32 copy) of the float32 logprobs, or 1e-3 of the same-dtype forward's."""
    engine = torch.tensor(got)
    same = _token_logprobs(model, ids, start, device)
    diff = float((engine - same).abs().max())
    if exact is None:
        return f"{name} vs forward (diff {diff:.1e})", diff < 1e-3
    ref = _token_logprobs(exact, ids, start, device)
    noise, err = float((same - ref).abs().max()), float((engine - ref).abs().max())
    return (f"{name} vs forward (diff {diff:.1e}; vs float32: engine {err:.1e}, same-dtype forward {noise:.1e})",
            diff < 1e-3 or err <= 2 * noise)


def check_engine(url: str, model: Any, model_dir: Path, device: torch.device, tmp: Path) -> list[tuple[str, bool]]:
    """Correctness of the serving path on this device (prefix reuse, prompt logprobs, weight update)."""
    results = []
    exact = None if model.dtype == torch.float32 else copy.deepcopy(model).float()
    ids = prompts(1, 24, min(model.config.vocab_size, 50_000), seed=7)[0]
    greedy = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    out = _post(url, "/generate", {"input_ids": ids, "sampling_params": greedy})
    results.append(("greedy output = HF greedy", out["output_ids"] == _greedy(model, ids, 12, device)))
    turn2 = ids + out["output_ids"] + [11, 12, 13]
    second = _post(url, "/generate", {"input_ids": turn2, "return_logprob": True,
                                      "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}})
    meta = second["meta_info"]
    results.append(("second turn reuses the cached prefix", meta["cached_tokens"] > 0))
    results.append(_within_noise("second-turn logprobs", [t[0] for t in meta["output_token_logprobs"]],
                                 turn2 + second["output_ids"], len(turn2), model, exact, device))
    scored = _post(url, "/generate", {"input_ids": turn2, "return_logprob": True, "logprob_start_len": 1,
                                      "sampling_params": {"max_new_tokens": 1}})
    results.append(_within_noise("prompt logprobs", [t[0] for t in scored["meta_info"]["input_token_logprobs"]],
                                 turn2, 1, model, exact, device))
    del exact
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    model.save_pretrained(tmp / "flipped")
    update = _post(url, "/update_weights_from_disk", {"model_path": str(tmp / "flipped"), "weight_version": "5"})
    after = _post(url, "/generate", {"input_ids": ids, "sampling_params": greedy})
    results.append(("weight update applied (graphs see new weights)", bool(update["success"])
                    and after["meta_info"]["output_token_versions"] == [5] * 12
                    and after["output_ids"] == _greedy(model, ids, 12, device)
                    and after["output_ids"] != out["output_ids"]))
    return results


def generate_tokens_per_s(model: object, batch: list[list[int]], new_tokens: int, device: torch.device) -> float:
    ids = torch.tensor(batch, device=device)
    kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "max_new_tokens": new_tokens,
              "min_new_tokens": new_tokens, "pad_token_id": 0}
    kwargs["attention_mask"] = torch.ones_like(ids)
    best = 0.0
    for _ in range(2):  # the first call also warms up; keep the faster
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)  # type: ignore[attr-defined]
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - start))
    return best


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The model options every engine bench takes: a checkpoint, or a random model of a shape; device; dtype."""
    p.add_argument("--model", type=Path, help="HF model directory (default: random model of --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")


def bench_model(args: argparse.Namespace, prefix: str) -> tuple[Path, Path]:
    """A scratch directory for the bench, and ``--model`` or a random model of ``--shape`` written in it."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    return tmp, args.model or init_model(tmp / "model", SHAPES[args.shape])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-generate", action="store_true", help="engine only (no model.generate baseline)")
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--decode-attention", choices=["triton", "sdpa"], default="triton", help="engine.decode_attention")
    p.add_argument("--no-overlap", action="store_true", help="the engine decodes step by step (no overlap scheduling)")
    p.add_argument("--no-fused-ops", action="store_true", help="engine.fused_ops=false (the HF modules' small ops)")
    p.add_argument("--torch-sampling", action="store_true", help="engine.sampling=torch (no fused sampler)")
    p.add_argument("--check", action="store_true",
                   help="after timing, check prefix reuse, prompt logprobs and a weight update on this device")
    args = p.parse_args()

    tmp, model_dir = bench_model(args, "agentrl-bench-")
    from transformers import AutoModelForCausalLM

    from agentrl.engine.weights import resolve_device

    device, dtype = resolve_device(args.device, args.dtype)
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size if args.model else SHAPES[args.shape].vocab_size
    batches = {c: prompts(c, args.prompt_len, min(vocab, 50_000), seed=c) for c in args.concurrency}

    model = None
    if not args.skip_generate:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    engine: dict[int, float] = {}
    baseline: dict[int, float] = {}
    proc, url = start_engine(model_dir, args, tmp / "engine.log")
    try:
        for c in args.concurrency:  # interleaved, so both see the same machine load
            engine[c] = asyncio.run(engine_tokens_per_s(url, batches[c], args.new_tokens))
            if model is not None:
                with torch.inference_mode():
                    baseline[c] = generate_tokens_per_s(model, batches[c], args.new_tokens, device)
        sample = asyncio.run(logprob_sample(url, batches[args.concurrency[0]][0]))
        if args.check and model is not None:
            with torch.inference_mode():
                diff = logprob_diff(model, *sample, device)
            print(f"engine logprobs vs one forward pass of model (same dtype): max abs diff {diff:.2e}")
            with torch.no_grad():
                for name, ok in check_engine(url, model, model_dir, device, tmp):
                    print(f"check {'PASS' if ok else 'FAIL'}: {name}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    if model is not None and not args.check:
        with torch.inference_mode():
            diff = logprob_diff(model, *sample, device)
        print(f"engine logprobs vs one forward pass of model (same dtype): max abs diff {diff:.2e}")

    print(f"model={model_dir} shape={args.shape} device={device} dtype={dtype} prompt={args.prompt_len} "
          f"new={args.new_tokens} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    print(f"{'concurrency':>11} | {'engine tok/s':>12} | {'generate tok/s':>14} | {'ratio':>6}")
    for c in args.concurrency:
        base = baseline.get(c)
        ratio = f"{engine[c] / base:6.2f}" if base else "     -"
        print(f"{c:>11} | {engine[c]:>12.1f} | {base if base else float('nan'):>14.1f} | {ratio}")


if __name__ == "__main__":
    main()
