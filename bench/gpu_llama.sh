#!/usr/bin/env bash
# The Llama family on one GPU, in one device call: the GPU kernel tests (GQA attention, Llama blocks vs
# the CPU), then ferrospeed's Llama-3.2-1B shape (micro-batch 4, T=2048, stage 0, with the step breakdown)
# and 3B shape (micro-batch 2, stage 3) beside anchor_llama.py's torch eager, torch.compile, FSDP2 and
# DeepSpeed ZeRO-3 on the same shapes. Carried: .carry/*.xz (bench/gpu_pack.sh), .anchors/ (anchor_llama.py
# and wheels/ from fetch-wheels.sh). Set PARTS to a subset of "tests ours anchors" to run less.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
PARTS=${PARTS:-tests ours anchors}
for f in .carry/*.xz; do xz -dc "$f" > "/tmp/bin/$(basename "$f" .xz)"; chmod +x "/tmp/bin/$(basename "$f" .xz)"; done
source .carry/device-env.sh
BIN=/tmp/bin/ferrospeed
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
if [[ $PARTS == *tests* ]]; then
  LOGS=$OUT; source bench/gpu_tests.sh
  TESTS=${TESTS:-test-ferrospeed-models-gpu_kernels} gpu_tests || grep -E "panicked|relative error" "$LOGS/gpu-tests.log" | tail -20
fi
if [[ $PARTS == *ours* ]]; then
  L="--precision bf16 --device cuda --seq-len 2048 --steps ${STEPS:-6} --warmup 2"
  timeout 300 $BIN bench-train --model llama-1b --micro-batch 4 --stage 0 --profile $L 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"
  timeout 300 $BIN bench-train --model llama-3b --micro-batch 2 --stage 3 $L 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"
fi
if [[ $PARTS == *anchors* ]]; then
  source bench/anchor_env.sh && install_anchors .anchors/wheels
  cd .anchors
  ANCHOR_STEPS=4 ANCHOR_WARM=2 TORCH_CUDA_ARCH_LIST=9.0 timeout ${ANCHOR_TIMEOUT:-400} python3 anchor_llama.py llama-1b:4:e llama-1b:4:c llama-3b:2:fsdp llama-3b:2:ds3 \
    2>>"$OUT/anchors.err" | tee -a "$OUT/anchors.jsonl"
fi
