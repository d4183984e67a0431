#!/usr/bin/env bash
# One GPU for issue 25, in as few calls as possible (PARTS picks what a call runs):
#   tests   every carried GPU test binary (bench/gpu_tests.sh);
#   speed   GPT-2 124M and the Llama-3.2-1B shape (bench-train, as bench/gpu_finetune.sh runs them),
#           this build and a baseline build (.carry/base-ferrospeed.xz, when carried) alternated, twice;
#   params  the Llama-3.2-3B shape at stage 3 (bf16, T=2048, micro-batch 2): the optimizer on the GPU,
#           the optimizer on the CPU with the parameter shards in device memory (offload_params none),
#           and with them in page-locked host memory uploaded per use (offload_params cpu);
#   anchors FSDP2 on the same shape, without and with CPU offload (.anchors/anchor_llama.py).
# PARAM_TIMEOUT bounds each params run (s).
# Carried: .carry/*.xz (bench/gpu_pack.sh; the baseline as base-ferrospeed.xz), .carry/device-env.sh,
# .anchors/ (a copy of ../shared/bench). Writes JSON lines and logs under $OUT.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
PARTS=${PARTS:-tests speed params anchors}
source bench/carry_unpack.sh
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; nproc; free -g | head -2; } | tee "$OUT/env.txt"

if [[ $PARTS == *tests* ]]; then
  LOGS=$OUT; source bench/gpu_tests.sh
  TESTS=$(ls /tmp/bin/test-* | grep -v base) gpu_tests
  grep -hE "^test .*(FAILED|panicked)|test result" "$OUT"/test-*.log | sort | uniq -c | sort -rn | head -20
fi

# A bench-train JSON line, labelled.
bench() { local label=$1 bin=$2; shift 2; timeout "${RUN_TIMEOUT:-240}" "$bin" bench-train "$@" 2>>"$OUT/bench.err" | sed "s/^{/{\"label\":\"$label\",/" | tee -a "$OUT/bench.jsonl"; }
S124="--model gpt2-124m --micro-batch 16 --precision bf16 --device cuda --steps 8 --warmup 3 --stage 0"
S1B="--model llama-1b --micro-batch 4 --stage 0 --precision bf16 --device cuda --seq-len 2048 --steps 6 --warmup 2"
if [[ $PARTS == *speed* ]]; then
  for round in $(seq 1 "${ROUNDS:-2}"); do
    bench "new-124m-$round" $BIN $S124
    [ -x /tmp/bin/base-ferrospeed ] && bench "base-124m-$round" /tmp/bin/base-ferrospeed $S124
    [ -n "${SKIP_1B:-}" ] && continue
    bench "new-1b-$round" $BIN $S1B
    [ -x /tmp/bin/base-ferrospeed ] && bench "base-1b-$round" /tmp/bin/base-ferrospeed $S1B
  done
fi

L3="--model llama-3b --micro-batch 2 --precision bf16 --device cuda --seq-len 2048 --stage 3 --steps ${STEPS:-5} --warmup 2"
if [[ $PARTS == *params* ]]; then
  # PARAM_RUNS: label:flags entries separated by '|'.
  IFS='|' read -r -a runs <<< "${PARAM_RUNS:-device:|cpu-opt:--offload-optimizer cpu|cpu-opt-cpu-params:--offload-optimizer cpu --offload-params cpu}"
  for run in "${runs[@]}"; do
    label=${run%%:*}; args=${run#*:}
    /usr/bin/time -v timeout "${PARAM_TIMEOUT:-400}" $BIN bench-train $L3 $args 2>>"$OUT/params-$label.err" | sed "s/^{/{\"label\":\"3b-s3-$label\",/" | tee -a "$OUT/bench.jsonl"
    grep -E "Maximum resident" "$OUT/params-$label.err" | tail -1
  done
fi

if [[ $PARTS == *anchors* ]]; then
  cd .anchors
  ANCHOR_STEPS=4 ANCHOR_WARM=2 timeout ${ANCHOR_TIMEOUT:-420} python3 anchor_llama.py ${ANCHORS:-llama-3b:2:fsdp llama-3b:2:fsdp-cpu} \
    2>>"$OUT/anchors.err" | tee -a "$OUT/anchors.jsonl"
  tail -3 "$OUT/anchors.err"
fi
