#!/usr/bin/env bash
# One device call for issue 28 (PARTS picks what it runs):
#   tests   every carried GPU test binary (bench/gpu_tests.sh; gpu_moe: MoE and expert parallelism on the GPU);
#   bench   bench-train --model MOE_MODELS (default olmoe-1b-7b) with MOE_LAYERS layers (default 4: the whole
#           model's fp32 optimizer state does not fit one GPU, for us or for the anchor's bf16 AdamW), micro-batch
#           MOE_B (4) × T MOE_T (1024), bf16, MOE_STEPS timed after MOE_WARM (6, 2), MOE_EXTRA more flags (--profile),
#           against transformers 5 (bench/anchor_moe.py, the same shape and batch; its default experts, grouped_mm,
#           and MOE_IMPLS more, e.g. eager; ds3: DeepSpeed ZeRO-3) in the same call; the ratios in
#           $OUT/moe-summary.txt.
# Carried: .carry/*.xz (bench/gpu_pack.sh), .carry/device-env.sh; for ds3 .carry/wheels/ (DeepSpeed's,
# ../shared/bench/fetch-wheels.sh). JSON lines in $OUT/moe.jsonl.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
PARTS=${PARTS:-tests bench}
source bench/carry_unpack.sh
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/env.txt"

if [[ $PARTS == *tests* ]]; then
  LOGS=$OUT; source bench/gpu_tests.sh
  TESTS=$(ls /tmp/bin/test-* | grep -v base) gpu_tests
fi

label() { sed "s/^{/{\"label\":\"$1\",/"; }
if [[ $PARTS == *bench* && ${MOE_IMPLS:-} == *ds3* ]] && ! python3 -c "import deepspeed" 2>/dev/null; then
  mkdir -p /tmp/ds /tmp/site && tar xzf .carry/wheels/deepspeed-*.tar.gz -C /tmp/ds \
    && (cd /tmp/ds/deepspeed-* && DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .) 2>&1 | tail -2
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ $PARTS == *bench* ]]; then
  L=${MOE_LAYERS:-4}; B=${MOE_B:-4}; T=${MOE_T:-1024}
  for m in ${MOE_MODELS:-olmoe-1b-7b}; do
    timeout ${MOE_TIMEOUT:-240} $BIN bench-train --model $m --layers $L --micro-batch $B --seq-len $T --micro-batches 1 --precision bf16 --device cuda \
      --steps ${MOE_STEPS:-6} --warmup ${MOE_WARM:-2} ${MOE_EXTRA:-} 2>>"$OUT/moe.err" | grep '^{' | label "ferrospeed-$m" | tee -a "$OUT/moe.jsonl"
    specs="$m:$L:$B:$T"
    for impl in ${MOE_IMPLS:-}; do specs="$specs $m:$L:$B:$T:$impl"; done
    ANCHOR_STEPS=${MOE_STEPS:-6} ANCHOR_WARM=${MOE_WARM:-2} timeout 240 python3 bench/anchor_moe.py $specs 2>>"$OUT/moe.err" | label "transformers-$m" | tee -a "$OUT/moe.jsonl"
  done
  python3 - "$OUT/moe.jsonl" <<'EOF' | tee "$OUT/moe-summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ours = {r["model"]: r for r in rows if r.get("engine") == "ferrospeed"}
for r in rows:
    if r.get("engine") not in ("transformers", "deepspeed-zero3") or "tok_s" not in r:
        if "error" in r: print(f"anchor {r.get('spec')}: {r['error']}")
        continue
    o = ours.get(r["model"])
    if o is None:
        print(f"{r['model']}: no ferrospeed row"); continue
    print(f"{r['model']} layers {r['layers']} B {r['B']} T {r['T']}: ferrospeed {o['tok_s']} tok/s (GPU peak {o['peak_gpu_gib']} GiB) vs {r['engine']}, transformers {r['transformers']} "
          f"({r['experts_implementation']} experts) {r['tok_s']} tok/s (GPU peak {r['peak_gpu_gib']} GiB): {o['tok_s'] / r['tok_s']:.2f}x")
EOF
fi
