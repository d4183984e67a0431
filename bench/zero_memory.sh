#!/usr/bin/env bash
# Peak resident memory per rank of a ~50M-parameter GPT at world size 4, ZeRO stages 0-3 (CPU, fp32),
# next to the engine's own accounting of the bytes it keeps between steps.
# Usage: bash bench/zero_memory.sh [OUT.md]   (default: bench/results/zero_memory-<date>.md)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrospeed-cli >/dev/null
bin=target/release/ferrospeed
out=${1:-bench/results/zero_memory-$(date +%F).md}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo "# Peak memory per rank by ZeRO stage: GPT ~50M parameters (bench/configs/gpt50m.toml), world size 4, fp32, CPU"
  echo
  echo "- date: $(date -u '+%F %T UTC')"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- command: \`$bin launch --nproc-per-node 4 train --config bench/configs/gpt50m.toml --set zero.stage=S\`"
  echo "- peak RSS: VmHWM of each rank at the end of the run (2 steps); accounting: rank 0's persistent bytes"
  echo "  (parameters + gradients + master weights + moments) from the engine's MemoryReport"
  echo
  echo "| stage | peak RSS per rank (MB) | accounted persistent (MB) | params | grads | master | moments | gathered peak (MB) | loss after 2 steps |"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  for s in 0 1 2 3; do
    dir="$tmp/s$s"
    "$bin" launch --nproc-per-node 4 train --config bench/configs/gpt50m.toml --set zero.stage=$s --set track.dir="$dir" >/dev/null
    python3 - "$dir/summary.json" "$s" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); m = s["memory"]; mb = lambda b: b / 2**20
rss = "/".join(f"{mb(b):.0f}" for b in s["peak_rss_bytes"])
persistent = m["params"] + m["grads"] + m["master"] + m["moments"]
print(f"| {sys.argv[2]} | {rss} | {mb(persistent):.0f} | {mb(m['params']):.0f} | {mb(m['grads']):.0f} | {mb(m['master']):.0f} | {mb(m['moments']):.0f} | {mb(m['gathered_peak']):.0f} | {s['final_loss']:.4f} |")
PY
  done
} | tee "$out"
