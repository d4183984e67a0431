#!/usr/bin/env bash
# A short device call between full runs: the GPU kernel tests and the GPT-2 124M step (kept and recomputed
# activations, stage 3), with the CUDA-event breakdown. Same carried files as bench/gpu_run.sh.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
for f in .carry/*.xz; do xz -dc "$f" > "/tmp/bin/$(basename "$f" .xz)"; chmod +x "/tmp/bin/$(basename "$f" .xz)"; done
source .carry/device-env.sh
BIN=/tmp/bin/ferrospeed
LOGS=$OUT; source bench/gpu_tests.sh
TESTS=${TESTS:-test-ferrospeed-models-gpu_kernels} gpu_tests || tail -30 "$LOGS/gpu-tests.log"
S124="--model gpt2-124m --micro-batch 16 --precision bf16 --device cuda --steps 8 --warmup 3"
for extra in "--stage 0 --profile" "--stage 0 --checkpointing --profile" "--stage 3 --checkpointing"; do
  timeout 240 $BIN bench-train $S124 $extra 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"
done
