"""Learner train-step throughput: padding-free packing vs padded micro-batches, same ragged RL-like batch.

Both modes run the same :class:`trainer.backend.TorchBackend.train_step` (PPO loss, AdamW, grad clipping) on
the same sequences under the same token budget per micro-batch:

- ``packed``: first-fit-decreasing bins of at most ``--budget`` real tokens, one row each, position ids reset
  per sequence, ``sdpa_varlen`` attention (per-sequence causal SDPA);
- ``padded``: the baseline most trainers use — sequences in batch order, each micro-batch padded to its
  longest sequence with an attention mask, as many sequences as fit ``rows × longest <= --budget``, plain
  ``sdpa``.

Throughput counts real (non-padding) tokens per second of a whole optimizer step. ``--uniform`` adds the
packed path on uniform ``8 × 2048`` sequences, the shape of the plain-transformers baseline in issue 5.
Model TFLOP/s = 6 · parameters · tokens / time (attention FLOPs not counted).

    python bench/learner.py                                  # CPU, small random model
    python bench/learner.py --shape qwen2.5-0.5b --device cuda --seqs 128 --max-len 4096 --budget 16384 --uniform
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentrl.config.learner import LossConfig, OptimConfig
from trainer.backend.torch_backend import TorchBackend
from trainer.losses import ppo_loss
from trainer.packing import MicroBatch, Sample, pack, plan_micro_batches, token_logprobs

SHAPES = {
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1_000_000.0),
}


class PaddedBackend(TorchBackend):
    """The baseline: each micro-batch is unpacked into a right-padded ``[rows, longest]`` batch with a mask."""

    def _forward(self, model, mb, *, with_entropy=False, entropy_grad=False):  # type: ignore[no-untyped-def]
        rows = torch.split(mb.input_ids[0], mb.seq_lens)
        width = max(mb.seq_lens)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=mb.input_ids.device)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            attn[i, : len(r)] = 1
        with self._autocast():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        starts = torch.zeros(width, dtype=torch.bool, device=ids.device)
        starts[0] = True
        lps, ents = [], []
        for i, n in enumerate(mb.seq_lens):
            lp, ent = token_logprobs(logits[i, :n], ids[i, :n], starts[:n], with_entropy=with_entropy,
                                     entropy_grad=entropy_grad)
            lps.append(lp)
            ents.append(ent)
        return torch.cat(lps), (torch.cat(ents) if with_entropy else None)  # type: ignore[arg-type]


def rl_batch(n: int, max_len: int, vocab: int, seed: int) -> list[Sample]:
    """Ragged RL-like sequences: prompts of max_len/16..max_len/4, long-tailed (log-normal) responses."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = int(rng.integers(max_len // 16, max_len // 4))
        resp = int(min(max_len - prompt, max(1, rng.lognormal(math.log(max_len / 5), 0.9))))
        total = prompt + resp
        mask = np.r_[np.zeros(prompt), np.ones(resp)].astype(np.float32)
        out.append(Sample(tokens=rng.integers(0, vocab, total), mask=mask,
                          behaviour_logprobs=np.where(mask > 0, -math.log(vocab), 0).astype(np.float32),
                          advantage=float(rng.standard_normal())))
    return out


