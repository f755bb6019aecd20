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

``--learner agentrl`` runs the learner path of ``agentrl run --set learner.colocate=true`` instead of the
in-process bf16 model above: the trainer's :class:`~trainer.backend.TorchBackend` (bf16 parameters with float32
master weights on a GPU, ``learner.precision``; AdamW, the PPO loss on packed micro-batches), colocated turns by
:class:`~trainer.colocate.ColocatedDevice` (retract + release, onload, step, offload + empty cache, resume), and new
weights by disk as the controller loads them (``export_hf``, then ``/update_weights_from_disk``), in both modes.

What both modes hold all the time counts against the budget first: this process's CUDA context (measured before
the learner loads) and the engine's memory besides its KV pool (weights, CUDA graphs, workspaces, its context;
measured by starting an engine with a small pool, or ``--overhead-gb``). The learner process is held to its share
(``torch.cuda.set_per_process_memory_fraction``): side by side its measured peak (reserved memory), colocated all
the rest; the engine's KV pool is sized to what is left.

Printed: seconds per iteration and per phase, KV positions each mode could afford, peak device memory used
(whole device, both processes), and the ratio colocated / side by side.

    python -m bench.colocate --shape qwen2.5-0.5b --rollouts 512 --prompt-len 256 --new-tokens 256 --iterations 2
    python -m bench.colocate --learner agentrl --shape qwen2.5-0.5b --rollouts 512 --iterations 2
    python -m bench.colocate --device cpu --shape small --rollouts 8 --prompt-len 16 --new-tokens 8 \
        --budget-gb 0.05 --overhead-gb 0.01 --learner agentrl    # a smoke run of the code paths: no memory numbers
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.client.engine import EngineClient
from agentrl.client.protocol import build_memory_request, build_update_weights_from_tensor_request
from agentrl.config.learner import BatchConfig, LearnerConfig, OptimConfig
from agentrl.engine.tiny import init_model
from bench.engine import SHAPES, launch_engine
from trainer.backend.host_stash import HostStash
from trainer.backend.torch_backend import TorchBackend, build_torch_backend
from trainer.colocate import ColocatedDevice
from trainer.losses import ppo_loss
from trainer.metrics import Phases, StepCounters
from trainer.packing import Sample, pack, plan_micro_batches

GIB = 2**30


class StepLog:
    """Per learner step, by mode: seconds, CUDA allocator retries and device allocations (cudaMalloc calls), and
    graphs torch.compile built: what makes one mode's step slower than the other's."""

    def __init__(self) -> None:
        self.mode = "warm-up"
        self.steps: dict[str, list[tuple[float, int, int, int]]] = {}

    @staticmethod
    def counters() -> StepCounters:
        return StepCounters.now()

    def record(self, seconds: float, before: StepCounters) -> None:
        self.steps.setdefault(self.mode, []).append((seconds, *StepCounters.now().since(before)))

    def line(self, mode: str) -> str:
        rows = self.steps.get(mode, [])
        return (f"{mode:>12}  learner steps: " + ", ".join(f"{s:.2f} s (retries {r}, cudaMalloc {m}, compiled {g})"
                                                         for s, r, m, g in rows))


STEPS = StepLog()


def logged_step(step: Callable[[Any, list[list[int]], int], None]) -> Callable[[Any, list[list[int]], int], float]:
    """A learner's step, timed (seconds returned) and recorded in :data:`STEPS`."""

    @functools.wraps(step)
    def run(self: Any, seqs: list[list[int]], prompt_len: int) -> float:
        start, before = time.perf_counter(), STEPS.counters()
        step(self, seqs, prompt_len)
        seconds = time.perf_counter() - start
        STEPS.record(seconds, before)
        return seconds

    return run


class Learner:
    """The model in bf16 with AdamW, trained on rollout tokens; can offload its states to the host."""

    def __init__(self, model_dir: Path, micro_batch: int, device: str = "cuda") -> None:
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).train()  # type: ignore[arg-type]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, foreach=True)
        self.micro_batch = micro_batch
        self.stash = HostStash()

    @logged_step
    def step(self, seqs: list[list[int]], prompt_len: int) -> None:
        """One AdamW step of the LM loss over every token of ``seqs`` (``prompt_len`` is not used)."""
        for i in range(0, len(seqs), self.micro_batch):
            ids = torch.tensor(seqs[i : i + self.micro_batch], device=self.device)
            loss = self.model(input_ids=ids, labels=ids).loss * len(ids) / len(seqs)
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()

    def drop_cache(self) -> None:
        """Return the step's cached activation memory to the device (the engine needs it next)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def move(self, device: str) -> None:
        """Parameters and AdamW state onto ``device`` through pinned host buffers, as the trainer's backend does."""
        where = torch.device(device)
        for name, p in self.model.named_parameters():
            p.data = self.stash.move(name, p.data, where)
        for i, state in enumerate(self.opt.state.values()):
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = self.stash.move(f"{i}.{k}", v, where)
        self.stash.wait(torch.device(self.device))
        self.drop_cache()

    def offload(self) -> None:
        self.move("cpu")

    def named(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach()) for n, p in self.model.named_parameters()]

    async def update(self, engine: Engine, s: aiohttp.ClientSession, version: int) -> None:
        """New weights by CUDA IPC handles (``/update_weights_from_tensor``)."""
        await engine.post(s, "/update_weights_from_tensor", build_update_weights_from_tensor_request(self.named(), 1))


