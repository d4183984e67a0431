# Multi-GPU anchors for issue 7 (run under torchrun, one process per GPU): PyTorch FSDP2 (fully_shard)
# and DeepSpeed ZeRO-3 training the GPT of ../shared/bench/anchor_torch.py (carried as .anchors/) with
# the same settings as the one-GPU anchors (bf16, AdamW, clip 1.0, T=1024, vocab 50304, random tokens).
#   torchrun --nproc-per-node N bench/anchors/multi_gpu.py fsdp|deepspeed MODEL:MICROBATCH
# Rank 0 prints one JSON line: tok/s per GPU (each rank trains MICROBATCH sequences), peak GPU memory.
import json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".anchors"))
import torch, torch.distributed as dist
from anchor_torch import GPT, CFG

def main(engine, spec, T=1024, V=50304, steps=5, warm=2):
    name, B = spec.split(":"); B = int(B); L, d, h = CFG[name]
    local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
    world = int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        with torch.device("meta"):
            m = GPT(V, T, L, d, h)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for b in m.blocks: fully_shard(b, mp_policy=mp)
        fully_shard(m, mp_policy=mp)
        m.to_empty(device="cuda")
        for mod in m.modules():
            if hasattr(mod, "reset_parameters"): mod.reset_parameters()
        N = sum(p.numel() for p in m.parameters()) * 1  # DTensor numel is the global size
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        def step(x, y):
            loss = m(x, y); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step(); opt.zero_grad(set_to_none=True); return loss
    else:
        import deepspeed
        deepspeed.init_distributed("nccl")
        cfg = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
               "gradient_clipping": 1.0, "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "steps_per_print": 10**9}
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            m = GPT(V, T, L, d, h)
        N = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in m.parameters())
        eng, _, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
        def step(x, y):
            loss = eng(x, y); eng.backward(loss); eng.step(); return loss
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device="cuda").manual_seed(1 + dist.get_rank())
    x = torch.randint(0, V, (B, T), device="cuda", generator=g); y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    times = []
    for i in range(warm + steps):
        torch.cuda.synchronize(); dist.barrier(); t0 = time.perf_counter()
        loss = step(x, y)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
    dt = sorted(times[warm:])[len(times[warm:]) // 2]
    tok = B * T / dt; fl = 6 * N + 12 * L * d * T
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda"); dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(json.dumps(dict(engine="fsdp2" if engine == "fsdp" else "deepspeed-zero3", model=name, params=N, B=B, world=world,
            step_ms=round(dt * 1e3, 1), tok_s_per_gpu=round(tok), mfu_989=round(tok * fl / 989e12, 3),
            peak_gib=round(peak.item(), 2), loss=round(loss.item(), 3))), flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
