#!/usr/bin/env bash
# Flakiness under load: run the README's test command N times in a row while a parallel release build
# (into its own target folder, cleaned and rebuilt in a loop) keeps the machine's cores busy. Appends one
# row per run (pass/fail, seconds, load average) and a summary to a results file.
# Usage: bash bench/flake_check.sh [N] [OUT.md]   (default: 10, bench/results/flake-<date>.md)
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
out=${2:-bench/results/flake-$(date +%F).md}
cargo test --workspace --locked --no-run >/dev/null 2>&1 || { echo "the tests do not build" >&2; exit 1; }
load_dir=$(mktemp -d)
( while true; do CARGO_TARGET_DIR="$load_dir" cargo build --release -p ferrospeed-cli >/dev/null 2>&1; rm -rf "$load_dir"/release; done ) &
loader=$!
trap 'kill $loader 2>/dev/null; pkill -P $loader 2>/dev/null; rm -rf "$load_dir"' EXIT
sleep 20
{
  echo "# Flake check: \`cargo test --workspace --locked\` $n times under a parallel build"
  echo
  echo "- date: $(date -u '+%F %T UTC'); machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); commit $(git rev-parse --short HEAD)"
  echo "- load: \`cargo build --release -p ferrospeed-cli\` into a separate target folder, cleaned and rebuilt in a loop"
  echo
  echo "| run | result | seconds | load average (1 min) at the end | failed tests |"
  echo "|---:|---|---:|---:|---|"
} >> "$out"
fails=0
for i in $(seq 1 "$n"); do
  t0=$(date +%s)
  cargo test --workspace --locked > "$load_dir/run-$i.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  failed=$(grep -E '^test .* FAILED$' "$load_dir/run-$i.log" | sed 's/^test //; s/ \.\.\. FAILED$//' | tr '\n' ' ')
  [ $rc -eq 0 ] || fails=$((fails + 1))
  echo "| $i | $([ $rc -eq 0 ] && echo pass || echo "FAIL (rc $rc)") | $secs | $(cut -d' ' -f1 /proc/loadavg) | $failed |" | tee -a "$out"
  [ $rc -eq 0 ] || cp "$load_dir/run-$i.log" "/tmp/flake-run-$i.log"
done
echo | tee -a "$out"
echo "$((n - fails)) of $n runs passed." | tee -a "$out"
[ $fails -eq 0 ]
