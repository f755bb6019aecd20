"""Megatron-core backend vs torch backend on the same weights and the same ragged packed RL batch.

For each model shape, in one process (TP = PP = DP = 1): a random Qwen2 model is written as an HF checkpoint,
both backends load it, and the script prints JSON rows:

- ``numerics``: per-token logprobs of one packed micro-batch, Megatron (bf16 params on GPU) and torch (fp32
  params under bf16 autocast on GPU) each against torch in float32, and against each other: max and mean
  |Δ| over trained tokens; a second ``numerics`` row (``torch_bf16_master_vs_*``) scores the same
  micro-batch with the torch backend's bf16 parameters and fp32 master weights, before that row's timing;
- ``first_step``: a Megatron train step on that micro-batch whose behaviour logprobs are (a) torch's scores
  of the initial weights, (b) Megatron's own scores right before the step: the importance ratio
  (``policy/ratio_mean``), approximate KL and logprob gap of the step;
- ``throughput``: ``--steps`` timed optimizer steps (after ``--warmup``) of each backend over the
  ``bench/learner.py`` workload (ragged RL batch, first-fit-decreasing packing under ``--budget`` tokens):
  real tokens per second, peak device memory, and each one's ratio to the torch backend's autocast row
  (``torch``: ``learner.precision: autocast``; ``torch-bf16-master``: ``learner.precision: bf16_master``, on
  CPU in bf16 too while the other rows compute in float32 there; ``--unfused``: torch (autocast) and Megatron
  also with ``learner.fused_kernels: false``).

    python bench/learner_megatron.py                                     # CPU, small shape, fp32
    python bench/learner_megatron.py --seqs 8 --max-len 128 --budget 512 # CPU, seconds
    python bench/learner_megatron.py --device cuda --shapes qwen2.5-0.5b qwen2.5-1.5b --seqs 128 \\
        --max-len 4096 --budget 16384
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import msgspec
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.config.learner import LearnerConfig, LossConfig
from bench.learner import SHAPES, hf_baseline, rl_batch, uniform_batch
from trainer.backend.base import TrainBackend
from trainer.backend.megatron.driver import MegatronBackend
from trainer.backend.megatron.engine import MegatronEngine
from trainer.backend.megatron.launch import free_port
from trainer.backend.megatron.parallel import Rank, init_parallel
from trainer.backend.torch_backend import build_torch_backend
from trainer.losses import ppo_loss
from trainer.packing import MicroBatch, Sample, pack, plan_micro_batches

ALL_SHAPES: dict[str, dict[str, Any]] = {name: cast(dict[str, Any], shape) for name, shape in SHAPES.items()}


def write_model(shape: str, out: Path, device: str) -> None:
    torch.manual_seed(0)
    cfg = Qwen2Config(**ALL_SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=True)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
        model.to(torch.bfloat16 if device == "cuda" else torch.float32)  # type: ignore[arg-type]
    model.save_pretrained(str(out))
    del model


def learner_config(model: Path, args: argparse.Namespace, fused: bool = True,
                   precision: str = "autocast") -> LearnerConfig:
    """The megatron backend's config; the torch backend reads ``precision`` (bf16_master: in bf16 on CPU too)."""
    dtype = "bfloat16" if precision == "bf16_master" else "auto"
    return msgspec.convert({"model": str(model), "device": args.device, "backend": "megatron", "dtype": dtype,
                            "optim": {"lr": 1e-6}, "fused_kernels": fused, "precision": precision}, LearnerConfig)


def build_row(name: str, path: Path, args: argparse.Namespace, rank: Rank) -> TrainBackend:
    """``torch``, ``torch-bf16-master``, ``megatron``, each with ``-unfused`` for fused_kernels off."""
    precision = "bf16_master" if "bf16-master" in name else "autocast"
    cfg = learner_config(path, args, fused=not name.endswith("-unfused"), precision=precision)
    return build_torch_backend(cfg) if name.startswith("torch") else MegatronBackend(MegatronEngine(rank, cfg))


def masked_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    d = (a - b).abs()[mask > 0]
    return {"max": float(d.max()), "mean": float(d.mean())}


def numerics(meg: TrainBackend, torch_be: Any, mb: MicroBatch) -> dict[str, Any]:
    """``torch_be`` computes under autocast (float32 parameters): without it, it scores in float32."""
    lp_meg = meg.logprobs(mb)
    lp_torch = torch_be.logprobs(mb)
    bf16 = torch_be.bf16
    torch_be.bf16 = False
    lp_fp32 = torch_be.logprobs(mb)
    torch_be.bf16 = bf16
    return {"megatron_vs_torch": masked_gap(lp_meg, lp_torch, mb.mask),
            "megatron_vs_torch_fp32": masked_gap(lp_meg, lp_fp32, mb.mask),
            "torch_vs_torch_fp32": masked_gap(lp_torch, lp_fp32, mb.mask),
            "_lp": {"megatron": lp_meg, "torch": lp_torch, "torch_fp32": lp_fp32}}


