#!/usr/bin/env python3
"""Print the benchmark table of bench/gpu_run.sh from its JSON lines (ferrospeed bench-train and the anchors):
tok/s, MFU (989 TFLOP/s), peak GPU memory, and each line's ratio to torch eager and DeepSpeed on the same model.

    python3 bench/table.py gpu-out/bench.jsonl
"""
import json
import sys


def label(d):
    if d.get("engine") == "ferrospeed":
        acts = "recomputed" if d.get("checkpointing") else "kept"
        variant = f", {d['variant']}" if d.get("variant") else ""
        return f"ferrospeed stage {d['stage']} ({acts}{variant})"
    if d.get("engine") == "deepspeed":
        return f"DeepSpeed ZeRO-{d['stage']}" + ("" if d.get("offload") in (None, "none") else f" offload {d['offload']}")
    return "torch.compile" if d.get("compile") else "torch eager"


def main(path):
    rows = []
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if "tok_s" in d and "model" in d:
            rows.append(d)
    eager = {d["model"]: d["tok_s"] for d in rows if d.get("engine") is None and not d.get("compile")}
    ds = {d["model"]: d["tok_s"] for d in rows if d.get("engine") == "deepspeed"}
    ratio = lambda v, base: f"{v / base:.2f}×" if base else "-"
    print("| engine | model | B | tok/s | MFU | peak GPU GiB | vs torch eager | vs DeepSpeed |")
    print("|---|---|---|---|---|---|---|---|")
    for d in rows:
        peak = d.get("peak_gpu_gib", d.get("peak_gib"))
        print(f"| {label(d)} | {d['model']} | {d['B']} | {d['tok_s']:,.0f} | {100 * d['mfu_989']:.1f}% | "
              f"{peak if peak is not None else '-'} | {ratio(d['tok_s'], eager.get(d['model']))} | {ratio(d['tok_s'], ds.get(d['model']))} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-out/bench.jsonl")
