#!/usr/bin/env bash
# The README's main job, timed: `launch --nproc-per-node 2 train --config examples/tiny.toml`, run on this
# machine after the release build, with the numbers the README quotes (steps, seconds, wall, loss first ->
# final, tokens/s) appended to a results file with the date, machine and commit.
# Usage: bash bench/main_job.sh [OUT.md]   (default: bench/results/main_job-<date>.md)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrospeed-cli >/dev/null 2>&1
out=${1:-bench/results/main_job-$(date +%F).md}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
load=$(cut -d' ' -f1 /proc/loadavg)
t0=$(date +%s.%N)
target/release/ferrospeed launch --nproc-per-node 2 train --config examples/tiny.toml --set track.dir="$tmp/run" > "$tmp/out.txt"
wall=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
[ -f "$out" ] || {
  echo "# The README's main job: \`cargo run --release -- launch --nproc-per-node 2 train --config examples/tiny.toml\`"
  echo
  echo "Timed by \`bash bench/main_job.sh\` after the release build (the binary run directly, as \`cargo run\` does)."
  echo "seconds: the training loop (summary.json); wall: the whole command, start-up and sample text included."
  echo
  echo "| date (UTC) | machine | commit | load before | steps | seconds | wall | loss first → final | tokens/s |"
  echo "|---|---|---|---:|---:|---:|---:|---|---:|"
} > "$out"
python3 - "$tmp/run/summary.json" "$wall" "$load" >> "$out" <<'PY'
import json, os, subprocess, sys, time
s = json.load(open(sys.argv[1]))
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {os.cpu_count()} cores, {cpu}, {mem:.0f} GiB | {commit} | {sys.argv[3]} "
      f"| {s['steps']} | {s['seconds']:.1f} | {sys.argv[2]} | {s['first_loss']:.2f} → {s['final_loss']:.2f} | {s['tokens_per_s']:.0f} |")
PY
tail -1 "$out"
