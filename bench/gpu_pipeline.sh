#!/usr/bin/env bash
# One device call for issue 26 (PARTS picks what it runs):
#   tests    every carried GPU test binary (bench/gpu_tests.sh);
#   pipe     the Llama-1B shape (bf16, T=1024, micro-batch 2, 4 micro-batches a step) at pp=1 on the GPU and
#            at pp=2 with both ranks on it (FERROSPEED_SHARE_GPUS=1), once per PIPE_SCHEDULES (default 1f1b);
#            PASS when every step's loss of each pp=2 run is within PIPE_TOL (relative) of pp=1's, into
#            $OUT/pipeline-check.txt;
#   bubble   4 CPU stages (GPT-2 width, 16 layers, vocabulary BUBBLE_VOCAB (default 4096: the head weighs
#            0.44 of a layer; 512: 0.06), pp_split 5,4,4,5), BUBBLE_SCHEDULES (default 1f1b gpipe;
#            interleaved: 2 stages a rank, split 3,2,2,2,2,2,2,3; zb) at 8 and 16 micro-batches: each rank's
#            measured idle share beside the schedule's analytic bubble at unit costs (bench-train's
#            "bubble"), RAYON_NUM_THREADS cores a rank.
# Carried: .carry/*.xz (bench/gpu_pack.sh), .carry/device-env.sh. Writes JSON lines and logs under $OUT.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
PARTS=${PARTS:-tests pipe bubble}
source bench/carry_unpack.sh
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; } | tee "$OUT/env.txt"

if [[ $PARTS == *tests* ]]; then
  LOGS=$OUT; source bench/gpu_tests.sh
  TESTS=$(ls /tmp/bin/test-* | grep -v base) gpu_tests
fi

label() { sed "s/^{/{\"label\":\"$1\",/"; }
if [[ $PARTS == *pipe* ]]; then
  P="--model llama-1b --micro-batch 2 --seq-len 1024 --micro-batches 4 --precision bf16 --device cuda --steps ${PIPE_STEPS:-4} --warmup 1"
  timeout 200 $BIN bench-train $P 2>>"$OUT/pipe.err" | label pp1 | tee -a "$OUT/pipe.jsonl"
  for s in ${PIPE_SCHEDULES:-1f1b}; do
    FERROSPEED_SHARE_GPUS=1 timeout 240 $BIN launch --nproc-per-node 2 bench-train $P --pp 2 --schedule $s 2>>"$OUT/pipe.err" | sed 's/^\[rank0\]: //' | grep '^{' | label "pp2-$s" | tee -a "$OUT/pipe.jsonl"
  done
  python3 - "$OUT/pipe.jsonl" "${PIPE_TOL:-2e-2}" ${PIPE_SCHEDULES:-1f1b} <<'EOF' | tee "$OUT/pipeline-check.txt"
import json, sys
rows = {r["label"]: r for r in map(json.loads, open(sys.argv[1]))}
tol = float(sys.argv[2])
for s in sys.argv[3:]:
    p = rows.get(f"pp2-{s}")
    if "pp1" not in rows or p is None or p.get("pp") != 2 or p.get("schedule") != s:
        print(f"FAIL: a run is missing (pp2-{s})", sorted(rows)); continue
    a, b = rows["pp1"]["losses"], p["losses"]
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    ok = len(a) == len(b) and worst <= tol
    print(f"{'PASS' if ok else 'FAIL'}: pp=2 {s} vs pp=1 losses {b} vs {a}: worst relative difference {worst:.2e} (tolerance {tol:g}); "
          f"tok/s {p['tok_s']} vs {rows['pp1']['tok_s']}, GPU peak {p['peak_gpu_gib']} vs {rows['pp1']['peak_gpu_gib']} GiB, "
          f"pipeline wait {p['phases_ms']['pipeline_wait']:.0f} ms")
EOF
fi

if [[ $PARTS == *bubble* ]]; then
  C="--model gpt2-124m --layers 16 --vocab ${BUBBLE_VOCAB:-4096} --seq-len ${BUBBLE_T:-128} --micro-batch 2 --device cpu --precision fp32 --pp 4 --steps 3 --warmup 1"
  for m in 8 16; do
    for s in ${BUBBLE_SCHEDULES:-1f1b gpipe}; do
      split="--pp-split 5,4,4,5"
      [ "$s" = interleaved ] && split="--pp-virtual 2 --pp-split 3,2,2,2,2,2,2,3"
      RAYON_NUM_THREADS=${BUBBLE_THREADS:-4} timeout 150 $BIN launch --nproc-per-node 4 bench-train $C $split --micro-batches $m --schedule $s 2>>"$OUT/bubble.err" \
        | sed 's/^\[rank0\]: //' | grep '^{' | label "bubble-$s-m$m-v${BUBBLE_VOCAB:-4096}" | tee -a "$OUT/bubble.jsonl"
    done
  done
fi