def padded_plan(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Sequences in order; a micro-batch grows while rows × longest stays within the budget."""
    plan: list[list[int]] = [[]]
    longest = 0
    for i, n in enumerate(lengths):
        if plan[-1] and (len(plan[-1]) + 1) * max(longest, n) > budget:
            plan.append([])
            longest = 0
        plan[-1].append(i)
        longest = max(longest, n)
    return plan


def timed_steps(backend: TorchBackend, batches: list[list[MicroBatch]], steps: int, warmup: int) -> float:
    """Seconds per optimizer step over ``steps`` timed steps after ``warmup``; step i trains batch i (mod the
    number of batches: one batch is replayed, ``warmup + steps`` batches are each trained once)."""
    cfg = LossConfig()
    for i in range(warmup):
        backend.train_step(batches[i % len(batches)], ppo_loss, cfg)
    sync(backend.device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        backend.train_step(batches[i % len(batches)], ppo_loss, cfg)
    sync(backend.device)
    return (time.perf_counter() - start) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def uniform_batch(vocab: int, length: int, rows: int = 8) -> list[Sample]:
    """``rows`` random sequences of ``length`` tokens, every token but the first trained (the baseline's shape)."""
    rng = np.random.default_rng(1)
    return [Sample(tokens=rng.integers(0, vocab, length), mask=np.r_[0, np.ones(length - 1)].astype(np.float32),
                   behaviour_logprobs=np.zeros(length, np.float32), advantage=1.0) for _ in range(rows)]


def hf_baseline(args: argparse.Namespace, samples: list[Sample], shape: str | None = None) -> dict[str, float]:
    """Plain transformers training on the same uniform rows: ``model(ids, labels=ids).loss``, under bf16
    autocast on a GPU (float32 weights and AdamW state); ``shape`` defaults to ``args.shape``."""
    device = torch.device(args.device)
    model = make_model(shape or args.shape, "sdpa", device)
    ids = torch.stack([torch.as_tensor(s.tokens, dtype=torch.long) for s in samples]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    real = int(ids.numel())
    params = sum(p.numel() for p in model.parameters())
    row = {"mode": f"hf-labels-loss-{len(samples)}x{ids.shape[1]}", "micro_batches": 1, "real_tokens": real,
           "padded_tokens": real, "seconds_per_step": seconds, "tokens_per_s": real / seconds,
           "model_tflops": 6 * params * real / seconds / 1e12}
    print(json.dumps(row), flush=True)
    return row


def make_model(shape: str, attn: str, device: torch.device) -> Qwen2ForCausalLM:
    import trainer.backend.varlen  # noqa: F401  (registers sdpa_varlen)

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=True,
                      attn_implementation=attn)
    with torch.device(device):  # initialise where it will train (a 0.5B init on CPU takes a while)
        return Qwen2ForCausalLM(cfg).float()


Batch = tuple[list[Sample], list[list[int]]]  # sequences and their micro-batch plan


def run_mode(name: str, args: argparse.Namespace, batches: list[Batch]) -> dict[str, float]:
    cls = PaddedBackend if name == "padded" else TorchBackend
    device = torch.device(args.device)
    model = make_model(args.shape, "sdpa" if name in ("padded", "packed-mask") else "sdpa_varlen", device)
    pure_bf16 = "pure-bf16" in name
    if pure_bf16:  # attribution only: bf16 weights and optimizer state, no autocast
        model = model.to(torch.bfloat16)
    backend = cls(model, OptimConfig(lr=1e-6), device=device, bf16=device.type == "cuda" and not pure_bf16,
                  gradient_checkpointing=args.checkpointing, track_entropy="no-entropy" not in name)
    packed = [[pack(samples, ids) for ids in plan] for samples, plan in batches]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_steps(backend, packed, args.steps, args.warmup)
    timed = [batches[i % len(batches)] for i in range(args.warmup, args.warmup + args.steps)]
    real = sum(len(s) for samples, _ in timed for s in samples) // len(timed)  # per step
    slots = sum(len(ids) * max(len(samples[i]) for i in ids) for samples, plan in timed
                for ids in plan) // len(timed) if name == "padded" else real
    plan = timed[0][1]
    params = sum(p.numel() for p in model.parameters())
    row = {"mode": name, "micro_batches": len(plan), "real_tokens": real, "padded_tokens": slots,
           "seconds_per_step": seconds, "tokens_per_s": real / seconds, "model_tflops": 6 * params * real / seconds / 1e12}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(row), flush=True)
    del backend, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seqs", type=int, default=32, help="sequences in the RL batch")
    p.add_argument("--max-len", type=int, default=1024, help="longest prompt + response")
    p.add_argument("--budget", type=int, default=4096, help="tokens per micro-batch (padded: rows × longest)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--uniform", action="store_true", help="also packed on uniform 8 x --uniform-len (baseline shape)")
    p.add_argument("--uniform-len", type=int, default=2048)
    p.add_argument("--only-uniform", action="store_true", help="skip the ragged packed/padded comparison")
    p.add_argument("--variants", action="store_true",
                   help="uniform also without the entropy metric, and with pure bf16 weights (attribution)")
    p.add_argument("--fresh", action="store_true",
                   help="a new ragged batch (new lengths) every step, as RL training sees, instead of one replayed")
    p.add_argument("--mask-mode", action="store_true", help="also packed with plain sdpa (T x T block mask)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vocab = int(SHAPES[args.shape]["vocab_size"])  # type: ignore[call-overload]
    ragged = [rl_batch(args.seqs, args.max_len, vocab, seed=i)
              for i in range(args.warmup + args.steps if args.fresh else 1)]
    lengths = [len(s) for samples in ragged for s in samples]

    def plans(plan: Callable[[Sequence[int], int], list[list[int]]]) -> list[Batch]:
        return [(samples, plan([len(s) for s in samples], args.budget)) for samples in ragged]

    rows = [] if args.only_uniform else [
        run_mode("packed", args, plans(plan_micro_batches)),
        run_mode("padded", args, plans(padded_plan)),
    ]
    if args.mask_mode:
        rows.append(run_mode("packed-mask", args, plans(plan_micro_batches)))
    if args.uniform:
        n = args.uniform_len
        uniform = uniform_batch(vocab, n)
        plan = plan_micro_batches([n] * 8, max(args.budget, 8 * n))
        for variant in ["packed", *(["packed-no-entropy", "packed-no-entropy-pure-bf16"] if args.variants else [])]:
            row = run_mode(variant, args, [(uniform, plan)])
            rows.append({**row, "mode": f"{variant}-uniform-8x{n}"})
        rows.append(hf_baseline(args, uniform))
    print(f"shape={args.shape} device={args.device} seqs={args.seqs} max_len={args.max_len} budget={args.budget} "
          f"lengths: mean={np.mean(lengths):.0f} max={max(lengths)} total={sum(lengths) // len(ragged)} per batch, "
          + (f"a new batch every step ({len(ragged)})" if args.fresh else "one batch replayed"))
    print(f"{'mode':24} {'mbs':>4} {'real tok':>9} {'slots':>9} {'s/step':>8} {'tok/s':>10} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['mode']:24} {r['micro_batches']:>4} {r['real_tokens']:>9} {r['padded_tokens']:>9} "
              f"{r['seconds_per_step']:>8.3f} {r['tokens_per_s']:>10.0f} {r['model_tflops']:>8.2f}")
    if not args.only_uniform:
        print(f"packed / padded tokens/s: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
