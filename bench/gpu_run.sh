#!/usr/bin/env bash
# One device call: environment, GPU correctness checks (CUDA vs CPU, stages on the GPU), and the
# benchmark table against the PyTorch and DeepSpeed anchors on the same GPT-2 shapes.
# Expects (carried, built by bench/gpu_pack.sh): .carry/*.xz (the release binary and the GPU test binaries,
# --features cuda, xz-compressed to fit a device call), .carry/device-env.sh, .anchors/ (../shared/bench
# with wheels/ from fetch-wheels.sh). Writes logs and JSON lines under $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
# Per-run logs go to $LOGS and come back as one archive (a device call returns only a few files).
LOGS=/tmp/gpu-logs; rm -rf "$LOGS"; mkdir -p "$LOGS"
trap 'tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null' EXIT
mkdir -p /tmp/bin
for f in .carry/*.xz; do
  b=/tmp/bin/$(basename "$f" .xz)
  xz -dc "$f" > "$b" 2>/dev/null || python3 -c "import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" "$f" > "$b"
  chmod +x "$b"
done
BIN=/tmp/bin/ferrospeed
source .carry/device-env.sh
export PYTHONUNBUFFERED=1
$BIN env | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/env.txt"

# --- GPU tests (cargo test --features cuda binaries): kernels and blocks against the CPU
source bench/gpu_tests.sh
gpu_tests

# --- correctness: the tiny config on CPU and CUDA (world 1), CUDA stages 0-3 (2 ranks sharing the GPU)
cat > /tmp/tiny.toml <<TOML
[model]
n_layer = 2
n_head = 2
d_model = 64
seq_len = 64
[data]
path = "data/rust-book.txt"
[train]
steps = 20
global_batch = 8
micro_batch = 4
warmup = 2
sample_tokens = 0
TOML
run() { local name=$1; shift; timeout 300 $BIN launch "$@" --set track.dir=/tmp/runs/$name > "$LOGS/$name.log" 2>&1 || echo "FAILED $name (see $name.log)"; }
run cpu-fp32 --nproc-per-node 1 train --config /tmp/tiny.toml --set train.device=cpu
run cuda-fp32 --nproc-per-node 1 train --config /tmp/tiny.toml --set train.device=cuda
run cuda-bf16 --nproc-per-node 1 train --config /tmp/tiny.toml --set train.device=cuda --set train.precision=bf16
export FERROSPEED_SHARE_GPUS=1
for s in 0 1 2 3; do run cuda-w2-s$s --nproc-per-node 2 train --config /tmp/tiny.toml --set train.device=cuda --set zero.stage=$s; done
unset FERROSPEED_SHARE_GPUS
python3 - "$OUT" <<'PY' | tee "$OUT/checks.txt"
import json, sys
def losses(n):
    try: return [json.loads(l)["loss"] for l in open(f"/tmp/runs/{n}/metrics.jsonl")]
    except Exception as e: return None
ok = True
def check(name, cond, detail):
    global ok; ok &= bool(cond); print(("PASS " if cond else "FAIL ") + name + ": " + detail)
cpu, cuda, bf16 = losses("cpu-fp32"), losses("cuda-fp32"), losses("cuda-bf16")
if cpu and cuda:
    rel = max(abs(a - b) / abs(a) for a, b in zip(cpu, cuda))
    check("CUDA fp32 vs CPU fp32, 20 steps", rel < 1e-4 and len(cuda) == 20, f"max relative difference {rel:.2e}")
else: check("CUDA fp32 vs CPU fp32", False, "a run failed")
if cpu and bf16:
    rel = abs(sum(bf16[-5:]) - sum(cpu[-5:])) / sum(cpu[-5:])
    check("CUDA bf16 vs CPU fp32 (mean of last 5 steps)", rel < 0.02, f"relative difference {rel:.2%}")
else: check("CUDA bf16", False, "a run failed")
st = [losses(f"cuda-w2-s{s}") for s in range(4)]
if all(st):
    rel = max(abs(a - b) / abs(a) for s in st[1:] for a, b in zip(st[0], s))
    check("CUDA stages 0-3 at world 2 agree", rel == 0.0, f"max relative difference {rel:.2e}")
    rel = max(abs(a - b) / abs(a) for a, b in zip(cpu, st[0]))
    check("CUDA world 2 vs CPU world 1", rel < 1e-4, f"max relative difference {rel:.2e}")
else: check("CUDA stages", False, "a run failed")
print("ALL GPU CHECKS PASSED" if ok else "SOME GPU CHECKS FAILED")
PY

# --- benchmarks, all in this call
# VARIANT=... names a line in the table (the JSON gets a "variant" field).
B() { timeout "$1" $BIN bench-train "${@:2}" 2>>"$LOGS/bench.err" | sed "s/^{/{${VARIANT:+\"variant\":\"$VARIANT\",}/" | tee -a "$OUT/bench.jsonl"; }
S124="--model gpt2-124m --micro-batch 16 --precision bf16 --device cuda --steps 8 --warmup 3"
# Activations kept (no recompute; the table's line), then recomputed (the least memory), then stages 2 and 3.
B 240 $S124 --stage 0 --profile
B 240 $S124 --stage 0 --checkpointing --profile
B 240 $S124 --stage 2
B 240 $S124 --stage 3 --checkpointing
# The previous attention (heads split, T×T scores materialised) for comparison.
FERROSPEED_FUSED_ATTENTION=0 VARIANT="previous attention" B 240 $S124 --stage 0 --checkpointing
[ "${QUICK:-0}" = 1 ] && { python3 bench/table.py "$OUT/bench.jsonl" | tee "$OUT/table.md"; echo "done (quick: 1.5B and anchors skipped)"; exit 0; }
B 300 --model gpt2-1.5b --micro-batch 8 --stage 0 --precision bf16 --device cuda --steps 3 --warmup 2 --checkpointing
B 300 --model gpt2-1.5b --micro-batch 8 --stage 0 --precision bf16 --device cuda --steps 3 --warmup 2
[ "${SKIP_ANCHORS:-0}" = 1 ] && { python3 bench/table.py "$OUT/bench.jsonl" | tee "$OUT/table.md"; echo "done (anchors skipped)"; exit 0; }
cd .anchors
timeout 300 python3 anchor_torch.py gpt2-124m:16:e gpt2-124m:16:c 2>>"$LOGS/anchors.err" | tee -a "$OUT/bench.jsonl"
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
mkdir -p /tmp/ds && tar xzf wheels/deepspeed-0.19.8.tar.gz -C /tmp/ds && \
  (cd /tmp/ds/deepspeed-0.19.8 && DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >/dev/null 2>&1)
TORCH_CUDA_ARCH_LIST=9.0 timeout 300 python3 anchor_deepspeed.py gpt2-124m:16:2:none 2>>"$LOGS/anchors.err" | grep '^{' | tee -a "$OUT/bench.jsonl"
timeout 200 python3 anchor_torch.py gpt2-1.5b:8:e 2>>"$LOGS/anchors.err" | tee -a "$OUT/bench.jsonl"
cd ..
python3 bench/table.py "$OUT/bench.jsonl" | tee "$OUT/table.md"
echo "done"
