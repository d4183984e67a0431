#!/usr/bin/env bash
# One device call for issue 27's LoRA speed point: bench-train --lora-r R (all-linear, alpha 2R, bf16 base) against
# HF transformers + PEFT (bench/anchor_peft.py, the same shape, batch, optimizer and adapters) in the same call,
# for each of LORA_MODELS (default llama-8b) at micro-batch LORA_MB (4), T=LORA_T (1024), R=LORA_R (16), each base of
# LORA_BASES (bf16; nf4 = QLoRA), LORA_STEPS timed steps after LORA_WARM (10, 3), LORA_EXTRA more bench-train flags
# (--profile, --checkpointing); LORA_PEFT=0 skips the anchor, which runs once per base (nf4: bitsandbytes' Linear4bit).
# Carried: .carry/*.xz (bench/gpu_pack.sh), .carry/device-env.sh, .carry/wheels/peft-*.whl, and for nf4
# .carry/site/bitsandbytes (bitsandbytes 0.50.2's wheel unpacked, its CUDA 11/12, ROCm and XPU libraries removed to fit
# the carry limit: `pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64`).
# JSON lines in $OUT/lora.jsonl.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
source bench/carry_unpack.sh
[ -d .carry/site/bitsandbytes ] && export PYTHONPATH=$PWD/.carry/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import peft" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .carry/wheels/peft-*.whl 2>&1 | tail -2
R=${LORA_R:-16}; MB=${LORA_MB:-4}; T=${LORA_T:-1024}
label() { sed "s/^{/{\"label\":\"$1\",/"; }
S=${LORA_STEPS:-10}; W=${LORA_WARM:-3}
for m in ${LORA_MODELS:-llama-8b}; do
  for base in ${LORA_BASES:-bf16}; do
    timeout ${LORA_TIMEOUT:-300} $BIN bench-train --model $m --lora-r $R --lora-base $base --micro-batch $MB --seq-len $T --precision bf16 --device cuda --steps $S --warmup $W ${LORA_EXTRA:-} 2>>"$OUT/lora.err" | label "ferrospeed-$m-$base" | tee -a "$OUT/lora.jsonl"
    [ "${LORA_PEFT:-1}" = 1 ] && timeout 300 python3 bench/anchor_peft.py $m $MB $T $R $S $W $base 2>>"$OUT/lora.err" | label "peft-$m-$base" | tee -a "$OUT/lora.jsonl"
  done
done
