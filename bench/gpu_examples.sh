#!/usr/bin/env bash
# The library API's examples on the GPU machine: examples/mlp.rs and examples/transformer.rs (built with
# --features cuda, carried as .carry/example-*.xz) at stages 0 and 3 on the CPU and on the GPU, fp32, one
# rank; prints, per example, the largest relative loss difference GPU vs CPU and whether stage 3 equals
# stage 0 bit for bit on each device.
# Build and pack here: CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda -p ferrospeed-cli
# --examples (after ../shared/gpu/cuda-build-env.sh), then strip + xz into .carry/example-NAME.xz.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT" /tmp/bin
for ex in mlp transformer; do xz -dc ".carry/example-$ex.xz" > "/tmp/bin/$ex"; chmod +x "/tmp/bin/$ex"; done
source .carry/device-env.sh
for ex in mlp transformer; do
  for dev in cpu cuda; do
    for stage in 0 3; do
      timeout 120 "/tmp/bin/$ex" --set train.device="\"$dev\"" --set zero.stage=$stage --set track.dir="\"$OUT/$ex-$dev-s$stage\"" \
        > "$OUT/$ex-$dev-s$stage.log" 2>&1 || echo "FAIL $ex $dev stage $stage (see $ex-$dev-s$stage.log)"
    done
  done
done
python3 - "$OUT" <<'PY' | tee "$OUT/examples.txt"
import json, sys, os
out = sys.argv[1]
def losses(name):
    p = os.path.join(out, name, "metrics.jsonl")
    return [json.loads(l)["loss"] for l in open(p)] if os.path.exists(p) else None
for ex in ["mlp", "transformer"]:
    c0, c3, g0, g3 = (losses(f"{ex}-{d}-s{s}") for d, s in [("cpu", 0), ("cpu", 3), ("cuda", 0), ("cuda", 3)])
    if None in (c0, c3, g0, g3):
        print(f"{ex}: a run failed"); continue
    rel = max(abs(a - b) / abs(b) for a, b in zip(g0, c0))
    print(f"{ex}: {len(c0)} steps; loss cpu {c0[0]:.4f} -> {c0[-1]:.4f}, cuda {g0[0]:.4f} -> {g0[-1]:.4f}; "
          f"max rel diff cuda vs cpu {rel:.2e}; stage 3 == stage 0 bitwise: cpu {c3 == c0}, cuda {g3 == g0}")
PY
