#!/usr/bin/env bash
# The SmolLM2 GGUF file in two parts for bench/gpu_finetune.sh (a device call carries 64 MiB at most):
# .xfer/a.gguf (the first 36 MiB: the header, so it serves as a tokenizer source alone) and .xfer/b.
set -euo pipefail
cd "$(dirname "$0")/.."
G=.models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $G ] || bash scripts/fetch-smollm2.sh
mkdir -p .xfer
head -c $((36 << 20)) $G > .xfer/a.gguf
tail -c +$(((36 << 20) + 1)) $G > .xfer/b
cat .xfer/a.gguf .xfer/b | cmp - $G && ls -la .xfer
