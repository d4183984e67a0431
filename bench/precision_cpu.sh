#!/usr/bin/env bash
# The README example (examples/tiny.toml) for 100 steps in fp32, bf16 and fp16 (2 ranks, CPU): the
# loss after 100 steps in bf16 and fp16 against fp32 (target: within 2%).
# Usage: bash bench/precision_cpu.sh [OUT.md] [STAGE]   (default: bench/results/precision_cpu-<date>.md, stage 2)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrospeed-cli >/dev/null
bin=target/release/ferrospeed
out=${1:-bench/results/precision_cpu-$(date +%F).md}
stage=${2:-2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo "# Mixed precision on CPU: examples/tiny.toml, 100 steps, 2 ranks, ZeRO stage $stage"
  echo
  echo "- date: $(date -u '+%F %T UTC')"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- command: \`$bin launch --nproc-per-node 2 train --config examples/tiny.toml --set train.steps=100 --set train.warmup=10 --set zero.stage=$stage --set train.precision=P\`"
  echo "- the loss is the mean over the last 10 steps (same batches in every run), to read the trend rather than one batch"
  echo
  echo "| precision | loss (mean of steps 91-100) | loss at step 100 | vs fp32 | skipped steps | final loss scale | seconds |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for p in fp32 bf16 fp16; do
    "$bin" launch --nproc-per-node 2 train --config examples/tiny.toml --set train.steps=100 --set train.warmup=10 \
      --set zero.stage="$stage" --set train.precision=$p --set train.sample_tokens=0 --set track.dir="$tmp/$p" >/dev/null
  done
  python3 - "$tmp" <<'PY'
import json, sys, os
base = sys.argv[1]
def load(p):
    rows = [json.loads(l) for l in open(os.path.join(base, p, "metrics.jsonl"))]
    s = json.load(open(os.path.join(base, p, "summary.json")))
    return rows, s
ref_rows, _ = load("fp32")
ref = sum(r["loss"] for r in ref_rows[-10:]) / 10
for p in ["fp32", "bf16", "fp16"]:
    rows, s = load(p)
    mean = sum(r["loss"] for r in rows[-10:]) / 10
    skipped = sum(1 for r in rows if r.get("skipped"))
    scale = rows[-1].get("loss_scale")
    print(f"| {p} | {mean:.4f} | {rows[-1]['loss']:.4f} | {100 * (mean - ref) / ref:+.2f}% | {skipped} | {scale if scale is not None else '-'} | {s['seconds']:.1f} |")
PY
} | tee "$out"