class AgentrlLearner:
    """The learner path of ``agentrl run``: trainer's TorchBackend, the PPO loss on packed micro-batches (random
    advantages: the step's cost, not its direction, is measured), weights published to disk and loaded from there."""

    def __init__(self, model_dir: Path, tokens_per_micro_batch: int, device: str, out: Path, *, colocated: bool) -> None:
        self.cfg = LearnerConfig(model=str(model_dir), device=device, dtype="bfloat16" if device != "cpu" else "float32",
                                 colocate=colocated, optim=OptimConfig(lr=1e-5),
                                 batch=BatchConfig(max_tokens_per_micro_batch=tokens_per_micro_batch))
        self.backend: TorchBackend = build_torch_backend(self.cfg)
        transformers.utils.logging.disable_progress_bar()  # export_hf's shard bars, once per version
        self.out = out
        self.rng = np.random.default_rng(0)

    @logged_step
    def step(self, seqs: list[list[int]], prompt_len: int) -> None:
        samples = [self._sample(seq, prompt_len) for seq in seqs]
        plan = plan_micro_batches([len(x) for x in samples], self.cfg.batch.max_tokens_per_micro_batch)
        self.backend.train_step([pack(samples, bin_) for bin_ in plan], ppo_loss, self.cfg.loss)
        sync()

    def _sample(self, seq: list[int], prompt_len: int) -> Sample:
        mask = np.zeros(len(seq), dtype=np.float32)
        mask[prompt_len:] = 1.0
        return Sample(tokens=np.asarray(seq, dtype=np.int64), mask=mask, behaviour_logprobs=np.zeros(len(seq), np.float32),
                      advantage=float(self.rng.choice([-1.0, 1.0])))

    def offload(self) -> None:
        self.backend.offload()

    def publish(self, version: int) -> Path:
        dest = self.out / f"v{version}"
        self.backend.export_hf(dest)
        return dest

    async def update(self, engine: Engine, s: aiohttp.ClientSession, version: int) -> None:
        """As the learner and the controller of a run do it: write the version, then the engine loads it."""
        path = await asyncio.to_thread(self.publish, version)
        await engine.post(s, "/update_weights_from_disk", {"model_path": str(path), "weight_version": str(version)})


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Engine:
    """An ``agentrl engine`` process on the GPU and the calls the loop makes to it."""

    def __init__(self, model: Path, kv_tokens: int, args: argparse.Namespace, log: Path) -> None:
        self.proc, self.url = launch_engine(model, [
            "--device", args.device, "--max-running", str(args.rollouts), "--context-length",
            str(args.prompt_len + args.new_tokens + 8), "--set", f"engine.max_total_tokens={kv_tokens}",
            "--set", "engine.prefix_cache=false",
        ], log, timeout=600)

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
    """Samples the whole device's used memory (every process) in a background thread; ``label`` names the phase
    the loop is in, and the peak is kept per label too."""

    def __init__(self) -> None:
        self.peak = 0
        self.label = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while torch.cuda.is_available() and not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), total - free)
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


Trainer = Learner | AgentrlLearner


async def side_by_side(engine: Engine, learner: Trainer, batches: list[list[list[int]]],
                       args: argparse.Namespace, peak: PeakMemory) -> dict[str, float]:
    """As many generations and training steps as the colocated loop: generate batch 0, then train on batch i
    while generating batch i+1 (the last step trains alone)."""
    phases: dict[str, float] = {}

    def add(name: str, seconds: float) -> None:
        phases[name] = phases.get(name, 0.0) + seconds

    await warm_up(engine, batches[0])
    async with session() as s:
        start = time.perf_counter()
        peak.label = "generate + train"
        done = await engine.rollouts(s, batches[0], args.new_tokens)
        add("generate", time.perf_counter() - start)
        for version in range(1, len(batches) + 1):
            train = asyncio.create_task(asyncio.to_thread(learner.step, done, args.prompt_len))
            if version < len(batches):
                t0 = time.perf_counter()
                done = await engine.rollouts(s, batches[version], args.new_tokens)
                add("generate", time.perf_counter() - t0)
            add("train", await train)
            t0 = time.perf_counter()
            await learner.update(engine, s, version)
            add("update weights", time.perf_counter() - t0)
        phases["iteration"] = (time.perf_counter() - start) / len(batches)
    return phases


