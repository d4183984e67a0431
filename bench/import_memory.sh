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
for n in 1 2; do
  $TIME "$BIN" launch --nproc-per-node $n train --config /tmp/import.toml --set track.dir="\"/tmp/import-run-$n\"" \
    > "$OUT/world$n.log" 2> "$OUT/world$n.time"
  echo "world $n (rc $?):"; grep -h "import:" "$OUT/world$n.log" | sed 's/^/  /'
  grep -h "Maximum resident" "$OUT/world$n.time" | sed 's/^/  launcher tree: /'
done | tee "$OUT/import_memory.txt"
