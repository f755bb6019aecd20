"""Weight sync by torch.distributed broadcast vs the disk path, same model, same engine, same run.

This process is the learner (a Hugging Face model on ``--device``); a real ``agentrl engine`` process serves the
same model on ``--engine-device``; a :class:`~agentrl.controller.weights_sync.WeightsSync` plays the controller.
Each round changes every weight a little (a "training step") and times, from the learner's first action until
the engine has answered that it serves the new version:

- disk: ``DiskWeightSink.publish`` (the learner writes the version's safetensors, tokenizer and sha256) then the
  controller's ``/update_weights_from_disk`` (the engine reads the files and copies them in);
- broadcast: ``BroadcastWeightSink.broadcast`` (probe the engine, announce, broadcast every tensor over the
  group: NCCL between two GPUs, or gloo through host memory) while the controller's
  ``/update_weights_from_distributed`` makes the engine receive and copy them in. Forming the group (once, at the
  first version) is timed apart.

After the last broadcast round the engine's logprobs of a fixed continuation are compared with the learner's
own forward pass. Prints the median of each path and the ratio.

    python bench/weight_sync.py                                                  # CPU, small model, gloo
    python bench/weight_sync.py --shape qwen2.5-0.5b --device cuda:0 --engine-device cuda:1 --backend nccl
    python bench/weight_sync.py --shape qwen2.5-0.5b --device cuda --engine-device cuda --backend gloo  # 1 GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.client.engine import EngineClient
from agentrl.config.engine import EngineClientConfig
from agentrl.controller.weights_sync import WeightsSync
from agentrl.engine.tiny import TinyModelSpec, init_model
from agentrl.messages import WeightUpdate
from bench.engine import launch_engine
from trainer.weight_broadcast import BroadcastWeightSink, EngineGroup, hf_tensors
from trainer.weights import DiskWeightSink

SHAPES = {
    "small": TinyModelSpec(vocab_size=2048, hidden_size=256, intermediate_size=768, layers=4, heads=8, kv_heads=2),
    "qwen2.5-0.5b": TinyModelSpec(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, layers=24, heads=14, kv_heads=2,
        max_positions=32768, rope_theta=1_000_000.0,
    ),
}
PROMPT = [17, 42, 99, 7, 250, 31]
CONTINUATION = [12, 300, 45, 46, 201, 9, 77, 3]


def start_engine(model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return launch_engine(model, [
        "--device", args.engine_device, "--dtype", args.dtype, "--max-running", "4", "--context-length", "256",
        "--set", "engine.cuda_graph_batch_sizes=[1, 2, 4]", "--set", "engine.weight_group_timeout_s=120",
    ], log, timeout=600)


def step(model: Any, k: int) -> None:
    """A stand-in for an optimizer step: every weight moves by its own random amount (no two versions alike)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(k)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype) * 2e-3)


def continuation_logprobs(model: Any) -> torch.Tensor:
    ids = torch.tensor([PROMPT + CONTINUATION], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    pos = torch.arange(len(PROMPT) - 1, len(PROMPT) + len(CONTINUATION) - 1)
    return logp[pos.to(logp.device), torch.tensor(CONTINUATION, device=logp.device)].cpu()


async def engine_logprobs(client: EngineClient) -> tuple[torch.Tensor, str]:
    out = await client.request("POST", "/generate", {
        "input_ids": PROMPT + CONTINUATION, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 0}})
    meta = out["meta_info"]
    return torch.tensor([t[0] for t in meta["input_token_logprobs"][len(PROMPT):]]), meta["weight_version"]


async def disk_rounds(model: Any, sink: DiskWeightSink, sync: WeightsSync, versions: range) -> list[dict[str, float]]:
    rows = []
    for v in versions:
        step(model, v)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        update = await sink.publish(v, model.save_pretrained)
        t1 = time.perf_counter()
        assert await sync.load(update) == [] and sync.sources
        t2 = time.perf_counter()
        rows.append({"version": v, "write_s": t1 - t0, "load_s": t2 - t1, "total_s": t2 - t0})
        print(f"  disk      v{v}: learner writes {t1 - t0:6.3f} s + engine loads {t2 - t1:6.3f} s = {t2 - t0:6.3f} s",
              flush=True)
    return rows


