#!/usr/bin/env bash
# all_reduce bus bandwidth of the TCP (CPU) backend on loopback, for 2 and 4 ranks.
# Usage: bash bench/comm_allreduce.sh [OUT.md]   (default: bench/results/comm_allreduce-<date>.md)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrospeed-cli >/dev/null
bin=target/release/ferrospeed
out=${1:-bench/results/comm_allreduce-$(date +%F).md}
sizes=4096,65536,1048576,4194304,16777216,67108864
{
  echo "# all_reduce bus bandwidth, TCP backend on loopback"
  echo
  echo "- date: $(date -u '+%F %T UTC')"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- command: \`$bin launch --nproc-per-node W comm bench --sizes $sizes\`"
  echo "- reading: busbw = bytes / time × 2(W−1)/W (nccl-tests' definition); time is the slowest rank's mean"
  for w in 2 4; do
    echo
    echo "## $w ranks"
    echo
    "$bin" launch --nproc-per-node "$w" comm bench --sizes "$sizes" | sed -n 's/^\[rank0\]: //p'
  done
} | tee "$out"
