#!/usr/bin/env bash
# Sourced by the GPU scripts on the device machine: every carried binary (.carry/*.xz, bench/gpu_pack.sh)
# unpacked once into /tmp/bin (the test binaries as /tmp/bin/test-*), the device environment, and BIN.
mkdir -p /tmp/bin
for f in .carry/*.xz; do
  b=/tmp/bin/$(basename "$f" .xz)
  [ -x "$b" ] || { xz -dc "$f" > "$b" && chmod +x "$b"; }
done
source .carry/device-env.sh
BIN=/tmp/bin/ferrospeed
