#!/usr/bin/env bash
# Models larger than the GPU on one H200, in one device call: the GPU test of offloaded state (three tiers
# included) against device state, then bench-train runs listed in RUNS (one per line: a label and
# bench-train's arguments after the common ones), each under /usr/bin/time for its peak host memory.
# bf16, T=2048, micro-batch 2, accumulation 1, as issue 16's benchmarks; the JSON line of each run has
# its per-step losses, tok/s, init time, GPU peak and NVMe bandwidth.
# Carried: .carry/*.xz (bench/gpu_pack.sh).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin /tmp/nvme
for f in .carry/*.xz; do xz -dc "$f" > "/tmp/bin/$(basename "$f" .xz)"; chmod +x "/tmp/bin/$(basename "$f" .xz)"; done
source .carry/device-env.sh
BIN=/tmp/bin/ferrospeed
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2; df -h /tmp | tail -1; } | tee "$OUT/env.txt"
if [ -n "${TEST_FILTER:-}" ]; then
  timeout 300 /tmp/bin/test-ferrospeed-models-gpu_engine --test-threads 1 --nocapture "$TEST_FILTER" > "$OUT/gpu-test.log" 2>&1
  echo "gpu test rc $?" | tee -a "$OUT/env.txt"
  grep -E "vs device state|test result" "$OUT/gpu-test.log" | tee "$OUT/offload-tests.txt" | tail -3
fi
C="--micro-batch 2 --precision bf16 --device cuda --seq-len 2048 --nvme-dir /tmp/nvme"
while read -r label args; do
  [ -n "$label" ] || continue
  echo "== $label: $args" | tee -a "$OUT/bench.err"
  /usr/bin/time -v timeout "${RUN_TIMEOUT:-400}" $BIN bench-train $C $args 2>>"$OUT/bench.err" | sed "s/^{/{\"label\":\"$label\",/" | tee -a "$OUT/bench.jsonl"
  grep -E "Maximum resident|Elapsed" "$OUT/bench.err" | tail -2
  tail -3 "$OUT/bench.err" | grep -iE "error|panick" || true
done <<< "${RUNS:-}"