async def colocated(engine: Engine, learner: Trainer, batches: list[list[list[int]]],
                    args: argparse.Namespace, peak: PeakMemory) -> dict[str, float]:
    if isinstance(learner, AgentrlLearner):
        return await colocated_turns(engine, learner, batches, args, peak)
    phases: dict[str, float] = {}

    async def phase(name: str, coro: Any) -> Any:
        t0, peak.label = time.perf_counter(), name
        out = await coro
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return out

    await warm_up(engine, batches[0])
    async with session() as s:
        start = time.perf_counter()
        for batch in batches:
            done = await phase("generate", engine.rollouts(s, batch, args.new_tokens))
            await phase("release", engine.post(s, "/release_memory_occupation", build_memory_request()))
            await phase("learner onload", asyncio.to_thread(learner.move, args.device))
            await phase("train", asyncio.to_thread(learner.step, done, args.prompt_len))
            await phase("train", asyncio.to_thread(learner.drop_cache))
            await phase("resume", engine.post(s, "/resume_memory_occupation", build_memory_request(["weights"])))
            await phase("update weights", learner.update(engine, s, 1))
            await phase("learner offload", asyncio.to_thread(learner.move, "cpu"))
            await phase("resume", engine.post(s, "/resume_memory_occupation", build_memory_request(["kv_cache", "cuda_graph"])))
        phases["iteration"] = (time.perf_counter() - start) / len(batches)
    return phases


async def colocated_turns(engine: Engine, learner: AgentrlLearner, batches: list[list[list[int]]],
                          args: argparse.Namespace, peak: PeakMemory) -> dict[str, float]:
    """The loop of a colocated ``agentrl run``: the learner's turn (trainer.colocate), then the version by disk."""
    phases = Phases()
    await warm_up(engine, batches[0])
    async with session() as s, EngineClient(engine.url) as client:
        device = ColocatedDevice([client], learner.backend, load_wait_s=0.0)
        start = time.perf_counter()
        for version, batch in enumerate(batches, 1):
            peak.label = "generate"
            with phases("generate"):
                done = await engine.rollouts(s, batch, args.new_tokens)
            peak.label = "learner's turn (release, onload, train, offload, resume)"
            async with device.turn(version - 1, phases):
                with phases("train"):
                    await asyncio.to_thread(learner.step, done, args.prompt_len)
            peak.label = "update weights"
            with phases("update weights"):
                await learner.update(engine, s, version)
        seconds = dict(phases.seconds)
        seconds["iteration"] = (time.perf_counter() - start) / len(batches)
    return seconds


def kv_bytes_per_token(model_dir: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2)  # bf16 keys + values


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--budget-gb", type=float, default=0.0,
                   help="device memory the engine and learner may use together; 0 = the learner's peak + overhead + "
                        "half of what the rollouts' keys/values need (a GPU on which the pair is tight side by side)")
    p.add_argument("--rollouts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch (--learner bench)")
    p.add_argument("--tokens-per-micro-batch", type=int, default=8192, help="packing budget (--learner agentrl)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--overhead-gb", type=float, default=0.0,
                   help="the engine's memory besides its KV pool (weights, CUDA graphs, context); 0 = measured")
    p.add_argument("--learner", choices=["bench", "agentrl"], default="bench",
                   help="bench: an in-process bf16 model, weights by CUDA IPC; agentrl: the learner path of agentrl "
                        "run (TorchBackend, trainer.colocate, weights by disk)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run, no memory numbers")
    args = p.parse_args()
    if args.device == "cpu" and args.learner == "bench":
        p.error("--device cpu needs --learner agentrl (CPU tensors cannot be sent by CUDA IPC handle)")
    return args


def learner_footprint(learner: Trainer, batch: list[list[int]], args: argparse.Namespace) -> int:
    """Device memory the learner's step reserves in steady state; 0 on CPU.

    Two warm-up steps on ``batch``: the optimizer's state is created at the end of the first step, after the
    activations are freed, so only the second step holds both (the first step's peak is short by that state).
    """
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        learner.step([b + b[: args.new_tokens] for b in batch], args.prompt_len)
    return torch.cuda.max_memory_reserved() if args.device == "cuda" else 0


def device_used() -> int:
    """Bytes in use on the device by every process (0 without CUDA); creates this process's context first."""
    if not torch.cuda.is_available():
        return 0
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return total - free


