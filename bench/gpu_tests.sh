#!/usr/bin/env bash
# Sourced by the GPU scripts: run every carried GPU test binary (/tmp/bin/test-*, or those named in $TESTS),
# each test's output into $LOGS/gpu-tests.log, one PASS/FAIL line per binary into $OUT/gpu-tests.txt.
# A GPU test that cannot run prints `GPU-TEST-SKIPPED needs=N test=NAME: reason` and passes; here a skip
# counts as a failure when this machine has the N GPUs the test needs, so a broken probe cannot pass.
gpu_tests() {
  local ng t name log skips bad status=0
  ng=$(nvidia-smi -L 2>/dev/null | wc -l)
  : > "$OUT/gpu-tests.txt"
  for t in ${TESTS:-/tmp/bin/test-*}; do
    [ -x "$t" ] || t=/tmp/bin/$t
    name=$(basename "$t"); log=$LOGS/$name.log
    echo "== $name" >> "$LOGS/gpu-tests.log"
    if timeout 300 "$t" --test-threads 1 --nocapture > "$log" 2>&1; then
      skips=$(grep -o 'GPU-TEST-SKIPPED needs=[0-9]* test=[A-Za-z0-9_]*' "$log")
      bad=$(echo "$skips" | awk -v ng="$ng" -F'[= ]' 'NF && $3 <= ng {print $5}' | tr '\n' ' ')
      if [ -n "$bad" ]; then
        echo "FAIL $name: skipped on a machine with the $ng GPU(s) they need: $bad" | tee -a "$OUT/gpu-tests.txt"; status=1
      else
        echo "PASS $name$([ -n "$skips" ] && echo " ($(echo "$skips" | wc -l) skipped: need more than $ng GPU(s))")" | tee -a "$OUT/gpu-tests.txt"
      fi
    else
      echo "FAIL $name (rc $?; see $name.log)" | tee -a "$OUT/gpu-tests.txt"; status=1
    fi
    cat "$log" >> "$LOGS/gpu-tests.log"
  done
  return $status
}
