#!/usr/bin/env bash
# Optimizer offload on one GPU, in one device call per model: the GPU engine tests (offloaded state bitwise
# against device state), then ferrospeed's Llama shape with the optimizer state on the CPU (and at ratio 0.5)
# beside anchor_llama.py's DeepSpeed ZeRO-3 + CPU optimizer and FSDP2 CPU offload on the same shape, bf16,
# T=2048, micro-batch 2, accumulation 1, no activation checkpointing (as the anchors).
# Carried: .carry/*.xz (bench/gpu_pack.sh), .anchors/ (anchor_llama.py and wheels/).
# PARTS: a subset of "tests ours anchors"; MODEL: llama-3b (anchors ds3-opt, fsdp-cpu) or llama-8b
# (ratio 1.0 and 0.5; anchor ds3-opt0.5).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
PARTS=${PARTS:-tests ours anchors}
MODEL=${MODEL:-llama-3b}
for f in .carry/*.xz; do xz -dc "$f" > "/tmp/bin/$(basename "$f" .xz)"; chmod +x "/tmp/bin/$(basename "$f" .xz)"; done
source .carry/device-env.sh
BIN=/tmp/bin/ferrospeed
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2; df -h /tmp | tail -1; } | tee "$OUT/env.txt"
if [[ $PARTS == *tests* ]]; then
  LOGS=$OUT; source bench/gpu_tests.sh
  TESTS=${TESTS:-test-ferrospeed-models-gpu_engine} gpu_tests || grep -E "panicked|bitwise" "$LOGS/gpu-tests.log" | tail -30
  grep -E "vs device state" "$LOGS/gpu-tests.log" | head -40 > "$OUT/offload-tests.txt"
fi
L="--model $MODEL --micro-batch 2 --precision bf16 --device cuda --seq-len 2048 --stage 1 --steps ${STEPS:-5} --warmup 2"
if [[ $PARTS == *ours* ]]; then
  RATIOS=${RATIOS:-1.0}
  for r in $RATIOS; do
    /usr/bin/time -v timeout 300 $BIN bench-train $L --offload-optimizer cpu --offload-ratio $r ${PROFILE:+--profile} 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"
    grep -E "Maximum resident" "$OUT/bench.err" | tail -1
  done
fi
if [[ $PARTS == *anchors* ]]; then
  source bench/anchor_env.sh && install_anchors .anchors/wheels
  cd .anchors
  ANCHOR_STEPS=4 ANCHOR_WARM=2 TORCH_CUDA_ARCH_LIST=9.0 timeout ${ANCHOR_TIMEOUT:-400} python3 anchor_llama.py ${ANCHORS:-$MODEL:2:ds3-opt $MODEL:2:fsdp-cpu} \
    2>>"$OUT/anchors.err" | tee -a "$OUT/anchors.jsonl"
  tail -5 "$OUT/anchors.err"
fi
