#!/usr/bin/env python3
"""The weak-scaling table of bench/gpu_multi.sh from scaling.jsonl: per engine and GPU count, tok/s per GPU,
weak-scaling efficiency (tok/s per GPU against the same engine on one GPU), peak GPU memory, and ferrospeed's
ratio to FSDP2 and DeepSpeed ZeRO-3 at the same count. ferrospeed reports tok/s over all ranks and rank 0's
peak; the anchors report tok/s per GPU and the peak over ranks.

    python3 bench/scaling_table.py gpu-out/scaling.jsonl
"""
import json
import sys


def main(path):
    rows = {}
    for line in open(path):
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        w = d.get("world", 1)
        per_gpu = d["tok_s"] / w if "tok_s" in d else d.get("tok_s_per_gpu")
        peak = d.get("peak_gpu_gib", d.get("peak_gib"))
        rows[(d["engine"], w)] = (per_gpu, peak)
    engines = sorted({e for e, _ in rows}, key=lambda e: (e != "ferrospeed", e))
    print("| engine | GPUs | tok/s per GPU | weak-scaling efficiency | peak GPU GiB | ferrospeed vs this |")
    print("|---|---|---|---|---|---|")
    for e in engines:
        for w in sorted(w for en, w in rows if en == e):
            per_gpu, peak = rows[(e, w)]
            base = rows.get((e, 1), (None,))[0]
            eff = f"{100 * per_gpu / base:.0f}%" if base else "-"
            ours = rows.get(("ferrospeed", w), (None,))[0]
            vs = f"{ours / per_gpu:.2f}×" if ours and e != "ferrospeed" else ""
            print(f"| {e} | {w} | {per_gpu:,.0f} | {eff} | {peak} | {vs} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-out/scaling.jsonl")