async def broadcast_rounds(model: Any, sink: BroadcastWeightSink, sync: WeightsSync, loads: list[Any],
                           versions: range) -> list[dict[str, float]]:
    rows = []
    for v in versions:
        step(model, v)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        update = await sink.broadcast(v)
        await asyncio.gather(*loads)
        loads.clear()
        t1 = time.perf_counter()
        assert update is not None and set(sync.sources.values()) == {"distributed"}, sync.sources
        rows.append({"version": v, "total_s": t1 - t0})
        print(f"  broadcast v{v}: {t1 - t0:6.3f} s", flush=True)
    return rows


async def run(args: argparse.Namespace, model_dir: Path, url: str, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    client = EngineClient(url, EngineClientConfig(max_attempts=1, request_timeout_s=600))
    sync = WeightsSync([client])
    disk = DiskWeightSink(work / "weights", keep=2, base_model=model_dir)
    loads: list[Any] = []

    async def announce(update: WeightUpdate) -> None:  # the controller reacts to the announcement
        loads.append(asyncio.create_task(sync.load(update)))

    group = EngineGroup([client], address="127.0.0.1", port=0, backend=args.backend, group_name="bench",
                        timeout_s=120.0)
    sink = BroadcastWeightSink(disk, hf_tensors(SimpleNamespace(model=model)), group, announce)
    n = args.rounds
    print(f"disk path ({n} rounds + 1 warm-up):", flush=True)
    disk_rows = (await disk_rounds(model, disk, sync, range(1, n + 2)))[1:]
    t0 = time.perf_counter()
    formed = await group.ready()
    formation = time.perf_counter() - t0
    print(f"group formed in {formation:.3f} s ({args.backend}, {formed.name if formed else 'FAILED'})", flush=True)
    print(f"broadcast path ({n} rounds + 1 warm-up):", flush=True)
    bcast_rows = (await broadcast_rounds(model, sink, sync, loads, range(n + 2, 2 * n + 2)))[1:]
    before = continuation_logprobs(model)  # the last round's version must show: the check below can tell them apart
    bcast_rows += await broadcast_rounds(model, sink, sync, loads, range(2 * n + 2, 2 * n + 3))
    engine_lp, served = await engine_logprobs(client)
    learner_lp = continuation_logprobs(model)
    diff = float((engine_lp - learner_lp).abs().max())
    moved = float((before - learner_lp).abs().max())
    await group.dissolve()
    await client.close()
    nbytes = sum(t.numel() * t.element_size() for _, t in hf_tensors(SimpleNamespace(model=model))())
    disk_s = statistics.median(r["total_s"] for r in disk_rows)
    bcast_s = statistics.median(r["total_s"] for r in bcast_rows)
    return {"shape": args.shape, "dtype": args.dtype, "backend": args.backend, "device": args.device,
            "engine_device": args.engine_device, "bytes": nbytes, "disk": disk_rows, "broadcast": bcast_rows,
            "formation_s": formation, "disk_median_s": disk_s, "broadcast_median_s": bcast_s,
            "speedup": disk_s / bcast_s, "served_version": served, "max_logprob_diff": diff,
            "last_round_logprob_change": moved}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default="cpu", help="the learner's device")
    p.add_argument("--engine-device", default="cpu", help="the engine's device (another GPU for NCCL)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on GPU, else fp32")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    with tempfile.TemporaryDirectory(prefix="agentrl-bench-sync-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model_dir = init_model(work / "model", SHAPES[args.shape])
        print(f"model {args.shape} written in {time.perf_counter() - t0:.1f} s", flush=True)
        proc, url = start_engine(model_dir, args, work / "engine.log")
        try:
            out = asyncio.run(run(args, model_dir, url, work))
        finally:
            proc.terminate()
            proc.wait(30)
            if os.environ.get("BENCH_ENGINE_LOG"):
                print((work / "engine.log").read_text()[-4000:])
    gib = out["bytes"] / 2**30
    print(f"\n{args.shape} {args.dtype} ({gib:.2f} GiB), learner on {args.device}, engine on {args.engine_device}")
    print(f"  disk path (write + load), median: {out['disk_median_s']:.3f} s")
    print(f"  broadcast ({args.backend}), median:       {out['broadcast_median_s']:.3f} s "
          f"(group formation once: {out['formation_s']:.3f} s)")
    print(f"  broadcast vs disk: {out['speedup']:.2f}x faster; engine serves v{out['served_version']}, "
          f"max |logprob - learner's| = {out['max_logprob_diff']:.2e} (the last round moved them by "
          f"{out['last_round_logprob_change']:.2e})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
