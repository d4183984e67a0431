#!/usr/bin/env python3
"""torch's fused CPU AdamW on N f32 parameters (the anchor of `ferrospeed bench-adamw`): median step time over
STEPS steps after one untimed, as one JSON line. Usage: python3 bench/adamw_torch.py [N] [STEPS]"""
import json, sys, time
import torch

n = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000_000
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
p = torch.nn.Parameter(torch.randn(n) * 0.02)
p.grad = torch.randn(n) * 0.01
for fused in (True, False):
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused, foreach=None if fused else True)
    opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter(); opt.step(); times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    print(json.dumps({"bench": "torch_cpu_adamw", "fused": fused, "threads": torch.get_num_threads(), "params": n,
                      "adamw_ms": round(dt * 1e3, 1), "adamw_gparams_s": round(n / dt / 1e9, 3), "adamw_gb_s": round(n * 28 / dt / 1e9, 1)}))
    del opt
