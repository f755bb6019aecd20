"""Colocated vs side-by-side on one GPU: an engine and a learner sharing a memory budget, in the same run.

One RL iteration = the engine generates a batch of rollouts, the learner takes an optimizer step on them
(AdamW, bf16), the new weights go to the engine (``/update_weights_from_tensor``: CUDA IPC handles, no copy
through the host). Within ``--budget-gb`` of device memory:

- **side by side**: both hold their memory all the time; the KV pool gets what the learner leaves, and the
  learner's step on batch i overlaps the generation of batch i+1 (async RL, one step stale);
- **colocated** (slime's ``--colocate``): the KV pool gets the whole budget; before each step the engine releases
  its KV cache and weights (``/release_memory_occupation``) and the learner moves its states back from the
  host; after it the engine resumes its weights only, loads the new ones from the learner's GPU tensors, the
  learner offloads, and only then the engine resumes its KV pool and CUDA graphs (SGLang's multi-stage resume),
  so the two never hold their peaks at once.

Both engines are warmed up (one small round of requests) before anything is timed, and the client keeps every
rollout in flight at once (no connection cap).

Printed: seconds per iteration and per phase, KV positions each mode could afford, peak device memory used
(whole device, both processes), and the ratio colocated / side by side.

    python -m bench.colocate --shape qwen2.5-0.5b --rollouts 512 --prompt-len 256 --new-tokens 256 --iterations 2
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.client.protocol import build_memory_request, build_update_weights_from_tensor_request
from agentrl.engine.tiny import init_model
from bench.engine import SHAPES, free_port

GIB = 2**30


class Learner:
    """The model in bf16 with AdamW, trained on rollout tokens; can offload its states to the host."""

    def __init__(self, model_dir: Path, micro_batch: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, foreach=True)
        self.micro_batch = micro_batch

    def step(self, seqs: list[list[int]]) -> float:
        start = time.perf_counter()
        for i in range(0, len(seqs), self.micro_batch):
            ids = torch.tensor(seqs[i : i + self.micro_batch], device="cuda")
            loss = self.model(input_ids=ids, labels=ids).loss * len(ids) / len(seqs)
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def drop_cache(self) -> None:
        """Return the step's cached activation memory to the device (the engine needs it next)."""
        torch.cuda.empty_cache()

    def move(self, device: str) -> None:
        self.model.to(device)
        for state in self.opt.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(device)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def named(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach()) for n, p in self.model.named_parameters()]


