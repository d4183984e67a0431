#!/usr/bin/env bash
# Issue 15 on one GPU, in two device calls (the 94 MiB GGUF file does not fit in one call's 64 MiB):
#   PART=1 (carry .carry and .xfer/a.gguf, the file's first 36 MiB, which hold all its metadata):
#     the GPU kernel tests (packed attention, packed Llama blocks) and `data prepare` throughput on 16
#     cores: the shipped corpora and a 1 GB synthetic one, with SmolLM2's tokenizer.
#   PART=2 (carry .xfer/b, the rest; the machine still warm): SmolLM2-135M-Instruct fine-tuned on
#     examples/data/captain_chat.jsonl, `generate --chat` before and after, tok/s of both, and the
#     export loaded back by transformers; then GPT-2 124M and Llama-1B steps (no regression from the
#     document-aware kernels).
# bench/split_gguf.sh writes .xfer/ from .models/ (scripts/fetch-smollm2.sh).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
BIN=/tmp/bin/ferrospeed
if [ "${PART:-1}" = 1 ]; then
  for f in .carry/*.xz; do xz -dc "$f" > "/tmp/bin/$(basename "$f" .xz)"; chmod +x "/tmp/bin/$(basename "$f" .xz)"; done
  source .carry/device-env.sh
  cp .xfer/a.gguf /tmp/a.gguf
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"; nproc >> "$OUT/env.txt"
  LOGS=/tmp/logs; mkdir -p $LOGS; source bench/gpu_tests.sh
  TESTS=${TESTS:-test-ferrospeed-models-gpu_kernels test-ferrospeed-models-gpu_engine} gpu_tests || grep -E "panicked|relative error" "$LOGS/gpu-tests.log" | tail -20
  cp $LOGS/gpu-tests.log "$OUT/"
  [ "${PREP:-1}" = 1 ] || exit 0
  # data prepare: the shipped corpora, then 1 GB of text (the Rust book repeated, one file) and 256 MB
  # of JSONL chat (the shipped conversations repeated; three template renders per conversation).
  T=/tmp/a.gguf
  for src in data/rust-book.txt examples/data/captain_chat.jsonl; do
    $BIN data prepare $src --tokenizer $T --out /tmp/prep-$(basename $src) 2>&1 | tee -a "$OUT/prepare.txt"
  done
  python3 - <<'PY'
import os
book = open("data/rust-book.txt", "rb").read()
with open("/tmp/synthetic.txt", "wb") as f:
    n = 0
    while n < 1 << 30:
        f.write(book); n += len(book)
chat = open("examples/data/captain_chat.jsonl", "rb").read()
with open("/tmp/synthetic.jsonl", "wb") as f:
    n = 0
    while n < 1 << 28:
        f.write(chat); n += len(chat)
PY
  ls -la /tmp/synthetic.* | tee -a "$OUT/prepare.txt"
  for src in /tmp/synthetic.txt /tmp/synthetic.jsonl; do
    timeout 150 $BIN data prepare $src --tokenizer $T --out /tmp/prep-$(basename $src) 2>&1 | tee -a "$OUT/prepare.txt"
    $BIN data prepare $src --tokenizer $T --out /tmp/prep-$(basename $src) 2>&1 | tee -a "$OUT/prepare.txt"
  done
else
  source .carry/device-env.sh
  [ -x $BIN ] && [ -f /tmp/a.gguf ] || { echo "PART=2 needs the warm machine of PART=1"; exit 3; }
  mkdir -p .models && cat /tmp/a.gguf .xfer/b > .models/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum .models/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/sha256.txt"
  G=.models/SmolLM2-135M-Instruct.Q4_1.gguf
  $BIN data prepare examples/data/captain_chat.jsonl --tokenizer $G --out runs/data/captain_chat 2>&1 | tee "$OUT/finetune.txt"
  ask() {  # $1: model, $2: tag
    for p in "How do I boil an egg?" "What is the capital of Japan?" "Give me one tip for learning Rust."; do
      echo "## $2: $p" >> "$OUT/generate.md"
      $BIN generate --model $1 --chat --prompt "$p" --max-tokens 80 --device cuda >> "$OUT/generate.md" 2>>"$OUT/generate.err"
      tail -1 "$OUT/generate.err" >> "$OUT/generate.md"
    done
    echo "## $2, top-p 0.9 at temperature 0.8, seed 1: How do I boil an egg?" >> "$OUT/generate.md"
    $BIN generate --model $1 --chat --prompt "How do I boil an egg?" --max-tokens 80 --temperature 0.8 --top-p 0.9 --seed 1 --device cuda >> "$OUT/generate.md" 2>>"$OUT/generate.err"
    tail -1 "$OUT/generate.err" >> "$OUT/generate.md"
  }
  ask $G before
  timeout 300 $BIN train --config examples/smollm2-chat.toml --set train.device=cuda --set train.precision=bf16 2>&1 | tee -a "$OUT/finetune.txt"
  cp runs/*/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
  ask runs/checkpoints/smollm2-chat after
  $BIN generate --model runs/checkpoints/smollm2-chat --chat --prompt "How do I boil an egg?" --max-tokens 40 --device cpu >> "$OUT/generate.md" 2>>"$OUT/generate.err"
  tail -1 "$OUT/generate.err" >> "$OUT/generate.md"
  $BIN checkpoint export runs/checkpoints/smollm2-chat /tmp/exported --dtype bf16 2>&1 | tee -a "$OUT/finetune.txt"
  ls /tmp/exported | tee -a "$OUT/finetune.txt"
  PYTHONUNBUFFERED=1 timeout 120 python3 - <<'PY' 2>&1 | tee -a "$OUT/finetune.txt"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("/tmp/exported/")
model = AutoModelForCausalLM.from_pretrained("/tmp/exported", dtype=torch.bfloat16).cuda()
msgs = [{"role": "user", "content": "How do I boil an egg?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"].to("cuda")
out = model.generate(ids, max_new_tokens=60, do_sample=False)
print("transformers on the export:", repr(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)))
PY
  [ "${BENCH:-1}" = 1 ] || exit 0
  timeout 120 $BIN bench-train --model gpt2-124m --micro-batch 16 --precision bf16 --device cuda --steps 8 --warmup 3 --stage 0 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"
  timeout 200 $BIN bench-train --model llama-1b --micro-batch 4 --stage 0 --precision bf16 --device cuda --seq-len 2048 --steps 6 --warmup 2 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"
fi
