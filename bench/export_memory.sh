#!/usr/bin/env bash
# Peak memory of `ferrospeed checkpoint export` for a ~353M-parameter GPT, against the model's size.
# Usage: bash bench/export_memory.sh [OUT.md]   (default: bench/results/export_memory-<date>.md)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrospeed-cli >/dev/null
bin=target/release/ferrospeed
out=${1:-bench/results/export_memory-$(date +%F).md}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$bin" launch --nproc-per-node 2 train --config bench/configs/gpt350m.toml --set checkpoint.dir="$tmp/ck" \
  --set track.dir="$tmp/run" >"$tmp/train.log" 2>&1
export_line=$("$bin" checkpoint export "$tmp/ck" "$tmp/model.safetensors")
inspect=$("$bin" checkpoint inspect "$tmp/ck" | sed -n '2,3p')
{
  echo "# Export peak memory: GPT ~353M parameters (bench/configs/gpt350m.toml)"
  echo
  echo "- date: $(date -u '+%F %T UTC')"
  echo "- machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- commands: \`$bin launch --nproc-per-node 2 train --config bench/configs/gpt350m.toml --set checkpoint.dir=CK\`, then \`$bin checkpoint export CK model.safetensors\`"
  echo "- checkpoint:"
  echo "$inspect" | sed 's/^ */  - /'
  echo "- checkpoint size on disk: $(du -sh "$tmp/ck" | cut -f1) (fp32 master weights and two moments, 2 rank files)"
  echo "- export: $export_line"
  echo "- consolidated file: $(stat -c %s "$tmp/model.safetensors") bytes"
} | tee "$out"