def engine_overhead(model: Path, per_token: int, args: argparse.Namespace, tmp: Path) -> float:
    """What an engine holds on the device besides its KV pool (weights, CUDA graphs and their memory pool,
    workspaces, its CUDA context): ``--overhead-gb`` when given, else measured by starting one with a small pool."""
    if args.overhead_gb or args.device != "cuda":
        return args.overhead_gb * GIB
    small = 4 * (args.prompt_len + args.new_tokens)
    before = device_used()
    engine = Engine(model, small, args, tmp / "engine-overhead.log")
    try:
        return device_used() - before - small * per_token
    finally:
        engine.stop()


def hold_learner_to(share: float, args: argparse.Namespace) -> None:
    """Cap this process's CUDA allocator (the learner's memory) at ``share`` bytes."""
    if args.device == "cuda":
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, share / total))


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentrl-bench-colocate-"))
    model = args.model or init_model(tmp / "model", SHAPES[args.shape])
    rng = random.Random(0)
    vocab = min(SHAPES[args.shape].vocab_size, 50_000)
    batches = [[[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(args.rollouts)]
               for _ in range(args.iterations + 1)]

    baseline = device_used()  # this process's CUDA context (and anything else already on the device)
    per_token = kv_bytes_per_token(model)
    overhead = engine_overhead(model, per_token, args, tmp)
    learner: Trainer = Learner(model, args.micro_batch) if args.learner == "bench" else AgentrlLearner(
        model, args.tokens_per_micro_batch, args.device, tmp / "weights", colocated=False)
    learner_peak = learner_footprint(learner, batches[0], args)
    need = args.rollouts * (args.prompt_len + args.new_tokens)
    share = {"side by side": 1.05 * learner_peak}  # what the learner process may hold: its peak and some slack
    fixed = baseline + overhead  # held in both modes all the time
    budget = args.budget_gb * GIB or fixed + share["side by side"] + need * per_token / 2
    share["colocated"] = budget - fixed
    kv = {"side by side": int((budget - fixed - share["side by side"]) / per_token),
          "colocated": int((budget - fixed) / per_token)}
    print(f"device memory held in both modes: {baseline / GIB:.2f} GiB before the learner (CUDA context), "
          f"{overhead / GIB:.2f} GiB engine besides its KV pool ({'given' if args.overhead_gb else 'measured'})")
    results: dict[str, tuple[dict[str, float], int]] = {}
    peaks: dict[str, dict[str, int]] = {}
    for mode in ("side by side", "colocated"):
        if kv[mode] < args.prompt_len + args.new_tokens:
            print(f"{mode}: the budget leaves no room for a KV pool ({kv[mode]} positions)")
            continue
        if mode == "colocated":
            learner.offload()
        hold_learner_to(share[mode], args)
        STEPS.mode = mode
        engine = Engine(model, kv[mode], args, tmp / f"engine-{mode.replace(' ', '-')}.log")
        try:
            with PeakMemory() as peak:
                run = side_by_side if mode == "side by side" else colocated
                phases = asyncio.run(run(engine, learner, batches[1:], args, peak))
            results[mode] = (phases, peak.peak)
            peaks[mode] = peak.peaks
        finally:
            engine.stop()
    report(args, model, budget, learner_peak, need, kv, results)
    for mode, by_phase in peaks.items():
        print(f"{mode:>12}  peak device memory by phase: "
              + ", ".join(f"{label} {used / GIB:.1f} GiB" for label, used in by_phase.items()))


def report(args: argparse.Namespace, model: Path, budget: float, learner_peak: int, need: int, kv: dict[str, int],
           results: dict[str, tuple[dict[str, float], int]]) -> None:
    print(f"model={model} shape={args.shape} learner={args.learner} device={args.device} budget={budget / GIB:.1f} GiB "
          f"rollouts={args.rollouts} prompt={args.prompt_len} new={args.new_tokens} iterations={args.iterations} "
          f"learner peak={learner_peak / GIB:.1f} GiB, rollouts need {need:,} KV positions")
    for mode, (phases, peak) in results.items():
        detail = ", ".join(f"{k} {v / args.iterations:.2f}s" for k, v in phases.items() if k != "iteration")
        print(f"{mode:>12}: {phases['iteration']:.2f} s/iteration | KV pool {kv[mode]:,} positions | "
              f"peak device memory {peak / GIB:.1f} GiB (budget {budget / GIB:.1f}) | per iteration: {detail}")
    for mode in ("warm-up", *results):
        print(STEPS.line(mode))
    if len(results) == 2:
        ratio = results["side by side"][0]["iteration"] / results["colocated"][0]["iteration"]
        print(f"colocated speedup over side by side: {ratio:.2f}x")


if __name__ == "__main__":
    main()
