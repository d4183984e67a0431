#!/usr/bin/env bash
# A small Llama-shaped model trained on the CPU (llama-1b's width, 2 layers: 383 M parameters, bf16,
# T=128, micro-batch 1, 3 steps): start-up and step times, user and system CPU time, peak memory.
# Usage: bash bench/cpu_step.sh [BINARY...] (default: target/release/ferrospeed), each run twice.
set -u
BINS=("${@:-target/release/ferrospeed}")
for round in 1 2; do
  for b in "${BINS[@]}"; do
    echo "== $b (round $round)"
    /usr/bin/time -f "user %U s, sys %S s, max RSS %M KB" "$b" bench-train --model llama-1b --layers 2 --seq-len 128 \
      --micro-batch 1 --steps 3 --warmup 0 --device cpu --precision bf16 2>&1 | grep -E "initialised|^step|user"
  done
done
