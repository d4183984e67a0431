#!/usr/bin/env bash
# Build what bench/gpu_run.sh carries to the GPU machine: the release binary and the GPU test binaries
# (--features cuda, on this GPU-less machine with ../shared/gpu/cuda-build-env.sh), stripped and
# xz-compressed into .carry/ (a device call carries at most 64 MiB), plus the device environment script.
set -euo pipefail
cd "$(dirname "$0")/.."
source ../shared/gpu/cuda-build-env.sh
export CARGO_TARGET_DIR=target-cuda
cargo build --release --features cuda -p ferrospeed-cli
mkdir -p .carry && rm -f .carry/ferrospeed
# Each file written beside its place and renamed over it: a device call that copies .carry meanwhile
# gets whole files (old or new), never a half-written one.
strip -o /tmp/ferrospeed-stripped target-cuda/release/ferrospeed
xz -T2 -6 -c /tmp/ferrospeed-stripped > .carry/.ferrospeed.xz.tmp && mv .carry/.ferrospeed.xz.tmp .carry/ferrospeed.xz
# Each GPU test binary, named test-<crate>-<test>.
for spec in "ferrospeed-models gpu_kernels" "ferrospeed gpu_optim" "ferrospeed gpu_nccl" "ferrospeed-models gpu_engine" "ferrospeed-models gpu_lora" "ferrospeed-models gpu_moe" "ferrospeed-models gpu_parallel"; do
  set -- $spec
  [ -f "crates/$1/tests/$2.rs" ] || continue
  exe=$(cargo test --release --features cuda -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
  strip -o /tmp/t-stripped "$exe"
  xz -T2 -6 -c /tmp/t-stripped > ".carry/.test.tmp" && mv .carry/.test.tmp ".carry/test-$1-$2.xz"
done
cp ../shared/gpu/device-env.sh .carry/
du -ch .carry/* | tail -1