def master_numerics(backend: TrainBackend, mb: MicroBatch, lps: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The bf16-master row's scores of the initial weights (before its timed steps) against the others'."""
    lp = backend.logprobs(mb)
    return {f"torch_bf16_master_vs_{name}": masked_gap(lp, other, mb.mask) for name, other in lps.items()}


def first_step(meg: TrainBackend, mb: MicroBatch, behaviour: torch.Tensor, label: str) -> dict[str, Any]:
    mb.behaviour_logprobs = behaviour.clone()
    result = meg.train_step([mb], ppo_loss, LossConfig(proximal=False))
    return {"behaviour": label, "ratio_mean": result.metrics["policy/ratio_mean"],
            "approx_kl": result.metrics["policy/approx_kl"], "logprob_diff_mean": result.logprob_diff_mean,
            "logprob_diff_max": result.logprob_diff_max, "grad_norm": result.grad_norm}


def timed(backend: TrainBackend, mbs: list[MicroBatch], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        backend.train_step(mbs, ppo_loss, LossConfig())
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        backend.train_step(mbs, ppo_loss, LossConfig())
    sync()
    return (time.perf_counter() - start) / steps


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(row: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)


def run_shape(shape: str, rank: Rank, args: argparse.Namespace, tmp: Path) -> None:
    path = tmp / shape
    write_model(shape, path, args.device)
    lc = learner_config(path, args)
    samples: list[Sample] = rl_batch(args.seqs, args.max_len, ALL_SHAPES[shape]["vocab_size"], seed=0)
    plan = plan_micro_batches([len(s) for s in samples], args.budget)
    mbs = [pack(samples, ids) for ids in plan]
    meg = MegatronBackend(MegatronEngine(rank, lc))
    torch_be = build_torch_backend(lc)
    num = numerics(meg, torch_be, mbs[0])
    emit({"shape": shape, "row": "numerics", "tokens": mbs[0].num_tokens, **num})
    lp_torch = num["_lp"]["torch"]  # torch's scores of the initial weights, as if an engine had sampled them
    emit({"shape": shape, "row": "first_step", **first_step(meg, pack(samples, plan[0]), lp_torch, "torch")})
    own = meg.logprobs(mbs[0])  # the learner's own policy, right before its step: the ratio must be 1
    emit({"shape": shape, "row": "first_step", **first_step(meg, pack(samples, plan[0]), own, "megatron")})
    del meg, torch_be
    free()
    real = sum(len(s) for s in samples)
    times = {}
    names = ("torch", "torch-bf16-master", "megatron") + (("torch-unfused", "megatron-unfused") if args.unfused else ())
    for name in names:  # one backend on the GPU at a time (a 1.5B pair does not fit beside the other's activations)
        backend = build_row(name, path, args, rank)
        if name == "torch-bf16-master":
            emit({"shape": shape, "row": "numerics", **master_numerics(backend, mbs[0], num["_lp"])})
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times[name] = timed(backend, mbs, args.steps, args.warmup)
        if args.profile:
            profile(backend, mbs, f"{shape}/{name}", args.profile)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit({"shape": shape, "row": "throughput", "backend": name, "micro_batches": len(mbs), "real_tokens": real,
              "seconds_per_step": times[name], "tokens_per_s": real / times[name], "peak_mem_gb": peak})
        del backend
        free()
    emit({"shape": shape, "row": "ratio", **{f"{n}_over_torch": times["torch"] / times[n] for n in names[1:]}})
    if args.plain:
        plain_baseline(shape, args, {n: real / t for n, t in times.items()})


def plain_baseline(shape: str, args: argparse.Namespace, tokens_per_s: dict[str, float]) -> None:
    """Plain transformers on uniform ``8 x --plain-len`` rows in this process, after the backends (the issue's
    baseline): its row, then each backend's real tokens/s on the ragged batch over the baseline's."""
    vocab = int(ALL_SHAPES[shape]["vocab_size"])
    row = hf_baseline(argparse.Namespace(device=args.device, steps=args.steps, warmup=args.warmup),
                      uniform_batch(vocab, args.plain_len), shape)
    free()
    emit({"shape": shape, "row": "ratio_to_plain", "plain_tokens_per_s": row["tokens_per_s"],
          **{f"{n}_over_plain": t / row["tokens_per_s"] for n, t in tokens_per_s.items()}})


def profile(backend: TrainBackend, mbs: list[MicroBatch], label: str, rows: int) -> None:
    """One more train step under torch.profiler: the ``rows`` ops with the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        backend.train_step(mbs, ppo_loss, LossConfig())
        sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"== profile {label}", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(ALL_SHAPES), default=["small"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--unfused", action="store_true",
                   help="also time both backends with learner.fused_kernels = false")
    p.add_argument("--plain", action="store_true",
                   help="also plain transformers training on uniform 8 x --plain-len rows, same process, and ratios")
    p.add_argument("--plain-len", type=int, default=2048)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one more step of each backend and print its top ROWS ops")
    args = p.parse_args()
    lc = LearnerConfig()
    rank = init_parallel(lc.megatron, 0, 1, use_cuda=args.device == "cuda", port=free_port())
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            run_shape(shape, rank, args, Path(tmp))


if __name__ == "__main__":
    main()
