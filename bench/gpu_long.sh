#!/usr/bin/env bash
# One device call for issue 29's long-context points (PARTS picks what it runs):
#   loss   the Llama-1B shape (vocabulary 128,256) at micro-batch 1 × T LONG_T (default 8192), bf16, activation
#          checkpointing: peak GPU memory with the logits whole (what chunk_rows keeps at this length) and in
#          chunks of LONG_CHUNK rows (FERROSPEED_LOGITS_CHUNK_ROWS, default 1024), each bench-train's JSON line
#          into $OUT/long.jsonl and the two peaks side by side in $OUT/long-summary.txt.
# Carried: .carry/ferrospeed.xz, .carry/device-env.sh (bench/gpu_pack.sh).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
PARTS=${PARTS:-loss}
source bench/carry_unpack.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
label() { sed "s/^{/{\"label\":\"$1\",/"; }
if [[ $PARTS == *loss* ]]; then
  T=${LONG_T:-8192}; CHUNK=${LONG_CHUNK:-1024}
  args="bench-train --model llama-1b --micro-batch 1 --seq-len $T --micro-batches 1 --precision bf16 --device cuda --checkpointing --steps 3 --warmup 1"
  timeout 200 $BIN $args 2>>"$OUT/long.err" | grep '^{' | label whole | tee -a "$OUT/long.jsonl"
  FERROSPEED_LOGITS_CHUNK_ROWS=$CHUNK timeout 200 $BIN $args 2>>"$OUT/long.err" | grep '^{' | label "chunks-of-$CHUNK" | tee -a "$OUT/long.jsonl"
  python3 - "$OUT/long.jsonl" <<'PY' | tee "$OUT/long-summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    print(f"{r['label']}: peak GPU {r.get('peak_gpu_gib')} GiB, {r.get('tok_s')} tok/s")
if len(rows) == 2 and rows[0].get('peak_gpu_gib') and rows[1].get('peak_gpu_gib'):
    print(f"chunked / whole peak: {rows[1]['peak_gpu_gib'] / rows[0]['peak_gpu_gib']:.3f}")
PY
fi
