#!/usr/bin/env bash
# Host memory of importing a transformers checkpoint: a random Llama-3.2-1B-shaped directory (bf16, 3
# shards + index, bench/make_random_hf.py) imported by `ferrospeed train` with train.steps = 0 at world 1
# and 2 (ZeRO stage 3); each rank prints the host memory its import added ("import: … host memory +X MB")
# beside the largest block's state. On the GPU machine: DEVICE=cuda (two ranks then share the GPU).
# Usage: BIN=path/to/ferrospeed DEVICE=cpu|cuda bash bench/import_memory.sh [OUT_DIR]
set -u
OUT=${1:-${OUT:-import-out}}; mkdir -p "$OUT"
BIN=${BIN:-target/release/ferrospeed}; DEVICE=${DEVICE:-cpu}
HF=${HF:-/tmp/llama1b-hf}
[ -f "$HF/config.json" ] || python3 bench/make_random_hf.py "$HF" --shape llama-1b | tee "$OUT/make.txt"
printf 'The quick brown fox jumps over the lazy dog.\n%.0s' $(seq 1 400) > /tmp/import-corpus.txt
cat > /tmp/import.toml <<TOML
[model]
seq_len = 64
init_from = "$HF"
vocab = "bytes"
[data]
path = "/tmp/import-corpus.txt"
[train]
steps = 0
warmup = 0
global_batch = 2
micro_batch = 1
precision = "bf16"
device = "$DEVICE"
[zero]
stage = 3
TOML
TIME=""; [ -x /usr/bin/time ] && TIME="/usr/bin/time -v"
# Ranks take GPU LOCAL_RANK: on a machine with one GPU only world 1 runs on the device.
WORLDS=${WORLDS:-1 2}
for n in $WORLDS; do
  rm -rf "/tmp/import-ckpt-$n" "/tmp/import-export-$n" "/tmp/import-run-$DEVICE-$n"
  $TIME "$BIN" launch --nproc-per-node $n train --config /tmp/import.toml --set track.dir="\"/tmp/import-run-$DEVICE-$n\"" \
    --set checkpoint.dir="\"/tmp/import-ckpt-$n\"" > "$OUT/world$n.log" 2> "$OUT/world$n.time"
  echo "world $n, $DEVICE (rc $?):"; grep -h "import:" "$OUT/world$n.log" | sed 's/^/  /'
  grep -h "Maximum resident" "$OUT/world$n.time" | sed 's/^/  launcher and ranks, largest process: /'
  # The imported weights, exported again in bf16, against the source: the same bits?
  "$BIN" checkpoint export "/tmp/import-ckpt-$n" "/tmp/import-export-$n" --max-shard-gb 1 > "$OUT/export$n.log" 2>&1
  python3 - "$HF" "/tmp/import-export-$n" <<'PY'
import json, os, struct, sys
def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"): continue
        with open(os.path.join(d, f), "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]; h = json.loads(fh.read(n)); base = 8 + n
            for k, v in h.items():
                if k == "__metadata__": continue
                a, b = v["data_offsets"]; fh.seek(base + a); out[k] = (v["dtype"], v["shape"], fh.read(b - a))
    return out
src, got = tensors(sys.argv[1]), tensors(sys.argv[2])
same = src.keys() == got.keys() and all(src[k] == got[k] for k in src)
print(f"  re-export: {len(got)} tensors, bit-identical to the source: {same}")
PY
done | tee "$OUT/import_memory.txt"
