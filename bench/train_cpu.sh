#!/usr/bin/env bash
# CPU training throughput of the README's example (examples/tiny.toml) at world size 1 and 2.
# Usage: bash bench/train_cpu.sh [OUT.md] [STEPS]   (default: bench/results/train_cpu-<date>.md, 150 steps)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrospeed-cli >/dev/null
bin=target/release/ferrospeed
out=${1:-bench/results/train_cpu-$(date +%F).md}
steps=${2:-150}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo "# CPU training throughput, examples/tiny.toml (GPT 2 layers, d 128, seq 64, global batch 16)"
  echo
  echo "- date: $(date -u '+%F %T UTC')"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- command: \`$bin launch --nproc-per-node W train --config examples/tiny.toml --set train.steps=$steps --set train.warmup=10 [--set train.activation_checkpointing=true]\`"
  echo "- tokens/s is the whole run's (first step included), from summary.json; ranks split the cores (RAYON_NUM_THREADS = cores / ranks)"
  echo
  echo "| world size | activation checkpointing | steps | seconds | tokens/s | final loss |"
  echo "|---:|---|---:|---:|---:|---:|"
  for w in 1 2; do
    for ckpt in false true; do
      dir="$tmp/w$w-$ckpt"
      "$bin" launch --nproc-per-node "$w" train --config examples/tiny.toml --set train.steps="$steps" \
        --set train.warmup=10 --set train.sample_tokens=0 --set train.activation_checkpointing=$ckpt \
        --set track.dir="$dir" >/dev/null
      python3 -c "import json,sys; s=json.load(open('$dir/summary.json')); print(f\"| $w | $ckpt | {s['steps']} | {s['seconds']:.1f} | {s['tokens_per_s']:.0f} | {s['final_loss']:.4f} |\")"
    done
  done
} | tee "$out"