class Engine:
    """An ``agentrl engine`` process on the GPU and the calls the loop makes to it."""

    def __init__(self, model: Path, kv_tokens: int, args: argparse.Namespace, log: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "agentrl.cli", "engine", "--model", str(model), "--port", str(port),
               "--device", "cuda", "--max-running", str(args.rollouts), "--context-length",
               str(args.prompt_len + args.new_tokens + 8), "--set", f"engine.max_total_tokens={kv_tokens}",
               "--set", "engine.prefix_cache=false"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("engine did not become healthy")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    async def post(self, s: aiohttp.ClientSession, path: str, body: Any) -> Any:
        async with s.post(self.url + path, json=body) as r:
            out = await r.json(content_type=None)
            assert r.status == 200, out
            return out

    async def rollouts(self, s: aiohttp.ClientSession, prompts: list[list[int]], new: int) -> list[list[int]]:
        sampling = {"max_new_tokens": new, "ignore_eos": True, "temperature": 1.0}
        outs = await asyncio.gather(*(self.post(s, "/generate", {"input_ids": p, "sampling_params": sampling})
                                      for p in prompts))
        return [p + o["output_ids"] for p, o in zip(prompts, outs, strict=True)]


class PeakMemory:
    """Samples the whole device's used memory (every process) in a background thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=3600))


async def warm_up(engine: Engine, batch: list[list[int]]) -> None:
    async with session() as s:
        await engine.rollouts(s, batch[:64], 8)


async def side_by_side(engine: Engine, learner: Learner, batches: list[list[list[int]]], new: int) -> dict[str, float]:
    phases: dict[str, float] = {}
    await warm_up(engine, batches[0])
    async with session() as s:
        start = time.perf_counter()
        done = await engine.rollouts(s, batches[0], new)
        for batch in batches[1:]:  # train on batch i while generating batch i+1
            train = asyncio.create_task(asyncio.to_thread(learner.step, done))
            t0 = time.perf_counter()
            done = await engine.rollouts(s, batch, new)
            phases["generate"] = phases.get("generate", 0.0) + time.perf_counter() - t0
            phases["train"] = phases.get("train", 0.0) + await train
            t0 = time.perf_counter()
            await engine.post(s, "/update_weights_from_tensor", build_update_weights_from_tensor_request(learner.named(), 1))
            phases["update weights"] = phases.get("update weights", 0.0) + time.perf_counter() - t0
        phases["iteration"] = (time.perf_counter() - start) / len(batches)
    return phases


async def colocated(engine: Engine, learner: Learner, batches: list[list[list[int]]], new: int) -> dict[str, float]:
    phases: dict[str, float] = {}

    async def phase(name: str, coro: Any) -> Any:
        t0 = time.perf_counter()
        out = await coro
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return out

    await warm_up(engine, batches[0])
    async with session() as s:
        start = time.perf_counter()
        for batch in batches:
            done = await phase("generate", engine.rollouts(s, batch, new))
            await phase("release", engine.post(s, "/release_memory_occupation", build_memory_request()))
            await phase("learner onload", asyncio.to_thread(learner.move, "cuda"))
            await phase("train", asyncio.to_thread(learner.step, done))
            await phase("train", asyncio.to_thread(learner.drop_cache))
            await phase("resume", engine.post(s, "/resume_memory_occupation", build_memory_request(["weights"])))
            await phase("update weights", engine.post(s, "/update_weights_from_tensor",
                                                      build_update_weights_from_tensor_request(learner.named(), 1)))
            await phase("learner offload", asyncio.to_thread(learner.move, "cpu"))
            await phase("resume", engine.post(s, "/resume_memory_occupation", build_memory_request(["kv_cache", "cuda_graph"])))
        phases["iteration"] = (time.perf_counter() - start) / len(batches)
    return phases


def kv_bytes_per_token(model_dir: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2)  # bf16 keys + values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--budget-gb", type=float, default=0.0,
                   help="device memory the engine and learner may use together; 0 = the learner's peak + overhead + "
                        "half of what the rollouts' keys/values need (a GPU on which the pair is tight side by side)")
    p.add_argument("--rollouts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--overhead-gb", type=float, default=3.0, help="engine weights, CUDA graphs and context")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentrl-bench-colocate-"))
    model = args.model or init_model(tmp / "model", SHAPES[args.shape])
    rng = random.Random(0)
    vocab = min(SHAPES[args.shape].vocab_size, 50_000)
    batches = [[[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(args.rollouts)]
               for _ in range(args.iterations + 1)]

    learner = Learner(model, args.micro_batch)
    torch.cuda.reset_peak_memory_stats()
    learner.step([b + b[: args.new_tokens] for b in batches[0]])  # warm-up: the learner's peak memory
    learner_peak = torch.cuda.max_memory_allocated()
    per_token = kv_bytes_per_token(model)
    need = args.rollouts * (args.prompt_len + args.new_tokens)
    budget = args.budget_gb * GIB or learner_peak + args.overhead_gb * GIB + need * per_token / 2
    kv = {"side by side": int((budget - learner_peak - args.overhead_gb * GIB) / per_token),
          "colocated": int((budget - args.overhead_gb * GIB) / per_token)}
    results: dict[str, tuple[dict[str, float], int]] = {}
    for mode in ("side by side", "colocated"):
        if kv[mode] < args.prompt_len + args.new_tokens:
            print(f"{mode}: the budget leaves no room for a KV pool ({kv[mode]} positions)")
            continue
        if mode == "colocated":
            learner.move("cpu")
        engine = Engine(model, kv[mode], args, tmp / f"engine-{mode.replace(' ', '-')}.log")
        try:
            with PeakMemory() as peak:
                run = side_by_side if mode == "side by side" else colocated
                phases = asyncio.run(run(engine, learner, batches[1:], args.new_tokens))
            results[mode] = (phases, peak.peak)
        finally:
            engine.stop()
    print(f"model={model} shape={args.shape} budget={budget / GIB:.1f} GiB rollouts={args.rollouts} "
          f"prompt={args.prompt_len} new={args.new_tokens} micro_batch={args.micro_batch} iterations={args.iterations} "
          f"learner peak={learner_peak / GIB:.1f} GiB, rollouts need {need:,} KV positions")
    for mode, (phases, peak) in results.items():
        detail = ", ".join(f"{k} {v / args.iterations:.2f}s" for k, v in phases.items() if k != "iteration")
        print(f"{mode:>12}: {phases['iteration']:.2f} s/iteration | KV pool {kv[mode]:,} positions | "
              f"peak device memory {peak / GIB:.1f} GiB (budget {budget / GIB:.1f}) | per iteration: {detail}")
    if len(results) == 2:
        ratio = results["side by side"][0]["iteration"] / results["colocated"][0]["iteration"]
        print(f"colocated speedup over side by side: {ratio:.2f}x")


if __name__ == "__main__":
    main()
